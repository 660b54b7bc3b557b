"""The metadata privacy scan: what a kohya / A1111 / diffusers checkpoint's metadata leaks, without loading a model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from s2l_plugin.audit.metadata import scan_file, scan_metadata, worst_severity
from s2l_plugin.cli import main
from s2l_plugin.errors import FormatError

KOHYA_KEYS = {
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 64),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(64, 4),
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0),
}

# What sd-scripts' train_network.py writes (str -> str; dict values JSON-encoded).
KOHYA_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_tag_frequency": json.dumps(
        {"20_ohwx woman": {"ohwx woman": 14, "smiling": 6, "standing in a kitchen in Lyon": 1},
         "5_woman": {"woman": 40}}
    ),
    "ss_dataset_dirs": json.dumps({"20_ohwx woman": {"n_repeats": 20, "img_count": 14}, "5_woman": {"n_repeats": 5, "img_count": 40}}),
    "ss_datasets": json.dumps([{"subsets": [{"image_dir": "/home/jdoe/photos/jane_2023", "class_tokens": "ohwx woman",
                                              "is_reg": False, "metadata_file": None}]}]),
    "modelspec.trigger_phrase": "ohwx woman",
    "ss_sd_model_name": "C:\\Users\\jdoe\\sd\\models\\v1-5-pruned.safetensors",
    "ss_num_train_images": "280",
    "ss_seed": "1234",
}


@pytest.fixture
def kohya_file(tmp_path):
    path = tmp_path / "community_lora.safetensors"
    save_file(KOHYA_KEYS, str(path), metadata=KOHYA_METADATA)
    return path


def test_tag_frequency_reports_the_leaked_captions_with_high_severity(kohya_file):
    findings = scan_file(kohya_file)
    tag = [f for f in findings if f.key == "ss_tag_frequency"]
    assert len(tag) == 1 and tag[0].severity == "high"
    for caption in ("ohwx woman", "smiling", "standing in a kitchen in Lyon", "woman"):
        assert caption in tag[0].message
    assert "4 distinct caption tags" in tag[0].message
    assert worst_severity(findings) == "high"


def test_dataset_folders_repeats_paths_and_trigger_are_reported(kohya_file):
    by_key: dict[str, list] = {}
    for f in scan_file(kohya_file):
        by_key.setdefault(f.key, []).append(f)
    dirs = by_key["ss_dataset_dirs"][0]
    assert "'20_ohwx woman' (14 images x 20 repeats, token/class 'ohwx woman')" in dirs.message
    datasets = by_key["ss_datasets"]
    assert datasets[0].severity == "high" and "/home/jdoe/photos/jane_2023" in datasets[0].message
    assert any("local path" in f.message and "/home/jdoe/photos/jane_2023" in f.message for f in datasets)
    assert any("local path" in f.message and "C:\\Users\\jdoe" in f.message for f in by_key["ss_sd_model_name"])
    assert by_key["modelspec.trigger_phrase"][0].severity == "medium"
    assert "'ohwx woman'" in by_key["modelspec.trigger_phrase"][0].message
    assert by_key["ss_num_train_images"][0].severity == "low"


def test_findings_are_sorted_high_first():
    findings = scan_metadata(KOHYA_METADATA)
    ranks = ["high", "medium", "low", "info"]
    assert [ranks.index(f.severity) for f in findings] == sorted(ranks.index(f.severity) for f in findings)


def test_no_metadata_gives_no_findings(tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file(KOHYA_KEYS, str(path))
    assert scan_file(path) == []


def test_diffusers_embedding_token_name_is_a_finding(tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    save_file({"<jane-doe>": torch.zeros(2, 32)}, str(path), metadata={"format": "pt"})
    tokens = [f for f in scan_file(path) if f.key == "token"]
    assert len(tokens) == 1 and "'<jane-doe>'" in tokens[0].message and tokens[0].severity == "medium"


def test_a1111_embedding_and_hypernetwork_names_need_allow_pickle(tmp_path):
    emb = tmp_path / "jane.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.zeros(2, 32)}, "name": "jane-doe",
                "step": 500, "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "v1-5-pruned"}, emb)
    with pytest.raises(FormatError, match="allow-pickle"):
        scan_file(emb)
    findings = {f.key: f for f in scan_file(emb, allow_pickle=True)}
    assert findings["name"].severity == "medium" and "'jane-doe'" in findings["name"].message
    assert "'v1-5-pruned'" in findings["sd_checkpoint_name"].message

    hyper = tmp_path / "hn.pt"
    k = {"linear.0.weight": torch.zeros(64, 32), "linear.0.bias": torch.zeros(64),
         "linear.1.weight": torch.zeros(32, 64), "linear.1.bias": torch.zeros(32)}
    torch.save({32: (k, k), "name": "janes_face", "layer_structure": [1, 2, 1], "activation_func": "relu",
                "sd_checkpoint_name": "v1-5-pruned", "step": 10}, hyper)
    findings = {f.key: f for f in scan_file(hyper, allow_pickle=True)}
    assert "hypernetwork name 'janes_face'" in findings["name"].message


def test_cli_scan_prints_the_captions_and_exits_zero(kohya_file, capsys):
    assert main(["scan", str(kohya_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    tag = next(f for f in data if f["key"] == "ss_tag_frequency")
    assert "standing in a kitchen in Lyon" in tag["value"] and tag["severity"] == "high"
    assert main(["scan", str(kohya_file)]) == 0
    assert "ss_tag_frequency" in capsys.readouterr().out


def test_cli_scan_of_a_truncated_file_is_one_line_error(kohya_file, tmp_path, capsys):
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(kohya_file.read_bytes()[:-10])
    assert main(["scan", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("s2l: error:") and "truncated" in err and "\n" not in err


def test_cli_scan_shows_markup_like_captions_verbatim(tmp_path, capsys):
    """Checkpoint text is data, never console markup: a caption '[/bold] x' must print as written."""
    path = tmp_path / "markup.safetensors"
    tags = {"10_sks": {"[/bold] my [red]secret[/red] caption": 3}}
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(path), metadata={"ss_tag_frequency": json.dumps(tags)})
    assert main(["scan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[/bold] my" in out and "[red]secret[/red] caption" in out


def test_an_audit_goes_on_when_the_artifact_file_is_a_format_the_scan_cannot_read(tiny_pipeline, tmp_path):
    """A plugin method may publish its own format: the audit records that the metadata was not scanned."""
    import torch
    from safetensors.torch import save_file

    from s2l_plugin.audit.api import s2l_audit
    from s2l_plugin.context import AuditSpec, Run

    weights = tmp_path / "bitfit.safetensors"
    save_file({"unet.down.0.bias": torch.zeros(3), "unet.up.0.bias": torch.zeros(3, 3)}, str(weights))
    run = Run(audit=AuditSpec(memorization=False), state={"label": "bitfit", "target_path": str(weights)})
    result = s2l_audit(run=run, target=tiny_pipeline, reference=None)
    (finding,) = result.findings
    assert finding.severity == "info" and finding.message.startswith("not scanned: ") and finding.value == str(weights)
