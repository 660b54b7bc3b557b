"""Image distances for extraction audits: normalized ℓ2, tiled ℓ2, and chunked nearest neighbours.

Conventions (the same as :mod:`s2l_plugin.result`): images are float tensors
``[N, C, H, W]`` with pixels in ``[-1, 1]``; the *normalized ℓ2* of two images is
``‖a − b‖₂ / sqrt(C·H·W)``, so it lies in ``[0, 2]`` and is twice Carlini et al.'s value on
``[0, 1]`` pixels (their extraction threshold 0.15 on ``[0, 1]`` is 0.30 here).

*Tiled ℓ2* (Carlini et al. 2023) splits each image into non-overlapping ``tile × tile`` squares
and takes the **maximum** over tiles of the per-tile normalized ℓ2, so a matching background
cannot hide a different object: tiled ℓ2 ≥ normalized ℓ2 always (the squared global distance is
the mean of the squared per-tile distances).

Distances are computed in float32 through the ``‖a‖² + ‖b‖² − 2ab`` expansion (as ``torch.cdist``
does for large inputs): accurate to about 1e-3 near zero (an exact copy may read 3e-4), far below
any extraction threshold. Every function here works in bounded memory: the ``n × M`` comparisons run in blocks whose size
is set by ``max_block_bytes``, never as one ``n × M × D`` tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from s2l_plugin.errors import ConfigError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

METRICS = ("l2", "tiled")
#: Default memory budget of one block of pairwise work (the distance block plus its temporaries).
DEFAULT_BLOCK_BYTES = 64 * 2**20


def _check_images(name: str, x: Any) -> None:
    import torch

    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if hasattr(x, "shape") else type(x).__name__
        raise InputError(f"{name} has shape {shape}; expected a tensor [N, C, H, W]")


def _check_tile(tile: int, height: int, width: int) -> None:
    if isinstance(tile, bool) or not isinstance(tile, int) or tile <= 0:
        raise ConfigError(f"tile={tile!r} is not valid; expected a positive integer (tile side in pixels)")
    if height % tile or width % tile:
        raise ConfigError(
            f"tile={tile} does not divide the image size {height}x{width}; expected a divisor of both sides"
        )


def to_tiles(images: torch.Tensor, tile: int) -> torch.Tensor:
    """``[N, C, H, W]`` → ``[N, T, C·tile·tile]`` with ``T = (H/tile)·(W/tile)`` tiles in row-major order."""
    _check_images("images", images)
    n, c, h, w = images.shape
    _check_tile(tile, h, w)
    x = images.reshape(n, c, h // tile, tile, w // tile, tile)
    x = x.permute(0, 2, 4, 1, 3, 5)  # n, th, tw, c, tile, tile
    return x.reshape(n, (h // tile) * (w // tile), c * tile * tile)


def _prepare(images: torch.Tensor, metric: str, tile: int | None) -> torch.Tensor:
    """Images as ``[T, N, d]`` float32 rows (T = 1 for plain ℓ2) ready for blockwise distances."""
    import torch

    if metric not in METRICS:
        raise ConfigError(f"metric={metric!r} is not valid; expected one of: {', '.join(METRICS)}")
    x = images.detach().to(torch.float32)
    if metric == "l2":
        return x.reshape(1, x.shape[0], -1)
    if tile is None:
        raise ConfigError("metric='tiled' needs tile=<pixels>; expected a positive integer")
    return to_tiles(x, tile).transpose(0, 1).contiguous()


def _block_sq(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, b_sq: torch.Tensor) -> torch.Tensor:
    """Per-tile squared distances ``[T, q, r]`` of rows ``a [T, q, d]`` and ``b [T, r, d]``."""
    import torch

    # ‖a‖² + ‖b‖² − 2ab through one batched matmul: the cdist-style expansion, clamped at 0
    # because rounding can make identical rows come out slightly negative.
    sq = torch.bmm(a, b.transpose(1, 2))
    # In place, so the block costs one [T, q, r] tensor (a broadcast addend would be a second).
    sq.mul_(-2.0).add_(a_sq.unsqueeze(-1)).add_(b_sq.unsqueeze(-2))
    return sq.clamp_min_(0.0)


def _block_rows(tiles: int, other: int, max_block_bytes: int) -> int:
    # A block holds the [T, q, r] squared distances plus one reduced [q, r] copy (float32).
    per_row = 4 * other * (tiles + 2)
    return max(1, min(other, max_block_bytes // max(per_row, 1)))


def pairwise_distances(
    a: torch.Tensor,
    b: torch.Tensor | None = None,
    *,
    metric: str = "l2",
    tile: int | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> torch.Tensor:
    """The full ``[n, m]`` matrix of normalized (``"l2"``) or tiled (``"tiled"``) ℓ2 distances.

    ``b`` defaults to ``a`` (the self-distance matrix, zero diagonal). The result itself is
    ``n × m`` floats; intermediate work is blocked. Use :func:`nearest` when only the nearest
    neighbour is needed (memory then does not grow with ``m``).
    """
    import torch

    _check_images("a", a)
    b = a if b is None else b
    _check_images("b", b)
    if a.shape[1:] != b.shape[1:]:
        raise InputError(f"image shapes differ: {tuple(a.shape[1:])} vs {tuple(b.shape[1:])}; expected the same C, H, W")
    xa, xb = _prepare(a, metric, tile), _prepare(b, metric, tile)
    d = xa.shape[-1]
    a_sq, b_sq = (xa * xa).sum(-1), (xb * xb).sum(-1)
    out = torch.empty(xa.shape[1], xb.shape[1], dtype=torch.float32)
    rows = _block_rows(xa.shape[0], xb.shape[1], max_block_bytes)
    for start in range(0, xa.shape[1], rows):
        sl = slice(start, start + rows)
        sq = _block_sq(xa[:, sl], a_sq[:, sl], xb, b_sq)
        out[sl] = sq.amax(0).div_(d).sqrt_()
    if b is a:
        out.fill_diagonal_(0.0)
    return out


def nearest(
    queries: torch.Tensor,
    references: torch.Tensor,
    *,
    metric: str = "l2",
    tile: int | None = None,
    max_block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query, its nearest reference: ``(distance [n] float32, index [n] int64)``.

    Distances are normalized ℓ2 (``metric="l2"``) or tiled ℓ2 (``metric="tiled"``, ``tile``
    pixels a side), lower = closer. Work is done in query × reference blocks of at most
    ``max_block_bytes`` (plus the two inputs and the ``[n]`` outputs), so memory stays bounded
    however large ``n × M`` is. Ties go to the lowest reference index.
    """
    import torch

    _check_images("queries", queries)
    _check_images("references", references)
    if references.shape[0] == 0:
        raise InputError("references is empty; expected at least one reference image")
    if queries.shape[1:] != references.shape[1:]:
        raise InputError(
            f"image shapes differ: queries {tuple(queries.shape[1:])} vs references {tuple(references.shape[1:])}; "
            "expected the same C, H, W"
        )
    xq, xr = _prepare(queries, metric, tile), _prepare(references, metric, tile)
    tiles, n, d = xq.shape
    m = xr.shape[1]
    q_sq, r_sq = (xq * xq).sum(-1), (xr * xr).sum(-1)
    # Square blocks keep the matmuls efficient: q query rows against r reference rows.
    side = max(1, int((max_block_bytes / (4 * (tiles + 2))) ** 0.5))
    q_rows = min(n, side)
    r_rows = min(m, max(1, max_block_bytes // (4 * (tiles + 2) * q_rows)))
    best = torch.full((n,), float("inf"), dtype=torch.float32)
    best_idx = torch.zeros(n, dtype=torch.int64)
    blocks = range(0, n, q_rows)
    if progress:
        from s2l_plugin.progress import progress_bar

        blocks = progress_bar(blocks, desc=f"nearest ({metric})", unit="block")
    for qs in blocks:
        qsl = slice(qs, qs + q_rows)
        for rs in range(0, m, r_rows):
            rsl = slice(rs, rs + r_rows)
            sq = _block_sq(xq[:, qsl], q_sq[:, qsl], xr[:, rsl], r_sq[:, rsl]).amax(0)
            val, idx = sq.min(1)
            better = val < best[qsl]
            best[qsl] = torch.where(better, val, best[qsl])
            best_idx[qsl] = torch.where(better, idx + rs, best_idx[qsl])
    return best.div_(d).sqrt_(), best_idx
