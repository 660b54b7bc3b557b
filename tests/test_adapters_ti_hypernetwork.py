"""Textual Inversion, hypernetwork and the TI combinations: train on the `test` testbed, save, reload, compare.

Every method trains 3 optimizer steps on one testbed domain's member images, then the artifact is
loaded onto a fresh base pipeline and must reproduce the trained pipeline's denoiser output on fixed
inputs (max |Δ| ≤ 1e-5, float32 CPU), while every tensor the method must not touch equals the base.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from s2l_plugin.adapters.base import Artifact, TrainConfig
from s2l_plugin.hooks.manager import collect, get

from s2l_plugin.errors import ConfigError

REPRODUCE_ATOL = 1e-5
METHODS = ("textual_inversion", "hypernetwork", "textual_inversion+lora", "textual_inversion+dreambooth")
TOKEN = "<s2l>"


def _data_dir(testbed) -> Path:
    return testbed.members(testbed.domains[0])[0].path.parent


def _config(method: str, testbed) -> TrainConfig:
    options = {"hypernetwork": {"activation_func": "relu", "is_layer_norm": True}}.get(
        method, {"placeholder_token": TOKEN, "initializer_token": str(testbed.domains[0].digit), "num_vectors": 2}
    )
    return TrainConfig(prompt=testbed.domains[0].prompt, max_train_steps=3, train_batch_size=4, learning_rate=1e-2,
                       seed=0, options=options)


def _prompt(method: str, testbed) -> str:
    return testbed.domains[0].prompt if method == "hypernetwork" else f"a photo of {TOKEN}"


def _denoiser_output(pipe, prompt: str) -> torch.Tensor:
    """The UNet's noise prediction for fixed latents and timesteps, conditioned on ``prompt`` (as the pipeline encodes it)."""
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        return pipe.unet(latents, torch.tensor([50, 600]), embeds.repeat(2, 1, 1)).sample


@pytest.fixture(scope="module")
def base(test_testbed):
    """The test testbed's pipeline, loaded once; tests use copies (``copy.deepcopy``) and never change it."""
    return test_testbed.load_pipeline()


def _fresh(base):
    return copy.deepcopy(base)


@pytest.fixture(scope="module", params=METHODS)
def trained(request, test_testbed, base, tmp_path_factory):
    method = request.param
    pipe = _fresh(base)
    out = tmp_path_factory.mktemp(method.replace("+", "_"))
    artifact = get("adapters", method).train(pipe, _data_dir(test_testbed), _config(method, test_testbed), out)
    return method, pipe, artifact


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_unchanged(base: dict, trained: dict, *, skip=lambda key: False, rename=lambda key: key, what: str) -> int:
    """Every base tensor (but ``skip``ped ones) equals the trained one at ``rename(key)``; returns how many were compared."""
    compared = 0
    names = {rename(k): k for k in trained}
    for key, value in base.items():
        if skip(key):
            continue
        assert key in names, f"{what}: {key} missing after training"
        assert torch.equal(trained[names[key]], value), f"{what}: {key} changed"
        compared += 1
    return compared


def test_hook_register_adapters_registers_the_ti_hypernetwork_and_combination_methods():
    from s2l_plugin.hooks.manager import DEFAULT_PLUGINS, plugin_table

    adapters = collect("adapters")
    for method in METHODS:
        assert adapters[method].name == method
    rows = {row["name"]: row for row in plugin_table()}
    for module in ("s2l_plugin.adapters.textual_inversion", "s2l_plugin.adapters.hypernetwork", "s2l_plugin.adapters.pivotal"):
        assert module in DEFAULT_PLUGINS
        assert rows[module]["builtin"] and "register_adapters" in rows[module]["hooks"]


def test_reloading_onto_a_fresh_base_reproduces_the_trained_denoiser_and_unload_gives_the_base_back(trained, test_testbed, base):
    method, pipe, artifact = trained
    fresh = _fresh(base)
    adapter = get("adapters", method)
    prompt = _prompt(method, test_testbed)
    plain = test_testbed.domains[0].prompt
    before = _denoiser_output(fresh, plain)

    adapter.load(fresh, Artifact.from_dict(artifact.to_dict()))

    assert (_denoiser_output(fresh, prompt) - _denoiser_output(pipe, prompt)).abs().max() <= REPRODUCE_ATOL
    adapter.unload(fresh, artifact)
    assert torch.equal(_denoiser_output(fresh, plain), before)
    assert TOKEN not in fresh.tokenizer.get_vocab()


