"""The loss attack's UNet forwards are bounded by latent size, not by the audit's batch size: the
testbed's small latents go through in one forward (the measured results are unchanged), large
latents (SDXL at 1024 px) in chunks whose scores agree with one forward."""

from __future__ import annotations

import torch

from s2l_plugin.audit.mia import loss as loss_mod
from s2l_plugin.audit.mia.engine import MEMBER, DiffusionModel, encode_batch


def _batch(pipe, n=4):
    images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return encode_batch(DiffusionModel(pipe), images, ["a photo of seven"] * n, [(MEMBER, i) for i in range(n)], seed=0)


def _count_forwards(unet):
    calls = []
    handle = unet.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


def test_testbed_latents_go_through_in_one_forward(tiny_pipeline):
    batch = _batch(tiny_pipeline)
    calls, handle = _count_forwards(tiny_pipeline.unet)
    try:
        with torch.inference_mode():
            loss_mod.per_image_loss(batch, loss_mod.DEFAULT_TIMESTEPS, loss_mod.DEFAULT_N_NOISE)
    finally:
        handle.remove()
    assert len(calls) == 1  # 4 images x 16 draws x 256 latent elements < DEFAULT_ROW_BUDGET


def test_larger_latents_are_chunked_and_score_as_one_forward(tiny_pipeline, monkeypatch):
    assert loss_mod.DEFAULT_ROW_BUDGET // (4 * 128 * 128) == 16  # rows per forward for SDXL at 1024 px
    batch = _batch(tiny_pipeline)
    with torch.inference_mode():
        whole = loss_mod.per_image_loss(batch, loss_mod.DEFAULT_TIMESTEPS, loss_mod.DEFAULT_N_NOISE, max_rows=64)
        # A budget of 8 rows of these latents stands in for 16 rows of SDXL's 4x128x128 at 2**20.
        monkeypatch.setattr(loss_mod, "DEFAULT_ROW_BUDGET", 8 * batch.latents[0].numel())
        calls, handle = _count_forwards(tiny_pipeline.unet)
        try:
            chunked = loss_mod.per_image_loss(batch, loss_mod.DEFAULT_TIMESTEPS, loss_mod.DEFAULT_N_NOISE)
        finally:
            handle.remove()
    assert len(calls) == 64 // 8
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
