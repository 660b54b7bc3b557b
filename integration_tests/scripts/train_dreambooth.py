"""Test stand-in for diffusers' examples/dreambooth/train_dreambooth.py (its CLI contract, tiny loop).

Contract kept: ``parse_args(input_args=None)`` + ``main(args)``; every file in
``--instance_data_dir`` is opened as an image; the result is a full pipeline saved with
``save_pretrained(--output_dir)``.
"""

import argparse
from pathlib import Path

import torch
from _tiny_loop import load_image, train_steps
from diffusers import StableDiffusionPipeline


def parse_args(input_args=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--instance_data_dir", required=True)
    parser.add_argument("--instance_prompt", required=True)
    parser.add_argument("--class_data_dir")
    parser.add_argument("--with_prior_preservation", action="store_true")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--train_text_encoder", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(input_args)


def main(args):
    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, safety_checker=None)
    files = sorted(Path(args.instance_data_dir).iterdir())  # DreamBoothDataset: every file is an image
    images = [load_image(p, args.resolution) for p in files]
    params = list(pipe.unet.parameters()) + (list(pipe.text_encoder.parameters()) if args.train_text_encoder else [])
    train_steps(pipe, images, [args.instance_prompt] * len(images), params, args.max_train_steps,
                args.learning_rate, args.train_batch_size, args.seed)
    with torch.no_grad():
        pipe.save_pretrained(args.output_dir)


if __name__ == "__main__":
    args = parse_args()
    main(args)
