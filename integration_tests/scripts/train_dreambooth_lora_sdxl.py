"""Test stand-in for diffusers' examples/dreambooth/train_dreambooth_lora_sdxl.py (its CLI contract, tiny loop).

Contract kept: ``parse_args(input_args=None)`` + ``main(args)``; the real script's argument names
(those below; ``--dataset_name``, prior preservation, ``--use_dora``, ``--output_kohya_format``
and the crop options are accepted and not acted on); every file in ``--instance_data_dir`` is
opened as an image; ``--pretrained_vae_model_name_or_path`` replaces the VAE; LoRA (rank
``--rank``, alpha = rank) through peft on the UNet's to_k/to_q/to_v/to_out.0 and, with
``--train_text_encoder``, on both text encoders' q/k/v/out projections; the SDXL conditioning (both
encoders, pooled embedding, size/crop ids); the result is ``pytorch_lora_weights.safetensors`` in
``--output_dir``, written with ``StableDiffusionXLPipeline.save_lora_weights`` (``unet.``,
``text_encoder.``, ``text_encoder_2.`` keys).
"""

import argparse
from pathlib import Path

from _tiny_loop import add_sdxl_lora, load_image, load_sdxl, save_sdxl_lora, train_steps


def parse_args(input_args=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--pretrained_vae_model_name_or_path")
    parser.add_argument("--revision")
    parser.add_argument("--variant")
    parser.add_argument("--dataset_name")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--caption_column")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--instance_data_dir")
    parser.add_argument("--instance_prompt", required=True)
    parser.add_argument("--class_data_dir")
    parser.add_argument("--class_prompt")
    parser.add_argument("--with_prior_preservation", action="store_true")
    parser.add_argument("--validation_prompt")
    parser.add_argument("--output_dir", default="lora-dreambooth-model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--crops_coords_top_left_h", type=int, default=0)
    parser.add_argument("--crops_coords_top_left_w", type=int, default=0)
    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--train_text_encoder", action="store_true")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--use_dora", action="store_true")
    parser.add_argument("--output_kohya_format", action="store_true")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    parser.add_argument("--report_to", default="tensorboard")
    args = parser.parse_args(input_args)
    if args.dataset_name is None and args.instance_data_dir is None:
        raise ValueError("Specify either `--dataset_name` or `--instance_data_dir`")
    return args


def main(args):
    pipe = load_sdxl(args)
    params = add_sdxl_lora(pipe, args.rank, args.rank, args.train_text_encoder)
    images = [load_image(p, args.resolution) for p in sorted(Path(args.instance_data_dir).iterdir())]
    train_steps(pipe, images, [args.instance_prompt] * len(images), params, args.max_train_steps,
                args.learning_rate, args.train_batch_size, args.seed)
    save_sdxl_lora(pipe, args.output_dir, args.train_text_encoder)


if __name__ == "__main__":
    args = parse_args()
    main(args)