def test_training_changed_the_model(trained, test_testbed, base):
    method, pipe, _ = trained
    if method == "hypernetwork":
        prompt = test_testbed.domains[0].prompt
        assert (_denoiser_output(pipe, prompt) - _denoiser_output(base, prompt)).abs().max() > 1e-4
        return
    # the placeholder rows moved away from the initializer's row they started from
    init_id = base.tokenizer.convert_tokens_to_ids(f"{test_testbed.domains[0].digit}</w>")
    init_row = base.text_encoder.get_input_embeddings().weight[init_id]
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    rows = pipe.text_encoder.get_input_embeddings().weight.detach()[ids]
    assert (rows - init_row).abs().max() > 1e-4


def test_only_the_intended_parameters_changed(trained, base):
    method, pipe, _ = trained
    vocab = len(base.tokenizer)

    # VAE: never trained by any of these methods
    assert _assert_unchanged(_state(base.vae), _state(pipe.vae), what="vae") == len(base.vae.state_dict())

    # text encoder: everything but the new embedding rows; the old rows were restored every step
    te_base, te_trained = _state(base.text_encoder), _state(pipe.text_encoder)
    emb_key = next(k for k in te_base if k.endswith("token_embedding.weight"))
    skip_te = (lambda k: k == emb_key) if method != "hypernetwork" else (lambda k: False)
    _assert_unchanged(te_base, te_trained, skip=skip_te, what="text_encoder")
    assert torch.equal(te_trained[emb_key][:vocab], te_base[emb_key])
    expected_rows = vocab + (0 if method == "hypernetwork" else 2)
    assert te_trained[emb_key].shape[0] == expected_rows

    # UNet: untouched except by DreamBooth; LoRA's base layers are untouched too
    unet_base, unet_trained = _state(base.unet), _state(pipe.unet)
    if method == "textual_inversion+dreambooth":
        assert any(not torch.equal(unet_trained[k], v) for k, v in unet_base.items())
    else:
        lora_free = {k: v for k, v in unet_trained.items() if ".lora_" not in k}
        compared = _assert_unchanged(unet_base, lora_free, rename=lambda k: k.replace(".base_layer", ""), what="unet")
        assert compared == len(unet_base)
        if method == "textual_inversion+lora":
            assert len(lora_free) < len(unet_trained)  # the LoRA layers are there, and only they differ


def test_the_artifact_holds_the_community_formats(trained):
    method, _, artifact = trained
    files = set(artifact.files)
    if method == "hypernetwork":
        assert {"s2l.safetensors", "s2l.pt"} <= files
        return
    assert {"learned_embeds.safetensors", "a1111/s2l.pt", "kohya/s2l.safetensors"} <= files
    if method == "textual_inversion+lora":
        assert "pytorch_lora_weights.safetensors" in files
    if method == "textual_inversion+dreambooth":
        assert "model_index.json" in files and any(f.startswith("unet/") for f in files)
    assert all((Path(artifact.path) / f).is_file() for f in files)


def test_detect_finds_the_artifact_in_its_folder(trained):
    method, _, artifact = trained

    found = get("adapters", method).detect(Path(artifact.path))

    assert found is not None and found.method == method


def test_the_exported_embeddings_load_with_the_trained_vectors(trained, base):
    method, pipe, artifact = trained
    if method == "hypernetwork":  # no embedding: it must not publish embedding exports either
        assert not (Path(artifact.path) / "a1111").exists() and not (Path(artifact.path) / "kohya").exists()
        return
    ids = pipe.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"])
    want = pipe.text_encoder.get_input_embeddings().weight.detach()[ids]
    fresh = _fresh(base)
    for rel, token in (("a1111/s2l.pt", "<a>"), ("kohya/s2l.safetensors", "<k>")):
        fresh.load_textual_inversion(str(Path(artifact.path) / rel), token=token)
        got = fresh.text_encoder.get_input_embeddings().weight.detach()[fresh.tokenizer.convert_tokens_to_ids([token, f"{token}_1"])]
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# -- option errors (no training) --------------------------------------------------------------------


def test_a_multi_token_initializer_is_one_clear_error(tiny_pipeline, tmp_path):
    from s2l_plugin.adapters.textual_inversion import add_placeholder_tokens

    with pytest.raises(ConfigError, match=r"initializer_token='seven' is 5 tokens .* expected exactly one token .*character-level"):
        add_placeholder_tokens(tiny_pipeline, TOKEN, 1, "seven")
    assert TOKEN not in tiny_pipeline.tokenizer.get_vocab()


