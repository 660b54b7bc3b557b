"""Test stand-in for kohya-ss/sd-scripts train_network.py (its CLI contract, tiny loop).

Contract kept: ``--train_data_dir`` in the kohya layout (``<repeats>_<name>/`` subfolders, a
``.txt`` caption beside each image, ``--caption_extension``), ``--network_module``,
``--network_dim`` / ``--network_alpha``; the result is ``{output_name or "last"}.safetensors``
with ``lora_unet_…`` keys (``lora_down`` / ``lora_up`` / ``alpha``) and ``ss_*`` metadata.
"""

import argparse
import json
import os

import torch
from _tiny_loop import load_kohya_dataset, train_steps
from diffusers import StableDiffusionPipeline
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file


def setup_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--train_data_dir", required=True)
    parser.add_argument("--caption_extension", default=".caption")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--output_name")
    parser.add_argument("--save_model_as", default="safetensors")
    parser.add_argument("--network_module", required=True)
    parser.add_argument("--network_dim", type=int, default=4)
    parser.add_argument("--network_alpha", type=float, default=1.0)
    parser.add_argument("--resolution", default="16,16")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main():
    args = setup_parser().parse_args()
    images, captions, dirs, tags = load_kohya_dataset(args.train_data_dir, args.caption_extension, args.resolution)
    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, safety_checker=None)
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=args.network_dim, lora_alpha=args.network_alpha, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    train_steps(pipe, images, captions, params, args.max_train_steps, args.learning_rate, args.train_batch_size, args.seed)
    peft_sd = get_peft_model_state_dict(pipe.unet)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()})
    kohya = {k: v.contiguous() for k, v in kohya.items()}
    for key in list(kohya):
        if key.endswith(".alpha"):  # kohya stores the alpha the network was trained with
            kohya[key] = torch.tensor(float(args.network_alpha))
    os.makedirs(args.output_dir, exist_ok=True)
    metadata = {
        "ss_network_module": args.network_module,
        "ss_network_dim": str(args.network_dim),
        "ss_network_alpha": str(args.network_alpha),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_tag_frequency": json.dumps(tags),
    }
    save_file(kohya, os.path.join(args.output_dir, f"{args.output_name or 'last'}.safetensors"), metadata=metadata)


if __name__ == "__main__":
    main()
