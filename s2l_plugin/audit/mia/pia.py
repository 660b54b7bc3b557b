"""PIA and PIAN (Kong et al., ICLR 2024): proximal initialization, 2 UNet calls per image.

ε₀ = ε_θ(z0, 0, c); z_t = sqrt(ᾱ_t) z0 + sqrt(1-ᾱ_t) ε₀ (deterministic); score = -‖ε₀ - ε_θ(z_t, t, c)‖_p,
p = 4, on the VAE latent. Higher = member: the model's own noise estimate at the clean point is
consistent with its estimate at t for training points. PIAN first rescales ε₀ per image to the
mean absolute value of N(0, I): ε₀ ← ε₀ · sqrt(2/π) / mean|ε₀|.

Default t = 200: the reference code sweeps t in 10..300 (stable_attack.py: up to 500); 200 is an
intermediate step of that grid, chosen before measuring on the testbed. The scheduler's own
``alphas_cumprod`` is used (the reference SD script hard-codes linear betas, a known pitfall).

On a flow-matching model (SD3, Flux; ``x_t = (1 − σ)·x0 + σ·ε``, velocity ``v = ε − x0``) the same
idea reads: the model's velocity at the clean point σ = 0 estimates ``ε − x0``, so
``ε₀ = z0 + v_θ(z0, 0, c)`` is the noise the model "sees" in z0 (the ε-prediction of a velocity
model, ``ε̂ = x_t + (1 − σ)·v̂``, at σ = 0). Then ``z_t = (1 − σ_t)·z0 + σ_t·ε₀`` and the score
compares ε₀ with the ε-prediction at ``z_t``: a member's trajectory is straight, so both agree.
Both families are the one formula ``z_t = α_t·z0 + σ_t·ε₀`` (:meth:`DiffusionModel.coeffs`).

How PIA and PIAN behave on small or briefly trained models is measured in docs/audit.md
("Reading SecMI and PIA on small models").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from s2l_plugin.audit.mia.engine import EncodedBatch, MIAttack
from s2l_plugin.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_T = 200
DEFAULT_P = 4


class PIAAttack(MIAttack):
    """Proximal-initialization attack (``normalize=True``: PIAN)."""

    needs_reference = False

    def __init__(self, t: int = DEFAULT_T, p: float = DEFAULT_P, *, normalize: bool = False) -> None:
        if int(t) < 1:
            raise ConfigError(f"t={t!r} is not valid; expected a timestep >= 1")
        if float(p) <= 0:
            raise ConfigError(f"p={p!r} is not valid; expected a positive norm order")
        self.t = int(t)
        self.p = float(p)
        self.normalize = bool(normalize)
        self.name = "pian" if normalize else "pia"
        self.params: dict[str, Any] = {"t": self.t, "p": self.p}

    @property
    def unet_calls_per_image(self) -> int:
        return 2

    def score_encoded(self, batch: EncodedBatch, reference: EncodedBatch | None = None) -> torch.Tensor:
        model = batch.model
        model.check_timestep("t", self.t)
        z0 = batch.latents
        eps0 = model.eps(z0, 0, batch.text)
        if self.normalize:
            scale = math.sqrt(2 / math.pi) / eps0.abs().flatten(1).mean(1).clamp_min(1e-12)
            eps0 = eps0 * scale.view(-1, 1, 1, 1)
        alpha, sigma = model.coeffs(self.t)
        z_t = alpha * z0 + sigma * eps0
        eps_t = model.eps(z_t, self.t, batch.text)
        return -(eps0 - eps_t).abs().pow(self.p).flatten(1).sum(1).pow(1 / self.p)
