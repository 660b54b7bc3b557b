"""CLiD (Zhai et al., NeurIPS 2024, "Membership Inference on Text-to-Image Diffusion Models via
Conditional Likelihood Discrepancy"): how much more the image's own caption helps the model denoise it
than a null caption does.

With L(x, c) = mean_{t in timesteps, j < n_noise} mean_pixels (ε_j − ε_θ(sqrt(ᾱ_t) z0 + sqrt(1−ᾱ_t) ε_j, t, c))²
(the loss attack's ε-MSE), the same noise ε_j for every caption, and c∅ the null caption ``""``::

    D(x)     = L(x, c∅) − L(x, c)                      (conditional likelihood discrepancy)
    score(x) = D(x) − loss_weight · L(x, c)            (higher = member)

A fine-tune that saw (x, c) lowers L(x, c) more than L(x, c∅), so members have the larger
discrepancy; subtracting the conditional loss cancels what makes an image intrinsically easy or
hard to denoise, which the plain loss attack confuses with membership.

Settings (the paper's, fixed before any measurement here): t ∈ {440, 450, 460} (T_mid = 450, spacing
10, one noise draw per timestep shared by both captions): 3 timesteps × 1 draw × 2 captions = 6 UNet
calls per image. The paper's aggregated CLiD_th, S = (1−α)·L̃ + α·(−mean_k D̃_k), mixes the
discrepancy with the conditional loss, each RobustScaler-standardised on a *shadow* model's members
and hold-out, α picked by shadow AUC; no shadow model is at hand here, so both terms stay in ε-MSE
units and the mix is fixed: ``loss_weight = 1e-3`` (α ≈ 0.999). The discrepancy decides; the
conditional loss only orders images the caption does not help at all (for a model that ignores its
text, D ≡ 0 and CLiD falls back to the loss attack instead of giving every image the same score).
``loss_weight=0`` is the pure threshold variant (score = D).

Not implemented: the paper's perturbed captions c_k (the caption with its 30 / 50 / 70 % most
"important" words replaced by ``<|endoftext|>``) and CLiD_vec (XGBoost on the discrepancy vector).
The fast path sees encoded captions only (:class:`~s2l_plugin.audit.mia.engine.EncodedBatch` carries
no caption strings), so only the null caption, whose encoding needs no caption, is used. The null
caption goes through the batch's own model (``model.encode_text``), so SD 1.x/2.x and SDXL
(an :class:`~s2l_plugin.conditioning.SDXLCondition` with the batch's size ids) both work.

Each image's draws come from (seed, :data:`CLID_STREAM`, role, index), so the same image gets the
same noise in every audit with the same seed (base and fine-tune alike).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from s2l_plugin.audit.mia.engine import EncodedBatch, MIAttack, image_noise
from s2l_plugin.audit.mia.loss import _check_timesteps, per_image_loss
from s2l_plugin.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

#: Noise stream of the CLiD attack (its own: not the loss attack's stream 1).
CLID_STREAM = 5
DEFAULT_TIMESTEPS = (440, 450, 460)
DEFAULT_N_NOISE = 1
DEFAULT_LOSS_WEIGHT = 1e-3
NULL_CAPTION = ""


class CLiDAttack(MIAttack):
    """Conditional likelihood discrepancy: L(x, "") − L(x, own caption) at fixed noise (higher = member)."""

    name = "clid"
    needs_reference = False

    def __init__(
        self,
        timesteps: Sequence[int] = DEFAULT_TIMESTEPS,
        n_noise: int = DEFAULT_N_NOISE,
        loss_weight: float = DEFAULT_LOSS_WEIGHT,
        max_rows: int | None = None,
    ) -> None:
        if isinstance(n_noise, bool) or int(n_noise) < 1:
            raise ConfigError(f"n_noise={n_noise!r} is not valid; expected a positive integer")
        if not math.isfinite(float(loss_weight)) or float(loss_weight) < 0:
            raise ConfigError(f"loss_weight={loss_weight!r} is not valid; expected a finite number >= 0")
        self.timesteps = _check_timesteps("timesteps", timesteps)
        self.n_noise = int(n_noise)
        self.loss_weight = float(loss_weight)
        self.max_rows = max_rows
        self.params: dict[str, Any] = {
            "timesteps": list(self.timesteps),
            "n_noise": self.n_noise,
            "null_caption": NULL_CAPTION,
            "loss_weight": self.loss_weight,
        }

    @property
    def unet_calls_per_image(self) -> int:
        return 2 * len(self.timesteps) * self.n_noise

    def losses(self, batch: EncodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L(x, own caption), L(x, null caption))``, each ``[B]`` float32, on one shared noise draw."""
        model = batch.model
        k = len(self.timesteps) * self.n_noise
        noise = image_noise(batch.seed, CLID_STREAM, batch.keys, (k, *batch.latents.shape[1:])).to(model.device)
        resolution = int(batch.latents.shape[-1]) * model.vae_scale_factor
        null_text = model.encode_text([NULL_CAPTION] * batch.size, resolution)
        null = EncodedBatch(model, batch.latents, null_text, batch.keys, batch.seed)
        own_loss = per_image_loss(batch, self.timesteps, self.n_noise, max_rows=self.max_rows, noise=noise)
        null_loss = per_image_loss(null, self.timesteps, self.n_noise, max_rows=self.max_rows, noise=noise)
        return own_loss, null_loss

    def score_encoded(self, batch: EncodedBatch, reference: EncodedBatch | None = None) -> torch.Tensor:
        own_loss, null_loss = self.losses(batch)
        return (null_loss - own_loss) - self.loss_weight * own_loss
