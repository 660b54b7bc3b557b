"""SecMI_stat (Duan et al., ICML 2023) on latents: the t-error of one deterministic DDIM round trip.

1. Deterministic DDIM inversion of z0 from t=0 to t_sec in strides of k: z̃_{t_sec}
   (t_sec/k UNet calls, the first at t=0 as in the reference code);
2. one DDIM inversion step z̃_{t_sec} → z̃_{t_sec+k} and one DDIM denoising step back → ẑ_{t_sec}
   (2 calls);
3. t-error = ‖ẑ_{t_sec} - z̃_{t_sec}‖²₂ summed over the latent; score = -t-error (higher = member).

Exactly t_sec/k + 2 UNet calls per image (16 with the defaults). Defaults t_sec = 140, k = 10:
the latent-model setting the S2L code uses (compare at 140 after stepping to 150). A DDIM move
from s to u is D(z_s, s→u) = sqrt(ᾱ_u)·f + sqrt(1-ᾱ_u)·ε_θ(z_s, s) with
f = (z_s - sqrt(1-ᾱ_s)·ε_θ(z_s, s)) / sqrt(ᾱ_s).

On a flow-matching model (SD3, Flux) the same formula with ``sqrt(ᾱ) → 1 − σ``,
``sqrt(1 − ᾱ) → σ`` (:meth:`DiffusionModel.coeffs`) and the velocity turned into ε is exactly an
Euler step of the flow ODE, ``z_u = z_s + (σ_u − σ_s)·v_θ(z_s, σ_s)``: the attack is a
deterministic Euler inversion to σ(t_sec), one step further and one step back.

A score below the non-members' (AUC < 0.5) is signal in the other direction, not "no leakage":
how the attack behaves on small models is measured in docs/audit.md ("Reading SecMI and PIA on
small models").
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from s2l_plugin.audit.mia.engine import DiffusionModel, EncodedBatch, MIAttack
from s2l_plugin.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

DEFAULT_T_SEC = 140
DEFAULT_K = 10


def ddim_move(model: DiffusionModel, z: torch.Tensor, s: int, u: int, text: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM move of ``z`` from timestep ``s`` to ``u`` (u > s inverts, u < s denoises); one
    denoiser call. On a flow-matching model this is the Euler step ``z + (σ_u − σ_s)·v̂``."""
    eps = model.eps(z, s, text)
    (alpha_s, sigma_s), (alpha_u, sigma_u) = model.coeffs(s), model.coeffs(u)
    f = (z - sigma_s * eps) / alpha_s
    return alpha_u * f + sigma_u * eps


class SecMIAttack(MIAttack):
    """SecMI_stat t-error at ``t_sec`` with stride ``k`` (score = -t-error)."""

    name = "secmi"
    needs_reference = False

    def __init__(self, t_sec: int = DEFAULT_T_SEC, k: int = DEFAULT_K) -> None:
        if int(k) < 1 or int(t_sec) < int(k) or int(t_sec) % int(k):
            raise ConfigError(f"t_sec={t_sec!r}, k={k!r} is not valid; expected k >= 1 and t_sec a positive multiple of k")
        self.t_sec = int(t_sec)
        self.k = int(k)
        self.params: dict[str, Any] = {"t_sec": self.t_sec, "k": self.k}

    @property
    def unet_calls_per_image(self) -> int:
        return self.t_sec // self.k + 2

    def score_encoded(self, batch: EncodedBatch, reference: EncodedBatch | None = None) -> torch.Tensor:
        model = batch.model
        model.check_timestep("t_sec + k", self.t_sec + self.k)
        z = batch.latents
        for s in range(0, self.t_sec, self.k):
            z = ddim_move(model, z, s, s + self.k, batch.text)
        up = ddim_move(model, z, self.t_sec, self.t_sec + self.k, batch.text)
        back = ddim_move(model, up, self.t_sec + self.k, self.t_sec, batch.text)
        return -(back - z).pow(2).flatten(1).sum(1)
