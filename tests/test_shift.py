"""The distribution-shift diagnostic (s2l_plugin.audit.shift): fires on a shifted non-member set, not on the testbed's IID split.

Method and level were fixed before any outcome was looked at: the permutation test of the mean
pooled-VAE-latent distance (500 seeded relabellings) at p < 0.01, the out-of-fold ridge shift
classifier's AUC as the effect size. The shifted set is the testbed's own non-members with
thicker strokes (a 3x3 max filter: the bright digit strokes grow by a pixel each side).
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image, ImageFilter

DOMAIN = "seven"


def _thicker_strokes(src, dst):
    dst.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.suffix.lower() == ".png":
            Image.open(p).filter(ImageFilter.MaxFilter(3)).save(dst / p.name)
        else:  # metadata.jsonl: the same captions
            shutil.copy(p, dst / p.name)
    return dst


def _console(out):
    from rich.console import Console

    from s2l_plugin.report.console_report import print_summary

    buf = io.StringIO()
    print_summary(out, console=Console(file=buf, width=200, color_system=None))
    return buf.getvalue()


@pytest.fixture(scope="module")
def audits(test_testbed, tmp_path_factory):
    """``s2l audit`` (as a function) of the testbed model against itself, on the IID split and on a
    stroke-shifted non-member set: {"iid"|"shifted": (result, out_dir)}."""
    from s2l_plugin.audit.api import audit_checkpoint

    tb = test_testbed
    root = tmp_path_factory.mktemp("shift")
    nonmembers = tb.path / "nonmembers" / DOMAIN
    sets = {"iid": nonmembers, "shifted": _thicker_strokes(nonmembers, root / "thick")}
    out = {}
    for name, nm in sets.items():
        result = audit_checkpoint(tb.pipeline_dir, base=tb.pipeline_dir, members=tb.path / "members" / DOMAIN, nonmembers=nm,
                                  attacks=["loss", "pia"], memorization=False, out_dir=root / name)
        out[name] = (result, root / name)
    return out


def test_classifier_auc_is_near_chance_for_one_distribution_and_high_for_two():
    from s2l_plugin.audit.shift import classifier_auc

    rng = np.random.default_rng(0)
    same = classifier_auc(rng.normal(size=(60, 32)), rng.normal(size=(60, 32)))
    shifted = classifier_auc(rng.normal(size=(60, 32)), rng.normal(0.5, 1, size=(60, 32)))
    assert 0.35 < same < 0.65 and shifted > 0.9
    assert classifier_auc(np.zeros((1, 4)), np.zeros((5, 4))) is None  # too few to score out of fold


def test_shift_summary_fires_on_thicker_strokes_and_states_the_base_baseline(audits):
    shifted, _ = audits["shifted"]
    s = shifted.shift
    assert s["distinguishable"] is True and s["p_value"] < s["level"] == 0.01
    assert s["classifier_auc"] > 0.9  # a linear probe on the latents alone separates the sets
    base = shifted.audit("base").membership
    assert s["base_auc"] == {a.attack: a.auc for a in base.attacks} and set(s["base_auc_ci"]) == {"loss", "pia"}
    assert s["n_members"] == s["n_nonmembers"] == 8


def test_shift_summary_stays_quiet_on_the_iid_split(audits):
    iid, _ = audits["iid"]
    assert iid.shift["distinguishable"] is False and iid.shift["p_value"] >= 0.01
    assert iid.shift["classifier_auc"] < 0.8


def test_every_report_format_opens_with_the_shift_warning_on_the_shifted_set(audits):
    shifted, out = audits["shifted"]
    clf = f"{shifted.shift['classifier_auc']:.3f}"
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    console = _console(out)
    md_top = md.split("**Verdict:**")[0]
    assert "Distribution shift" in md_top and clf in md_top and "p = 0.002" in md_top
    summary = html.split('id="summary"')[1]
    assert summary.index('id="shift-alert"') < summary.index('class="headline"')
    assert "Distribution shift" in summary.split('class="headline"')[0] and clf in summary
    first = console.lstrip().splitlines()[0]
    assert first.startswith("⚠ Distribution shift") and "Membership evidence" in console
    assert console.index("Distribution shift") < console.index("Membership evidence")


def test_no_report_format_warns_on_the_iid_split(audits):
    _, out = audits["iid"]
    for text in ((out / "report.md").read_text(), (out / "report.html").read_text(), _console(out)):
        assert "Distribution shift:" not in text
        assert "not distinguishable at p" in text  # the audit still states the check it ran
