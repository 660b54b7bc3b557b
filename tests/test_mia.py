"""Specifications of the MIA attacks and engine: signs, call counts, determinism, sharding, input handling."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from s2l_plugin.hooks.manager import collect, make_plugin_manager

from s2l_plugin.audit.compare import compare_attack
from s2l_plugin.audit.mia import (
    LossAttack,
    PIAAttack,
    ReferenceAttack,
    SecMIAttack,
    audit_membership,
    builtin_attacks,
)
from s2l_plugin.audit.mia.data import iter_record_batches, latent_shift
from s2l_plugin.audit.mia.engine import MEMBER, NONMEMBER, image_noise, merge_shards, score_shard
from s2l_plugin.data import ImageRecord
from s2l_plugin.errors import ConfigError, InputError

# Every registered built-in attack (loss, secmi, pia, pian, reference), from the registry itself.
ALL = tuple(sorted(collect("attacks", make_plugin_manager(load_entry_points=False))))


# -- an exact memorizer: the optimal denoiser of a finite training set ------------------------


class _Out:
    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample


class OracleUNet(torch.nn.Module):
    """ε-prediction of the Bayes-optimal denoiser for the empirical distribution of ``train``.

    E[z0 | z_t] = Σ_i softmax_i(-‖z_t - sqrt(ᾱ_t) z_i‖² / (2(1-ᾱ_t))) z_i: the model that has
    memorized its training set perfectly, so every attack must rank its training points first.
    """

    def __init__(self, train: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        super().__init__()
        self.train_set = train
        self.acp = alphas_cumprod
        c, h, _ = train.shape[1:]
        self.config = SimpleNamespace(in_channels=c, sample_size=h)
        self.calls: list[int] = []
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> _Out:
        self.calls.append(x.shape[0])
        a = self.acp[t].view(-1, 1, 1, 1)
        d = ((x[:, None] - a.sqrt()[:, None] * self.train_set[None]) ** 2).flatten(2).sum(-1)  # [N, M]
        w = torch.softmax(-d / (2 * (1 - a.view(-1, 1))), dim=1)
        x0 = torch.einsum("nm,mchw->nchw", w, self.train_set)
        return _Out((x - a.sqrt() * x0) / (1 - a).sqrt())


class IdentityVAE(torch.nn.Module):
    """Latents = pixels (scaling 1), so the oracle works directly on images."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(scaling_factor=1.0, shift_factor=None, block_out_channels=[8])
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=x))


def oracle_pipeline(train: torch.Tensor) -> SimpleNamespace:
    from s2l_plugin.testbed.components import make_scheduler

    scheduler = make_scheduler()
    unet = OracleUNet(train, scheduler.alphas_cumprod.float())
    unet.device, unet.dtype = torch.device("cpu"), torch.float32
    vae = IdentityVAE()
    vae.device, vae.dtype = torch.device("cpu"), torch.float32
    return SimpleNamespace(
        unet=unet,
        vae=vae,
        scheduler=scheduler,
        text_encoder=None,
        encode_prompt=lambda prompts, device, n, cfg: (torch.zeros(len(prompts), 1, 1), None),
    )


@pytest.fixture(scope="module")
def tiny():
    """The random-init testbed-architecture pipeline, built once for this module (read-only use)."""
    from s2l_plugin.testbed import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def oracle():
    g = torch.Generator().manual_seed(0)
    members = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    nonmembers = torch.rand(8, 3, 4, 4, generator=g) * 2 - 1
    return oracle_pipeline(members), members, nonmembers


@pytest.mark.parametrize("name", ALL)
def test_every_attack_ranks_an_exact_memorizers_training_points_first(oracle, name: str) -> None:
    """Sign convention: on a model that memorized its training set, members score higher (AUC 1)."""
    from s2l_plugin.audit.metrics import roc_auc

    pipe, members, nonmembers = oracle
    # The reference model memorized *other* points, so calibrating by it keeps the sign.
    base = oracle_pipeline(torch.rand(8, 3, 4, 4, generator=torch.Generator().manual_seed(9)) * 2 - 1)
    attack = {a.name: a for a in builtin_attacks()}[name]
    caps = ["x"] * 8
    ref = base if attack.needs_reference else None
    sm = attack.score(pipe, members, caps, seed=0, reference=ref)
    sn = attack.score(pipe, nonmembers, caps, seed=0, keys=[(NONMEMBER, i) for i in range(8)], reference=ref)
    assert roc_auc(sm, sn) == 1.0


