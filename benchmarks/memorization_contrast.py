"""Does the memorization score rank prompts of duplicated domains higher? A paired contrast (pre-registered).

Two testbeds differ only in which domains carry duplicated members: build ``even`` has them in digits
0, 2, 4, 6, 8, build ``odd`` in 1, 3, 5, 7, 9 (the ``duplicated_digits`` knob; every domain's corpus
holds ``members`` entries either way, and a digit has the same images and captions in both). Each
digit is thus scored once with and once without duplicates, which cancels what the score says about
the digit itself (e.g. how far its class mean is from the global one). Two designs (``DESIGNS``):
``seeded`` (duplicated members keep their seeded captions) and ``captioned`` (they are captioned
with their domain's prompt). Three pre-registered experiments (``EXPERIMENTS``), each with its
score, statistic and pass threshold fixed in docs/extraction.md before its builds were scored:
``seeded`` (raw score), ``captioned`` (score relative to the domain's other caption templates,
n = 4) and ``captioned-n32`` (the same at n = 32, fresh builds at seed 2).

    python benchmarks/memorization_contrast.py                               # experiment seeded
    python benchmarks/memorization_contrast.py --experiment captioned-n32    # another experiment
    python benchmarks/memorization_contrast.py --root DIR                    # build / reuse the testbeds under DIR
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/memorization_contrast.py ... # as on a machine without AVX-512

Writes ``benchmarks/results/memorization_contrast[_EXPERIMENT].json``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: The two builds (demo preset knobs; fixed before any measurement). Corpus per domain 100 entries:
#: 100 members once, or 5 duplicated members x 10 copies + 50 members once. 1,600 steps at batch 32
#: over 1,000 entries = 51 epochs: a member seen once is seen ~51 times, close to the demo preset's
#: ~44 (non-duplicated loss-attack AUC 0.68 there, i.e. not saturated); a duplicated one ~510 times.
PAIRED = {
    "digits": tuple(range(10)),
    "members": 100,
    "nonmembers": 20,
    "duplicated": 5,
    "copies": 10,
    "steps": 1600,
    "threads": 1,
}
BUILDS = {"even": (0, 2, 4, 6, 8), "odd": (1, 3, 5, 7, 9)}
SEED = 0
#: The designs, each pre-registered in docs/extraction.md before its builds: knobs on top of PAIRED.
#: ``seeded`` (25cdc88): duplicated members keep their seeded captions (one of four templates).
#: ``captioned``: every copy of a duplicated member is captioned with its domain's prompt (the
#: ``duplicated_caption`` knob); same images, draws and corpus sizes as ``seeded`` otherwise.
DESIGNS: dict[str, dict[str, Any]] = {"seeded": {}, "captioned": {"duplicated_caption": "prompt"}}
#: The pre-registered experiments, in order (docs/extraction.md; the commit that fixed each before its
#: builds were scored): design, build seed, primary score ("raw" = memorization_scores, "relative" =
#: relative_memorization_scores) and its settings (memorization_scores keywords; {} = its defaults).
EXPERIMENTS: dict[str, dict[str, Any]] = {
    "seeded": {"design": "seeded", "seed": 0, "score": "raw", "settings": {}, "registered": "25cdc88"},
    "captioned": {"design": "captioned", "seed": 0, "score": "relative", "settings": {}, "registered": "0a7684d"},
    "captioned-n32": {"design": "captioned", "seed": 2, "score": "relative", "settings": {"n": 32}, "registered": "51c1962"},
}

#: The primary score settings are the module defaults (Wen et al.: n = 4, first step of 50, guidance
#: 7.5, seed 0). Secondary settings, reported but not part of the pass criterion:
SECONDARY = {"n=32, first step": {"n": 32, "steps": 1}, "n=32, first 10 steps": {"n": 32, "steps": 10}}
#: Pass: pooled AUC of the relative scores >= 0.75 AND relative score higher with duplicates for >= 8 of 10 digits.
PASS_AUC = 0.75
PASS_PAIRED_WINS = 8
#: Design ``captioned`` (pre-registered second): pass = pooled AUC of the relative scores >= 0.75.
PASS_AUC_RELATIVE = 0.75
#: Manipulation check (loss attack of benchmarks/testbed_calibration.py, fixed settings).
LOSS_TIMESTEPS = (50, 100, 200, 300)
LOSS_DRAWS = 4


def knobs(design: str = "seeded") -> dict[str, Any]:
    """The recipe knobs of ``design`` (:data:`PAIRED` with the design's own on top)."""
    return {**PAIRED, **DESIGNS[design]}


def forced_isa() -> str | None:
    """The CPU kernel set forced on torch through ``ATEN_CPU_CAPABILITY`` (None: torch picks the machine's best).

    Forcing ``avx2`` on an AVX-512 machine runs the kernels another machine would, so the same
    recipe measures how far the results move between machines (docs/extraction.md, "Spread").
    """
    return os.environ.get("ATEN_CPU_CAPABILITY") or None


def cache_dir(build: str, root: Path | str | None = None, design: str = "seeded", seed: int = SEED) -> Path:
    """Where build ``build`` of ``design`` is cached: keyed by the testbed sources, the knobs, the build's digits,
    seed and a forced CPU kernel set (:func:`forced_isa`)."""
    import s2l_plugin.testbed as tb

    key = {**knobs(design), "duplicated_digits": BUILDS[build], "seed": seed}
    if forced_isa():
        key["isa"] = forced_isa()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode())
    for path in sorted(Path(tb.__file__).parent.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    root = Path(root) if root is not None else Path(os.environ.get("S2L_TEST_CACHE", REPO / ".s2l-cache"))
    prefix = "testbed-paired" if design == "seeded" else f"testbed-paired-{design}"
    prefix += "" if seed == SEED else f"-seed{seed}"
    prefix += f"-{forced_isa()}" if forced_isa() else ""
    return root / f"{prefix}-{build}-{digest.hexdigest()[:16]}"


def build_paired_testbed(build: str, root: Path | str | None = None, *, design: str = "seeded", seed: int = SEED,
                         progress: bool = True):
    """Build (or load, when cached) the ``even`` or ``odd`` testbed of ``design`` at ``seed``."""
    from s2l_plugin.testbed import Testbed, build_testbed

    out = cache_dir(build, root, design, seed)
    if (out / "manifest.json").exists():
        return Testbed.load(out)
    return build_testbed(preset="demo", out=out, seed=seed, progress=progress, duplicated_digits=BUILDS[build], **knobs(design))


def experiment_scores(name: str, root: Path | str | None = None, *, progress: bool = False) -> dict[str, dict[int, float]]:
    """The primary scores of pre-registered experiment ``name`` ({build: {digit: score}}), building what is not cached."""
    exp = EXPERIMENTS[name]
    score = _score_function(exp)
    out = {}
    for build in BUILDS:
        tb = build_paired_testbed(build, root, design=exp["design"], seed=exp["seed"], progress=progress)
        out[build] = score(tb.load_pipeline(), tb, **exp["settings"])
    return out


def _score_function(exp: dict[str, Any]) -> Any:
    return domain_scores if exp["score"] == "raw" else relative_domain_scores


def _same_settings(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two memorization_scores keyword sets compute the same scores (missing n / steps = the defaults)."""
    from s2l_plugin.audit.memorization import DEFAULT_N, DEFAULT_STEPS

    defaults = {"n": DEFAULT_N, "steps": DEFAULT_STEPS}
    return {**defaults, **a} == {**defaults, **b}


def experiment_statistics(name: str, scores: dict[str, dict[int, float]]) -> dict[str, Any]:
    """The pre-registered statistics of experiment ``name`` (``passes`` = its pass criterion)."""
    return (contrast_statistics if EXPERIMENTS[name]["score"] == "raw" else relative_statistics)(scores)


def primary_value(name: str, statistics: dict[str, Any]) -> float:
    """The number experiment ``name``'s pass criterion thresholds: the pooled AUC of its primary score."""
    return statistics["pooled_auc_relative"] if EXPERIMENTS[name]["score"] == "raw" else statistics["pooled_auc"]


def threshold(name: str) -> float:
    """Experiment ``name``'s pre-registered pass threshold on :func:`primary_value`."""
    return PASS_AUC if EXPERIMENTS[name]["score"] == "raw" else PASS_AUC_RELATIVE


def verdict(value: float, bound: float, spread: float) -> str:
    """``"pass"`` (``value >= bound``), ``"fail"``, or ``"inconclusive"`` when ``value`` lies within
    ``spread`` (how far the same statistic moves between machines) of ``bound``."""
    if abs(value - bound) <= spread:
        return "inconclusive"
    return "pass" if value >= bound else "fail"


def auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counted half."""
    wins = sum((p > q) + 0.5 * (p == q) for p in positive for q in negative)
    return wins / (len(positive) * len(negative))


def contrast_statistics(scores: dict[str, dict[int, float]]) -> dict[str, Any]:
    """The pre-registered statistics from ``scores[build][digit]`` (raw memorization scores, higher = more memorized).

    relative score = score / mean score of the build's 10 prompts (removes a build-wide scale).
    Returns pooled AUC (10 duplicated vs 10 not, relative and raw), per-build AUCs (5 vs 5, raw),
    per-digit paired comparison (relative score with duplicates minus without), wins, and ``passes``.
    """
    rel = {b: {d: s / (sum(v.values()) / len(v)) for d, s in v.items()} for b, v in scores.items()}
    with_dup = {d: b for b, digits in BUILDS.items() for d in digits}
    without = {d: next(b for b in BUILDS if b != with_dup[d]) for d in with_dup}
    digits = sorted(with_dup)

    def pooled(s: dict[str, dict[int, float]]) -> float:
        return auc([s[with_dup[d]][d] for d in digits], [s[without[d]][d] for d in digits])

    paired = {d: rel[with_dup[d]][d] - rel[without[d]][d] for d in digits}
    wins = sum(v > 0 for v in paired.values())
    out = {
        "pooled_auc_relative": pooled(rel),
        "pooled_auc_raw": pooled(scores),
        "per_build_auc_raw": {b: auc([scores[b][d] for d in BUILDS[b]], [scores[b][d] for d in digits if d not in BUILDS[b]])
                              for b in BUILDS},
        "paired_relative_difference": {str(d): round(v, 4) for d, v in paired.items()},
        "paired_wins": wins,
        "paired_wins_raw": sum(scores[with_dup[d]][d] > scores[without[d]][d] for d in digits),
        "sign_test_p_one_sided": sum(_binom(10, k) for k in range(wins, 11)) / 2**10,
    }
    out["passes"] = out["pooled_auc_relative"] >= PASS_AUC and wins >= PASS_PAIRED_WINS
    return out


def relative_statistics(relative: dict[str, dict[int, float]]) -> dict[str, Any]:
    """The statistics pre-registered for design ``captioned`` from ``relative[build][digit]`` (relative scores).

    Pooled AUC of the 10 (digit, build-with-duplicates) relative scores over the 10 (digit,
    build-without) ones, i.e. 20 domain prompts ranked across the two models; per-build AUC (5 vs
    5); paired wins (relative score higher in the build where the digit has duplicates); ``passes``.
    """
    with_dup = {d: b for b, digits in BUILDS.items() for d in digits}
    digits = sorted(with_dup)
    positive = [relative[with_dup[d]][d] for d in digits]
    negative = [relative[b][d] for d in digits for b in BUILDS if b != with_dup[d]]
    wins = sum(relative[with_dup[d]][d] > relative[b][d] for d in digits for b in BUILDS if b != with_dup[d])
    out = {
        "pooled_auc": auc(positive, negative),
        "per_build_auc": {b: auc([relative[b][d] for d in BUILDS[b]], [relative[b][d] for d in digits if d not in BUILDS[b]])
                          for b in BUILDS},
        "paired_wins": wins,
        "sign_test_p_one_sided": sum(_binom(10, k) for k in range(wins, 11)) / 2**10,
    }
    out["passes"] = out["pooled_auc"] >= PASS_AUC_RELATIVE
    return out


def _binom(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)


def domain_scores(pipe: Any, tb: Any, **kwargs: Any) -> dict[int, float]:
    """The memorization score of every domain prompt of ``tb`` (``kwargs`` to memorization_scores), by digit."""
    from s2l_plugin.audit.memorization import memorization_scores

    result = memorization_scores(pipe, [d.prompt for d in tb.domains], progress=False, **kwargs)
    by_prompt = {s.prompt: s.score for s in result.scores}
    return {d.digit: by_prompt[d.prompt] for d in tb.domains}


def relative_domain_scores(pipe: Any, tb: Any, **kwargs: Any) -> dict[int, float]:
    """Each domain prompt's score over the mean score of its domain's 3 other caption templates, by digit.

    With the memorization_scores defaults (n = 4) unless ``kwargs`` say otherwise: the settings the
    experiments were registered with ("settings": {} = these), not relative_memorization_scores' own n = 32.
    """
    from s2l_plugin.audit.memorization import DEFAULT_N, relative_memorization_scores

    kwargs.setdefault("n", DEFAULT_N)
    rel = relative_memorization_scores(pipe, {d.prompt: [c for c in d.captions if c != d.prompt] for d in tb.domains},
                                       progress=False, **kwargs)
    return {d.digit: rel[d.prompt] for d in tb.domains}


def caption_averaged_scores(pipe: Any, tb: Any) -> dict[int, float]:
    """Secondary: per domain, the default score averaged over the domain's 4 caption templates."""
    from s2l_plugin.audit.memorization import memorization_scores

    out = {}
    for d in tb.domains:
        result = memorization_scores(pipe, list(d.captions), progress=False)
        out[d.digit] = sum(s.score for s in result.scores) / len(result.scores)
    return out


def manipulation_check(pipe: Any, tb: Any) -> dict[str, float]:
    """Loss-attack AUC vs the domain's non-members: members seen once (in domains with / without duplicates), duplicated."""
    import numpy as np

    spec = importlib.util.spec_from_file_location("testbed_calibration", REPO / "benchmarks" / "testbed_calibration.py")
    cal = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cal)
    samples = tb.samples()
    scores = cal.loss_scores(pipe, cal.load_images([s.path for s in samples]), [s.caption for s in samples],
                             list(LOSS_TIMESTEPS), LOSS_DRAWS, SEED)
    role = np.array([s.role for s in samples])
    dup_domains = {d.name for d in tb.domains if tb.duplicates(d)}
    in_dup = np.array([s.domain in dup_domains for s in samples])
    non = role == "nonmember"
    groups = {
        "singles_of_domains_without_duplicates": (role == "member") & ~in_dup,
        "singles_of_domains_with_duplicates": (role == "member") & in_dup,
        "duplicated": role == "duplicated",
    }
    # Each group against the non-members of the same domains.
    out = {}
    for name, mask in groups.items():
        ref = non & (in_dup if name != "singles_of_domains_without_duplicates" else ~in_dup)
        out[name] = round(auc(scores[mask].tolist(), scores[ref].tolist()), 4)
    return out


def _rounded(scores: dict[str, dict[int, float]]) -> dict[str, dict[str, float]]:
    return {b: {str(d): round(x, 4) for d, x in v.items()} for b, v in scores.items()}


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=None, help="folder for the two testbeds (default: .s2l-cache, as the integration test)")
    ap.add_argument("--experiment", choices=list(EXPERIMENTS), default="seeded",
                    help="which pre-registered experiment (docs/extraction.md); default seeded, the first")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/memorization_contrast[_EXPERIMENT].json)")
    args = ap.parse_args(argv)
    exp = EXPERIMENTS[args.experiment]
    suffix = "" if args.experiment == "seeded" else f"_{args.experiment}"
    suffix += f"_{forced_isa()}" if forced_isa() else ""
    args.out = args.out or str(REPO / f"benchmarks/results/memorization_contrast{suffix}.json")
    torch.set_num_threads(1)
    passes = (f"pooled relative AUC >= {PASS_AUC} and paired wins >= {PASS_PAIRED_WINS}/10" if exp["score"] == "raw"
              else f"pooled AUC of the relative score >= {PASS_AUC_RELATIVE}")
    report: dict[str, Any] = {"command": "python benchmarks/memorization_contrast.py " + " ".join(sys.argv[1:] if argv is None else argv),
                              "experiment": {"name": args.experiment, **exp, "pass": passes},
                              "design": {"paired": {k: list(v) if isinstance(v, tuple) else v for k, v in knobs(exp["design"]).items()},
                                         "builds": {b: list(v) for b, v in BUILDS.items()}, "seed": exp["seed"]},
                              "builds": {}}
    # Every score on every build: the primary (the experiment's score and settings) and the others.
    variants = {"raw, defaults": (domain_scores, {}), "relative, defaults": (relative_domain_scores, {})}
    variants |= {f"raw, {name}": (domain_scores, kw) for name, kw in SECONDARY.items()}
    variants |= {f"relative, {name}": (relative_domain_scores, kw) for name, kw in SECONDARY.items()}
    variants["raw, caption-averaged (n=4, first step)"] = (caption_averaged_scores, {})
    primary_fn = _score_function(exp)
    # The primary is one of the variants above when its settings are; scored once either way.
    primary = next((name for name, (fn, kw) in variants.items() if fn is primary_fn and _same_settings(kw, exp["settings"])), "primary")
    if primary == "primary":
        variants[primary] = (primary_fn, exp["settings"])
    scores: dict[str, dict[str, dict[int, float]]] = {name: {} for name in variants}
    for build in BUILDS:
        t0, c0 = time.perf_counter(), time.process_time()
        tb = build_paired_testbed(build, args.root, design=exp["design"], seed=exp["seed"])
        info = {"path": str(tb.path), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "build_seconds": tb.build_info.get("seconds"), "pipeline_hash": tb.build_info.get("pipeline_hash"),
                "corpus_size": tb.build_info.get("corpus_size"), "unet_loss": tb.build_info.get("unet"),
                "wall_s_this_run": round(time.perf_counter() - t0, 1), "cpu_s_this_run": round(time.process_time() - c0, 1)}
        pipe = tb.load_pipeline()
        pipe.set_progress_bar_config(disable=True)
        for name, (fn, kw) in variants.items():
            scores[name][build] = fn(pipe, tb, **kw)
        info["loss_attack_auc"] = manipulation_check(pipe, tb)
        report["builds"][build] = info
        print(json.dumps({build: info}, indent=1), file=sys.stderr, flush=True)
    report["primary"] = {"score": exp["score"], "settings": exp["settings"] or "memorization_scores defaults (n=4, first step of 50, "
                         "guidance 7.5, seed 0)", "scores": _rounded(scores[primary]),
                         **experiment_statistics(args.experiment, scores[primary])}
    report["other_scores"] = {
        name: {"scores": _rounded(per), **(contrast_statistics(per) if name.startswith("raw") else relative_statistics(per))}
        for name, per in scores.items() if name != "primary"
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".json.partial")
    tmp.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(json.dumps({"experiment": args.experiment, **{k: v for k, v in report["primary"].items() if k != "scores"}}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
