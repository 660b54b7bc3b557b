"""Latent choice, posterior mean vs one seeded posterior sample: AUCs of loss, PIA, PIAN and SecMI (issue #21).

Pre-registered in docs/results.md section 7 (committed before any measurement). On each target the
four attacks run with their defaults (each image conditioned on its own caption, seed 0, 200
bootstrap resamples), once with ``latent="mean"`` and once with ``latent="sample"``::

    python benchmarks/latent_choice.py                      # every target, in the order below (resumable)
    python benchmarks/latent_choice.py --targets memorized-32x64 --memorized-32x64 PATH
    python benchmarks/latent_choice.py --report             # only rewrite latent_choice.md from the JSON

Targets: ``memorized-32x64`` (the memorized variant of benchmarks/mia_memorized.py, 4,000 steps,
seed 0, default UNet; ``--memorized-32x64 PATH`` uses an existing build of it), ``demo-32x64`` (the
shipped demo testbed, all domains pooled as ``s2l audit`` sees them) and ``memorized-64x128`` (the
same variant with the (64, 128) UNet, built under ``--cache``; ≈ 750 CPU s). Results:
benchmarks/results/latent_choice.{json,md}, with the pre-registered decision (:func:`decision`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

OUT = HERE / "results" / "latent_choice.json"
ATTACKS = ("loss", "pia", "pian", "secmi")
LATENTS = ("mean", "sample")
TARGETS = ("memorized-32x64", "demo-32x64", "memorized-64x128")
#: the attacks the decision rule weighs (docs/results.md section 7)
RULE_ATTACKS = ("loss", "pia", "secmi")
RULE_MAX_LOSS = 0.05


def _testbed(target: str, args: argparse.Namespace) -> Any:
    from mia_memorized import memorized_testbed

    from s2l_plugin.testbed import Testbed

    if target == "demo-32x64":
        return Testbed.load(None)
    if target == "memorized-32x64":
        if args.memorized_32x64:
            return Testbed.load(Path(args.memorized_32x64))
        return memorized_testbed(4000, 0, root=Path(args.cache), progress=False)
    if target == "memorized-64x128":
        return memorized_testbed(4000, 0, channels=(64, 128), root=Path(args.cache), progress=False)
    raise SystemExit(f"latent_choice: error: target {target!r} is not valid; expected one of: {', '.join(TARGETS)}")


def measure(target: str, args: argparse.Namespace) -> dict[str, Any]:
    """Both latents' AUCs (all members, duplicated, non-duplicated) of every attack on ``target``."""
    from s2l_plugin.audit.mia import audit_membership, from_testbed

    t0 = time.process_time()
    tb = _testbed(target, args)
    build_cpu = round(time.process_time() - t0, 1)
    sets = from_testbed(tb)
    pipe = tb.load_pipeline()
    row: dict[str, Any] = {
        "target": target, "testbed": str(tb.path), "pipeline_hash": tb.build_info.get("pipeline_hash"),
        "unet_channels": list(pipe.unet.config.block_out_channels), "n_members": len(sets.members),
        "n_nonmembers": len(sets.nonmembers), "n_duplicated": len(sets.member_groups.get("duplicated", [])),
        "build_cpu_s_this_run": build_cpu,
    }
    for latent in LATENTS:
        t1 = time.process_time()
        result = audit_membership(pipe, sets.members, sets.nonmembers, list(ATTACKS), member_groups=sets.member_groups,
                                  n_boot=200, seed=0, batch_size=64, progress=False, latent=latent)
        row[latent] = {
            a.attack: {"auc": round(a.auc, 3), "auc_ci": [round(x, 3) for x in a.auc_ci],
                       **{g: {"auc": round(s["auc"], 3), "auc_ci": [round(x, 3) for x in s["auc_ci"]]} for g, s in a.subsets.items()}}
            for a in result.attacks
        }
        row[latent]["cpu_s"] = round(time.process_time() - t1, 1)
    return row


