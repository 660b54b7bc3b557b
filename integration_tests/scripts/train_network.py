"""Test stand-in for kohya-ss/sd-scripts train_network.py (its CLI contract, tiny loop).

Contract kept (facts read from sd-scripts at 48d368fa):
- the shape: ``class NetworkTrainer`` with ``train(self, args)``, ``setup_parser()``, and a main
  block that builds the parser, parses and calls ``NetworkTrainer().train(args)``; trainers of other
  families subclass ``NetworkTrainer`` (see sdxl_train_network.py);
- data: ``--train_data_dir`` is the parent of ``<repeats>_<class tokens>/`` folders, a caption file
  beside each image in ``--caption_extension`` (default ``.caption``; a missing one falls back to the
  class tokens); ``--dataset_config`` (TOML ``[[datasets]]`` / ``[[datasets.subsets]]`` with
  ``image_dir``, ``num_repeats``, ``caption_extension``) takes precedence over ``--train_data_dir``;
- no image found: "No data found" is logged and training returns, so the process exits 0 with no file;
- the result: ``{output_name or "last"}.{save_model_as}`` with ``lora_unet_…`` keys (``lora_down`` /
  ``lora_up`` / ``alpha``), ``ss_*`` and ``modelspec.*`` metadata; ``--no_metadata`` keeps only
  ``SS_METADATA_MINIMUM_KEYS``.
"""

import argparse
import json
import os
import time

import torch
from _tiny_loop import kohya_subsets, load_kohya_dataset, train_steps

#: kohya's SS_METADATA_MINIMUM_KEYS (library/train_util.py).
SS_METADATA_MINIMUM_KEYS = ["ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim",
                            "ss_network_alpha", "ss_network_args"]


class NetworkTrainer:
    """The SD 1.x/2.x trainer; subclasses change the model family."""

    base_model_version = "sd_v1"
    architecture = "stable-diffusion-v1/lora"

    def load_dataset(self, args):
        """(images, captions, ss_dataset_dirs, ss_tag_frequency), or None when no image is found."""
        data = load_kohya_dataset(kohya_subsets(args), args.resolution)
        if not data[0]:
            print("No data found. Please verify arguments (train_data_dir must be the parent of folders with images)")
            return None
        return data

    def metadata(self, args, dirs, tags):
        """kohya's safetensors metadata: ``ss_*`` training keys and SAI ``modelspec.*`` keys."""
        full = {
            "ss_v2": "False",
            "ss_base_model_version": self.base_model_version,
            "ss_network_module": args.network_module,
            "ss_network_dim": str(args.network_dim),
            "ss_network_alpha": str(args.network_alpha),
            "ss_network_args": json.dumps(dict(a.split("=", 1) for a in args.network_args or [])),
            "ss_output_name": str(args.output_name),
            "ss_max_train_steps": str(args.max_train_steps),
            "ss_seed": str(args.seed),
            "ss_dataset_dirs": json.dumps(dirs),
            "ss_tag_frequency": json.dumps(tags),
            "ss_training_comment": str(args.training_comment),
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": self.architecture,
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": str(args.output_name or "last"),
            "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if args.no_metadata:
            return {k: v for k, v in full.items() if k in SS_METADATA_MINIMUM_KEYS or k.startswith("modelspec.")}
        return full

    def save(self, args, weights, metadata):
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, f"{args.output_name or 'last'}.{args.save_model_as}")
        if args.save_model_as == "safetensors":
            from safetensors.torch import save_file

            save_file(weights, path, metadata=metadata)
        else:
            torch.save(weights, path)
        print(f"saving checkpoint: {path}")

    def train(self, args):
        from diffusers import StableDiffusionPipeline
        from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
        from peft import LoraConfig
        from peft.utils import get_peft_model_state_dict

        data = self.load_dataset(args)
        if data is None:
            return
        images, captions, dirs, tags = data
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
        self.save(args, kohya, self.metadata(args, dirs, tags))


def setup_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--train_data_dir")
    parser.add_argument("--dataset_config")
    parser.add_argument("--caption_extension", default=".caption")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--output_name")
    parser.add_argument("--save_model_as", default="safetensors", choices=["ckpt", "pt", "safetensors"])
    parser.add_argument("--no_metadata", action="store_true")
    parser.add_argument("--training_comment")
    parser.add_argument("--network_module", required=True)
    parser.add_argument("--network_dim", type=int, default=4)
    parser.add_argument("--network_alpha", type=float, default=1.0)
    parser.add_argument("--network_args", nargs="*")
    parser.add_argument("--network_train_unet_only", action="store_true")
    parser.add_argument("--network_train_text_encoder_only", action="store_true")
    parser.add_argument("--resolution", default="16,16")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--max_data_loader_n_workers", type=int, default=8)
    parser.add_argument("--tokenizer_cache_dir")
    parser.add_argument("--cache_latents", action="store_true")
    return parser


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    trainer = NetworkTrainer()
    trainer.train(args)
