"""The loss attack: the denoiser's training error at several intermediate timesteps, averaged over fixed noise draws.

score(x0, c) = -mean_{t in timesteps, j < n_noise} mean_pixels (ε_j - ε_θ(sqrt(ᾱ_t) z0 + sqrt(1-ᾱ_t) ε_j, t, c))²

On a flow-matching model (SD3, Flux) the error is the velocity error its training minimises,
at the scheduler's training sigma σ_t of each timestep (:class:`~s2l_plugin.audit.mia.engine.DiffusionModel`):

score(x0, c) = -mean_{t, j} mean_pixels ((ε_j − z0) − v_θ((1 − σ_t) z0 + σ_t ε_j, σ_t, c))²

unweighted, as diffusers' Flux training script weights it by default ("none").

Higher = member (members are denoised better). Defaults t ∈ {50, 100, 200, 300} × 4 noise draws
(16 UNet calls per image, one batched UNet forward per batch): intermediate timesteps leak most
(Matsumoto et al. 2023), and these are the settings the testbed's calibration runs measured
(docs/testbed.md, benchmarks/testbed_calibration.py). Each image's draws come from (seed, stream 1, role, index), so the
same image gets the same noise in every audit with the same seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from s2l_plugin.audit.mia.engine import EncodedBatch, MIAttack, image_noise
from s2l_plugin.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Noise stream of the loss and reference attacks (they share it: same noise for base and target).
LOSS_STREAM = 1
DEFAULT_TIMESTEPS = (50, 100, 200, 300)
DEFAULT_N_NOISE = 4
#: Latent elements per UNet forward when ``max_rows`` is not set (2**20: 4 MiB of fp32 latents). It bounds
#: the rows of one forward by the latent size: 4096 rows of the testbed's 4x8x8 latents (every testbed
#: audit runs in one forward), 64 at SD 1.5's 512 px, 16 at SDXL's 1024 px.
DEFAULT_ROW_BUDGET = 2**20


def _check_timesteps(name: str, timesteps: Sequence[int]) -> tuple[int, ...]:
    ts = tuple(int(t) for t in timesteps)
    if not ts or any(t < 0 for t in ts):
        raise ConfigError(f"{name}={list(timesteps)!r} is not valid; expected a non-empty list of timesteps >= 0")
    return ts


def loss_noise(batch: EncodedBatch, timesteps: Sequence[int], n_noise: int) -> torch.Tensor:
    """The loss stream's draws for ``batch``: ``[B, len(timesteps)*n_noise, C, h, w]`` on the model's device."""
    k = len(timesteps) * n_noise
    return image_noise(batch.seed, LOSS_STREAM, batch.keys, (k, *batch.latents.shape[1:])).to(batch.model.device)


def per_image_loss(
    batch: EncodedBatch, timesteps: Sequence[int], n_noise: int, *, max_rows: int | None = None, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean ε-MSE (velocity MSE on a flow-matching model) per image ``[B]`` (float32) over ``timesteps`` ×
    ``n_noise`` draws from the loss stream.

    The B·T·n_noise noisy latents go through the UNet in chunks of ``max_rows`` rows (default: as many
    as :data:`DEFAULT_ROW_BUDGET` latent elements hold, at least one). ``noise`` (from :func:`loss_noise`)
    lets two models share one draw.
    """
    import torch

    model = batch.model
    for t in timesteps:
        model.check_timestep("timesteps", t)
    b, k = batch.size, len(timesteps) * n_noise
    if noise is None:
        noise = loss_noise(batch, timesteps, n_noise)
    t_rows = torch.tensor([t for t in timesteps for _ in range(n_noise)], device=model.device).repeat(b)  # [B*k]
    alpha, sigma = model.coeffs(t_rows)
    z = batch.latents.repeat_interleave(k, dim=0)
    eps = noise.reshape(b * k, *batch.latents.shape[1:])
    x_t = alpha * z + sigma * eps
    text = batch.text.repeat_interleave(k, dim=0)
    # The training target: the velocity ε − z0 for flow matching, else ε (a v-prediction UNet's output is turned into ε).
    target, predict = (eps - z, model.predict) if model.flow else (eps, model.eps)
    step = max_rows or max(1, DEFAULT_ROW_BUDGET // max(1, batch.latents[0].numel()))
    err = torch.cat(
        [
            (predict(x_t[i : i + step], t_rows[i : i + step], text[i : i + step]) - target[i : i + step]).pow(2).flatten(1).mean(1)
            for i in range(0, b * k, step)
        ]
    )
    return err.view(b, k).mean(1)


class LossAttack(MIAttack):
    """Noise-prediction loss at intermediate timesteps (score = -loss; higher = member)."""

    name = "loss"
    needs_reference = False

    def __init__(self, timesteps: Sequence[int] = DEFAULT_TIMESTEPS, n_noise: int = DEFAULT_N_NOISE, max_rows: int | None = None) -> None:
        if int(n_noise) < 1:
            raise ConfigError(f"n_noise={n_noise!r} is not valid; expected a positive integer")
        self.timesteps = _check_timesteps("timesteps", timesteps)
        self.n_noise = int(n_noise)
        self.max_rows = max_rows
        self.params: dict[str, Any] = {"timesteps": list(self.timesteps), "n_noise": self.n_noise}

    @property
    def unet_calls_per_image(self) -> int:
        return len(self.timesteps) * self.n_noise

    def score_encoded(self, batch: EncodedBatch, reference: EncodedBatch | None = None) -> torch.Tensor:
        return -per_image_loss(batch, self.timesteps, self.n_noise, max_rows=self.max_rows)
