"""The MIA attacks on testbed variants whose duplicated members are memorized: AUC against training length.

Issue 7 asks every attack to reach AUC >= 0.9 on strongly memorized images, "the testbed's
duplicated members or a variant of the `test` testbed trained longer". This script builds the
`test`-preset variant of :data:`MEMORIZED_KNOBS` (2 digits, 8 members each of which 2 are
duplicated 8 times, 12 held-out images each) at several training lengths and seeds, and runs the
four single-model attacks with their defaults on each (each image conditioned on its own
caption, guidance 1, seed 0, 200 bootstrap resamples)::

    python benchmarks/mia_memorized.py      # 300, 1500, 4000, 12000 steps (seed 0); 4000 (seed 1); 4000 x 64x128 UNet (seeds 0, 1)
    python benchmarks/mia_memorized.py --runs 4000:0,4000:1:64x128 --out /tmp/x.json

Pre-registered before its run (SecMI and model capacity): a scratch build of this variant with a
(64, 128) UNet (3.9 M parameters), 4,000 steps, seed 0, gave SecMI AUC 0.458 on duplicated members
and 0.680 on all members, against 0.073 / 0.086 for the default 1 M UNet. Confirmation: the same at
seed 1 (4000:1:64x128). Prediction: SecMI AUC on all members > 0.5, and on duplicated members above
the 1 M UNet's at seed 1 (0.208). Both must hold to report "capacity undoes SecMI's inversion" as
replicated; otherwise it is reported as not replicated.

Besides the AUCs it records the mean norm of the model's noise estimate at the clean latent,
‖ε_θ(z0, 0, c)‖, for duplicated members and for held-out images (√d = 16 for a Gaussian draw on
the 4×8×8 latent): the quantity PIA builds its noised point from (benchmarks/results/mia.md §1).

Builds are cached under ``$S2L_TEST_CACHE`` (default ``.s2l-cache/``), keyed by steps, seed and the
testbed sources; the integration test ``integration_tests/test_mia_memorized.py`` shares the
4000-step, seed-0 build. Results: benchmarks/results/mia_memorized.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: The variant (fixed before any attack was measured on it; training length is the variable).
MEMORIZED_KNOBS: dict[str, Any] = dict(digits=(0, 1), members=8, nonmembers=12, duplicated=2, copies=8, vae_steps=60)
#: The training length the integration test uses: the shortest measured at which PIA's sign came out
#: right (AUC 1.0 on duplicated members at seed 0, and again at seed 1, a replication predicted
#: before it ran). 300 steps, the first fixture, left PIA at 0.32.
TEST_STEPS = 4000
ATTACKS = ("loss", "secmi", "pia", "pian")
DEFAULT_RUNS = ((300, 0), (1500, 0), (4000, 0), (4000, 1), (12000, 0), (4000, 0, "64x128"), (4000, 1, "64x128"))


def cache_root() -> Path:
    return Path(os.environ.get("S2L_TEST_CACHE", REPO / ".s2l-cache"))


def memorized_testbed(steps: int = TEST_STEPS, seed: int = 0, *, channels: tuple[int, int] = (32, 64), root: Path | None = None, progress: bool = False):
    """Build (once; cached, keyed by steps, seed, UNet widths and the testbed sources) the memorized variant."""
    from s2l_plugin.testbed import Testbed, build_testbed, sources_hash

    width = "" if tuple(channels) == (32, 64) else f"-w{channels[0]}x{channels[1]}"
    out = (root or cache_root()) / f"mia-memorized-s{steps}-seed{seed}{width}-{sources_hash()}"
    if (out / "manifest.json").exists():
        return Testbed.load(out)
    return build_testbed(
        preset="test", out=out, seed=seed, progress=progress, overwrite=True, steps=steps, unet_channels=tuple(channels), **MEMORIZED_KNOBS
    )


def audit(tb, *, n_boot: int = 200, progress: bool = False):
    """The four single-model attacks on ``tb`` (members vs held-out, duplicated / non-duplicated subsets)."""
    from s2l_plugin.audit.mia import audit_membership, from_testbed

    sets = from_testbed(tb)
    return audit_membership(
        tb.load_pipeline(), sets.members, sets.nonmembers, list(ATTACKS),
        member_groups=sets.member_groups, n_boot=n_boot, progress=progress, batch_size=64,
    )


def clean_noise_norms(tb) -> dict[str, float]:
    """Mean ‖ε_θ(z0, 0, c)‖ over duplicated members and over held-out images (posterior-mean latents)."""
    import torch

    from s2l_plugin.audit.mia import from_testbed
    from s2l_plugin.audit.mia.engine import DiffusionModel
    from s2l_plugin.data import load_images

    sets = from_testbed(tb)
    model = DiffusionModel(tb.load_pipeline())
    dup = sets.member_groups["duplicated"]
    out = {}
    with torch.no_grad():
        for name, records in (("duplicated", [sets.members[i] for i in dup]), ("nonmembers", sets.nonmembers)):
            z0 = model.encode_images(load_images(records, model.resolution))
            text = model.encode_text([r.caption for r in records])
            out[name] = round(float(model.eps(z0, 0, text).flatten(1).norm(dim=1).mean()), 3)
    return out


def round_trip_by_t(tb, *, k: int = 10, t_max: int = 300, every: int = 20) -> list[dict[str, float]]:
    """SecMI's one-step round trip t → t+k → t at each t, from two starting points, as AUCs (score = −error).

    ``inversion``: z̃_t from the deterministic DDIM inversion of z0 (what SecMI uses at t = t_sec);
    ``forward``: z_t = √ᾱ_t z0 + √(1−ᾱ_t) ε with one fixed Gaussian ε per image (a point on the noise
    shell the model was trained on). Also the mean ‖ε_θ(z̃_t, t)‖ along the inversion path.
    """
    import torch

    from s2l_plugin.audit.metrics import roc_auc
    from s2l_plugin.audit.mia import from_testbed
    from s2l_plugin.audit.mia.engine import DiffusionModel
    from s2l_plugin.audit.mia.secmi import ddim_move
    from s2l_plugin.data import load_images

    sets = from_testbed(tb)
    model = DiffusionModel(tb.load_pipeline())
    records = list(sets.members) + list(sets.nonmembers)
    nm, dup = len(sets.members), list(sets.member_groups["duplicated"])
    rows = []
    with torch.no_grad():
        z0 = model.encode_images(load_images(records, model.resolution))
        text = model.encode_text([r.caption for r in records])
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))

        def aucs(err: torch.Tensor) -> tuple[float, float]:
            s = (-err).double().numpy()
            return round(roc_auc(s[dup], s[nm:]), 3), round(roc_auc(s[:nm], s[nm:]), 3)

        z = z0.clone()
        for t in range(0, t_max, k):
            z_next = ddim_move(model, z, t, t + k, text)
            if t and t % every == 0:
                inv = (ddim_move(model, z_next, t + k, t, text) - z).pow(2).flatten(1).sum(1)
                a = model.alpha_bar(t)
                zf = a.sqrt() * z0 + (1 - a).sqrt() * noise
                fwd = (ddim_move(model, ddim_move(model, zf, t, t + k, text), t + k, t, text) - zf).pow(2).flatten(1).sum(1)
                eps = model.eps(z, t, text).flatten(1).norm(dim=1)
                (inv_dup, inv_all), (fwd_dup, fwd_all) = aucs(inv), aucs(fwd)
                rows.append({
                    "t": t, "inversion_auc_dup": inv_dup, "inversion_auc_all": inv_all, "forward_auc_dup": fwd_dup, "forward_auc_all": fwd_all,
                    "eps_norm_dup": round(float(eps[dup].mean()), 2), "eps_norm_nonmembers": round(float(eps[nm:].mean()), 2),
                })
            z = z_next
    return rows


def measure(steps: int, seed: int, channels: tuple[int, int] = (32, 64)) -> dict[str, Any]:
    t0 = time.process_time()
    tb = memorized_testbed(steps, seed, channels=channels, progress=True)
    result = audit(tb)
    row: dict[str, Any] = {"steps": steps, "seed": seed, "unet_channels": list(channels), "testbed": tb.path.name, "build_cpu_s": tb.build_info.get("seconds", {}).get("total_cpu_s")}
    for name in ATTACKS:
        a = result.attack(name)
        row[name] = {
            "auc": round(a.auc, 3), "auc_ci": [round(x, 3) for x in a.auc_ci],
            **{g: {"auc": round(s["auc"], 3), "auc_ci": [round(x, 3) for x in s["auc_ci"]]} for g, s in a.subsets.items()},
        }
    row["eps0_norm"] = clean_noise_norms(tb)
    row["cpu_s_this_run"] = round(time.process_time() - t0, 1)
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| UNet widths | steps | seed | loss dup | secmi dup | pia dup | pian dup | pia all | secmi all | ‖ε₀‖ dup / held-out |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [f"{r[a]['duplicated']['auc']:.3f}" for a in ATTACKS]
        lines.append(
            f"| {'×'.join(str(c) for c in r.get('unet_channels', (32, 64)))} | {r['steps']} | {r['seed']} | " + " | ".join(cells)
            + f" | {r['pia']['auc']:.3f} | {r['secmi']['auc']:.3f} | {r['eps0_norm']['duplicated']:.2f} / {r['eps0_norm']['nonmembers']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs", default=",".join(":".join(str(x) for x in run) for run in DEFAULT_RUNS),
        help="STEPS:SEED[:C1xC2] items, comma-separated (C1xC2: UNet block widths, default 32x64)",
    )
    parser.add_argument("--diagnose", default="4000:0", help="steps:seed of the run whose SecMI round trip is broken down by t ('' to skip)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "mia_memorized.json"))
    args = parser.parse_args(argv)
    runs = []
    for item in args.runs.split(","):
        try:
            parts = item.split(":")
            steps, seed = int(parts[0]), int(parts[1])
            channels = tuple(int(c) for c in parts[2].split("x")) if len(parts) == 3 else (32, 64)
            if len(parts) > 3 or len(channels) != 2:
                raise ValueError(item)
        except (ValueError, IndexError):
            print(f"mia_memorized: error: --runs item {item!r} is not valid; expected STEPS:SEED or STEPS:SEED:C1xC2", file=sys.stderr)
            return 2
        runs.append((steps, seed, channels))
    rows = []
    for steps, seed, channels in runs:
        rows.append(measure(steps, seed, channels))
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    payload: dict[str, Any] = {"command": "python benchmarks/mia_memorized.py " + " ".join(argv or sys.argv[1:]), "knobs": MEMORIZED_KNOBS, "runs": rows}
    if args.diagnose:
        steps, seed = (int(x) for x in args.diagnose.split(":"))
        payload["round_trip_by_t"] = {"steps": steps, "seed": seed, "rows": round_trip_by_t(memorized_testbed(steps, seed))}
    out = Path(args.out)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=list) + "\n", encoding="utf-8")
    tmp.replace(out)
    md = out.with_suffix(".md")
    text = "# MIA attacks on memorized testbed variants (AUC, duplicated members vs held-out)\n\n" + markdown(rows)
    if "round_trip_by_t" in payload:
        diag = payload["round_trip_by_t"]
        text += (
            f"\n## SecMI's round trip t → t+10 → t by t ({diag['steps']} steps, seed {diag['seed']}; AUC dup / all, score = −error)\n\n"
            "| t | from the DDIM inversion of z0 | from a forward-noised z_t | ‖ε_θ(z̃_t, t)‖ dup / held-out |\n|---|---|---|---|\n"
        )
        for r in diag["rows"]:
            text += (
                f"| {r['t']} | {r['inversion_auc_dup']:.3f} / {r['inversion_auc_all']:.3f} | {r['forward_auc_dup']:.3f} / {r['forward_auc_all']:.3f}"
                f" | {r['eps_norm_dup']:.2f} / {r['eps_norm_nonmembers']:.2f} |\n"
            )
    md.write_text(text, encoding="utf-8")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
