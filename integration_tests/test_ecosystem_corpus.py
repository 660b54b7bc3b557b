"""Ecosystem corpus: files written by the ecosystem's own code, audited and scanned as a user would.

Every file here is made in the test by the library that defines its format -- never by this
project's writers -- then audited with ``s2l audit`` on the shipped testbed (the default
``--base``; the ``seven`` domain's members and non-members, ``--attacks loss``,
``--no-memorization``) and scanned with ``s2l scan``. A refusal or a traceback here is a loader
bug: the rule is to accept what the ecosystem's own loaders (diffusers, peft, kohya sd-scripts,
AUTOMATIC1111) accept, unless it is unsafe (a pickle without ``--allow-pickle``, or code).

| file | written by |
|---|---|
| ``pytorch_lora_weights.safetensors`` (unet + text encoder) | diffusers ``StableDiffusionPipeline.save_lora_weights``, layers from peft ``get_peft_model_state_dict`` + diffusers ``convert_state_dict_to_diffusers``, adapter metadata as ``LoraConfig.to_dict()`` (``train_dreambooth_lora.py``) |
| kohya LoRA ``.safetensors`` | diffusers ``convert_all_state_dict_to_peft`` + ``convert_state_dict_to_kohya`` on that file, saved with safetensors (the advanced SD1.5 DreamBooth script's kohya export): int64 ``.alpha``, ``lora_te1_`` prefix |
| PEFT folders ``<dir>/unet/``, ``<dir>/text_encoder/`` | peft ``get_peft_model(...).save_pretrained`` (peft's DreamBooth LoRA example) |
| ``learned_embeds.safetensors`` | ``{token: tensor}`` rows of the resized CLIP embedding, safetensors ``save_file`` with ``{"format": "pt"}`` (``textual_inversion.py``'s ``save_progress``; 1-D ``[dim]`` as older scripts wrote, ``[n, dim]`` as ``--num_vectors`` does) |
| kohya ``emb_params`` | ``{"emb_params": [n, dim]}`` in fp16, safetensors ``save_file`` (sd-scripts ``train_textual_inversion.py`` ``save_weights`` with ``--save_precision fp16``) |
| A1111 ``.pt`` embedding and hypernetwork | ``torch.save`` of the dicts A1111's ``Embedding.save`` / ``Hypernetwork.save`` build, the MLPs as A1111's ``HypernetworkModule`` (a ``torch.nn.Sequential`` named ``linear``) |
| single-file checkpoint | see below |

What the formats' own code cannot write here, and what stands in for it:

- AUTOMATIC1111 is an application, not an installable library: its two save functions are
  reproduced as dict literals with the keys those functions write;
  the tensors come from real ``torch.nn`` modules built as A1111 builds them.
- The single-file (original LDM) layout: diffusers 0.42 only *reads* it (``from_single_file``;
  ``convert_from_ckpt``'s ``convert_ldm_*`` functions go LDM -> diffusers); its reverse script,
  ``scripts/convert_diffusers_to_original_stable_diffusion.py``, is not part of the installed
  package. The file is built with ``tests/test_formats.py``'s key mapping, which that test checks
  against diffusers' own ``from_single_file``.
- transformers 5.24's ``CLIPTextModel.add_adapter`` needs peft >= 0.22 (0.21 is installed); the
  text-encoder LoRA is injected with peft's ``inject_adapter_in_model``, which ``add_adapter`` calls.
- diffusers' ``convert_all_state_dict_to_peft`` converts a whole unet + text-encoder file only
  half (it picks one mapping for all keys), so it is applied per component.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from s2l_plugin.cli import main
from s2l_plugin.result import load_result
from s2l_plugin.testbed import Testbed

pytestmark = pytest.mark.integration

DOMAIN = "seven"
RANK = 4


def _load_tests_module(name: str):
    spec = importlib.util.spec_from_file_location(f"_s2l_tests_{name}", Path(__file__).resolve().parents[1] / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def shipped():
    return Testbed.load(None)


def _fresh_pipe(tb):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tb.pipeline_dir), safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _randomise_up(model, seed: int) -> None:
    """peft starts lora_B at zero; a trained LoRA has not (so the target differs from its base)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


