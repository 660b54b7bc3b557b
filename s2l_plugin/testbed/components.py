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
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
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


#: CLIP's real context length (77 tokens): the tiny SD3/Flux CLIPs have it, because diffusers' Flux
#: and SD3 training scripts tokenize CLIP prompts at a fixed 77.
CLIP_CONTEXT = 77


def make_tokenizer(max_length: int = MODEL_MAX_LENGTH) -> CLIPTokenizer:
    """A CLIPTokenizer over :func:`char_vocab`, loaded from the vocab/merges files written here
    (``max_length`` tokens per prompt, specials included)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="s2l-tok-") as tmp:
        write_tokenizer_files(Path(tmp))
        # from_pretrained reads vocab.json + merges.txt (the constructor takes in-memory dicts only).
        return CLIPTokenizer.from_pretrained(tmp, model_max_length=max_length, local_files_only=True)


def _text_config(max_positions: int = MODEL_MAX_LENGTH, **extra: Any) -> Any:
    from transformers import CLIPTextConfig

    vocab = char_vocab()
    return CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=TEXT_WIDTH,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[EOS_TOKEN],
        **extra,
    )


def make_text_encoder(max_positions: int = MODEL_MAX_LENGTH) -> CLIPTextModel:
    """A 2-layer CLIPTextModel of width 32 matching :func:`make_tokenizer`'s ids (``max_positions`` tokens)."""
    from transformers import CLIPTextModel

    return CLIPTextModel(_text_config(max_positions))


def make_text_encoder_2(max_positions: int = MODEL_MAX_LENGTH) -> CLIPTextModelWithProjection:
    """SDXL's second text encoder at testbed size: a CLIPTextModelWithProjection of :data:`TEXT_LAYERS_2`
    layers, width and projection :data:`TEXT_WIDTH_2` (SDXL's bigG: 32 layers, 1280), the testbed's ids."""
    from transformers import CLIPTextModelWithProjection

    config = _text_config(max_positions, projection_dim=TEXT_WIDTH_2)
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


# -- flow-matching families (Flux, Stable Diffusion 3) -------------------------------------------------

#: Width of the tiny T5 encoder (Flux's and SD3's third text encoder; T5-XXL's is 4096). Wider than
#: both CLIPs together (32 + 48), as SD3 pads the CLIP states to T5's width.
T5_WIDTH = 96
#: T5 tokens per prompt the tiny pipelines' tokenizer allows (Flux-dev's ``max_sequence_length``).
T5_MAX_LENGTH = 512
#: The T5 tokenizer's special tokens, at the ids T5 gives them.
T5_SPECIALS = ("<pad>", "</s>", "<unk>")
#: Flux's VAE latent normalisation (scaling and shift factor in its vae/config.json).
FLUX_VAE_SCALE, FLUX_VAE_SHIFT = 0.3611, 0.1159
#: SD3's VAE latent normalisation.
SD3_VAE_SCALE, SD3_VAE_SHIFT = 1.5305, 0.0609


def make_t5_tokenizer() -> Any:
    """A character-level T5TokenizerFast built in code: a ``tokenizers`` Unigram model over printable
    ASCII characters and SentencePiece's word marker ``▁``, with T5's specials (pad 0, ``</s>`` 1,
    unk 2), ``</s>`` appended to every prompt; nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = ["▁"] + [chr(c) for c in range(33, 127)]
    vocab = [(tok, 0.0) for tok in T5_SPECIALS] + [(c, -1.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=T5_MAX_LENGTH)


def make_t5_encoder() -> Any:
    """A 2-layer T5EncoderModel of width :data:`T5_WIDTH` over :func:`make_t5_tokenizer`'s ids."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=len(T5_SPECIALS) + 95, d_model=T5_WIDTH, d_kv=16, d_ff=2 * T5_WIDTH, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(config)


