"""The "Privacy audit" section of a model card: front matter kept and extended, prose kept, rerun in place."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from s2l_plugin.model_card import END, START, TAG, update_readme, write_model_card
from s2l_plugin.result import load_result

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_data import build_run_result  # noqa: E402

FRONT = """---
license: creativeml-openrail-m
base_model: runwayml/stable-diffusion-v1-5
tags:
  - text-to-image
  - lora   # trained with kohya
widget:
- text: a photo of sks dog
---
"""
PROSE = """
# Jane's LoRA

Trained on 20 photos. Use the trigger word `sks`.

## Limitations

None known.
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A saved two-model result (base, lora) with loss and secmi attacks, extraction and an HTML report beside it."""
    out = tmp_path_factory.mktemp("audit") / "s2l-report"
    path = build_run_result(out)
    (out / "report.html").write_text("<html></html>")
    return path


def _card(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text(FRONT + PROSE, encoding="utf-8")
    return folder


def test_section_is_added_front_matter_kept_and_extended_prose_kept(saved, tmp_path):
    folder = _card(tmp_path)
    readme = write_model_card(folder, saved.parent)
    text = readme.read_text(encoding="utf-8")
    # The front matter: every line kept, one tag added to the list where the list is.
    front = text.split("---\n")[1]
    assert front == FRONT.split("---\n")[1].replace("  - lora   # trained with kohya\n",
                                                    f"  - lora   # trained with kohya\n  - {TAG}\n")
    meta = yaml.safe_load(front)
    assert meta["tags"] == ["text-to-image", "lora", TAG] and meta["license"] == "creativeml-openrail-m"
    assert meta["widget"] == [{"text": "a photo of sks dog"}]
    # The prose, byte for byte, then the section.
    head, sep, section = text.partition(START)
    assert sep and head.startswith(FRONT.replace("lora   # trained with kohya\n", f"lora   # trained with kohya\n  - {TAG}\n"))
    assert head.endswith(PROSE + "\n")
    assert section.rstrip().endswith(END)
    result = load_result(saved)
    for audit in result.audits:
        for att in audit.membership.attacks:
            assert f"| {audit.model.label} | {att.attack} | {att.auc:.3f} [{att.auc_ci[0]:.3f}, {att.auc_ci[1]:.3f}] |" in section
            # Under 100 non-members a TPR at 1% FPR is not a measurement: the card says so instead of a number.
            assert len(att.nonmember_scores) < 100
            assert (f"| {audit.model.label} | {att.attack} | {att.auc:.3f} [{att.auc_ci[0]:.3f}, {att.auc_ci[1]:.3f}] | "
                    "n/r (needs ≥ 100 non-members) |") in section
    lora = result.audit("lora").extraction
    assert f"**{lora.extracted_total}** unique" in section
    assert "Attack settings:" in section and "s2l-report/report.html)" in section and "[HTML report](../" in section
    assert "Privacy gate" not in section  # no verdict.json beside the result


def test_rerun_replaces_the_section_in_place(saved, tmp_path):
    folder = _card(tmp_path)
    readme = folder / "README.md"
    write_model_card(folder, saved.parent)
    first = readme.read_text(encoding="utf-8")
    readme.write_text(first + "\n## Added by the author later\n", encoding="utf-8")
    edited = readme.read_text(encoding="utf-8")
    write_model_card(folder, saved.parent)
    assert readme.read_text(encoding="utf-8") == edited  # same result: nothing moves, the tag is not added twice
    # A different result: only the section changes.
    other = build_run_result(tmp_path / "other", seed=1, shift=0.2)
    write_model_card(folder, other.parent)
    again = readme.read_text(encoding="utf-8")
    before, after = edited.split(START)[0], edited.split(END)[1]
    assert again.startswith(before) and again.endswith(after) and again != edited
    assert again.count(START) == 1 and again.count(END) == 1 and again.count(TAG) == 3  # tag + two markers


def test_verdict_json_beside_the_result_is_shown(saved, tmp_path):
    report = tmp_path / "report"
    report.mkdir()
    (report / "result.json").write_bytes(saved.read_bytes())
    verdict = {"verdict": "fail", "fail_on": "loss.auc.lower>0.55", "failed": ["loss.auc.lower>0.55"],
               "conditions": [{"condition": "loss.auc.lower>0.55", "status": "fail", "model": "lora",
                               "value": 0.61, "interval": [0.58, 0.66]}]}
    (report / "verdict.json").write_text(json.dumps(verdict))
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.safetensors").write_bytes(b"")
    readme = write_model_card(folder / "weights.safetensors", report / "result.json")  # a file: its folder's README
    text = readme.read_text(encoding="utf-8")
    assert readme.parent == folder
    assert "**Privacy gate:** FAIL — `loss.auc.lower>0.55`" in text
    assert "| `loss.auc.lower>0.55` | fail | lora | 0.610 [0.580, 0.660] |" in text
    assert "[result.json](../report/result.json)" in text and "HTML report" not in text


@pytest.mark.parametrize(
    ("readme", "expected_front"),
    [
        ("", f"---\ntags:\n- {TAG}\n---\n\n"),
        ("# Title only\n", f"---\ntags:\n- {TAG}\n---\n\n# Title only\n"),
        ("---\nlicense: mit\n---\nText\n", f"---\nlicense: mit\ntags:\n- {TAG}\n---\nText\n"),
        ("---\ntags: [a, b]\n---\n", f"---\ntags: [a, b, {TAG}]\n---\n"),
        ("---\ntags: []\n---\n", f"---\ntags: [{TAG}]\n---\n"),
        ("---\ntags:\n- a\nlicense: mit\n---\n", f"---\ntags:\n- a\n- {TAG}\nlicense: mit\n---\n"),
        (f"---\ntags:\n- {TAG}\n---\n", f"---\ntags:\n- {TAG}\n---\n"),
        ("---\n: not yaml [\n---\nText\n", "---\n: not yaml [\n---\nText\n"),  # unreadable: left alone
    ],
)
def test_front_matter_cases(readme, expected_front):
    body = f"{START}\nx\n{END}\n"
    out = update_readme(readme, body)
    assert out.startswith(expected_front) and out.endswith(body)


def test_s2l_model_card_is_an_option_of_the_three_call_api_and_needs_an_audit(tmp_path):
    import argparse

    from s2l_plugin import add_arguments
    from s2l_plugin.errors import ConfigError
    from s2l_plugin.integration import run_from_args

    parser = add_arguments(argparse.ArgumentParser())
    parser.add_argument("--output_dir")
    args = parser.parse_args(["--s2l-model-card", "--output_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="--s2l-audit"):
        run_from_args(args)
    args = parser.parse_args(["--s2l-model-card", "--output_dir", str(tmp_path), "--s2l-audit",
                              f"members={tmp_path},nonmembers={tmp_path}", "--s2l-attacks", "loss"])
    assert run_from_args(args).options["model_card"] is True
