"""Test stand-in for diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py (its CLI contract, tiny loop).

Contract kept: ``parse_args(input_args=None)`` + ``main(args)``; the real script's argument names
(those below; prior preservation, ``--train_text_encoder``, ``--lora_layers`` and the logit-normal
weighting options are accepted and not acted on); every file in ``--instance_data_dir`` is opened as
an image and trained on ``--instance_prompt``; LoRA (rank ``--rank``, alpha ``--lora_alpha`` or the
rank) through peft on the transformer's default target layers; the flow-matching loss; the result is
``pytorch_lora_weights.safetensors`` in ``--output_dir``, written with ``StableDiffusion3Pipeline.save_lora_weights``.
"""

import argparse

from _tiny_loop import flow_dreambooth_main


def parse_args(input_args=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained_model_name_or_path", required=True)
    parser.add_argument("--revision")
    parser.add_argument("--variant")
    parser.add_argument("--dataset_name")
    parser.add_argument("--instance_data_dir")
    parser.add_argument("--instance_prompt", required=True)
    parser.add_argument("--class_data_dir")
    parser.add_argument("--class_prompt")
    parser.add_argument("--with_prior_preservation", action="store_true")
    parser.add_argument("--validation_prompt")
    parser.add_argument("--output_dir", default="sd3-dreambooth-lora")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=16)
    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--train_text_encoder", action="store_true")
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--max_train_steps", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lora_alpha", type=int)
    parser.add_argument("--lora_dropout", type=float, default=0.0)
    parser.add_argument("--lora_layers")
    parser.add_argument("--weighting_scheme", default="none", choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"])
    parser.add_argument("--logit_mean", type=float, default=0.0)
    parser.add_argument("--logit_std", type=float, default=1.0)
    parser.add_argument("--mode_scale", type=float, default=1.29)
    parser.add_argument("--precondition_outputs", type=int, default=1)
    parser.add_argument("--max_sequence_length", type=int, default=77)
    parser.add_argument("--lora_blocks")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    parser.add_argument("--report_to", default="tensorboard")
    args = parser.parse_args(input_args)
    if args.dataset_name is None and args.instance_data_dir is None:
        raise ValueError("Specify either `--dataset_name` or `--instance_data_dir`")
    return args


def main(args):
    flow_dreambooth_main(args, "StableDiffusion3Pipeline", 3.5)


if __name__ == "__main__":
    args = parse_args()
    main(args)
