"""Test stand-in for kohya-ss/sd-scripts sdxl_train_network.py (its CLI contract, tiny loop).

Contract kept: the shape (``import train_network``; ``class SdxlNetworkTrainer(train_network.NetworkTrainer)``;
``setup_parser()`` is train_network's plus the SDXL options, real names; those not acted on here are
accepted); the data, "No data found" and metadata behaviour of train_network.py (its base class);
``--network_module`` / ``--network_dim`` / ``--network_alpha``; the U-Net and both text encoders
train unless ``--network_train_unet_only``;
the SDXL conditioning. The result is ``{output_name or "last"}.{save_model_as}`` in kohya's SDXL
naming: U-Net modules under their original (SGM) block names (``lora_unet_input_blocks_4_1_…``,
``middle_block_1``, ``output_blocks_…``), the encoders under ``lora_te1_`` / ``lora_te2_``
(``…text_model_encoder_layers_0_self_attn_q_proj``); ``lora_down`` / ``lora_up`` / ``alpha`` each,
and ``ss_*`` metadata with ``ss_base_model_version`` ``sdxl_base_v1-0``.
"""

import torch
import train_network
from _tiny_loop import add_sdxl_lora, load_sdxl, train_steps
from peft.utils import get_peft_model_state_dict


def setup_parser():
    parser = train_network.setup_parser()
    # sdxl_train_util.add_sdxl_training_arguments
    parser.add_argument("--cache_text_encoder_outputs", action="store_true")
    parser.add_argument("--cache_text_encoder_outputs_to_disk", action="store_true")
    parser.add_argument("--disable_mmap_load_safetensors", action="store_true")
    parser.add_argument("--no_half_vae", action="store_true")
    return parser


def sgm_module_name(path, layers_per_block):
    """The original SDXL (SGM) name of a diffusers UNet attention module path:
    ``down_blocks.i.attentions.j`` is ``input_blocks.{(lpb+1)i+j+1}.1``, ``mid_block.attentions.0`` is
    ``middle_block.1``, ``up_blocks.i.attentions.j`` is ``output_blocks.{(lpb+1)i+j}.1``."""
    parts = path.split(".")
    if parts[0] == "mid_block":
        return ".".join(["middle_block", "1", *parts[3:]])
    index = (layers_per_block + 1) * int(parts[1]) + int(parts[3])
    if parts[0] == "down_blocks":
        return ".".join(["input_blocks", str(index + 1), "1", *parts[4:]])
    return ".".join(["output_blocks", str(index), "1", *parts[4:]])


def kohya_tensors(peft_state_dict, prefix, rename, alpha):
    """peft ``<module>.lora_A/B.weight`` tensors → kohya ``<prefix>_<module, dots as _>.lora_down/up.weight`` + ``.alpha``."""
    out = {}
    for key, tensor in peft_state_dict.items():
        module, _, factor = key.rpartition(".lora_")
        name = f"{prefix}_{rename(module).replace('.', '_')}"
        out[f"{name}.{'lora_down' if factor.startswith('A') else 'lora_up'}.weight"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


class SdxlNetworkTrainer(train_network.NetworkTrainer):
    base_model_version = "sdxl_base_v1-0"
    architecture = "stable-diffusion-xl-v1-base/lora"

    def train(self, args):
        data = self.load_dataset(args)
        if data is None:
            return
        images, captions, dirs, tags = data
        pipe = load_sdxl(args)
        params = add_sdxl_lora(pipe, args.network_dim, args.network_alpha, not args.network_train_unet_only)
        train_steps(pipe, images, captions, params, args.max_train_steps, args.learning_rate, args.train_batch_size, args.seed)
        lpb = pipe.unet.config.layers_per_block
        weights = kohya_tensors(get_peft_model_state_dict(pipe.unet), "lora_unet", lambda m: sgm_module_name(m, lpb),
                                args.network_alpha)
        if not args.network_train_unet_only:
            def te_name(module):  # kohya names CLIP modules from the CLIPTextModel root
                return module if module.startswith("text_model.") else f"text_model.{module}"

            for prefix, encoder in (("lora_te1", pipe.text_encoder), ("lora_te2", pipe.text_encoder_2)):
                weights.update(kohya_tensors(get_peft_model_state_dict(encoder), prefix, te_name, args.network_alpha))
        self.save(args, weights, self.metadata(args, dirs, tags))


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    trainer = SdxlNetworkTrainer()
    trainer.train(args)