@pytest.mark.parametrize(
    ("attack", "calls"),
    [(LossAttack(), 16), (SecMIAttack(), 16), (SecMIAttack(t_sec=100, k=10), 12), (PIAAttack(), 2), (PIAAttack(normalize=True), 2)],
    ids=["loss", "secmi-140-10", "secmi-100-10", "pia", "pian"],
)
def test_unet_calls_per_image_are_exactly_what_the_attack_declares(oracle, attack, calls: int) -> None:
    pipe, members, _ = oracle
    pipe.unet.calls.clear()
    attack.score(pipe, members[:5], ["x"] * 5)
    assert attack.unet_calls_per_image == calls
    assert sum(pipe.unet.calls) == calls * 5  # rows through the UNet = calls per image x images


def test_reference_attack_queries_target_and_base_once_each_per_draw(oracle) -> None:
    pipe, members, _ = oracle
    base = oracle_pipeline(members.flip(0))
    pipe.unet.calls.clear()
    base.unet.calls.clear()
    ReferenceAttack().score(pipe, members[:3], ["x"] * 3, reference=base)
    assert sum(pipe.unet.calls) == sum(base.unet.calls) == 16 * 3
    with pytest.raises(ConfigError, match="reference"):
        ReferenceAttack().score(pipe, members[:3], ["x"] * 3)


def test_reference_attack_is_zero_against_itself(oracle) -> None:
    pipe, members, _ = oracle
    assert np.all(ReferenceAttack().score(pipe, members, ["x"] * 8, reference=pipe) == 0.0)


def test_noise_depends_on_seed_and_image_only() -> None:
    a = image_noise(3, 1, [(MEMBER, 0), (MEMBER, 5), (NONMEMBER, 5)], (2, 4))
    b = image_noise(3, 1, [(NONMEMBER, 5), (MEMBER, 5)], (2, 4))
    assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a[1], a[2])  # member 5 and non-member 5 are different images
    assert not torch.equal(image_noise(4, 1, [(MEMBER, 0)], (2, 4))[0], a[0])


def test_scores_do_not_depend_on_batch_composition(tiny) -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    caps = [f"digit {i}" for i in range(6)]
    keys = [(MEMBER, i) for i in range(6)]
    for attack in (LossAttack(timesteps=(100, 300), n_noise=2), SecMIAttack(t_sec=40, k=10), PIAAttack()):
        full = attack.score(tiny, images, caps, seed=7, keys=keys)
        alone = attack.score(tiny, images[4:5], caps[4:5], seed=7, keys=keys[4:5])
        # Float kernels may round differently at another batch size, nothing more.
        np.testing.assert_allclose(alone, full[4:5], rtol=1e-4, atol=1e-6)


# -- the engine on image folders --------------------------------------------------------------