UNET_CONFIG = {"r": RANK, "lora_alpha": 2 * RANK, "init_lora_weights": "gaussian", "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}
TE_CONFIG = {"r": RANK, "lora_alpha": 2 * RANK, "init_lora_weights": "gaussian", "target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"]}


@pytest.fixture(scope="module")
def diffusers_lora(shipped, tmp_path_factory):
    """``pytorch_lora_weights.safetensors`` as train_dreambooth_lora.py writes it (unet + text encoder)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = _fresh_pipe(shipped)
    unet_config, te_config = LoraConfig(**UNET_CONFIG), LoraConfig(**TE_CONFIG)
    pipe.unet.add_adapter(unet_config)
    inject_adapter_in_model(te_config, pipe.text_encoder)
    _randomise_up(pipe.unet, 1)
    _randomise_up(pipe.text_encoder, 2)
    out = tmp_path_factory.mktemp("diffusers_lora")
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture
def member_args(shipped):
    return ["--members", str(shipped.path / "members" / DOMAIN), "--nonmembers", str(shipped.path / "nonmembers" / DOMAIN),
            "--attacks", "loss", "--no-memorization"]


def _audit(flag: str, path: Path, member_args: list[str], out: Path, *extra: str):
    """``s2l audit --<flag> path`` on the shipped testbed; the saved result, with an AUC for base and target checked."""
    assert main(["audit", f"--{flag}", str(path), *member_args, *extra, "--out", str(out)]) == 0
    result = load_result(out)
    base, target = result.audits
    for audit in (base, target):
        auc = audit.membership.attack("loss").auc
        assert isinstance(auc, float) and 0.0 <= auc <= 1.0
    return result


def _scan(path: Path, capsys, *extra: str) -> list[dict]:
    capsys.readouterr()
    assert main(["scan", "--json", *extra, str(path)]) == 0
    return json.loads(capsys.readouterr().out)


def _denoise(pipe, prompt: str = "a photo of the digit seven") -> torch.Tensor:
    tok = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    latents = torch.randn(1, pipe.unet.config.in_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = pipe.text_encoder(tok.input_ids)[0]
        return pipe.unet(latents, torch.tensor([300]), encoder_hidden_states=text).sample


def _matches_diffusers(shipped, path: Path) -> None:
    """Our loader applies ``path`` exactly as diffusers' own ``load_lora_weights`` does (same denoiser output)."""
    from s2l_plugin.formats.loaders import load_target

    ours, _ = load_target(path, _fresh_pipe(shipped))
    theirs = _fresh_pipe(shipped)
    theirs.load_lora_weights(str(path))
    base = _denoise(_fresh_pipe(shipped))
    assert (_denoise(theirs) - base).abs().max() > 1e-4
    torch.testing.assert_close(_denoise(ours), _denoise(theirs))


# -- LoRA ------------------------------------------------------------------------------------------


def test_diffusers_save_lora_weights(shipped, diffusers_lora, member_args, tmp_path, capsys):
    result = _audit("lora", diffusers_lora, member_args, tmp_path / "r")
    assert [(p["kind"], p["variant"]) for p in result.config["loaded"]] == [("diffusers_lora", "diffusers")]
    base, target = result.audits
    assert base.membership.attack("loss").member_scores != target.membership.attack("loss").member_scores
    _matches_diffusers(shipped, diffusers_lora)  # alpha from lora_adapter_metadata, unet and text encoder
    _scan(diffusers_lora, capsys)


def test_kohya_lora_from_diffusers_converter(shipped, diffusers_lora, member_args, tmp_path, capsys):
    """Issue 17: diffusers' kohya export stores ``.alpha`` as int64; diffusers, sd-scripts and A1111 all read it."""
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya

    state = load_file(str(diffusers_lora))
    peft_state = {}
    for component in ("unet", "text_encoder"):
        peft_state.update(convert_all_state_dict_to_peft({k: v for k, v in state.items() if k.startswith(component + ".")}))
    kohya = convert_state_dict_to_kohya(peft_state)
    alphas = [v for k, v in kohya.items() if k.endswith(".alpha")]
    assert alphas and all(a.dtype == torch.int64 for a in alphas)  # what the issue is about
    assert any(k.startswith("lora_te1_") for k in kohya)
    path = tmp_path / "my_lora.safetensors"
    save_file(kohya, str(path))

    result = _audit("lora", path, member_args, tmp_path / "r")
    assert [(p["kind"], p["variant"]) for p in result.config["loaded"]] == [("kohya_lora", "kohya")]
    base, target = result.audits
    assert base.membership.attack("loss").member_scores != target.membership.attack("loss").member_scores
    _matches_diffusers(shipped, path)
    _scan(path, capsys)

    # Half-precision alphas (and factors) are read too: the same file at fp16.
    half = tmp_path / "my_lora_fp16.safetensors"
    save_file({k: (v.half() if v.is_floating_point() or k.endswith(".alpha") else v) for k, v in kohya.items()}, str(half))
    from s2l_plugin.formats.loaders import load_target

    load_target(half, _fresh_pipe(shipped))


