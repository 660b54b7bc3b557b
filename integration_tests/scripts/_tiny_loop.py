"""The few lines every test trainer shares: load images, one epsilon-MSE step (diffusers' example loop).

Test-only: these scripts stand in for diffusers' / kohya's trainers, following their command-line
contract (argument names, data layout read, files written) on the embedded testbed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def load_image(path, resolution):
    image = Image.open(path).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def kohya_subsets(args):
    """kohya's DreamBooth-style subsets of a run as (folder, repeats, caption extension, class tokens):
    from ``--dataset_config`` when given (it takes precedence: ``--train_data_dir`` is then ignored,
    with a warning), else every ``<repeats>_<class tokens>/`` folder of ``--train_data_dir``."""
    import tomllib

    if getattr(args, "dataset_config", None):
        if args.train_data_dir is not None:
            print("ignore following options because config file is found: train_data_dir")
        config = tomllib.loads(Path(args.dataset_config).read_text())
        general = config.get("general", {})
        out = []
        for dataset in config["datasets"]:
            for sub in dataset.get("subsets", []):
                ext = sub.get("caption_extension", dataset.get("caption_extension", general.get("caption_extension", args.caption_extension)))
                out.append((Path(sub["image_dir"]), int(sub.get("num_repeats", 1)), ext, sub.get("class_tokens")))
        return out
    out = []
    for sub in sorted(Path(args.train_data_dir).iterdir()) if args.train_data_dir else []:
        repeats, _, name = sub.name.partition("_")
        if sub.is_dir() and repeats.isdigit():
            out.append((sub, int(repeats), args.caption_extension, name))
    return out


def load_kohya_dataset(subsets, resolution):
    """Images and captions of kohya subsets (:func:`kohya_subsets`): a caption file beside each image,
    else the subset's class tokens (as kohya falls back). Returns (images, captions,
    ``ss_dataset_dirs``, ``ss_tag_frequency``); ``resolution`` is kohya's ``"W,H"`` or ``"W"`` string."""
    size = int(str(resolution).split(",")[0])
    images, captions, dirs, tags = [], [], {}, {}
    for folder, repeats, caption_extension, class_tokens in subsets:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        dirs[folder.name] = {"n_repeats": repeats, "img_count": len(files)}
        tags[folder.name] = {}
        for f in files:
            side = f.with_suffix(caption_extension)
            caption = side.read_text().strip() if side.is_file() else (class_tokens or "")
            images.append(load_image(f, size))
            captions.append(caption)
            tags[folder.name][caption] = tags[folder.name].get(caption, 0) + 1
    return images, captions, dirs, tags


def encode_prompts(pipe, prompts):
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


def unet_conditioning(pipe, prompts, pixels):
    """The UNet's text conditioning for a batch: the text encoder's hidden states for SD 1.x; for
    SDXL (a pipeline with ``text_encoder_2``) both encoders' penultimate states and the pooled
    embedding (``encode_prompt``) plus the six size/crop ids the SDXL scripts compute
    (original size, crop top-left, target size; images here are resized, never cropped)."""
    if getattr(pipe, "text_encoder_2", None) is None:
        return encode_prompts(pipe, prompts), {}
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=pixels.device, do_classifier_free_guidance=False)
    h, w = pixels.shape[-2:]
    time_ids = torch.tensor([[h, w, 0, 0, h, w]] * len(prompts), dtype=embeds.dtype)
    return embeds, {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def train_steps(pipe, images, prompts, params, steps, lr, batch_size, seed=0, after_step=None):
    """``steps`` AdamW steps of the epsilon-prediction MSE on (images, prompts); SD 1.x or SDXL."""
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
        hidden, extra = unet_conditioning(pipe, [prompts[i] for i in idx], pixels)
        pred = pipe.unet(noisy, t, hidden, **extra).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if after_step is not None:
            after_step()
    return float(loss.detach())


#: What diffusers' LoRA scripts adapt: the UNet's attention projections and, with
#: ``--train_text_encoder``, CLIP's.
UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def load_sdxl(args):
    """The SDXL pipeline of ``--pretrained_model_name_or_path``, with ``--pretrained_vae_model_name_or_path``'s
    VAE when given (as the diffusers SDXL scripts load it)."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    vae = getattr(args, "pretrained_vae_model_name_or_path", None)
    extra = {"vae": AutoencoderKL.from_pretrained(vae)} if vae else {}
    return StableDiffusionXLPipeline.from_pretrained(args.pretrained_model_name_or_path, **extra)


def add_sdxl_lora(pipe, rank, alpha, text_encoders):
    """Freeze the pipeline, add peft LoRA layers to the UNet (and to both text encoders); returns the
    trainable parameters."""
    from peft import LoraConfig, inject_adapter_in_model

    modules = [pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2]
    for module in modules:
        module.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=UNET_LORA_TARGETS))
    if text_encoders:
        for encoder in (pipe.text_encoder, pipe.text_encoder_2):
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                               target_modules=TEXT_LORA_TARGETS), encoder)
    return [p for module in modules for p in module.parameters() if p.requires_grad]


def save_sdxl_lora(pipe, output_dir, text_encoders):
    """``pytorch_lora_weights.safetensors`` in ``output_dir``, written as the diffusers SDXL LoRA
    scripts write it (``StableDiffusionXLPipeline.save_lora_weights``)."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))}
    if text_encoders:
        layers["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder))
        layers["text_encoder_2_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder_2))
    StableDiffusionXLPipeline.save_lora_weights(save_directory=output_dir, **layers)


#: What diffusers' Flux and SD3 LoRA scripts adapt by default (``--lora_layers`` unset): the
#: attention projections of the image and the text stream.
TRANSFORMER_LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
                            "attn.add_v_proj", "attn.to_add_out"]


def load_flow(cls_name, args):
    """The FluxPipeline / StableDiffusion3Pipeline of ``--pretrained_model_name_or_path``."""
    import diffusers

    return getattr(diffusers, cls_name).from_pretrained(args.pretrained_model_name_or_path)


def add_transformer_lora(pipe, rank, alpha):
    """Freeze the pipeline, add peft LoRA layers to the transformer; returns the trainable parameters."""
    from peft import LoraConfig

    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
    pipe.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                            target_modules=TRANSFORMER_LORA_TARGETS))
    return [p for p in pipe.transformer.parameters() if p.requires_grad]


