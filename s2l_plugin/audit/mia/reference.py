"""The reference-calibrated loss attack: how much better the target denoises an image than its base.

score(x0, c) = L_base(x0, c) - L_target(x0, c), with L the loss attack's ε-MSE (same timesteps,
same per-image noise draws for both models). Higher = member: fine-tuning lowered this image's loss
more than the image's intrinsic difficulty explains. The S2L setting makes this possible, since the
pre-fine-tune model is at hand; it cancels per-image difficulty that the plain loss attack confuses
with membership. UNet calls per image: twice the loss attack's (target and base).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from s2l_plugin.audit.mia.engine import EncodedBatch
from s2l_plugin.audit.mia.loss import LossAttack, loss_noise, per_image_loss
from s2l_plugin.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch


class ReferenceAttack(LossAttack):
    """Target loss calibrated by the base model's loss on the same noise (needs ``reference``).

    Same settings as the loss attack (timesteps, noise draws), run on both models.
    """

    name = "reference"
    needs_reference = True

    @property
    def unet_calls_per_image(self) -> int:
        return 2 * super().unet_calls_per_image

    def score_encoded(self, batch: EncodedBatch, reference: EncodedBatch | None = None) -> torch.Tensor:
        if reference is None:
            raise ConfigError("attack 'reference' needs a reference (base) pipeline; pass reference=")
        # One draw for both models (the keys and seed are the same images'): identical noise by construction.
        noise = loss_noise(batch, self.timesteps, self.n_noise)
        target = per_image_loss(batch, self.timesteps, self.n_noise, max_rows=self.max_rows, noise=noise)
        base = per_image_loss(reference, self.timesteps, self.n_noise, max_rows=self.max_rows, noise=noise.to(reference.model.device))
        return base - target
