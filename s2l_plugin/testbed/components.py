"""The testbed's diffusers components, built in code: tokenizer, text encoder, VAE, UNet, scheduler.

Every constructor here is the single source of the testbed architecture; the random-init
:func:`build_tiny_pipeline` and the trained testbed share them, so a model that loads one loads the
other. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

#: Pixel resolution of testbed images (height = width).
IMAGE_SIZE = 16
#: Latent channels of the VAE (as Stable Diffusion).
LATENT_CHANNELS = 4
#: Text width shared by the text encoder and the UNet's cross-attention.
TEXT_WIDTH = 32
#: Width of the tiny SDXL's second text encoder. It differs from :data:`TEXT_WIDTH` as SDXL's
#: OpenCLIP bigG (1280) differs from its CLIP ViT-L (768): code that swaps the two encoders, or
#: a converter that tells them apart by width (diffusers' single-file loader), is exercised.
TEXT_WIDTH_2 = 48
#: Layers of the tiny SDXL's second text encoder: ten, so a single-file checkpoint has the
#: ``resblocks.9`` keys diffusers recognises an SDXL base by.
TEXT_LAYERS_2 = 10
#: Tokens per prompt, specials included. Character-level tokens: every caption template fits.
MODEL_MAX_LENGTH = 40

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

#: Stable Diffusion's scheduler settings (as in its scheduler_config.json). DDIM's own default
#: ``clip_sample=True`` clamps *latents* to [-1, 1] and wrecked samples in a measured run.
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins GPT-2/CLIP byte-level BPE uses for the bytes 0..255, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    table = dict(zip(printable, codes, strict=True))
    return [chr(table[b]) for b in range(256)]


def char_vocab() -> dict[str, int]:
    """Character-level CLIP vocabulary: each byte symbol, then each with ``</w>``, then BOS and EOS (514 ids)."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer_files(folder: Path) -> Path:
    """Write ``vocab.json`` and an empty ``merges.txt`` (char-level BPE: no merges) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(char_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return folder


def make_tokenizer() -> CLIPTokenizer:
    """A CLIPTokenizer over :func:`char_vocab`, loaded from the vocab/merges files written here."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="s2l-tok-") as tmp:
        write_tokenizer_files(Path(tmp))
        # from_pretrained reads vocab.json + merges.txt (the constructor takes in-memory dicts only).
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=MODEL_MAX_LENGTH, local_files_only=True)


def _text_config(**extra: Any) -> Any:
    from transformers import CLIPTextConfig

    vocab = char_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
        **extra,
    )


def make_text_encoder() -> CLIPTextModel:
    """A 2-layer CLIPTextModel of width 32 matching :func:`make_tokenizer`'s ids."""
    from transformers import CLIPTextModel

    return CLIPTextModel(_text_config())


def make_text_encoder_2() -> CLIPTextModelWithProjection:
    """SDXL's second text encoder at testbed size: a CLIPTextModelWithProjection of :data:`TEXT_LAYERS_2`
    layers, width and projection :data:`TEXT_WIDTH_2` (SDXL's bigG: 32 layers, 1280), the testbed's ids."""
    from transformers import CLIPTextModelWithProjection

    config = _text_config(projection_dim=TEXT_WIDTH_2)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = TEXT_WIDTH_2, 2 * TEXT_WIDTH_2, TEXT_LAYERS_2
    return CLIPTextModelWithProjection(config)


def make_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    """An AutoencoderKL with block widths (16, 32): 3x16x16 images to 4x8x8 latents (2x down).

    ``scaling_factor``: the latent scale in the config (SD 1.x 0.18215, SDXL 0.13025).
    """
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=IMAGE_SIZE,
        scaling_factor=scaling_factor,
    )


