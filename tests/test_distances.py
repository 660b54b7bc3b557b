"""Normalized and tiled ℓ2, and the blocked nearest-neighbour search the extraction audit relies on."""

from __future__ import annotations

import pytest
import torch

from s2l_plugin.audit.distances import nearest, pairwise_distances, to_tiles
from s2l_plugin.errors import ConfigError, InputError


def _images(n: int, seed: int, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def _direct_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = a[0].numel()
    return ((a[:, None] - b[None]) ** 2).flatten(2).sum(-1).div(d).sqrt()


def _direct_tiled(a: torch.Tensor, b: torch.Tensor, tile: int) -> torch.Tensor:
    out = torch.zeros(a.shape[0], b.shape[0])
    for i in range(0, a.shape[2], tile):
        for j in range(0, a.shape[3], tile):
            ta, tb = a[:, :, i : i + tile, j : j + tile], b[:, :, i : i + tile, j : j + tile]
            out = torch.maximum(out, _direct_l2(ta, tb))
    return out


def test_normalized_l2_is_rms_pixel_difference_on_minus1_1_scale():
    a = torch.zeros(1, 3, 16, 16)
    b = torch.full((1, 3, 16, 16), 0.3)
    assert pairwise_distances(a, b).item() == pytest.approx(0.3, abs=1e-5)
    # black vs white on [-1, 1] is the largest possible distance, 2.
    assert pairwise_distances(-torch.ones(1, 3, 4, 4), torch.ones(1, 3, 4, 4)).item() == pytest.approx(2.0, abs=1e-5)


def test_pairwise_matches_direct_computation_for_both_metrics():
    a, b = _images(7, 0), _images(5, 1)
    torch.testing.assert_close(pairwise_distances(a, b), _direct_l2(a, b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pairwise_distances(a, b, metric="tiled", tile=4), _direct_tiled(a, b, 4), atol=1e-4, rtol=1e-4)


def test_tiled_catches_a_local_difference_that_global_l2_dilutes():
    a = torch.zeros(1, 3, 16, 16)
    b = a.clone()
    b[:, :, :4, :4] = 1.0  # one 4x4 tile differs completely, 15 tiles identical
    l2 = pairwise_distances(a, b).item()
    tiled = pairwise_distances(a, b, metric="tiled", tile=4).item()
    assert l2 == pytest.approx(0.25, abs=1e-5)  # sqrt(1/16)
    assert tiled == pytest.approx(1.0, abs=1e-5)


def test_tiled_is_never_below_plain_l2():
    a, b = _images(6, 2), _images(6, 3)
    assert bool((pairwise_distances(a, b, metric="tiled", tile=8) >= pairwise_distances(a, b) - 1e-5).all())


def test_self_distance_matrix_has_zero_diagonal_and_is_symmetric():
    a = _images(6, 4)
    d = pairwise_distances(a, metric="tiled", tile=4)
    assert torch.all(d.diagonal() == 0)
    torch.testing.assert_close(d, d.T)


def test_to_tiles_orders_tiles_row_major():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    tiles = to_tiles(x, 2)
    assert tiles.shape == (1, 4, 4)
    assert tiles[0, 1].tolist() == [2.0, 3.0, 6.0, 7.0]  # top-right tile


@pytest.mark.parametrize("metric", ["l2", "tiled"])
def test_nearest_is_exact_and_independent_of_block_size(metric):
    q, r = _images(37, 5), _images(53, 6)
    # plant exact copies so the answer is known for some queries
    q[3], q[20] = r[7], r[52]
    full = _direct_tiled(q, r, 4) if metric == "tiled" else _direct_l2(q, r)
    want_d, want_i = full.min(1)
    for budget in (512, 4096, 2**26):  # from a few rows per block to everything at once
        d, i = nearest(q, r, metric=metric, tile=4, max_block_bytes=budget)
        torch.testing.assert_close(d, want_d, atol=1e-3, rtol=1e-4)
        assert torch.equal(i, want_i)
    assert i[3].item() == 7 and i[20].item() == 52
    assert d[3].item() < 1e-3 and d[20].item() < 1e-3


def test_bad_shapes_and_tiles_are_clear_errors():
    with pytest.raises(InputError, match="image shapes differ"):
        nearest(_images(2, 0, 16), _images(2, 0, 8))
    with pytest.raises(InputError, match="expected a tensor"):
        nearest(torch.zeros(3, 16, 16), _images(2, 0))
    with pytest.raises(ConfigError, match="tile=5 does not divide"):
        pairwise_distances(_images(2, 0), metric="tiled", tile=5)
    with pytest.raises(ConfigError, match="metric='cosine'"):
        pairwise_distances(_images(2, 0), metric="cosine")
    with pytest.raises(InputError, match="references is empty"):
        nearest(_images(2, 0), _images(0, 0))
