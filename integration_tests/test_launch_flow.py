"""`s2l launch` around diffusers' flow-matching DreamBooth LoRA trainers, train_dreambooth_lora_flux.py
and train_dreambooth_lora_sd3.py.

The stand-ins under integration_tests/scripts/ parse the real scripts' argument names, read the
instance folder, train LoRA on the transformer with the flow-matching loss and save it as the
real scripts do, on tiny Flux and SD3 pipelines: generate → run the script unchanged → find the
artifact → audit → result.json.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from safetensors import safe_open

from s2l_plugin.cli import main
from s2l_plugin.errors import ConfigError
from s2l_plugin.launch import SCRIPT_SIGNATURES, launch, recognise_script
from s2l_plugin.result import load_result

pytestmark = pytest.mark.integration
SCRIPTS = Path(__file__).resolve().parent / "scripts"
FAMILIES = {"flux": "train_dreambooth_lora_flux", "sd3": "train_dreambooth_lora_sd3"}


@pytest.fixture(scope="module")
def flow_bases(tmp_path_factory):
    from s2l_plugin.testbed.components import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    out = {}
    for family, build in (("flux", build_tiny_flux_pipeline), ("sd3", build_tiny_sd3_pipeline)):
        folder = tmp_path_factory.mktemp(family) / "base"
        build(seed=0).save_pretrained(folder)
        out[family] = folder
    return out



def _s2l_options(audit_sets) -> list[str]:
    return [
        "--s2l-domain", "seven", "--s2l-prompt", "a photo of the digit {domain}",
        "--s2l-num-images", "4", "--s2l-steps", "2",
        "--s2l-audit", f"members={audit_sets / 'members'},nonmembers={audit_sets / 'nonmembers'}",
        "--s2l-attacks", "loss,pian", "--s2l-report", "json",
    ]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_s2l_launch_generates_trains_and_audits_a_flow_matching_trainer(family, tmp_path, flow_bases, audit_sets):
    script = SCRIPTS / f"{FAMILIES[family]}.py"
    out = tmp_path / "out"
    argv = ["launch", *_s2l_options(audit_sets), "--", str(script), "--pretrained_model_name_or_path", str(flow_bases[family]),
            "--output_dir", str(out), "--instance_data_dir", "PLACEHOLDER", "--instance_prompt", "sks digit", "--rank", "2"]
    assert recognise_script(script) == FAMILIES[family]
    assert main(argv) == 0
    result = load_result(out / "s2l-report")
    assert [a.model.label for a in result.audits] == ["base", "lora"]
    assert {a.attack for a in result.audits[1].membership.attacks} == {"loss", "pian"}
    args = result.config["script_args"]
    data_dir = Path(args[args.index("--instance_data_dir") + 1])
    assert data_dir.is_relative_to(out / "s2l-private-set") and "PLACEHOLDER" not in args
    assert len(list(data_dir.rglob("*.png"))) == 4
    assert result.config["artifact"]["files"] == ["pytorch_lora_weights.safetensors"]
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())


def test_flow_scripts_are_recognised_before_the_sd_and_sdxl_twins():
    kinds = [kind for kind, _ in SCRIPT_SIGNATURES]
    for flow in FAMILIES.values():
        assert kinds.index(flow) < kinds.index("train_dreambooth_lora_sdxl") < kinds.index("train_dreambooth_lora")


@pytest.mark.parametrize("script, base, expected", [
    ("train_dreambooth_lora_flux", "sd3", "use train_dreambooth_lora_sd3.py for this base"),
    ("train_dreambooth_lora_sd3", "sd", "use train_dreambooth_lora.py for this base"),
    ("train_dreambooth_lora", "flux", "use train_dreambooth_lora_flux.py for this base"),
])
def test_a_script_of_another_model_family_fails_before_generating(script, base, expected, tmp_path, flow_bases, audit_sets,
                                                                   test_testbed):
    out = tmp_path / "out"
    folder = test_testbed.pipeline_dir if base == "sd" else flow_bases[base]
    with pytest.raises(ConfigError, match=expected):
        launch([*_s2l_options(audit_sets), "--", str(SCRIPTS / f"{script}.py"), "--pretrained_model_name_or_path",
                str(folder), "--output_dir", str(out), "--instance_data_dir", "x", "--instance_prompt", "sks"])
    assert not out.exists()


@pytest.mark.skipif(not (os.environ.get("S2L_DIFFUSERS_EXAMPLES") and os.environ.get("S2L_DIFFUSERS_PYTHON")),
                    reason="S2L_DIFFUSERS_EXAMPLES (a diffusers examples/ copy) and S2L_DIFFUSERS_PYTHON (a venv with torchvision) not set")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_real_diffusers_flow_matching_trainer(family, tmp_path, flow_bases, audit_sets):
    """The real train_dreambooth_lora_flux.py / _sd3.py, run by `s2l launch --python` in their own
    environment (torchvision), on the tiny base: the synthetic set, 2 steps, the LoRA audited."""
    script = Path(os.environ["S2L_DIFFUSERS_EXAMPLES"]) / "dreambooth" / f"{FAMILIES[family]}.py"
    out = tmp_path / "out"
    assert main(["launch", *_s2l_options(audit_sets), "--python", os.environ["S2L_DIFFUSERS_PYTHON"], "--", str(script),
                 "--pretrained_model_name_or_path", str(flow_bases[family]), "--output_dir", str(out),
                 "--instance_data_dir", "x", "--instance_prompt", "a photo of the digit seven", "--resolution", "16",
                 "--train_batch_size", "2", "--max_train_steps", "2", "--rank", "2", "--learning_rate", "1e-3",
                 "--mixed_precision", "no", "--report_to", "tensorboard"]) == 0
    result = load_result(out / "s2l-report")
    assert [a.model.label for a in result.audits] == ["base", "lora"]
    assert all(0.0 <= a.auc <= 1.0 for a in result.audits[1].membership.attacks)
