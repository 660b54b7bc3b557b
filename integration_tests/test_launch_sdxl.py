"""`s2l launch` around the SDXL trainers: diffusers' train_dreambooth_lora_sdxl.py and
train_text_to_image_lora_sdxl.py, kohya's sdxl_train_network.py.

The stand-ins under integration_tests/scripts/ parse the real scripts' argument names, read the
data layout each reads and save the LoRA as each saves it, on a tiny SDXL pipeline with SDXL's
block layout: generate → run the script unchanged → find the artifact → audit → result.json.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors import safe_open

from s2l_plugin.cli import main
from s2l_plugin.errors import ConfigError
from s2l_plugin.launch import SCRIPT_SIGNATURES, launch, recognise_script
from s2l_plugin.result import load_result

pytestmark = pytest.mark.integration
SCRIPTS = Path(__file__).resolve().parent / "scripts"

_KOHYA = ["--train_data_dir", "PLACEHOLDER", "--network_module", "networks.lora", "--network_dim", "2",
          "--output_name", "my_sdxl_lora"]
_SGM_UNET = {"lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks"}
# script, its usual arguments (besides model and output), the method S2L picks, its data argument,
# the weights file it writes and the key prefixes in it (LoRA+DB adds --train_text_encoder: both encoders)
SDXL_TRAINERS = [
    pytest.param("train_dreambooth_lora_sdxl", ["--instance_data_dir", "PLACEHOLDER", "--instance_prompt", "sks digit",
                                                "--rank", "2"],
                 "lora_dreambooth", "--instance_data_dir", "pytorch_lora_weights.safetensors",
                 {"unet", "text_encoder", "text_encoder_2"}, id="train_dreambooth_lora_sdxl"),
    pytest.param("train_text_to_image_lora_sdxl", ["--train_data_dir", "PLACEHOLDER", "--rank", "2"],
                 "lora", "--train_data_dir", "pytorch_lora_weights.safetensors", {"unet"}, id="train_text_to_image_lora_sdxl"),
    pytest.param("sdxl_train_network", [*_KOHYA, "--network_train_unet_only"], "lora", "--train_data_dir",
                 "my_sdxl_lora.safetensors", _SGM_UNET, id="sdxl_train_network-unet_only"),
    pytest.param("sdxl_train_network", _KOHYA, "lora", "--train_data_dir", "my_sdxl_lora.safetensors",
                 _SGM_UNET | {"lora_te1_text_model", "lora_te2_text_model"}, id="sdxl_train_network"),
]


@pytest.fixture(scope="module")
def sdxl_base(tmp_path_factory):
    """A tiny SDXL base pipeline folder (diffusers' save_pretrained)."""
    from s2l_plugin.testbed.components import build_tiny_sdxl_pipeline

    folder = tmp_path_factory.mktemp("sdxl") / "base"
    build_tiny_sdxl_pipeline(seed=0).save_pretrained(folder)
    return folder



def _s2l_options(audit_sets) -> list[str]:
    return [
        "--s2l-domain", "seven", "--s2l-prompt", "a photo of the digit {domain}",
        "--s2l-num-images", "4", "--s2l-steps", "2",
        "--s2l-audit", f"members={audit_sets / 'members'},nonmembers={audit_sets / 'nonmembers'}",
        "--s2l-attacks", "loss", "--s2l-report", "json",
    ]


def _key_prefixes(path: Path, wanted: set[str]) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {w for w in wanted if any(k.startswith(w) for k in f.keys())}


@pytest.mark.parametrize("script, usual, method, data_flag, weights, prefixes", SDXL_TRAINERS)
def test_s2l_launch_generates_trains_and_audits_an_sdxl_trainer(script, usual, method, data_flag, weights, prefixes,
                                                                 tmp_path, sdxl_base, audit_sets):
    out = tmp_path / "out"
    argv = ["launch", *_s2l_options(audit_sets), "--", str(SCRIPTS / f"{script}.py"),
            "--pretrained_model_name_or_path", str(sdxl_base), "--output_dir", str(out), *usual]
    assert recognise_script(SCRIPTS / f"{script}.py") == script
    assert main(argv) == 0
    assert (out / "s2l-report" / "result.json").is_file()
    result = load_result(out / "s2l-report")
    assert [a.model.label for a in result.audits] == ["base", method]
    assert result.audits[1].membership.n_members == 2
    # The script's data argument pointed at the generated set (in the layout it reads); the rest untouched.
    args = result.config["script_args"]
    data_dir = Path(args[args.index(data_flag) + 1])
    assert data_dir.is_relative_to(out / "s2l-private-set") and "PLACEHOLDER" not in args
    assert len(list(data_dir.rglob("*.png"))) == 4
    for flag in ("--rank", "--network_dim", "--output_name", "--instance_prompt"):
        if flag in usual:
            assert args[args.index(flag) + 1] == usual[usual.index(flag) + 1]
    # The artifact audited is the file the script wrote, in the naming the real script writes.
    assert result.config["artifact"]["files"] == [weights]
    assert _key_prefixes(out / weights, prefixes) == prefixes


def test_sdxl_scripts_are_recognised_by_options_and_kohya_s_by_structure(tmp_path):
    kinds = [kind for kind, _ in SCRIPT_SIGNATURES]
    for sdxl, twin in (("train_dreambooth_lora_sdxl", "train_dreambooth_lora"),
                       ("train_text_to_image_lora_sdxl", "train_text_to_image_lora")):
        assert kinds.index(sdxl) < kinds.index(twin)  # the more specific signature first
    # kohya's real sdxl_train_network.py defines its options in library/ modules: its source names none.
    real_like = tmp_path / "sdxl_train_network.py"
    real_like.write_text("import train_network\nfrom library import sdxl_train_util\n\n"
                         "def setup_parser():\n    parser = train_network.setup_parser()\n"
                         "    sdxl_train_util.add_sdxl_training_arguments(parser)\n    return parser\n")
    assert recognise_script(real_like) == "sdxl_train_network"
    renamed = tmp_path / "my_trainer.py"
    renamed.write_text((SCRIPTS / "train_text_to_image_lora_sdxl.py").read_text())
    assert recognise_script(renamed) == "train_text_to_image_lora_sdxl"


@pytest.mark.parametrize("script, base, expected", [
    ("train_dreambooth_lora_sdxl", "sd", "use train_dreambooth_lora.py for this base"),
    ("train_dreambooth_lora", "sdxl", "use train_dreambooth_lora_sdxl.py for this base"),
    ("train_dreambooth", "sdxl", "expected a StableDiffusionPipeline folder"),
])
def test_a_script_of_the_other_model_family_fails_before_generating(script, base, expected, tmp_path, sdxl_base,
                                                                     audit_sets, test_testbed):
    out = tmp_path / "out"
    folder = sdxl_base if base == "sdxl" else test_testbed.pipeline_dir
    with pytest.raises(ConfigError, match=expected):
        launch([*_s2l_options(audit_sets), "--", str(SCRIPTS / f"{script}.py"), "--pretrained_model_name_or_path",
                str(folder), "--output_dir", str(out), "--instance_data_dir", "x", "--instance_prompt", "sks"])
    assert not out.exists()


def test_domain_with_an_adapter_that_does_not_know_the_sdxl_script_s_data_arguments(tmp_path, sdxl_base, audit_sets):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"a train_dreambooth_lora_sdxl script \(data arguments as train_dreambooth_lora\); "
                                          r"the adapter knows: train_dreambooth$"):
        launch([*_s2l_options(audit_sets), "--adapter", "dreambooth", "--", str(SCRIPTS / "train_dreambooth_lora_sdxl.py"),
                "--pretrained_model_name_or_path", str(sdxl_base), "--output_dir", str(out),
                "--instance_data_dir", "x", "--instance_prompt", "sks"])
    assert not out.exists()