def make_flow_vae(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """The testbed VAE (3x16x16 images to 4x8x8 latents) with a flow-matching family's latent scale
    and shift (``(z - shift) * scale``)."""
    vae = make_vae(scaling_factor=scaling_factor)
    vae.register_to_config(shift_factor=shift_factor)
    return vae


def make_flux_transformer(guidance_embeds: bool = True) -> Any:
    """A FluxTransformer2DModel with one double-stream and one single-stream block (Flux.1: 19 and 38).

    Latents are packed 2x2, so ``in_channels`` is 4 x :data:`LATENT_CHANNELS`; two heads of 16
    (rotary axes 4 + 4 + 8); pooled projection from CLIP's width, joint attention over T5's.
    ``guidance_embeds``: True is Flux.1-dev's guidance-distilled layout, False is Flux.1-schnell's.
    """
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=TEXT_WIDTH,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    )


def make_sd3_transformer() -> Any:
    """An SD3Transformer2DModel with two joint blocks (SD3-medium: 24) on 2x2 patches of the 4x8x8 latents;
    pooled projection from both CLIPs' projections (32 + 48), joint attention over T5's width."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=IMAGE_SIZE // 2, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=32,
        pooled_projection_dim=TEXT_WIDTH + TEXT_WIDTH_2, out_channels=LATENT_CHANNELS, pos_embed_max_size=8,
    )


def make_flow_scheduler(family: str) -> Any:
    """The FlowMatchEulerDiscreteScheduler of ``family`` ("flux": Flux.1-dev's resolution-dependent
    shift; "sd3": SD3's static shift 3.0), as their scheduler_config.json set it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if family == "flux":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                               max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def _seeded(seed: int, build: Any) -> Any:
    import torch

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return build()
    finally:
        torch.random.set_rng_state(state)


def build_tiny_flux_pipeline(seed: int = 0, guidance_embeds: bool = True) -> Any:
    """A randomly initialised FluxPipeline with Flux.1's layout at testbed size (CPU, fp32).

    CLIP (:func:`make_text_encoder` with CLIP's 77 positions, its pooled output conditions the transformer) and a 2-layer T5
    (:func:`make_t5_encoder`, its hidden states are the joint-attention context),
    :func:`make_flux_transformer`, the testbed VAE with Flux's latent scale/shift and sample size
    16 (the resolution stages default to), Flux's flow-matching scheduler. 3x16x16 images.
    """
    from diffusers import FluxPipeline

    def build() -> tuple[Any, ...]:
        return (make_flux_transformer(guidance_embeds), make_flow_vae(FLUX_VAE_SCALE, FLUX_VAE_SHIFT), make_text_encoder(CLIP_CONTEXT),
                make_t5_encoder())

    transformer, vae, text_encoder, t5 = _seeded(seed, build)
    for module in (transformer, vae, text_encoder, t5):
        module.eval()
    pipe = FluxPipeline(scheduler=make_flow_scheduler("flux"), vae=vae, text_encoder=text_encoder, tokenizer=make_tokenizer(CLIP_CONTEXT),
                        text_encoder_2=t5, tokenizer_2=make_t5_tokenizer(), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sd3_pipeline(seed: int = 0) -> Any:
    """A randomly initialised StableDiffusion3Pipeline with SD3's layout at testbed size (CPU, fp32).

    Two CLIPs with projection (widths 32 and 48, as CLIP-L and bigG; CLIP's 77 positions), a 2-layer T5, :func:`make_sd3_transformer`,
    the testbed VAE with SD3's latent scale/shift, SD3's flow-matching scheduler (shift 3.0). 3x16x16 images.
    """
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    def build() -> tuple[Any, ...]:
        return (make_sd3_transformer(), make_flow_vae(SD3_VAE_SCALE, SD3_VAE_SHIFT),
                CLIPTextModelWithProjection(_text_config(CLIP_CONTEXT, projection_dim=TEXT_WIDTH)), make_text_encoder_2(CLIP_CONTEXT),
                make_t5_encoder())

    transformer, vae, te1, te2, t5 = _seeded(seed, build)
    for module in (transformer, vae, te1, te2, t5):
        module.eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=make_flow_scheduler("sd3"), vae=vae, text_encoder=te1, tokenizer=make_tokenizer(CLIP_CONTEXT),
        text_encoder_2=te2, tokenizer_2=make_tokenizer(CLIP_CONTEXT), text_encoder_3=t5, tokenizer_3=make_t5_tokenizer(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
