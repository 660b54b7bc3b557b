"""Test stand-in for diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py (its CLI contract, tiny loop).

Contract kept: ``parse_args(input_args=None)`` + ``main(args)``; the real script's argument names
(those below; ``--dataset_name`` is accepted and not acted on); ``--train_data_dir`` is read with
``datasets.load_dataset("imagefolder", ...)`` (``metadata.jsonl``: ``file_name`` + the caption
column); ``--pretrained_vae_model_name_or_path`` replaces the VAE; LoRA (rank ``--rank``, alpha =
rank) on the UNet and, with ``--train_text_encoder``, on both text encoders; the SDXL conditioning;
the result is ``pytorch_lora_weights.safetensors`` written with
``StableDiffusionXLPipeline.save_lora_weights``.
"""

import argparse
import os

import numpy as np
import torch
from _tiny_loop import add_sdxl_lora, load_sdxl, save_sdxl_lora, train_steps
from datasets import load_dataset


def parse_args(input_args=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--pretrained_vae_model_name_or_path")
    parser.add_argument("--revision")
    parser.add_argument("--variant")
    parser.add_argument("--dataset_name")
    parser.add_argument("--dataset_config_name")
    parser.add_argument("--train_data_dir")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--validation_prompt")
    parser.add_argument("--output_dir", default="sd-model-finetuned-lora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--train_text_encoder", action="store_true")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    parser.add_argument("--report_to", default="tensorboard")
    args = parser.parse_args(input_args)
    if args.dataset_name is None and args.train_data_dir is None:
        raise ValueError("Need either a dataset name or a training folder.")
    return args


def main(args):
    data = load_dataset("imagefolder", data_files={"train": os.path.join(args.train_data_dir, "**")})["train"]
    pipe = load_sdxl(args)
    params = add_sdxl_lora(pipe, args.rank, args.rank, args.train_text_encoder)
    images = [
        torch.from_numpy(np.asarray(im.convert("RGB").resize((args.resolution,) * 2), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        for im in data[args.image_column]
    ]
    train_steps(pipe, images, list(data[args.caption_column]), params, args.max_train_steps, args.learning_rate,
                args.train_batch_size, args.seed)
    save_sdxl_lora(pipe, args.output_dir, args.train_text_encoder)


if __name__ == "__main__":
    args = parse_args()
    main(args)
