"""The few lines every test trainer shares: load images, one epsilon-MSE step (diffusers' example loop).

Test-only: these scripts stand in for diffusers' / kohya's trainers, following their command-line
contract (argument names, data layout read, files written) on the embedded testbed.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def load_image(path, resolution):
    image = Image.open(path).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def encode_prompts(pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def train_steps(pipe, images, prompts, params, steps, lr, batch_size, seed=0, after_step=None):
    """``steps`` AdamW steps of the epsilon-prediction MSE on (images, prompts)."""
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(params, lr=lr)
    n = len(images)
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),))
        pixels = torch.stack([images[i] for i in idx])
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
        noisy = noise_scheduler.add_noise(latents, noise, t)
        hidden = encode_prompts(pipe, [prompts[i] for i in idx])
        pred = pipe.unet(noisy, t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step()
    return float(loss.detach())