def test_a_placeholder_already_in_the_vocabulary_is_refused(tiny_pipeline):
    from s2l_plugin.adapters.textual_inversion import add_placeholder_tokens

    with pytest.raises(ConfigError, match=r"token 'a</w>' is already in the tokenizer"):
        add_placeholder_tokens(tiny_pipeline, "a</w>", 1, "7")


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("textual_inversion", {"num_vectors": 0}, "num_vectors=0"),
        ("textual_inversion", {"learnable_property": "face"}, "learnable_property='face'"),
        ("textual_inversion", {"rank": 4}, "unknown option.*'rank'"),
        ("hypernetwork", {"layer_structure": [1, 2, 2]}, "starts and ends with 1"),
        ("hypernetwork", {"activation_func": "prelu"}, "activation_func='prelu'"),
        ("hypernetwork", {"sizes": "both"}, "sizes='both'"),
        ("textual_inversion+lora", {"rank": 0}, "rank=0"),
        ("textual_inversion+lora", {"templates": ["no placeholder"]}, "templates="),
        ("textual_inversion+dreambooth", {"embedding_learning_rate": -1}, "embedding_learning_rate=-1"),
    ],
)
def test_bad_options_are_refused_before_training(method, options, message):
    with pytest.raises(ConfigError, match=message):
        get("adapters", method).check_options(options)


def test_textual_inversion_script_args_target_diffusers_textual_inversion_py(tmp_path):
    args = get("adapters", "textual_inversion").script_args(
        "textual_inversion", tmp_path / "data", "ignored", tmp_path / "out",
        options={"placeholder_token": "<d7>", "initializer_token": "7", "learnable_property": "style"},
    )

    assert args == {
        "--train_data_dir": str(tmp_path / "data"), "--placeholder_token": "<d7>", "--initializer_token": "7",
        "--learnable_property": "style", "--num_vectors": "1", "--output_dir": str(tmp_path / "out"),
    }


# -- the command line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "flags", "expected"),
    [
        ("hypernetwork", ["--option", "layer_structure=[1,2,1]", "--option", "sizes=cross"], "s2l.safetensors"),
        ("textual_inversion", ["--option", "initializer_token=0", "--option", "num_vectors=2"], "learned_embeds.safetensors"),
    ],
)
def test_s2l_finetune_trains_these_methods(test_testbed, tmp_path, capsys, method, flags, expected):
    from s2l_plugin.cli import main

    out = tmp_path / "out"
    code = main(["finetune", "--method", method, "--model", str(test_testbed.pipeline_dir), "--data", str(_data_dir(test_testbed)),
                 "--out", str(out), "--steps", "1", "--batch-size", "2", "--json", *flags])

    assert code == 0
    artifact = Artifact.from_dict(__import__("json").loads(capsys.readouterr().out))
    assert artifact.method == method and (out / expected).is_file()
    assert get("adapters", method).detect(out).method == method


def test_s2l_finetune_names_a_bad_initializer_in_one_line(test_testbed, tmp_path, capsys):
    from s2l_plugin.cli import main

    code = main(["finetune", "--method", "textual_inversion", "--model", str(test_testbed.pipeline_dir),
                 "--data", str(_data_dir(test_testbed)), "--out", str(tmp_path / "out"), "--steps", "1",
                 "--option", "initializer_token=zero"])

    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("s2l: error:")]
    assert code == 2
    assert len(errors) == 1 and "initializer_token='zero' is 4 tokens" in errors[0]
    assert not (tmp_path / "out" / "learned_embeds.safetensors").exists()


# -- mixed precision and resume -----------------------------------------------------------------------


@pytest.mark.parametrize("method", ["textual_inversion", "hypernetwork"])
def test_after_bf16_training_the_pipeline_still_generates(base, test_testbed, tmp_path, method):
    pipe = _fresh(base)
    config = _config(method, test_testbed)
    config.mixed_precision, config.max_train_steps = "bf16", 1

    get("adapters", method).train(pipe, _data_dir(test_testbed), config, tmp_path / "out")

    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.vae.dtype} == {torch.float32}
    image = pipe(_prompt(method, test_testbed), num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (16, 16, 3)


def test_textual_inversion_resumed_from_a_checkpoint_equals_the_uninterrupted_run(base, test_testbed, tmp_path):
    adapter = get("adapters", "textual_inversion")
    data = _data_dir(test_testbed)
    straight = _config("textual_inversion", test_testbed)
    adapter.train(_fresh(base), data, straight, tmp_path / "straight")
    first = _config("textual_inversion", test_testbed)
    first.max_train_steps, first.checkpointing_steps = 2, 2
    adapter.train(_fresh(base), data, first, tmp_path / "resumed")
    second = _config("textual_inversion", test_testbed)
    second.checkpointing_steps = 2  # max_train_steps 3, as straight: resumes at step 2

    artifact = adapter.train(_fresh(base), data, second, tmp_path / "resumed")

    assert artifact.metadata["resumed_from"].endswith("checkpoint-2")
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "straight" / "learned_embeds.safetensors"))[TOKEN]
    b = load_file(str(tmp_path / "resumed" / "learned_embeds.safetensors"))[TOKEN]
    torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
