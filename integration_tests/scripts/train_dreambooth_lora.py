"""Test stand-in for diffusers' examples/dreambooth/train_dreambooth_lora.py (its CLI contract, tiny loop).

Contract kept: ``parse_args(input_args=None)`` + ``main(args)``; ``--rank``; LoRA through peft on
to_k/to_q/to_v/to_out.0 (``unet.add_adapter``); the result is ``pytorch_lora_weights.safetensors``
in ``--output_dir``, written with ``save_lora_weights``.
"""

import argparse
from pathlib import Path

from _tiny_loop import load_image, train_steps
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict


def parse_args(input_args=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--instance_data_dir", required=True)
    parser.add_argument("--instance_prompt", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--train_text_encoder", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(input_args)


def main(args):
    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, safety_checker=None)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    images = [load_image(p, args.resolution) for p in sorted(Path(args.instance_data_dir).iterdir())]
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    train_steps(pipe, images, [args.instance_prompt] * len(images), params, args.max_train_steps,
                args.learning_rate, args.train_batch_size, args.seed)
    unet_lora = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    StableDiffusionPipeline.save_lora_weights(save_directory=args.output_dir, unet_lora_layers=unet_lora)


if __name__ == "__main__":
    args = parse_args()
    main(args)
