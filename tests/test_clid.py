"""CLiD (s2l_plugin/audit/mia/clid.py): its statistic, sign on a caption-conditional exact memorizer,
call count, determinism, both forms, SDXL, and that it stays opt-in (not a default attack)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_mia import OracleUNet, _Out, oracle_pipeline

from s2l_plugin.audit.metrics import roc_auc
from s2l_plugin.audit.mia import CLiDAttack, audit_membership
from s2l_plugin.audit.mia.clid import CLID_STREAM, DEFAULT_TIMESTEPS
from s2l_plugin.audit.mia.engine import MEMBER, NONMEMBER, DiffusionModel, encode_batch, image_noise
from s2l_plugin.audit.mia.loss import per_image_loss
from s2l_plugin.config import DEFAULT_ATTACKS, DEFAULT_ATTACKS_WITH_BASE
from s2l_plugin.errors import ConfigError

N = 8  # members and non-members each


class CaptionOracleUNet(OracleUNet):
    """The Bayes-optimal denoiser of a finite set of (image, caption) pairs.

    The text is a one-hot caption id ``[N, 1, 2N]`` (zeros = the null caption). Given a caption it
    was trained on, it denoises towards that caption's image only; given the null caption or a
    caption it never saw, towards the posterior over every training image (the unconditional
    memorizer). Its training captions are ids 0..N-1.
    """

    def forward(self, x, t, encoder_hidden_states):
        self.calls.append(x.shape[0])
        a = self.acp[t].view(-1, 1, 1, 1)
        d = ((x[:, None] - a.sqrt()[:, None] * self.train_set[None]) ** 2).flatten(2).sum(-1)  # [n, M]
        seen = encoder_hidden_states[:, 0, : self.train_set.shape[0]]  # [n, M]: 1 at the trained caption
        mask = torch.where(seen.sum(1, keepdim=True) > 0, seen, torch.ones_like(seen))
        w = torch.softmax(-d / (2 * (1 - a.view(-1, 1))) + mask.clamp_min(1e-30).log(), dim=1)
        x0 = torch.einsum("nm,mchw->nchw", w, self.train_set)
        return _Out((x - a.sqrt() * x0) / (1 - a).sqrt())


def caption_oracle(train: torch.Tensor) -> SimpleNamespace:
    """``train`` memorized with captions "img0".."img{N-1}"; any other "imgK" (K < 2N) is a caption it never saw."""
    pipe = oracle_pipeline(train)
    pipe.unet = CaptionOracleUNet(train, pipe.scheduler.alphas_cumprod.float())
    pipe.unet.device, pipe.unet.dtype = torch.device("cpu"), torch.float32

    def encode_prompt(prompts, device, n, cfg):
        out = torch.zeros(len(prompts), 1, 2 * N)
        for i, p in enumerate(prompts):
            if p:
                out[i, 0, int(p.removeprefix("img"))] = 1.0
        return out, None

    pipe.encode_prompt = encode_prompt
    return pipe


@pytest.fixture(scope="module")
def memorizer():
    g = torch.Generator().manual_seed(0)
    members = torch.rand(N, 3, 4, 4, generator=g) * 2 - 1
    nonmembers = torch.rand(N, 3, 4, 4, generator=g) * 2 - 1
    return caption_oracle(members), members, nonmembers


def _scores(attack, memorizer):
    pipe, members, nonmembers = memorizer
    sm = attack.score(pipe, members, [f"img{i}" for i in range(N)], seed=0)
    sn = attack.score(pipe, nonmembers, [f"img{N + i}" for i in range(N)], seed=0, keys=[(NONMEMBER, i) for i in range(N)])
    return sm, sn


def test_clid_ranks_a_caption_memorizers_training_pairs_first(memorizer) -> None:
    sm, sn = _scores(CLiDAttack(), memorizer)
    assert roc_auc(sm, sn) == 1.0
    # The pure discrepancy too: members' own caption helps (D > 0); an unseen caption changes nothing (D = 0).
    dm, dn = _scores(CLiDAttack(loss_weight=0.0), memorizer)
    assert roc_auc(dm, dn) == 1.0
    assert np.all(dm > 0) and np.allclose(dn, 0.0, atol=1e-6)


def test_clid_is_the_null_minus_own_caption_loss_on_shared_noise(memorizer) -> None:
    pipe, members, _ = memorizer
    caps = [f"img{i}" for i in range(4)]
    attack = CLiDAttack(loss_weight=0.25)
    batch = encode_batch(DiffusionModel(pipe), members[:4], caps, [(MEMBER, i) for i in range(4)], 3)
    own, null = attack.losses(batch)
    np.testing.assert_allclose(attack.score_encoded(batch).numpy(), (null - own - 0.25 * own).numpy(), rtol=1e-6)
    # Both terms are the loss attack's ε-MSE at CLiD's timesteps, on one draw from CLiD's own stream.
    noise = image_noise(3, CLID_STREAM, batch.keys, (len(DEFAULT_TIMESTEPS), *batch.latents.shape[1:]))
    torch.testing.assert_close(own, per_image_loss(batch, DEFAULT_TIMESTEPS, 1, noise=noise))
    null_batch = encode_batch(DiffusionModel(pipe), members[:4], [""] * 4, batch.keys, 3)
    torch.testing.assert_close(null, per_image_loss(null_batch, DEFAULT_TIMESTEPS, 1, noise=noise))
    assert torch.all(null > own)  # the memorized caption helps


def test_clid_declares_its_unet_calls_and_params(memorizer) -> None:
    pipe, members, _ = memorizer
    attack = CLiDAttack()
    assert attack.unet_calls_per_image == 6 and attack.params == {
        "timesteps": [440, 450, 460], "n_noise": 1, "null_caption": "", "loss_weight": 1e-3}
    pipe.unet.calls.clear()
    attack.score(pipe, members[:5], [f"img{i}" for i in range(5)])
    assert sum(pipe.unet.calls) == 6 * 5
    assert CLiDAttack(timesteps=(100, 200), n_noise=2).unet_calls_per_image == 8


def test_clid_rejects_bad_settings(tiny_pipeline) -> None:
    for kwargs, match in (({"n_noise": 0}, "n_noise=0"), ({"loss_weight": -1}, "loss_weight=-1"), ({"timesteps": []}, "timesteps")):
        with pytest.raises(ConfigError, match=match):
            CLiDAttack(**kwargs)
    with pytest.raises(ConfigError, match="timesteps=1000"):
        CLiDAttack(timesteps=(1000,)).score(tiny_pipeline, torch.zeros(2, 3, 16, 16), ["a", "b"])


def test_clid_noise_is_per_image_not_per_batch(tiny_pipeline) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    caps = [f"a photo of the digit {i}" for i in range(4)]
    keys = [(MEMBER, i) for i in range(4)]
    full = CLiDAttack().score(tiny_pipeline, images, caps, seed=7, keys=keys)
    alone = CLiDAttack().score(tiny_pipeline, images[2:3], caps[2:3], seed=7, keys=keys[2:3])
    np.testing.assert_allclose(alone, full[2:3], rtol=1e-4, atol=1e-7)
    assert np.all(np.isfinite(full)) and not np.allclose(full, CLiDAttack().score(tiny_pipeline, images, caps, seed=8, keys=keys))


def test_clid_runs_on_sdxl() -> None:
    """The null caption is encoded through the batch's own model: an SDXLCondition with the batch's size ids."""
    from s2l_plugin.testbed.components import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline(seed=0)
    res = DiffusionModel(pipe).resolution
    images = torch.rand(2, 3, res, res, generator=torch.Generator().manual_seed(0)) * 2 - 1
    scores = CLiDAttack(timesteps=(450,)).score(pipe, images, ["a photo of the digit one", "a photo of the digit two"])
    assert scores.shape == (2,) and np.all(np.isfinite(scores)) and np.any(scores != 0)


def test_clid_is_opt_in(tiny_pipeline, test_testbed) -> None:
    """Registered (``--attacks clid``) but in no default attack list, so default audits are unchanged."""
    assert "clid" not in DEFAULT_ATTACKS and "clid" not in DEFAULT_ATTACKS_WITH_BASE
    members, nonmembers = test_testbed.members("seven")[:2], test_testbed.nonmembers("seven")[:2]
    r = audit_membership(tiny_pipeline, members, nonmembers, ["clid"], n_boot=10, progress=False)
    assert [a.attack for a in r.attacks] == ["clid"] and r.attacks[0].unet_calls_per_image == 6
