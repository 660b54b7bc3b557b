"""The attack plugin of docs/hooks.md, exactly as the page shows it, registered as a plugin and run
through every audit a user can select it in: ``audit_membership``, ``s2l audit`` (``audit_checkpoint``)
and ``s2l run`` (``run_experiment``). Each gets its AUC into the result.

The code is read from the page at test time (its ``python test`` block under "Writing a plugin"),
so the page cannot drift from what is tested. Tiny sizes: about 6 s on one CPU thread (the run
fine-tunes a LoRA for two steps).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
from s2l_plugin.hooks.manager import collect, make_plugin_manager

from s2l_plugin import audit_membership, load_pipeline, load_run_config, run_experiment
from s2l_plugin.audit.api import audit_checkpoint

# The block parser lives with the docs checks (test_docs_examples.py, beside this file); loaded by path.
_spec = importlib.util.spec_from_file_location("_s2l_docs_checks_attack", Path(__file__).resolve().parent / "test_docs_examples.py")
_checks = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _checks  # dataclasses look their module up there
_spec.loader.exec_module(_checks)

DOMAIN = "seven"
ATTACK = "one-step-loss"


def _doc_plugin_block():
    (block,) = [b for b in _checks.doc_blocks(_checks.DOCS / "hooks.md", "python") if b.section == "Writing-a-plugin"]
    return block


@pytest.fixture
def pm():
    """A plugin manager with the page's plugin module (executed from the page's own text) registered."""
    block = _doc_plugin_block()
    assert block.code.startswith("# my_package/plugin.py\n"), "the block is the plugin module the page packages"
    module = types.ModuleType("my_package.plugin")
    exec(compile(block.code, block.where, "exec"), module.__dict__)
    manager = make_plugin_manager(load_entry_points=False, extra_plugins=[module])
    assert manager.get_plugin("my_package.plugin") is module
    return manager


def _auc_ok(attack_result, n_members, n_nonmembers):
    assert attack_result.attack == ATTACK
    assert 0.0 <= attack_result.auc <= 1.0
    assert len(attack_result.member_scores) == n_members and len(attack_result.nonmember_scores) == n_nonmembers


def test_the_docs_example_attack_is_the_registered_plugin(pm):
    attack = collect("attacks", pm)[ATTACK]
    assert type(attack).__module__ == "my_package.plugin" and attack.needs_reference is False


def test_docs_plugin_attack_in_audit_membership(pm, test_testbed):
    tb = test_testbed
    pipe = load_pipeline(str(tb.pipeline_dir), device="cpu")
    members, nonmembers = tb.members(DOMAIN)[:6], tb.nonmembers(DOMAIN)[:6]
    result = audit_membership(pipe, members, nonmembers, attacks=[ATTACK, "loss"], batch_size=4, n_boot=50,
                              progress=False, pm=pm)
    _auc_ok(result.attack(ATTACK), 6, 6)
    again = audit_membership(pipe, members, nonmembers, attacks=[ATTACK], batch_size=5, n_boot=50, progress=False, pm=pm)
    # Its noise comes from the per-image seeds, so a different batching scores every image the same.
    assert again.attack(ATTACK).member_scores == pytest.approx(result.attack(ATTACK).member_scores, rel=1e-5, abs=1e-7)


def test_docs_plugin_attack_in_s2l_audit_result_json(pm, test_testbed, tmp_path):
    import torch
    from safetensors.torch import save_file

    tb = test_testbed
    target = tmp_path / "learned_embeds.safetensors"
    save_file({"<digit-style>": torch.randn(1, 32, generator=torch.Generator().manual_seed(0))}, str(target))
    out = tmp_path / "audit"
    audit_checkpoint(target, base=str(tb.pipeline_dir), members=tb.members(DOMAIN)[:4], nonmembers=tb.nonmembers(DOMAIN)[:4],
                     domain=DOMAIN, attacks=[ATTACK], memorization=False, out_dir=out, write_reports=False, pm=pm)
    saved = json.loads((out / "result.json").read_text())
    assert saved["config"]["attacks"] == [ATTACK]
    assert [a["model"]["label"] for a in saved["audits"]] == ["base", "textual_inversion"]
    for audit in saved["audits"]:
        (attack,) = audit["membership"]["attacks"]
        assert attack["attack"] == ATTACK and 0.0 <= attack["auc"] <= 1.0 and len(attack["member_scores"]) == 4
    assert [c["attack"] for c in saved["comparisons"] if c["subset"] == "all"] == [ATTACK]


def test_docs_plugin_attack_in_s2l_run_result_json(pm, test_testbed, tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(f"""
out = "{tmp_path / 'out'}"
base = "{test_testbed.path}"
seed = 0
domains = ["{DOMAIN}"]
methods = ["lora"]
report = ["markdown"]
[generate]
num_images = 4
num_inference_steps = 2
batch_size = 4
[train]
max_train_steps = 2
train_batch_size = 2
[audit]
attacks = ["{ATTACK}"]
extraction = 0
memorization = false
""")
    path = run_experiment(load_run_config(config), pm=pm)
    saved = json.loads(Path(path).read_text())
    assert [a["model"]["label"] for a in saved["audits"]] == ["base", "lora"]
    for audit in saved["audits"]:
        (attack,) = audit["membership"]["attacks"]
        assert attack["attack"] == ATTACK and 0.0 <= attack["auc"] <= 1.0
        assert len(attack["member_scores"]) == audit["membership"]["n_members"] > 0
    assert {c["attack"] for c in saved["comparisons"]} == {ATTACK}