def flow_train_steps(pipe, images, prompt, params, steps, lr, batch_size, seed=0, guidance_scale=3.5):
    """``steps`` AdamW steps of the scripts' flow-matching loss (weighting scheme "none": uniform
    timestep indices into the scheduler's training timesteps; x_t = (1 - σ) x0 + σ ε; target ε - x0)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    torch.manual_seed(seed)
    flux = type(pipe).__name__ == "FluxPipeline"
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(params, lr=lr)
    with torch.no_grad():
        if flux:
            hidden, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None)
        else:
            hidden, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False)
    shift = pipe.vae.config.shift_factor or 0.0
    n = len(images)
    for _ in range(steps):
        idx = torch.randint(0, n, (min(batch_size, n),))
        pixels = torch.stack([images[i] for i in idx])
        with torch.no_grad():
            x0 = (pipe.vae.encode(pixels).latent_dist.sample() - shift) * pipe.vae.config.scaling_factor
        noise = torch.randn_like(x0)
        b, c, h, w = x0.shape
        ind = torch.randint(0, scheduler.config.num_train_timesteps, (b,))
        timesteps = scheduler.timesteps[ind]
        sigmas = scheduler.sigmas[ind].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        if flux:
            guidance = torch.full((b,), guidance_scale) if pipe.transformer.config.guidance_embeds else None
            pred = pipe.transformer(hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w), timestep=timesteps / 1000,
                                    guidance=guidance, pooled_projections=pooled.expand(b, -1),
                                    encoder_hidden_states=hidden.expand(b, -1, -1), txt_ids=text_ids,
                                    img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
                                    return_dict=False)[0]
            pred = FluxPipeline._unpack_latents(pred, h, w, 1)
        else:
            pred = pipe.transformer(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden.expand(b, -1, -1),
                                    pooled_projections=pooled.expand(b, -1), return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss.detach())


def save_transformer_lora(pipe, output_dir):
    """``pytorch_lora_weights.safetensors`` in ``output_dir``, as the Flux/SD3 LoRA scripts write it
    (``FluxPipeline`` / ``StableDiffusion3Pipeline.save_lora_weights``, ``transformer.`` keys)."""
    from peft.utils import get_peft_model_state_dict

    type(pipe).save_lora_weights(save_directory=output_dir, transformer_lora_layers=get_peft_model_state_dict(pipe.transformer))


def flow_dreambooth_main(args, cls_name, guidance_scale=3.5):
    """The scripts' work at test size: every file in ``--instance_data_dir`` trained on ``--instance_prompt``,
    LoRA (rank ``--rank``, alpha ``--lora_alpha`` or the rank) on the transformer, the flow-matching loss,
    ``pytorch_lora_weights.safetensors`` in ``--output_dir``."""
    pipe = load_flow(cls_name, args)
    params = add_transformer_lora(pipe, args.rank, args.lora_alpha or args.rank)
    images = [load_image(p, args.resolution) for p in sorted(Path(args.instance_data_dir).iterdir())]
    flow_train_steps(pipe, images, args.instance_prompt, params, args.max_train_steps, args.learning_rate,
                     args.train_batch_size, args.seed, guidance_scale)
    save_transformer_lora(pipe, args.output_dir)
