"""Misspelled attack names fail before any model is loaded, generated from or trained: one line, exit 2."""

from __future__ import annotations

from pathlib import Path

from s2l_plugin.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "integration_tests" / "scripts" / "train_dreambooth_lora.py"


def test_s2l_audit_refuses_an_unknown_attack_before_loading(test_testbed, tmp_path, capsys, monkeypatch):
    import s2l_plugin.formats.loaders as loaders

    monkeypatch.setattr(loaders, "load_base", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded a model")))
    code = main(["audit", "--model", str(test_testbed.pipeline_dir), "--base", str(test_testbed.pipeline_dir),
                 "--attacks", "loss,nope", "--out", str(tmp_path / "audit")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'nope'" in err[0], err
    assert not (tmp_path / "audit").exists()


def test_s2l_launch_refuses_an_unknown_attack_before_generating(test_testbed, tmp_path, capsys):
    members, nonmembers = test_testbed.path / "members" / "seven", test_testbed.path / "nonmembers" / "seven"
    out = tmp_path / "launched"
    code = main(["launch", "--s2l-domain", "seven", "--s2l-num-images", "1", "--s2l-attacks", "loss,nope",
                 "--s2l-audit", f"members={members},nonmembers={nonmembers}", "--", str(SCRIPT),
                 "--pretrained_model_name_or_path", str(test_testbed.pipeline_dir),
                 "--instance_data_dir", str(tmp_path / "data"), "--output_dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "'nope'" in err[0], err
    assert not (out / "s2l-private-set").exists()