def _write_images(folder: Path, n: int, seed: int, size: int = 16, caption: str = "digit one") -> list[ImageRecord]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
        rows.append(json.dumps({"file_name": f"{i:03d}.png", "text": f"{caption} {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return [ImageRecord(folder / f"{i:03d}.png", f"{caption} {i}") for i in range(n)]


@pytest.fixture
def folders(tmp_path):
    m = _write_images(tmp_path / "members", 5, 0)
    n = _write_images(tmp_path / "nonmembers", 4, 1)
    return tmp_path / "members", tmp_path / "nonmembers", m, n


def test_audit_membership_fills_the_result_and_is_deterministic(tiny, folders) -> None:
    from s2l_plugin.result import MembershipResult, from_dict, to_dict

    mdir, ndir, _, _ = folders
    kw = dict(attacks=[LossAttack(timesteps=(50, 200), n_noise=2), "pia"], seed=3, batch_size=4, n_boot=50, progress=False, member_groups={"first": [0, 1]})
    r1 = audit_membership(tiny, mdir, ndir, **kw)
    r2 = audit_membership(tiny, mdir, ndir, **{**kw, "batch_size": 3})
    assert [a.attack for a in r1.attacks] == ["loss", "pia"]
    loss = r1.attack("loss")
    assert len(loss.member_scores) == 5 and len(loss.nonmember_scores) == 4
    assert loss.member_ids[0].endswith("000.png") and loss.unet_calls_per_image == 4
    assert 0.0 <= loss.auc <= 1.0 and loss.auc_ci[0] <= loss.auc <= loss.auc_ci[1]
    assert loss.subsets["first"]["member_indices"] == [0, 1]
    assert r1.n_members == 5 and r1.seed == 3
    np.testing.assert_allclose(r2.attack("loss").member_scores, loss.member_scores, rtol=1e-4)
    # JSON round trip (typed, no pickles).
    again = from_dict(MembershipResult, json.loads(json.dumps(to_dict(r1))))
    assert again.attack("pia").nonmember_scores == r1.attack("pia").nonmember_scores


def test_sharded_scores_merge_to_the_single_process_result(tiny, folders) -> None:
    _, _, m, n = folders
    attacks = [LossAttack(timesteps=(100,), n_noise=2), PIAAttack()]
    items = [((MEMBER, i), r) for i, r in enumerate(m)] + [((NONMEMBER, i), r) for i, r in enumerate(n)]
    kw = dict(seed=1, batch_size=2, progress=False)
    single = score_shard(tiny, items, attacks, **kw)
    shards = [score_shard(tiny, items, attacks, shard=(r, 3), **kw) for r in range(3)]
    shard_keys = np.concatenate([s.keys for s in shards]).tolist()
    assert sorted(map(tuple, shard_keys)) == sorted(map(tuple, single.keys.tolist()))
    merged, _ = merge_shards(shards, len(m), len(n))
    ref, _ = merge_shards([single], len(m), len(n))
    for name in ("loss", "pia"):
        assert np.array_equal(merged[name][0], ref[name][0]) and np.array_equal(merged[name][1], ref[name][1])
    with pytest.raises(InputError, match="scored by no shard"):
        merge_shards(shards[:2], len(m), len(n))
    with pytest.raises(InputError, match="two shards"):
        merge_shards([single, shards[0]], len(m), len(n))
    # audit_membership with an explicit shard scores only its batches, then refuses to merge half.
    with pytest.raises(InputError, match="scored by no shard"):
        audit_membership(tiny, m, n, ["pia"], shard=(0, 2), progress=False, batch_size=2)


def test_only_the_selected_batches_are_read(folders, monkeypatch) -> None:
    import s2l_plugin.audit.mia.data as data

    _, _, m, n = folders
    items = [((MEMBER, i), r) for i, r in enumerate(m)] + [((NONMEMBER, i), r) for i, r in enumerate(n)]
    opened: list[Path] = []
    real = data.open_image
    monkeypatch.setattr(data, "open_image", lambda p: (opened.append(p), real(p))[1])
    out = list(iter_record_batches(items, 2, 16, batches=[1, 4]))
    assert [k for keys, _, _ in out for k in keys] == [(MEMBER, 2), (MEMBER, 3), (NONMEMBER, 3)]
    assert opened == [m[2].path, m[3].path, n[3].path]
    assert out[0][1].shape == (2, 3, 16, 16) and float(out[0][1].abs().max()) <= 1.0


# -- bad input --------------------------------------------------------------------------------


def test_empty_folder_is_a_clear_error(tiny, folders, tmp_path) -> None:
    mdir, _, _, _ = folders
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="non-members folder .*empty"):
        audit_membership(tiny, mdir, tmp_path / "empty", ["loss"], progress=False)


def test_fewer_than_two_images_per_set_is_a_clear_error(tiny, folders) -> None:
    _, _, m, n = folders
    with pytest.raises(InputError, match="members: 1 image.*at least 2"):
        audit_membership(tiny, m[:1], n, ["loss"], progress=False)


def test_unreadable_image_is_named_before_any_model_runs(tiny, folders, monkeypatch) -> None:
    mdir, ndir, m, n = folders
    (ndir / "002.png").write_bytes(b"not an image")
    calls = []
    monkeypatch.setattr(tiny.unet, "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(InputError, match=r"non-members: .*002\.png.*not a readable image"):
        audit_membership(tiny, mdir, ndir, ["loss"], progress=False)
    assert calls == []


def test_mismatched_sizes_are_resized_by_one_rule_with_a_warning(tiny, tmp_path, caplog) -> None:
    from PIL import Image

    m = _write_images(tmp_path / "m", 3, 0, size=32)
    n = _write_images(tmp_path / "n", 3, 1, size=16)
    with caplog.at_level(logging.WARNING):
        r = audit_membership(tiny, m, n, ["pia"], progress=False, n_boot=10, shift_check=False)
    assert any("3 of 3 members image(s) resized to 16x16" in w for w in r.warnings)
    assert not any("non-members image(s) resized" in w for w in r.warnings)
    assert "resized to 16x16" in caplog.text
    # The 32x32 image is scored exactly as if the user had resized it with the documented rule.
    from s2l_plugin.data import image_to_tensor

    small = image_to_tensor(Image.open(m[0].path).convert("RGB"), 16)[None]
    direct = PIAAttack().score(tiny, small, [m[0].caption])
    assert r.attack("pia").member_scores[0] == pytest.approx(float(direct[0]), rel=1e-5)


def test_attack_configuration_errors_name_the_value(tiny, folders) -> None:
    _, _, m, n = folders
    with pytest.raises(ConfigError, match="unknown attack 'lira'"):
        audit_membership(tiny, m, n, ["lira"], progress=False)
    with pytest.raises(ConfigError, match="'reference' needs a reference"):
        audit_membership(tiny, m, n, ["reference"], progress=False)
    with pytest.raises(ConfigError, match="t_sec=145, k=10"):
        SecMIAttack(t_sec=145)
    with pytest.raises(ConfigError, match="member_groups\\['dup'\\]"):
        audit_membership(tiny, m, n, ["loss"], member_groups={"dup": [7]}, progress=False)
    with pytest.raises(ConfigError, match="t_sec \\+ k=1000"):
        SecMIAttack(t_sec=990, k=10).score(tiny, torch.zeros(2, 3, 16, 16), ["a", "b"])


def test_registered_attacks_have_the_declared_interface() -> None:
    attacks = collect("attacks")
    assert set(ALL) <= set(attacks)
    for name in ALL:
        a = attacks[name]
        assert a.name == name and callable(a.score) and isinstance(a.unet_calls_per_image, int)
        assert a.needs_reference is (name == "reference")


# -- distribution shift -----------------------------------------------------------------------


def test_shift_diagnostic_warns_on_shifted_sets_only() -> None:
    rng = np.random.default_rng(0)
    same = latent_shift(rng.normal(size=(40, 64)), rng.normal(size=(40, 64)), seed=0)
    assert same["warning"] is None and same["p_value"] > 0.01
    shifted = latent_shift(rng.normal(size=(40, 64)), rng.normal(0.5, 1, size=(40, 64)), seed=0)
    assert shifted["p_value"] < 0.01 and "distribution shift" in shifted["warning"]
    assert shifted["mean_distance"] > 2 * shifted["null_mean_distance"]


def test_shifted_image_sets_carry_the_warning_in_the_result(tiny, tmp_path) -> None:
    from PIL import Image

    dark, bright = tmp_path / "dark", tmp_path / "bright"
    recs = {}
    for folder, lo, hi in ((dark, 0, 80), (bright, 170, 256)):
        folder.mkdir()
        rng = np.random.default_rng(lo)
        recs[folder] = []
        for i in range(12):
            Image.fromarray(rng.integers(lo, hi, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            recs[folder].append(ImageRecord(folder / f"{i}.png", "x"))
    r = audit_membership(tiny, recs[dark], recs[bright], ["pia"], progress=False, n_boot=10)
    assert r.shift["p_value"] < 0.01
    assert any("distribution shift" in w for w in r.warnings)


# -- before / after -----------------------------------------------------------------------------


def test_compare_gives_paired_delta_and_refuses_different_images(tiny, folders) -> None:
    _, _, m, n = folders
    r = audit_membership(tiny, m, n, ["pia"], progress=False, n_boot=20, member_groups={"g": [0, 1, 2]})
    c = compare_attack(r.attack("pia"), r.attack("pia"), method="lora")
    assert c.delta_auc == 0.0 and c.delta_auc_ci == [0.0, 0.0] and c.subset == "all"
    g = compare_attack(r.attack("pia"), r.attack("pia"), method="lora", subset="g", member_indices=[0, 1, 2])
    assert g.auc_before == pytest.approx(r.attack("pia").subsets["g"]["auc"])
    other = audit_membership(tiny, m[1:], n, ["pia"], progress=False, n_boot=20)
    with pytest.raises(InputError, match="different images"):
        compare_attack(r.attack("pia"), other.attack("pia"), method="lora")


# The attacks on a testbed whose duplicated members are memorized (AUC >= 0.9, SecMI's measured
# inversion) are integration tests: integration_tests/test_mia_memorized.py.
