"""Build the base model of the real-kohya test, run inside the kohya venv (its diffusers / transformers).

    KPY integration_tests/kohya_fixture.py TESTBED_PIPELINE OUT_PIPELINE TOKENIZER_CACHE_DIR

kohya's SD 1.x path rebuilds the UNet as its own ``UNet2DConditionModel`` with SD 1.5's fixed block
channels (320, 640, 1280, 1280; two layers per block), so the base is an SD 1.5-shaped diffusers UNet
with random weights, saved in fp16. Its cross-attention width is the testbed text encoder's (32): the
text encoder, tokenizer and scheduler are the testbed's; the VAE is a tiny random one with SD's shape
contract (8x down, 4 latent channels), so ``sample_size`` 8 is 64 px. The tokenizer is also saved as
``TOKENIZER_CACHE_DIR/openai_clip-vit-large-patch14`` (what kohya's ``--tokenizer_cache_dir`` reads
for SD 1.x), so nothing is downloaded. Prints one JSON line with the folder and the UNet's size.
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


def main(testbed, out, tokenizer_cache):
    testbed, out = Path(testbed), Path(out)
    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(testbed / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(testbed / "text_encoder")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64, layers_per_block=1, norm_num_groups=8,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    scheduler = DDIMScheduler.from_pretrained(testbed / "scheduler")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.half(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(Path(tokenizer_cache) / "openai_clip-vit-large-patch14")
    print(json.dumps({"pipeline": str(out), "unet_parameters": sum(p.numel() for p in unet.parameters())}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
