"""``s2l scan DIR``: every checkpoint in a folder tree, one row each, unreadable files as rows, exit 0."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from s2l_plugin.audit.metadata import scan_tree
from s2l_plugin.cli import main

KOHYA = {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 64),
         "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(64, 4),
         "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0)}
KOHYA_XL = {k.replace("lora_unet_", "lora_te1_"): v for k, v in KOHYA.items()}
TAGS = json.dumps({"20_ohwx woman": {"ohwx woman": 14}})

#: file -> (status, format starts with, base, worst severity)
EXPECTED = {
    "loras/jane.safetensors": ("ok", "kohya_lora", "sd", "high"),
    "loras/xl/jane_xl.safetensors": ("ok", "kohya_lora", "sdxl", "medium"),
    "loras/flux.safetensors": ("ok", "kohya_lora", "flux", "info"),
    "embeddings/ohwx.safetensors": ("ok", "textual_inversion", "sdxl", None),
    "embeddings/a1111.pt": ("skipped", "pickle", "unknown", None),
    "broken/truncated.safetensors": ("error", "", "unknown", None),
    "broken/random.ckpt": ("error", "", "unknown", None),
    "broken/unknown_keys.safetensors": ("error", "safetensors (unrecognised)", "sd", "high"),
    "pipeline": ("ok", "diffusers_pipeline", "sd", None),
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tree") / "published"
    for sub in ("loras/xl", "embeddings", "broken", "notes"):
        (root / sub).mkdir(parents=True)
    save_file(KOHYA, str(root / "loras/jane.safetensors"), metadata={"ss_tag_frequency": TAGS, "ss_base_model_version": "sd_v1"})
    save_file(KOHYA_XL, str(root / "loras/xl/jane_xl.safetensors"), metadata={"modelspec.trigger_phrase": "ohwx"})
    save_file(KOHYA, str(root / "loras/flux.safetensors"), metadata={"ss_base_model_version": "flux1"})
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(root / "embeddings/ohwx.safetensors"))
    torch.save({"string_to_param": {"*": torch.zeros(1, 768)}, "name": "jane"}, str(root / "embeddings/a1111.pt"))
    good = (root / "loras/jane.safetensors").read_bytes()
    (root / "broken/truncated.safetensors").write_bytes(good[: len(good) // 2])
    (root / "broken/random.ckpt").write_bytes(b"\x01\x02not a checkpoint")
    save_file({"weird.weight": torch.zeros(2, 2, 2)}, str(root / "broken/unknown_keys.safetensors"),
              metadata={"ss_tag_frequency": TAGS, "modelspec.architecture": "stable-diffusion-v1"})
    (root / "notes/README.md").write_text("not a checkpoint")
    from s2l_plugin.testbed.components import build_tiny_pipeline

    build_tiny_pipeline(seed=0).save_pretrained(str(root / "pipeline"))
    return root


def _check_rows(rows: list[dict]) -> None:
    by_file = {r["file"]: r for r in rows}
    assert sorted(by_file) == sorted(EXPECTED), sorted(by_file)
    for file, (status, fmt, base, worst) in EXPECTED.items():
        row = by_file[file]
        assert (row["status"], row["base"], row["worst"] or None) == (status, base, worst), row
        assert row["format"].startswith(fmt), row
        assert bool(row["error"]) == (status != "ok"), row


def test_scan_dir_gives_one_row_per_checkpoint_and_writes_csv_and_json(tree, tmp_path, capsys):
    out = tmp_path / "scan-out"
    assert main(["scan", str(tree), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "9 checkpoint(s), worst finding: high; 3 unreadable, 1 skipped" in printed
    data = json.loads((out / "scan.json").read_text())
    assert data["worst"] == "high" and data["root"] == str(tree)
    _check_rows(data["rows"])
    with open(out / "scan.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["file", "status", "format", "base", "high", "medium", "low", "info", "worst", "error"]
    _check_rows(rows)
    assert {r["file"]: int(r["high"]) for r in rows}["loras/jane.safetensors"] == 1
    assert "--allow-pickle" in {r["file"]: r["error"] for r in rows}["embeddings/a1111.pt"]


def test_scan_dir_json_prints_the_rows_and_writes_nothing_by_default(tree, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["scan", str(tree), "--json"]) == 0
    _check_rows(json.loads(capsys.readouterr().out)["rows"])
    assert list(tmp_path.iterdir()) == []
    assert main(["scan", str(tree)]) == 0  # without --json: the documented default folder
    assert sorted(p.name for p in (tmp_path / "s2l-scan").iterdir()) == ["scan.csv", "scan.json"]


def test_scan_dir_reads_pickles_with_allow_pickle(tree):
    rows = {r.file: r for r in scan_tree(tree, allow_pickle=True).rows}
    row = rows["embeddings/a1111.pt"]
    assert (row.status, row.format, row.base) == ("ok", "textual_inversion (a1111)", "sd")
    assert any("jane" in f.message for f in row.findings)


def test_scan_tree_returns_rows_and_worst_for_a_gate(tree, tmp_path):
    scan = scan_tree(tree / "loras" / "xl")
    assert [r.file for r in scan.rows] == ["jane_xl.safetensors"] and scan.worst == "medium"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert scan_tree(empty).rows == [] and scan_tree(empty).worst is None


def test_scan_artifact_keeps_the_one_artifact_view_of_a_folder(tmp_path, capsys):
    folder = tmp_path / "pivotal"
    folder.mkdir()
    save_file(KOHYA, str(folder / "lora.safetensors"), metadata={"ss_tag_frequency": TAGS})
    save_file({"ohwx": torch.zeros(1, 64)}, str(folder / "ohwx.safetensors"))
    assert main(["scan", str(folder), "--artifact", "--json"]) == 0
    keys = {f["key"] for f in json.loads(capsys.readouterr().out)}
    assert "lora.safetensors/ss_tag_frequency" in keys and "ohwx.safetensors/token" in keys


def test_a_corrupt_header_is_a_row_not_a_crash(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", 10) + b'{"x": 1}  ')
    (tmp_path / "b.bin").write_bytes(b"")
    rows = scan_tree(tmp_path).rows
    assert [(r.file, r.status) for r in rows] == [("a.safetensors", "error"), ("b.bin", "error")]


def test_the_gate_on_a_folder_scan_trips_on_the_worst_file_and_holds_below_it(tree, tmp_path, capsys):
    from s2l_plugin.gate import GATE_EXIT_CODE

    out = tmp_path / "gated"
    assert main(["scan", str(tree), "--out", str(out), "--fail-on", "scan.severity>=high"]) == GATE_EXIT_CODE
    verdict = json.loads((out / "verdict.json").read_text())
    assert verdict["verdict"] == "fail" and verdict["failed"] == ["scan.severity>=high"]
    tripped = {m["model"] for c in verdict["conditions"] for m in c["measurements"] if m["tripped"]}
    assert tripped == {f for f, (_, _, _, worst) in EXPECTED.items() if worst == "high"}
    assert capsys.readouterr().err.startswith("Privacy gate FAILED (exit 3): scan.severity>=high")
    assert len(json.loads((out / "scan.json").read_text())["rows"]) == len(EXPECTED)  # the report is written either way
    held = tmp_path / "held"
    assert main(["scan", str(tree), "--out", str(held), "--fail-on", "scan.findings>100"]) == 0
    assert json.loads((held / "verdict.json").read_text())["verdict"] == "pass"


def test_the_scan_gate_takes_only_scan_metrics_and_checks_before_reading(tree, tmp_path, capsys):
    for expr, why in (("auc>0.6", "scan.severity or scan.findings"), ("scan.severity>=severe", "not one of")):
        capsys.readouterr()
        assert main(["scan", str(tree), "--out", str(tmp_path / "x"), "--fail-on", expr]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and why in err[0], err
    assert not (tmp_path / "x").exists()


def test_the_gate_on_one_file(tree, capsys):
    from s2l_plugin.gate import GATE_EXIT_CODE

    assert main(["scan", str(tree / "loras/jane.safetensors"), "--fail-on", "scan.severity>=medium"]) == GATE_EXIT_CODE
    assert main(["scan", str(tree / "loras/flux.safetensors"), "--fail-on", "scan.severity>=medium"]) == 0
