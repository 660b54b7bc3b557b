"""``s2l audit`` end to end on the test testbed with a LoRA trained by the LoRA adapter."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from s2l_plugin.cli import main
from s2l_plugin.result import load_result

pytestmark = pytest.mark.integration

# The shared fixtures live in tests/conftest.py (the cached `test` testbed, a fresh plugin manager per test).
_spec = importlib.util.spec_from_file_location("_s2l_tests_conftest", Path(__file__).resolve().parents[1] / "tests" / "conftest.py")
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
test_testbed = _conftest.test_testbed
fresh_plugin_manager = _conftest.fresh_plugin_manager

DOMAIN = "seven"


@pytest.fixture(scope="module")
def trained_lora(test_testbed, tmp_path_factory):
    """A LoRA trained briefly on the domain's members, and its kohya export re-saved with the dataset
    metadata sd-scripts would write for that training set (as a shared community file carries it)."""
    from s2l_plugin.adapters.base import TrainConfig
    from s2l_plugin.hooks.manager import get, make_plugin_manager

    tb = test_testbed
    domain = tb.domain(DOMAIN)
    out = tmp_path_factory.mktemp("lora")
    adapter = get("adapters", "lora", make_plugin_manager(load_entry_points=False))
    config = TrainConfig(prompt=domain.prompt, max_train_steps=4, train_batch_size=8, learning_rate=1e-3, seed=0)
    artifact = adapter.train(tb.pipeline_dir, tb.path / "members" / DOMAIN, config, out / "artifact")
    kohya = artifact.path / "lora_kohya.safetensors"
    captions = sorted({s.caption for s in tb.members(DOMAIN)})
    shared = out / "community_lora.safetensors"
    save_file(load_file(str(kohya)), str(shared), metadata={
        "ss_network_module": "networks.lora",
        "ss_tag_frequency": json.dumps({f"10_{DOMAIN}": {c: 1 for c in captions}}),
        "ss_dataset_dirs": json.dumps({f"10_{DOMAIN}": {"n_repeats": 10, "img_count": len(tb.members(DOMAIN))}}),
    })
    return artifact, shared, captions


def test_audit_lora_writes_mia_for_target_and_base_extraction_and_findings(test_testbed, trained_lora, tmp_path):
    _artifact, shared, captions = trained_lora
    tb = test_testbed
    out = tmp_path / "report"
    code = main([
        "audit", "--base", str(tb.pipeline_dir), "--lora", str(shared),
        "--members", str(tb.path / "members" / DOMAIN), "--nonmembers", str(tb.path / "nonmembers" / DOMAIN),
        "--domain", DOMAIN, "--attacks", "loss,pia", "--extraction", "4", "--extraction-steps", "5",
        "--out", str(out),
    ])
    assert code == 0
    result = load_result(out)
    assert result.kind == "audit"
    base, target = result.audit("base"), result.audit("lora")
    for audit in (base, target):
        assert audit.membership is not None
        assert {a.attack for a in audit.membership.attacks} == {"loss", "pia"}
        assert audit.membership.n_members == 8 and audit.membership.n_nonmembers == 8
        for a in audit.membership.attacks:
            assert 0.0 <= a.auc <= 1.0 and len(a.member_scores) == 8
        assert audit.extraction is not None and audit.extraction.n_generations == 4
        assert isinstance(audit.extraction.extracted_total, int)
    # The target differs from its base: the same noise gives different member scores.
    assert base.membership.attack("loss").member_scores != target.membership.attack("loss").member_scores
    assert target.model.path == str(shared) and len(target.model.sha256) == 64
    tags = [f for f in target.findings if f.key == "ss_tag_frequency"]
    assert tags and tags[0].severity == "high" and all(c in tags[0].value for c in captions)
    assert base.findings == []
    assert target.memorization is not None and [m.prompt for m in target.memorization.scores] == [tb.domain(DOMAIN).prompt]
    assert {c.attack for c in result.comparisons} >= {"loss", "pia"}
    # The registered report writers rendered the saved result.
    assert (out / "report.html").is_file() and (out / "report.md").is_file()


def test_audit_refuses_a_truncated_lora_and_writes_nothing(test_testbed, trained_lora, tmp_path, capsys):
    _artifact, shared, _ = trained_lora
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(shared.read_bytes()[:-100])
    out = tmp_path / "report"
    assert main(["audit", "--base", str(test_testbed.pipeline_dir), "--lora", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("s2l: error:") and "truncated" in err
    assert not out.exists()


def test_audit_flag_must_match_the_content(test_testbed, trained_lora, tmp_path, capsys):
    _artifact, shared, _ = trained_lora
    assert main(["audit", "--base", str(test_testbed.pipeline_dir), "--embedding", str(shared)]) == 2
    assert "is a kohya_lora checkpoint; expected textual_inversion" in capsys.readouterr().err


def test_shake_fine_tunes_the_target_on_its_own_generations_and_reports_the_growth(test_testbed, trained_lora, tmp_path):
    from s2l_plugin.audit.api import audit_checkpoint

    _artifact, shared, _ = trained_lora
    tb = test_testbed
    out = tmp_path / "shake"
    result = audit_checkpoint(
        shared, base=tb.pipeline_dir, expect="lora", members=tb.path / "members" / DOMAIN,
        nonmembers=tb.path / "nonmembers" / DOMAIN, domain=DOMAIN, attacks=["loss"], memorization=False,
        out_dir=out, shake="lora", shake_images=8, shake_steps=2, write_reports=False,
    )
    assert [a.model.label for a in result.audits] == ["base", "lora", "lora+s2l"]
    shaken = result.audit("lora+s2l")
    assert shaken.model.method == "lora" and shaken.membership is not None
    # The synthetic set was generated from the target and the shaken model is a new artifact.
    assert len(list((out / "shake" / "private_set").rglob("*.png"))) == 8
    assert (out / "shake" / "artifact" / "pytorch_lora_weights.safetensors").is_file()
    growth = [c for c in result.comparisons if c.method == "lora+s2l-lora" and c.attack == "loss" and c.subset == "all"]
    assert len(growth) == 1
    assert growth[0].auc_before == result.audit("lora").membership.attack("loss").auc
    assert growth[0].auc_after == shaken.membership.attack("loss").auc
    assert shaken.membership.attack("loss").member_scores != result.audit("lora").membership.attack("loss").member_scores
    assert load_result(out).audit("lora+s2l").membership is not None
