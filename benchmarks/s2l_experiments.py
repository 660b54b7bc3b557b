"""The S2L experiment grid behind docs/results.md: replication across domains and seeds, and the ablation.

    python benchmarks/s2l_experiments.py replicate [--domains zero,one,...] [--seeds 0,1,2] [--methods dreambooth,lora]
    python benchmarks/s2l_experiments.py ablate [--sizes 100,500,1000] [--steps 50,150,400]
    python benchmarks/s2l_experiments.py tables        # only re-collect the JSON files into markdown tables
    python benchmarks/s2l_experiments.py demo-table --result s2l-demo/result.json

Every cell is one ``s2l run`` of the shipped demo config (``s2l_plugin/configs/demo.toml``) with
``--set`` overrides, in its own run folder under ``--work`` (resumable: a rerun skips finished
cells and stages). The settings were pre-registered in docs/results.md ("Protocol") before any
outcome was seen. Results go to ``benchmarks/results/s2l_<grid>.json`` (one record per cell,
every comparison of every attack and member subset) and ``benchmarks/results/s2l_<grid>.md``.

Primary endpoint: ΔAUC (after − before) of the loss attack, non-duplicated members vs
non-members, with the paired bootstrap 95% interval of ``s2l_plugin.audit.compare``. Pooled over
runs: the mean Δ with a 95% bootstrap interval over runs (10,000 resamples, seed 0) and the count
of positive / negative Δ.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEMO = HERE.parent / "s2l_plugin" / "configs" / "demo.toml"
DOMAINS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: the pre-registered ablation learning rate and attacks (docs/results.md, Protocol)
ABLATION_METHOD = "dreambooth"


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _share_stages(donors: list[Path], out: Path) -> None:
    """Offer ``out`` the finished stages of earlier run folders ``donors`` (generate, audits, training).

    Only a record is copied, never trusted: the stage store reruns any stage whose key (a hash of
    all its inputs: base, domain, seed, attacks, generation options) differs, so a shared base
    audit is used only where it is exactly the one this cell would compute.
    """
    from s2l_plugin.stages import STAGES_FILE

    path = out / STAGES_FILE
    mine = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    before = dict(mine)
    for donor in reversed(donors):  # the latest donor first: in a size-major grid it has this cell's set
        dpath = donor / STAGES_FILE
        if not dpath.exists():
            continue
        for name, rec in json.loads(dpath.read_text(encoding="utf-8")).items():
            mine.setdefault(name, rec)
    if mine != before:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1), encoding="utf-8")


def run_cell(out: Path, overrides: list[str], donors: list[Path] = ()) -> dict[str, Any]:
    """Run (or resume) one ``s2l run`` of the demo config with ``overrides``; its comparisons as dicts."""
    from s2l_plugin.result import load_result
    from s2l_plugin.run import run_experiment
    from s2l_plugin.runconfig import load_run_config

    config = load_run_config(DEMO, [*overrides, f'out="{out}"', 'report=["html", "markdown"]'])
    _share_stages(list(donors), out)
    t0, c0 = time.time(), _cpu_seconds()
    path = run_experiment(config)
    result = load_result(path)
    return {
        "overrides": overrides,
        "result": str(path),
        "wall_s": round(time.time() - t0, 1),
        "cpu_s": round(_cpu_seconds() - c0, 1),
        "comparisons": [
            {k: getattr(c, k) for k in (
                "method", "attack", "subset", "auc_before", "auc_after", "delta_auc", "delta_auc_ci",
                "tpr_at_1fpr_before", "tpr_at_1fpr_after", "extracted_before", "extracted_after", "n_generations",
            )}
            for c in result.comparisons
        ],
    }


def _save(grid: str, records: list[dict[str, Any]]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"s2l_{grid}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _load(grid: str) -> list[dict[str, Any]]:
    """Every record of ``grid``: ``s2l_<grid>.json`` and the parts other workers wrote (``s2l_<grid>-<part>.json``)."""
    records: list[dict[str, Any]] = []
    for path in sorted(RESULTS.glob(f"s2l_{grid}.json")) + sorted(RESULTS.glob(f"s2l_{grid}-*.json")):
        for r in json.loads(path.read_text(encoding="utf-8")):
            # one record per cell: a cell rerun from its finished stages gives the same comparisons
            if all(r["cell"] != q["cell"] for q in records):
                records.append(r)
    return records


def _find(records: list[dict[str, Any]], cell: dict[str, Any]) -> dict[str, Any] | None:
    for r in records:
        if r["cell"] == cell:
            return r
    return None


def replicate(args: argparse.Namespace) -> None:
    """dreambooth and lora (by default) on each domain × seed, the demo's settings otherwise."""
    grid = f"replication-{args.part}" if args.part else "replication"
    records = _load("replication")
    mine: list[dict[str, Any]] = _load(grid) if args.part else records
    for seed in args.seeds:  # seed-major: every domain at seed 0 first, then seed 1, ...
        for domain in args.domains:
            cell = {"domain": domain, "seed": seed}
            if _find(records, cell):
                continue
            overrides = [f'domains=["{domain}"]', f"seed={seed}",
                         "methods=[" + ", ".join(f'"{m}"' for m in args.methods) + "]", *args.set]
            rec = run_cell(Path(args.work) / "replication" / f"{domain}-s{seed}", overrides, [Path(d) for d in args.donor])
            records.append({"cell": cell, **rec})
            if mine is not records:
                mine.append({"cell": cell, **rec})
            _save(grid, mine)
            print(f"replication {cell}: {rec['wall_s']} s wall, {rec['cpu_s']} s CPU", flush=True)
    tables()