def test_peft_save_pretrained_folders(shipped, member_args, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    pipe = _fresh_pipe(shipped)
    folder = tmp_path / "peft_lora"
    for component, config, seed in (("unet", UNET_CONFIG, 3), ("text_encoder", TE_CONFIG, 4)):
        model = get_peft_model(getattr(pipe, component), LoraConfig(**config))
        _randomise_up(model, seed)
        model.save_pretrained(str(folder / component))
    assert (folder / "unet" / "adapter_config.json").is_file() and (folder / "text_encoder" / "adapter_model.safetensors").is_file()
    # peft injected the adapters into pipe's own modules: our loader must reproduce that model (alpha 8 / r 4).
    from s2l_plugin.formats.loaders import load_target

    expected = _denoise(pipe)
    assert (expected - _denoise(_fresh_pipe(shipped))).abs().max() > 1e-4
    torch.testing.assert_close(_denoise(load_target(folder, _fresh_pipe(shipped))[0]), expected)

    result = _audit("lora", folder, member_args, tmp_path / "r")
    assert [(p["kind"], p["variant"]) for p in result.config["loaded"]] == [("peft_folders", "peft")]
    base, target = result.audits
    assert base.membership.attack("loss").member_scores != target.membership.attack("loss").member_scores
    _scan(folder, capsys)


# -- Textual Inversion -----------------------------------------------------------------------------


def _learned_rows(shipped, token: str, n: int) -> torch.Tensor:
    """textual_inversion.py's start: add the token(s), resize the embedding, initialise from a word; rows of the new ids."""
    pipe = _fresh_pipe(shipped)
    tokens = [token] + [f"{token}_{i}" for i in range(1, n)]
    assert pipe.tokenizer.add_tokens(tokens) == n
    ids = pipe.tokenizer.convert_tokens_to_ids(tokens)
    init = pipe.tokenizer.encode("seven", add_special_tokens=False)[0]
    pipe.text_encoder.resize_token_embeddings(len(pipe.tokenizer))
    weight = pipe.text_encoder.get_input_embeddings().weight
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i in ids:
            weight[i] = weight[init] + 0.1 * torch.randn(weight.shape[1], generator=gen)
    return weight[min(ids): max(ids) + 1].detach().cpu()


@pytest.mark.parametrize("n_vectors", [None, 2], ids=["1d", "multivector"])
def test_diffusers_learned_embeds(shipped, member_args, tmp_path, capsys, n_vectors):
    token = "<digit-seven>"
    rows = _learned_rows(shipped, token, n_vectors or 1)
    path = tmp_path / "learned_embeds.safetensors"
    save_file({token: rows[0] if n_vectors is None else rows}, str(path), metadata={"format": "pt"})

    result = _audit("embedding", path, member_args, tmp_path / "r")
    assert [(p["kind"], p["variant"], p["token"]) for p in result.config["loaded"]] == [("textual_inversion", "diffusers", token)]
    assert any(token in f["value"] for f in _scan(path, capsys))


def test_kohya_emb_params(shipped, member_args, tmp_path, capsys):
    path = tmp_path / "digitseven.safetensors"
    save_file({"emb_params": _learned_rows(shipped, "digitseven", 2).half()}, str(path))

    result = _audit("embedding", path, member_args, tmp_path / "r")
    assert [(p["kind"], p["variant"], p["token"]) for p in result.config["loaded"]] == [("textual_inversion", "kohya", "digitseven")]
    _scan(path, capsys)


def _refused_without_pickle(flag: str, path: Path, member_args: list[str], capsys) -> None:
    capsys.readouterr()
    assert main(["audit", f"--{flag}", str(path), *member_args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("s2l: error:") and "--allow-pickle" in err and "\n" not in err
    assert main(["scan", str(path)]) == 2
    assert "--allow-pickle" in capsys.readouterr().err


def test_a1111_embedding_pt(shipped, member_args, tmp_path, capsys):
    vec = _learned_rows(shipped, "janes-face", 2).clone().requires_grad_(True)  # A1111 saves its training tensor
    path = tmp_path / "janes-face.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "janes-face", "step": 1500,
                "sd_checkpoint": "e1441589a6", "sd_checkpoint_name": "v1-5-pruned-emaonly"}, path)

    _refused_without_pickle("embedding", path, member_args, capsys)
    result = _audit("embedding", path, member_args, tmp_path / "r", "--allow-pickle")
    assert [(p["kind"], p["variant"], p["token"]) for p in result.config["loaded"]] == [("textual_inversion", "a1111", "janes-face")]
    assert any("janes-face" in f["value"] for f in _scan(path, capsys, "--allow-pickle"))


class _A1111HypernetworkModule(torch.nn.Module):
    """A1111's ``HypernetworkModule`` for ``layer_structure`` [1, 2, 1], ``activation_func`` relu, no
    layer norm or dropout: ``self.linear`` = Sequential(Linear, ReLU, Linear) -> keys linear.0 / linear.2."""

    def __init__(self, dim: int, gen: torch.Generator):
        super().__init__()
        self.linear = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.ReLU(), torch.nn.Linear(2 * dim, dim))
        with torch.no_grad():  # weight_initialization "Normal": std 0.01, bias 0 -- larger here so the target differs
            for layer in (self.linear[0], self.linear[2]):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen) * 0.1)
                layer.bias.zero_()


