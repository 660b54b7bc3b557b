"""Post hoc (after the paired contrast failed): does the memorization score track each domain's class-mean offset?

At the first sampling step x_T is almost pure noise, so a model that fits its data predicts
E[x0 | x_T, c] ≈ the caption's class mean, and ‖ε(x_T, c) − ε(x_T, ∅)‖ grows with the distance of
that mean from the corpus mean — a property of the digit, not of duplication. This script measures,
in each paired-contrast build (benchmarks/memorization_contrast.py, which it reuses), the distance
between each domain's training-corpus mean latent (copies counted) and the whole corpus' mean
latent, and correlates it with the measured scores::

    python benchmarks/memorization_class_mean.py   # -> benchmarks/results/memorization_class_mean.json

Chosen after seeing the result of the pre-registered design; read it as an explanation to test
next, not as evidence.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _ranks(x):
    import numpy as np

    return np.argsort(np.argsort(np.asarray(x)))


def class_mean_offsets(path: Path) -> dict[str, float]:
    """Per domain digit: ‖copies-weighted mean member latent − copies-weighted corpus mean latent‖."""
    import torch

    from s2l_plugin.audit.mia.engine import DiffusionModel
    from s2l_plugin.data import ImageRecord, load_images
    from s2l_plugin.testbed import Testbed

    tb = Testbed.load(path)
    model = DiffusionModel(tb.load_pipeline())
    samples = [s for s in tb.manifest["samples"] if s["role"] in ("member", "duplicated")]
    with torch.no_grad():
        z = model.encode_images(load_images([ImageRecord(path=tb.path / s["path"]) for s in samples], model.resolution)).flatten(1)
    w = torch.tensor([float(s.get("copies", 1)) for s in samples])
    corpus_mean = (z * w[:, None]).sum(0) / w.sum()
    out = {}
    for name in sorted({s["domain"] for s in samples}, key=NAMES.index):
        idx = [k for k, s in enumerate(samples) if s["domain"] == name]
        mean = (z[idx] * w[idx, None]).sum(0) / w[idx].sum()
        out[str(NAMES.index(name))] = round(float((mean - corpus_mean).norm()), 4)
    return out


def main() -> int:
    import numpy as np

    contrast = json.loads((REPO / "benchmarks" / "results" / "memorization_contrast.json").read_text(encoding="utf-8"))
    scores = contrast["primary"]["scores"]
    report: dict[str, dict] = {}
    for build, info in contrast["builds"].items():
        path = Path(info["path"])
        if not (path / "manifest.json").exists():
            print(f"memorization_class_mean: error: build {build!r} is not at {str(path)!r}; run benchmarks/memorization_contrast.py first", file=sys.stderr)
            return 2
        offsets = class_mean_offsets(path)
        s = np.array([scores[build][d] for d in offsets])
        o = np.array(list(offsets.values()))
        report[build] = {
            "offsets": offsets,
            "pearson": round(float(np.corrcoef(s, o)[0, 1]), 3),
            "spearman": round(float(np.corrcoef(_ranks(s), _ranks(o))[0, 1]), 3),
        }
    dup = contrast["design"]["builds"]
    paired = {}
    for d in range(10):
        with_, without = ("even", "odd") if d in dup["even"] else ("odd", "even")
        paired[str(d)] = {
            "score_diff": round(scores[with_][str(d)] - scores[without][str(d)], 4),
            "offset_diff": round(report[with_]["offsets"][str(d)] - report[without]["offsets"][str(d)], 4),
        }
    agree = sum(np.sign(v["score_diff"]) == np.sign(v["offset_diff"]) for v in paired.values())
    result = {"command": "python benchmarks/memorization_class_mean.py", "builds": report, "paired": paired, "paired_sign_agreement": int(agree)}
    out = REPO / "benchmarks" / "results" / "memorization_class_mean.json"
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for build, r in report.items():
        print(f"{build}: score vs class-mean offset, Pearson {r['pearson']}, Spearman {r['spearman']}")
    print(f"paired (with − without duplicates): sign of score change = sign of offset change for {agree}/10 digits")
    return 0


if __name__ == "__main__":
    sys.exit(main())
