"""The latent option of the MIA engine: "mean" (default) or one posterior "sample" seeded per image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from s2l_plugin.audit.mia import LossAttack, audit_membership
from s2l_plugin.audit.mia.engine import MEMBER, NONMEMBER, DiffusionModel, check_latent
from s2l_plugin.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def tiny():
    from s2l_plugin.testbed import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_sample_is_a_seeded_posterior_draw_per_image(tiny) -> None:
    model = DiffusionModel(tiny)
    x = _images(4)
    keys = [(MEMBER, 0), (MEMBER, 1), (NONMEMBER, 0), (NONMEMBER, 1)]
    with torch.no_grad():
        mean = model.encode_images(x)
        s1 = model.encode_images(x, "sample", keys, seed=3)
        s2 = model.encode_images(x, "sample", keys, seed=3)
        alone = model.encode_images(x[2:3], "sample", keys[2:3], seed=3)
        other_seed = model.encode_images(x, "sample", keys, seed=4)
        dist = model.vae.encode(x).latent_dist
    assert torch.equal(s1, s2)  # deterministic: a before/after pair sees the same draw
    torch.testing.assert_close(alone, s1[2:3], rtol=1e-4, atol=1e-5)  # the image's own seed, not its batch
    assert not torch.allclose(s1, mean) and not torch.allclose(s1, other_seed)
    # the draw is mean + std * eps, scaled as the VAE config says: its deviation is on the std's scale
    z = s1 / model.scaling_factor + model.shift_factor
    eps = (z - dist.mean) / dist.std
    assert 0.5 < float(eps.std()) < 1.5


def test_sample_without_keys_and_unknown_latents_are_one_line_errors(tiny) -> None:
    model = DiffusionModel(tiny)
    with pytest.raises(InputError, match="latent='sample' needs one"):
        model.encode_images(_images(2), "sample")
    with pytest.raises(ConfigError, match=r"latent='median' is not valid; expected one of: mean, sample"):
        check_latent("median")
    with pytest.raises(ConfigError, match="latent='posterior'"):
        audit_membership(tiny, [], [], ["loss"], latent="posterior", progress=False)


def test_audit_records_the_latent_and_sample_changes_scores_reproducibly(tiny, tmp_path) -> None:
    from PIL import Image

    for name, seed in (("members", 0), ("nonmembers", 1)):
        folder = tmp_path / name
        folder.mkdir()
        rng = np.random.default_rng(seed)
        rows = []
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "text": f"digit {i}"}))
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    kw = dict(attacks=[LossAttack(timesteps=(50, 200), n_noise=2), "pia"], seed=2, n_boot=20, progress=False)
    mean = audit_membership(tiny, tmp_path / "members", tmp_path / "nonmembers", **kw)
    s1 = audit_membership(tiny, tmp_path / "members", tmp_path / "nonmembers", latent="sample", batch_size=3, **kw)
    s2 = audit_membership(tiny, tmp_path / "members", tmp_path / "nonmembers", latent="sample", **kw)
    assert mean.attack("loss").params["latent"] == "mean" and s1.attack("pia").params["latent"] == "sample"
    np.testing.assert_allclose(s1.attack("loss").member_scores, s2.attack("loss").member_scores, rtol=1e-4)
    assert not np.allclose(s1.attack("loss").member_scores, mean.attack("loss").member_scores)


def test_run_config_latent_and_data_folders() -> None:
    from s2l_plugin.runconfig import SHIPPED_CONFIGS, load_run_config

    demo = SHIPPED_CONFIGS / "demo.toml"
    c = load_run_config(demo)
    assert c.audit.latent == "mean" and c.audit.extraction_references == "members"
    assert c.data.folder("private_set", "seven") is None
    c = load_run_config(demo, ['audit.latent="sample"', 'data.private_set="real/{domain}"', 'audit.extraction_references="all"'])
    assert c.audit.latent == "sample" and c.data.folder("private_set", "two") == "real/two"
    with pytest.raises(ConfigError, match=r"audit.latent='median' is not valid; expected one of: mean, sample"):
        load_run_config(demo, ['audit.latent="median"'])
    with pytest.raises(ConfigError, match=r"audit.extraction_references='some' is not valid; expected one of: members, all"):
        load_run_config(demo, ['audit.extraction_references="some"'])
