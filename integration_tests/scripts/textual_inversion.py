"""Test stand-in for diffusers' examples/textual_inversion/textual_inversion.py (its CLI contract, tiny loop).

Contract kept: ``parse_args()`` and ``main()`` take no arguments (``sys.argv`` carries them); the
flat ``--train_data_dir`` is read with ``os.listdir``; tokens ``tok``, ``tok_1``… are added and
only their embedding rows train; the result is ``learned_embeds.safetensors`` (one key = the token).
"""

import argparse
import os

import torch
from _tiny_loop import load_image, train_steps
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--train_data_dir", required=True)
    parser.add_argument("--placeholder_token", required=True)
    parser.add_argument("--initializer_token", required=True)
    parser.add_argument("--learnable_property", default="object", choices=["object", "style"])
    parser.add_argument("--num_vectors", type=int, default=1)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=5e-3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, safety_checker=None)
    tokens = [args.placeholder_token] + [f"{args.placeholder_token}_{i}" for i in range(1, args.num_vectors)]
    pipe.tokenizer.add_tokens(tokens)
    init_id = pipe.tokenizer.convert_tokens_to_ids(args.initializer_token)
    ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    emb = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for i in ids:
            emb[i] = emb[init_id]
    original = emb.detach().clone()
    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    emb.requires_grad_(True)
    keep = torch.ones(len(pipe.tokenizer), dtype=torch.bool)
    keep[ids] = False

    def restore():
        with torch.no_grad():
            emb[keep] = original[keep]

    images = [load_image(os.path.join(args.train_data_dir, f), args.resolution) for f in sorted(os.listdir(args.train_data_dir))]
    prompt = "a photo of " + " ".join(tokens)
    train_steps(pipe, images, [prompt] * len(images), [emb], args.max_train_steps, args.learning_rate,
                args.train_batch_size, args.seed, after_step=restore)
    os.makedirs(args.output_dir, exist_ok=True)
    learned = emb[ids].detach().clone()
    save_file({args.placeholder_token: learned}, os.path.join(args.output_dir, "learned_embeds.safetensors"),
              metadata={"format": "pt"})


if __name__ == "__main__":
    main()