def test_a1111_hypernetwork_pt(shipped, member_args, tmp_path, capsys):
    unet = _fresh_pipe(shipped).unet
    from diffusers.models.attention_processor import Attention

    widths = sorted({m.to_k.in_features for m in unet.modules() if isinstance(m, Attention)})
    gen = torch.Generator().manual_seed(6)
    data = {w: (_A1111HypernetworkModule(w, gen).state_dict(), _A1111HypernetworkModule(w, gen).state_dict()) for w in widths}
    data.update({"step": 4000, "name": "janes_style", "layer_structure": [1, 2, 1], "activation_func": "relu",
                 "is_layer_norm": False, "weight_initialization": "Normal", "sd_checkpoint": "e1441589a6",
                 "sd_checkpoint_name": "v1-5-pruned-emaonly", "activate_output": False, "use_dropout": False,
                 "dropout_structure": [0, 0, 0], "last_layer_dropout": False, "optional_info": None})
    path = tmp_path / "janes_style.pt"
    torch.save(data, path)

    _refused_without_pickle("hypernetwork", path, member_args, capsys)
    result = _audit("hypernetwork", path, member_args, tmp_path / "r", "--allow-pickle")
    assert [(p["kind"], p["variant"]) for p in result.config["loaded"]] == [("hypernetwork", "a1111")]
    base, target = result.audits
    assert base.membership.attack("loss").member_scores != target.membership.attack("loss").member_scores
    assert any("janes_style" in f["value"] for f in _scan(path, capsys, "--allow-pickle"))


# -- full models -----------------------------------------------------------------------------------


def test_single_file_checkpoint(shipped, member_args, tmp_path, capsys):
    ldm = _load_tests_module("test_formats")
    tuned = _fresh_pipe(shipped)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a "fine-tuned" model: the shipped one with its UNet nudged
        for p in tuned.unet.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 1e-3)
    n_blocks = len(tuned.unet.config.block_out_channels)
    lpb = tuned.unet.config.layers_per_block
    state = {**ldm.unet_to_ldm(tuned.unet.state_dict(), n_blocks, lpb), **ldm.vae_to_ldm(tuned.vae.state_dict(), len(tuned.vae.config.block_out_channels)),
             **ldm.clip_to_ldm(tuned.text_encoder.state_dict())}
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    result = _audit("model", path, member_args, tmp_path / "r")
    assert [p["kind"] for p in result.config["loaded"]] == ["single_file_checkpoint"]
    base, target = result.audits
    assert base.membership.attack("loss").member_scores != target.membership.attack("loss").member_scores
    _scan(path, capsys)