def ablate(args: argparse.Namespace) -> None:
    """ABLATION_METHOD on domain seven, seed 0: synthetic-set size × fine-tuning steps."""
    records = _load("ablation")
    for size in args.sizes:
        for steps in args.steps:
            cell = {"num_images": size, "max_train_steps": steps}
            if _find(records, cell):
                continue
            overrides = [f'methods=["{ABLATION_METHOD}"]', f"generate.num_images={size}",
                         f"train.max_train_steps={steps}", *args.set]
            # same domain, seed and attacks in every cell: one base audit (and one set per size) serves all
            donors = [Path(d) for d in args.donor] + [Path(r["result"]).parent for r in records]
            rec = run_cell(Path(args.work) / "ablation" / f"P{size}-steps{steps}", overrides, donors)
            records.append({"cell": cell, **rec})
            _save("ablation", records)
            print(f"ablation {cell}: {rec['wall_s']} s wall, {rec['cpu_s']} s CPU", flush=True)
    tables()


# -- decide (issue #21): guidance 3.0 vs a fresh-real-data control --------------------------------------

#: Pre-registered in docs/results.md section 6 (committed before any run).
DECIDE_K = 40  # images in each arm's fine-tuning set (synthetic or real control)
DECIDE_EXTRACTION = 256  # extraction generations, before and after
DECIDE_ATTACKS = ("loss", "pia", "pian")
DECIDE_METHODS = ("dreambooth", "lora")
#: arm -> the synthetic set's guidance (None: the real-image control set)
DECIDE_ARMS = {"S": 3.0, "C": None, "S7.5": 7.5}


def decide_split(domain: str, base: str | Path | None = None) -> dict[str, Any]:
    """The pre-registered use of a domain's unused images (neither member nor non-member of the shipped
    demo testbed): sorted by ``load_digits`` index, permuted by ``default_rng([0, 1000 + digit])``; the first
    :data:`DECIDE_K` are the control set, the rest extra non-members with a caption drawn uniformly from
    the domain's templates (same generator, after the permutation). ``base``: another testbed folder
    (default: the shipped one)."""
    import numpy as np

    from s2l_plugin.testbed import Testbed
    from s2l_plugin.testbed.corpus import _digits, make_domain

    tb = Testbed.load(None if base is None else Path(base))
    dom = tb.domain(domain)
    digit = make_domain(DOMAINS.index(domain)).digit
    used = {s.source_index for s in tb.members(domain)} | {s.source_index for s in tb.nonmembers(domain)}
    _, target = _digits()
    unused = sorted(int(i) for i in np.flatnonzero(target == digit) if int(i) not in used)
    rng = np.random.default_rng([0, 1000 + digit])
    order = [unused[i] for i in rng.permutation(len(unused))]
    control, extra = order[:DECIDE_K], order[DECIDE_K:]
    captions = rng.integers(0, len(dom.captions), size=len(extra))
    return {"unused": len(unused), "control": control, "extra": extra,
            "extra_captions": [dom.captions[int(c)] for c in captions]}


