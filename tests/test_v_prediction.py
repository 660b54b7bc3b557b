"""SD 2.x-style v-prediction and zero-terminal-SNR bases: the attacks read the UNet as the ε the
scheduler implies, and `s2l finetune` + `s2l audit` run on one."""

from __future__ import annotations

import json

import pytest
import torch

from s2l_plugin.audit.mia.engine import DiffusionModel
from s2l_plugin.cli import main
from s2l_plugin.testbed.components import build_tiny_pipeline

SCHEDULERS = {
    "v_prediction": {},
    "v_prediction+zero_snr": {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
}


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_eps_is_the_noise_the_scheduler_implies(kind):
    pipe = build_tiny_pipeline(seed=3, prediction_type="v_prediction", **SCHEDULERS[kind])
    model = DiffusionModel(pipe)
    assert model.prediction_type == "v_prediction"
    text = model.encode_text(["a photo of seven"] * 3)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(10)
    for t in (int(scheduler.timesteps[1]), int(scheduler.timesteps[5]), int(scheduler.timesteps[-1])):
        with torch.no_grad():
            v = pipe.unet(x, t, encoder_hidden_states=text).sample
            eps = model.eps(x, t, text)
        # DDIM's own reading of the v output: its predicted clean sample, and the noise that implies.
        x0 = scheduler.step(v, t, x).pred_original_sample
        a = scheduler.alphas_cumprod[t]
        implied = (x - a.sqrt() * x0) / (1 - a).sqrt()
        assert torch.allclose(eps, implied, atol=1e-4), (kind, t, (eps - implied).abs().max())
    if kind.endswith("zero_snr"):
        assert float(model.alphas_cumprod[-1]) < 1e-6  # the last timestep is pure noise


def test_finetune_and_audit_run_on_a_v_prediction_base(test_testbed, tmp_path):
    base = tmp_path / "v-base"
    build_tiny_pipeline(seed=0, prediction_type="v_prediction").save_pretrained(base)
    members, nonmembers = test_testbed.path / "members" / "seven", test_testbed.path / "nonmembers" / "seven"
    lora = tmp_path / "lora"
    assert main(["finetune", "--method", "lora", "--model", str(base), "--data", str(members), "--out", str(lora),
                 "--steps", "2", "--batch-size", "4"]) == 0
    # (The velocity target itself: tests/test_adapters_dreambooth_lora.py::test_v_prediction_training_lowers_the_v_prediction_loss.)
    out = tmp_path / "audit"
    assert main(["audit", "--base", str(base), "--lora", str(lora / "pytorch_lora_weights.safetensors"),
                 "--members", str(members), "--nonmembers", str(nonmembers), "--attacks", "loss,pia,secmi",
                 "--domain", "seven", "--extraction", "0", "--no-memorization", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    aucs = [a["auc"] for a in result["audits"][-1]["membership"]["attacks"]]
    assert len(aucs) == 3 and all(0.0 <= x <= 1.0 for x in aucs)