def make_unet(channels: tuple[int, int] = (32, 64)) -> UNet2DConditionModel:
    """The testbed UNet: block widths ``channels`` ((32, 64): ~1.0 M params), one layer per block, cross-attention width 32."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(channels),
        layers_per_block=1,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def make_sdxl_unet() -> UNet2DConditionModel:
    """A UNet with SDXL's layout at testbed size (~3.1 M params).

    As SDXL 1.0: three down blocks (``DownBlock2D``, then two ``CrossAttnDownBlock2D``), two
    layers per block, transformer depth rising per block ((1, 1, 2); SDXL's is (1, 2, 10)), linear
    projections, ``addition_embed_type="text_time"`` (the pooled text embedding plus six
    size/crop numbers, each embedded to ``addition_time_embed_dim``) and cross-attention over both
    text encoders' hidden states concatenated (32 + 48 = 80 wide). The block indices therefore
    match SDXL's original (SGM) names: ``input_blocks_4_1`` is ``down_blocks.1.attentions.0``.
    """
    from diffusers import UNet2DConditionModel

    time_dim = 8
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TEXT_WIDTH_2 + 6 * time_dim,
        cross_attention_dim=TEXT_WIDTH + TEXT_WIDTH_2,
        norm_num_groups=32,
    )


def make_scheduler(prediction_type: str = "epsilon", **overrides: Any) -> DDIMScheduler:
    """A DDIMScheduler with Stable Diffusion's settings (:data:`SCHEDULER_CONFIG`).

    ``prediction_type``: "epsilon" or "v_prediction" (SD 2.x 768 models); ``overrides``: other
    scheduler settings (e.g. ``rescale_betas_zero_snr=True, timestep_spacing="trailing"`` for a
    zero-terminal-SNR base).
    """
    from diffusers import DDIMScheduler

    return DDIMScheduler(**{**SCHEDULER_CONFIG, "prediction_type": prediction_type, **overrides})


def assemble_pipeline(unet, vae, text_encoder, tokenizer, scheduler) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from the parts, with no safety checker or feature extractor."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon", **scheduler: Any) -> StableDiffusionPipeline:
    """A randomly initialised StableDiffusionPipeline with the testbed architecture, in memory (CPU, fp32).

    The same ``seed`` gives the same weights. Generations are 3x16x16 noise-like images: use the
    testbed (:func:`s2l_plugin.testbed.build_testbed` / :meth:`Testbed.load`) for a trained model.
    ``prediction_type`` and ``scheduler`` go to :func:`make_scheduler`.
    """
    import torch

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = make_unet()
        vae = make_vae()
        text_encoder = make_text_encoder()
    finally:
        torch.random.set_rng_state(state)
    for module in (unet, vae, text_encoder):
        module.eval()
    return assemble_pipeline(unet, vae, text_encoder, make_tokenizer(), make_scheduler(prediction_type, **scheduler))


def build_tiny_sdxl_pipeline(seed: int = 0, prediction_type: str = "epsilon", **scheduler: Any) -> StableDiffusionXLPipeline:
    """A randomly initialised StableDiffusionXLPipeline with SDXL's real layout at testbed size (CPU, fp32).

    Two text encoders of different widths (the second a ``CLIPTextModelWithProjection``, whose
    projection is the pooled embedding), both with the testbed's character-level tokenizer; :func:`make_sdxl_unet`;
    the testbed VAE with SDXL's latent scale 0.13025; 3x16x16 images. The same ``seed`` gives
    the same weights. ``prediction_type`` and ``scheduler`` go to :func:`make_scheduler`.
    """
    import torch
    from diffusers import StableDiffusionXLPipeline

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = make_sdxl_unet()
        vae = make_vae(scaling_factor=0.13025)
        text_encoder = make_text_encoder()
        text_encoder_2 = make_text_encoder_2()
    finally:
        torch.random.set_rng_state(state)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.eval()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=make_tokenizer(),
        tokenizer_2=make_tokenizer(), unet=unet, scheduler=make_scheduler(prediction_type, **scheduler),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