def _write_decide_data(root: Path, domain: str, base: str | Path | None = None) -> dict[str, Any]:
    """The control set and the extra non-members of ``domain`` as image folders under ``root`` (idempotent)."""
    from PIL import Image

    from s2l_plugin.testbed.corpus import digit_image

    split = decide_split(domain, base)
    for kind, indices, captions in (("control", split["control"], None), ("extra", split["extra"], split["extra_captions"])):
        folder = root / kind / domain
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for k, index in enumerate(indices):
            name = f"{domain}_{index:04d}.png"
            if not (folder / name).exists():
                Image.fromarray(digit_image(index)).save(folder / name, format="PNG")
            if captions is not None:
                rows.append(json.dumps({"file_name": name, "text": captions[k]}))
        if rows:
            (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return split


def _extraction_hits(audit: Any, groups: dict[str, set[int]]) -> dict[str, int]:
    """Unique images of each group with at least one extracted generation (a generation counts for its nearest image)."""
    hit: dict[str, set[int]] = {g: set() for g in groups}
    ex = audit.extraction
    for m in ex.matches if ex is not None else []:
        if not m.extracted or not m.reference_id:
            continue
        index = int(Path(m.reference_id).stem.rsplit("_", 1)[1])
        for g, members in groups.items():
            if index in members:
                hit[g].add(index)
    return {g: len(v) for g, v in hit.items()}


def decide(args: argparse.Namespace) -> None:
    """Issue #21: per domain, arms S (guidance 3.0) and C (real control), then S7.5; dreambooth and lora."""
    from s2l_plugin.result import load_result
    from s2l_plugin.testbed import Testbed

    tb = Testbed.load(Path(args.base) if args.base else None)
    grid = args.grid_name
    work = Path(args.work) / grid
    records = _load(grid)
    mine: list[dict[str, Any]] = [r for r in records if r.get("part", "") == args.part] if args.part else records
    arms = [a for a in args.arms if a in DECIDE_ARMS]
    # domain-major for S and C (the registered order), then the optional S7.5 over all domains
    order = [(d, a) for d in args.domains for a in arms if a != "S7.5"] + [(d, "S7.5") for d in args.domains if "S7.5" in arms]
    for domain, arm in order:
        cell = {"domain": domain, "arm": arm}
        if _find(records, cell):
            continue
        split = _write_decide_data(work / "data", domain, args.base or None)
        overrides = [*([f'base="{Path(args.base).resolve()}"'] if args.base else []), f'domains=["{domain}"]', "seed=0", "methods=[" + ", ".join(f'"{m}"' for m in DECIDE_METHODS) + "]",
                     f"generate.num_images={DECIDE_K}", f"generate.batch_size={DECIDE_K}",
                     "audit.attacks=[" + ", ".join(f'"{a}"' for a in DECIDE_ATTACKS) + "]",
                     f"audit.extraction={DECIDE_EXTRACTION}", 'audit.extraction_references="all"', "audit.memorization=false",
                     f'data.extra_nonmembers="{(work / "data" / "extra").resolve()}/{{domain}}"', *args.set]
        if DECIDE_ARMS[arm] is None:
            overrides.append(f'data.private_set="{(work / "data" / "control").resolve()}/{{domain}}"')
        else:
            overrides.append(f"generate.guidance_scale={DECIDE_ARMS[arm]}")
        donors = [work / f"{domain}-{a}" for a in DECIDE_ARMS if a != arm]
        rec = run_cell(work / f"{domain}-{arm}", overrides, donors)
        result = load_result(rec["result"])
        groups = {
            "duplicated": {s.source_index for s in tb.members(domain) if s.role == "duplicated"},
            "non-duplicated": {s.source_index for s in tb.members(domain) if s.role != "duplicated"},
            "non-members": {s.source_index for s in tb.nonmembers(domain)} | set(split["extra"]),
        }
        hits = {}
        for audit in result.audits:
            label = "base" if audit.model.label.startswith("base") else audit.model.label
            hits[label] = _extraction_hits(audit, groups)
        n_non = next(a.membership.n_nonmembers for a in result.audits if a.membership is not None)
        row = {"cell": cell, **rec, "hits": hits, "n_nonmembers": n_non, "n_extra_nonmembers": len(split["extra"]),
               "n_unused": split["unused"], **({"part": args.part} if args.part else {})}
        records.append(row)
        if mine is not records:
            mine.append(row)
        _save(f"{grid}-{args.part}" if args.part else grid, mine)
        print(f"decide {cell}: {rec['wall_s']} s wall, {rec['cpu_s']} s CPU", flush=True)
    decide_tables(grid)


# -- tables -------------------------------------------------------------------------------------------


def _fmt_ci(c: dict[str, Any]) -> str:
    lo, hi = c["delta_auc_ci"]
    return f"{c['delta_auc']:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _pooled(deltas: list[float], seed: int = 0, n: int = 10_000) -> tuple[float, float, float]:
    """Mean of ``deltas`` with a percentile-bootstrap 95% interval over runs."""
    rng = random.Random(seed)
    k = len(deltas)
    means = sorted(sum(rng.choice(deltas) for _ in range(k)) / k for _ in range(n))
    return sum(deltas) / k, means[int(0.025 * n)], means[int(0.975 * n) - 1]


def _pick(rec: dict[str, Any], method: str, attack: str, subset: str) -> dict[str, Any] | None:
    for c in rec["comparisons"]:
        if c["method"] == method and c["attack"] == attack and c["subset"] == subset:
            return c
    return None


def tables() -> None:
    """Write benchmarks/results/s2l_replication.md and s2l_ablation.md from the JSON records."""
    rep = _load("replication")
    lines = ["# S2L replication across domains and seeds (demo settings)", ""]
    methods = sorted({c["method"] for r in rep for c in r["comparisons"]})
    for method in methods:
        for attack in ("loss", "pia", "secmi"):
            rows = [(r, _pick(r, method, attack, "non-duplicated"), _pick(r, method, attack, "all"),
                     _pick(r, method, attack, "duplicated")) for r in rep]
            rows = [x for x in rows if x[1] is not None]
            if not rows:
                continue
            lines += [f"## {method}, {attack} attack", "",
                      "| domain | seed | non-dup. before → after | non-dup. Δ [95% CI] | all Δ [95% CI] | dup. before → after | extracted before → after (of N gens) |",
                      "|---|---|---|---|---|---|---|"]
            for r, nd, al, du in rows:
                dup = f"{du['auc_before']:.3f} → {du['auc_after']:.3f}" if du else "–"
                ext = (f"{nd['extracted_before']} → {nd['extracted_after']} (of {nd['n_generations']})"
                       if nd.get("n_generations") else "–")
                lines.append(f"| {r['cell']['domain']} | {r['cell']['seed']} | {nd['auc_before']:.3f} → {nd['auc_after']:.3f} | "
                             f"{_fmt_ci(nd)} | {_fmt_ci(al) if al else '–'} | {dup} | {ext} |")
            for subset in ("non-duplicated", "all"):
                ds = [c["delta_auc"] for r in rep if (c := _pick(r, method, attack, subset))]
                cis = [c["delta_auc_ci"] for r in rep if (c := _pick(r, method, attack, subset))]
                mean, lo, hi = _pooled(ds)
                pos = sum(d > 0 for d in ds)
                above = sum(ci[0] > 0 for ci in cis)
                below = sum(ci[1] < 0 for ci in cis)
                lines.append("")
                lines.append(f"Pooled over {len(ds)} runs, {subset}: mean Δ {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] "
                             f"(bootstrap over runs); {pos} positive / {len(ds) - pos} not; "
                             f"intervals entirely above 0: {above}, entirely below 0: {below}.")
            extra = [(c["extracted_before"], c["extracted_after"]) for r in rep
                     if (c := _pick(r, method, attack, "all")) and c.get("n_generations")]
            if extra:
                more = sum(a > b for b, a in extra)
                fewer = sum(a < b for b, a in extra)
                lines.append(f"Extraction: more unique members after in {more} runs, fewer in {fewer}, "
                             f"equal in {len(extra) - more - fewer}; totals {sum(b for b, _ in extra)} → {sum(a for _, a in extra)}.")
            lines.append("")
    (RESULTS / "s2l_replication.md").write_text("\n".join(lines) + "\n", encoding="utf-8")

    abl = _load("ablation")
    lines = [f"# S2L ablation: {ABLATION_METHOD}, domain seven, seed 0", "",
             "| synthetic set | steps | loss non-dup. Δ [95% CI] | loss all Δ [95% CI] | pia non-dup. Δ [95% CI] | extracted before → after | CPU s |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(abl, key=lambda r: (r["cell"]["num_images"], r["cell"]["max_train_steps"])):
        nd = _pick(r, ABLATION_METHOD, "loss", "non-duplicated")
        al = _pick(r, ABLATION_METHOD, "loss", "all")
        pia = _pick(r, ABLATION_METHOD, "pia", "non-duplicated")
        ext = f"{al['extracted_before']} → {al['extracted_after']} (of {al['n_generations']})" if al and al.get("n_generations") else "–"
        lines.append(f"| {r['cell']['num_images']} | {r['cell']['max_train_steps']} | {_fmt_ci(nd) if nd else '–'} | "
                     f"{_fmt_ci(al) if al else '–'} | {_fmt_ci(pia) if pia else '–'} | {ext} | {r['cpu_s']} |")
    (RESULTS / "s2l_ablation.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _pooled_domains(deltas: list[float]) -> tuple[float, float, float]:
    """Mean over domains with the pre-registered domain-clustered bootstrap (domains resampled, 10,000, seed 0)."""
    return _pooled(deltas, seed=0, n=10_000)


def _ci(mean_lo_hi: tuple[float, float, float]) -> str:
    m, lo, hi = mean_lo_hi
    return f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def _members_hit(h: dict[str, int]) -> int:
    return h["non-duplicated"] + h["duplicated"]


def decide_summary(recs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Per method and arm: the pooled endpoints and the pre-registered verdict (docs/results.md section 6)."""
    from s2l_plugin.audit.metrics import fpr_resolvable

    recs = _load("decide") if recs is None else recs
    by = {(r["cell"]["domain"], r["cell"]["arm"]): r for r in recs}
    out: dict[str, Any] = {"methods": {}, "n_nonmembers": {}, "tpr_at_1fpr_resolvable": {}}
    for r in recs:
        out["n_nonmembers"][r["cell"]["domain"]] = r["n_nonmembers"]
        out["tpr_at_1fpr_resolvable"][r["cell"]["domain"]] = fpr_resolvable(0.01, r["n_nonmembers"])
    done = [d for d in DOMAINS if (d, "S") in by and (d, "C") in by]
    out["domains_done"] = done
    out["missing"] = [f"{d}/{a}" for d in DOMAINS for a in ("S", "C") if (d, a) not in by]
    for method in DECIDE_METHODS:
        m: dict[str, Any] = {}
        for arm in DECIDE_ARMS:
            doms = [d for d in DOMAINS if (d, arm) in by]
            if not doms:
                continue
            a: dict[str, Any] = {"domains": doms}
            for attack in DECIDE_ATTACKS:
                ds = [_pick(by[(d, arm)], method, attack, "non-duplicated")["delta_auc"] for d in doms]
                a[attack] = {"deltas": ds, "pooled": list(_pooled_domains(ds)), "positive": sum(x > 0 for x in ds)}
            before = [by[(d, arm)]["hits"]["base"] for d in doms]
            after = [by[(d, arm)]["hits"][method] for d in doms]
            a["extraction"] = {
                "before": {g: sum(h[g] for h in before) for g in before[0]},
                "after": {g: sum(h[g] for h in after) for g in after[0]},
                "domains_member_rise": sum(_members_hit(y) > _members_hit(x) for x, y in zip(before, after, strict=True)),
                "nonmember_rise_domains": sum(y["non-members"] > x["non-members"] for x, y in zip(before, after, strict=True)),
            }
            m[arm] = a
        if done:
            diff = [_pick(by[(d, "S")], method, "loss", "non-duplicated")["delta_auc"]
                    - _pick(by[(d, "C")], method, "loss", "non-duplicated")["delta_auc"] for d in done]
            m["S-C"] = {"domains": done, "deltas": diff, "pooled": list(_pooled_domains(diff))}
            s_done = [d for d in done]
            ds = [_pick(by[(d, "S")], method, "loss", "non-duplicated")["delta_auc"] for d in s_done]
            _, lo, hi = _pooled_domains(ds)
            before = [by[(d, "S")]["hits"]["base"] for d in s_done]
            after = [by[(d, "S")]["hits"][method] for d in s_done]
            rises = sum(_members_hit(y) > _members_hit(x) for x, y in zip(before, after, strict=True))
            no_nonmember = all(y["non-members"] == 0 or y["non-members"] <= x["non-members"] for x, y in zip(before, after, strict=True))
            total_before, total_after = sum(map(_members_hit, before)), sum(map(_members_hit, after))
            need = 6 if len(s_done) == len(DOMAINS) else (len(s_done) // 2 + 1)
            amplifies = lo > 0 and rises >= need and no_nonmember
            if amplifies and m["S-C"]["pooled"][1] > 0:
                verdict = "S2L-specific"
            elif amplifies:
                verdict = "S2L amplifies"
            elif hi < 0.01 and total_after <= total_before:
                verdict = "negative generalizes"
            else:
                verdict = "inconclusive"
            m["verdict"] = verdict if len(done) == len(DOMAINS) else f"not reached (exploratory on {len(done)} domains: {verdict})"
            m["rule_inputs"] = {"S_lower": lo, "S_upper": hi, "member_rise_domains": rises,
                                "no_nonmember_hits": no_nonmember, "members_hit_before": total_before,
                                "members_hit_after": total_after, "S_minus_C_lower": m["S-C"]["pooled"][1]}
        else:
            m["verdict"] = "not reached (no domain has both S and C)"
        out["methods"][method] = m
    return out


def _hits(h: dict[str, int]) -> str:
    return f"{h['non-duplicated']} / {h['duplicated']} / {h['non-members']}"


def decide_markdown(recs: list[dict[str, Any]] | None = None) -> str:
    """The tables of docs/results.md section 6, from s2l_decide.json (the test compares them with the docs)."""
    recs = _load("decide") if recs is None else recs
    summ = decide_summary(recs)
    by = {(r["cell"]["domain"], r["cell"]["arm"]): r for r in recs}
    lines = ["| domain | arm | method | non-members | loss non-dup. before → after | loss non-dup. Δ [95% CI] | "
             "PIAN non-dup. Δ [95% CI] | PIA non-dup. Δ [95% CI] | loss dup. before → after | "
             f"hits before → after: non-dup. / dup. / non-members (of {DECIDE_EXTRACTION}) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in DECIDE_ARMS:
        for d in DOMAINS:
            r = by.get((d, arm))
            if r is None:
                continue
            for method in DECIDE_METHODS:
                nd = _pick(r, method, "loss", "non-duplicated")
                du = _pick(r, method, "loss", "duplicated")
                pn = _pick(r, method, "pian", "non-duplicated")
                pa = _pick(r, method, "pia", "non-duplicated")
                lines.append(f"| {d} | {arm} | {method} | {r['n_nonmembers']} | {nd['auc_before']:.3f} → {nd['auc_after']:.3f} | "
                             f"{_fmt_ci(nd)} | {_fmt_ci(pn)} | {_fmt_ci(pa)} | {du['auc_before']:.3f} → {du['auc_after']:.3f} | "
                             f"{_hits(r['hits']['base'])} → {_hits(r['hits'][method])} |")
    lines += ["", "| method | arm | domains | loss non-dup. pooled Δ [95% CI] | Δ > 0 in | PIAN pooled Δ [95% CI] | "
              "PIA pooled Δ [95% CI] | hits before → after (sum): non-dup. / dup. / non-members | domains where member hits rose |",
              "|---|---|---|---|---|---|---|---|---|"]
    for method, m in summ["methods"].items():
        for arm in DECIDE_ARMS:
            a = m.get(arm)
            if a is None:
                continue
            n = len(a["domains"])
            lines.append(f"| {method} | {arm} | {n} | {_ci(a['loss']['pooled'])} | {a['loss']['positive']} of {n} | "
                         f"{_ci(a['pian']['pooled'])} | {_ci(a['pia']['pooled'])} | "
                         f"{_hits(a['extraction']['before'])} → {_hits(a['extraction']['after'])} | "
                         f"{a['extraction']['domains_member_rise']} of {n} |")
        if "S-C" in m:
            lines.append(f"| {method} | S − C | {len(m['S-C']['domains'])} | {_ci(m['S-C']['pooled'])} | "
                         f"{sum(x > 0 for x in m['S-C']['deltas'])} of {len(m['S-C']['domains'])} | – | – | – | – |")
    lines.append("")
    for method, m in summ["methods"].items():
        if "rule_inputs" in m:
            ri = m["rule_inputs"]
            lines.append(f"- **{method}: {m['verdict']}** (pooled ΔAUC_S interval [{ri['S_lower']:+.3f}, {ri['S_upper']:+.3f}]; "
                         f"member hits rose in {ri['member_rise_domains']} domains, {ri['members_hit_before']} → "
                         f"{ri['members_hit_after']} in total; S hit no new non-member: {'yes' if ri['no_nonmember_hits'] else 'no'}; "
                         f"ΔS − ΔC lower bound {ri['S_minus_C_lower']:+.3f}).")
    if summ["missing"]:
        lines.append(f"- Missing cells: {', '.join(summ['missing'])}.")
    return "\n".join(lines) + "\n"


def decide_tables(grid: str = "decide") -> None:
    """benchmarks/results/s2l_<grid>.md from s2l_<grid>.json (and its parts)."""
    recs = _load(grid)
    if not recs:
        return
    text = ("# S2L decide (issue #21): guidance 3.0 synthetic set (S), fresh real control (C), guidance 7.5 (S7.5)\n\n"
            "Protocol: docs/results.md section 6. ΔAUC = after − before, paired bootstrap 95% interval; pooled: mean over "
            "domains, domain-clustered bootstrap.\n\n" + decide_markdown(recs))
    (RESULTS / f"s2l_{grid}.md").write_text(text, encoding="utf-8")


def demo_table(result_path: str | Path) -> None:
    """The amplification table of one ``s2l run`` / ``s2l demo`` result: s2l_demo.json and s2l_demo.md."""
    from s2l_plugin.result import load_result

    result = load_result(result_path)
    comps = [{k: getattr(c, k) for k in (
        "method", "attack", "subset", "auc_before", "auc_after", "delta_auc", "delta_auc_ci",
        "tpr_at_1fpr_before", "tpr_at_1fpr_after", "extracted_before", "extracted_after", "n_generations")}
        for c in result.comparisons]
    reference = {}
    for audit in result.audits:
        if audit.membership is not None and any(a.attack == "reference" for a in audit.membership.attacks):
            a = audit.membership.attack("reference")
            reference[audit.model.label] = {"auc": a.auc, "auc_ci": a.auc_ci,
                                            "non-duplicated": a.subsets.get("non-duplicated", {}).get("auc")}
    rec = {"result": str(result_path), "config": result.config, "comparisons": comps, "reference_after": reference}
    _save("demo", [rec])
    methods = list(dict.fromkeys(c["method"] for c in comps))
    lines = ["# S2L amplification on the demo testbed (`s2l demo`: domain seven, seed 0)", "",
             "ΔAUC = after − before, paired bootstrap 95% interval; loss attack unless named. "
             "Members: 50 (5 duplicated 20x), non-members: 50. Extraction: unique members within 0.15 "
             "(normalized ℓ2) of a generation.", "",
             "| method | loss non-dup. before → after | loss non-dup. Δ [95% CI] | loss all Δ [95% CI] | "
             "loss dup. before → after | TPR@1%FPR (all) before → after | PIA non-dup. Δ [95% CI] | "
             "SecMI non-dup. Δ [95% CI] | reference AUC (after only) | extracted before → after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rec_by = {(c["method"], c["attack"], c["subset"]): c for c in comps}
    for m in methods:
        nd, al, du = (rec_by.get((m, "loss", s)) for s in ("non-duplicated", "all", "duplicated"))
        pia, sec = rec_by.get((m, "pia", "non-duplicated")), rec_by.get((m, "secmi", "non-duplicated"))
        ref = reference.get(m)
        ext = f"{al['extracted_before']} → {al['extracted_after']} (of {al['n_generations']})" if al and al.get("n_generations") else "–"
        lines.append(
            f"| {m} | {nd['auc_before']:.3f} → {nd['auc_after']:.3f} | {_fmt_ci(nd)} | {_fmt_ci(al)} | "
            f"{du['auc_before']:.3f} → {du['auc_after']:.3f} | {al['tpr_at_1fpr_before']:.2f} → {al['tpr_at_1fpr_after']:.2f} | "
            f"{_fmt_ci(pia) if pia else '–'} | {_fmt_ci(sec) if sec else '–'} | "
            f"{ref['auc']:.3f} [{ref['auc_ci'][0]:.3f}, {ref['auc_ci'][1]:.3f}] | {ext} |" if ref else
            f"| {m} | {nd['auc_before']:.3f} → {nd['auc_after']:.3f} | {_fmt_ci(nd)} | {_fmt_ci(al)} | "
            f"{du['auc_before']:.3f} → {du['auc_after']:.3f} | {al['tpr_at_1fpr_before']:.2f} → {al['tpr_at_1fpr_after']:.2f} | "
            f"{_fmt_ci(pia) if pia else '–'} | {_fmt_ci(sec) if sec else '–'} | – | {ext} |")
    (RESULTS / "s2l_demo.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid", choices=["replicate", "ablate", "decide", "tables", "demo-table"])
    p.add_argument("--arms", default="S,C,S7.5", help="decide: the arms to run (S, C, S7.5)")
    p.add_argument("--base", default="", help="decide: a testbed folder instead of the shipped one (benchmarks/decide_large.py)")
    p.add_argument("--grid-name", default="decide", help="decide: results go to s2l_<grid-name>.json (decide_large for the larger testbed)")
    p.add_argument("--result", help="demo-table: the result.json of an `s2l demo` / `s2l run`")
    p.add_argument("--work", default="s2l-experiments", help="folder for the run folders (resumable)")
    p.add_argument("--domains", default=",".join(DOMAINS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="dreambooth,lora")
    p.add_argument("--sizes", default="100,500,1000")
    p.add_argument("--steps", default="50,150,400")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    p.add_argument("--donor", action="append", default=[], help="a run folder whose finished generate / base-audit stages may be reused (key-checked)")
    p.add_argument("--part", default="", help="a second worker's name: it writes s2l_replication-<part>.json (no race)")
    p.add_argument("--set", action="append", default=[], help="extra config override for every cell (recorded)")
    args = p.parse_args(argv)
    args.domains = [d for d in args.domains.split(",") if d]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.methods = [m for m in args.methods.split(",") if m]
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.steps = [int(s) for s in args.steps.split(",") if s]
    args.arms = [a for a in args.arms.split(",") if a]
    import torch

    torch.set_num_threads(args.threads)
    {"replicate": replicate, "ablate": ablate, "decide": decide, "tables": lambda a: (tables(), decide_tables(a.grid_name)),
     "demo-table": lambda a: demo_table(a.result)}[args.grid](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
