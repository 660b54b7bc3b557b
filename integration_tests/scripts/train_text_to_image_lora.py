"""Test stand-in for diffusers' examples/text_to_image/train_text_to_image_lora.py (its CLI contract).

Contract kept: ``parse_args()`` / ``main()`` without arguments; ``--train_data_dir`` is read with
``datasets.load_dataset("imagefolder", ...)`` (``metadata.jsonl``: ``file_name`` + the caption
column); UNet LoRA only; the result is ``pytorch_lora_weights.safetensors``.
"""

import argparse
import os

import numpy as np
import torch
from _tiny_loop import train_steps
from datasets import load_dataset
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--train_data_dir", required=True)
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--validation_prompt")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    data = load_dataset("imagefolder", data_files={"train": os.path.join(args.train_data_dir, "**")})["train"]
    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, safety_checker=None)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    images = [
        torch.from_numpy(np.asarray(im.convert("RGB").resize((args.resolution,) * 2), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        for im in data[args.image_column]
    ]
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    train_steps(pipe, images, list(data[args.caption_column]), params, args.max_train_steps, args.learning_rate,
                args.train_batch_size, args.seed)
    StableDiffusionPipeline.save_lora_weights(
        save_directory=args.output_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        safe_serialization=True,
    )


if __name__ == "__main__":
    main()