def decision(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The pre-registered rule: "sample" is recommended iff, on the memorized variant (every width measured),
    its duplicated-member AUC beats "mean" for the majority of (attack, width) pairs of loss, pia and secmi
    and falls by more than 0.05 for none; and SecMI's inversion read from the width × latent 2 × 2."""
    mem = [r for r in rows if r["target"].startswith("memorized")]
    pairs = []
    for r in mem:
        for a in RULE_ATTACKS:
            m, s = r["mean"][a]["duplicated"]["auc"], r["sample"][a]["duplicated"]["auc"]
            pairs.append({"target": r["target"], "attack": a, "mean": m, "sample": s, "diff": round(s - m, 3)})
    higher = sum(p["diff"] > 0 for p in pairs)
    worse = [p for p in pairs if p["diff"] < -RULE_MAX_LOSS]
    recommend = "sample" if pairs and higher > len(pairs) / 2 and not worse else "mean"
    secmi = {(r["target"], lat): r[lat]["secmi"]["duplicated"]["auc"] for r in mem for lat in LATENTS}
    narrow_sample = secmi.get(("memorized-32x64", "sample"))
    wide_mean, wide_sample = secmi.get(("memorized-64x128", "mean")), secmi.get(("memorized-64x128", "sample"))
    if narrow_sample is None:
        reading = "not measured"
    elif narrow_sample > 0.5:
        reading = "the latent"
    elif wide_mean is None:
        reading = "not the latent alone (the (64, 128) half was not measured)"
    elif wide_mean > 0.5:
        reading = "scale"
    elif wide_sample is not None and wide_sample > 0.5:
        reading = "both together"
    else:
        reading = "neither undoes it"
    return {"pairs": pairs, "sample_higher": higher, "n_pairs": len(pairs), "worse_by_more_than_0.05": len(worse),
            "recommended_default": recommend, "secmi_duplicated": {f"{t} {lat}": v for (t, lat), v in secmi.items()},
            "secmi_inversion_due_to": reading}


def report(payload: dict[str, Any]) -> str:
    lines = ["# Latent choice: posterior mean vs one seeded sample (AUC; duplicated members / all members vs held-out)", "",
             "| target | UNet | attack | mean: dup. | sample: dup. | mean: all | sample: all | mean: non-dup. | sample: non-dup. |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["rows"]:
        for a in ATTACKS:
            m, s = r["mean"][a], r["sample"][a]
            lines.append(f"| {r['target']} | {'×'.join(map(str, r['unet_channels']))} | {a} | {m['duplicated']['auc']:.3f} | "
                         f"{s['duplicated']['auc']:.3f} | {m['auc']:.3f} | {s['auc']:.3f} | "
                         f"{m['non-duplicated']['auc']:.3f} | {s['non-duplicated']['auc']:.3f} |")
    d = payload["decision"]
    lines += ["", f"Decision rule (docs/results.md section 7): sample higher in {d['sample_higher']} of {d['n_pairs']} "
              f"(attack, width) pairs of loss/pia/secmi on duplicated members, lower by more than 0.05 in "
              f"{d['worse_by_more_than_0.05']}: recommended default **{d['recommended_default']}**. "
              f"SecMI's inversion is due to: **{d['secmi_inversion_due_to']}**.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--memorized-32x64", default="", help="an existing build of the memorized variant (4,000 steps, seed 0, 32x64)")
    p.add_argument("--cache", default=str(HERE.parent / ".s2l-cache"), help="where memorized builds are made / found")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--report", action="store_true", help="only rewrite the markdown from the JSON")
    args = p.parse_args(argv)
    out = Path(args.out)
    payload = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {"rows": []}
    if not args.report:
        import torch

        torch.set_num_threads(args.threads)
        for target in [t for t in args.targets.split(",") if t]:
            if target not in TARGETS:
                print(f"latent_choice: error: target {target!r} is not valid; expected one of: {', '.join(TARGETS)}", file=sys.stderr)
                return 2
            if any(r["target"] == target for r in payload["rows"]):
                continue
            payload["rows"].append(measure(target, args))
            payload["decision"] = decision(payload["rows"])
            out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
            print(f"latent_choice: {target} done", flush=True)
    payload["decision"] = decision(payload["rows"])
    out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(report(payload), encoding="utf-8")
    print(report(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
