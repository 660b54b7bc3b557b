"""A folder holding a LoRA *and* Textual Inversion embeddings (pivotal tuning, TI+LoRA) loads all of it.

The artifact is the one the ``textual_inversion+lora`` adapter publishes (3 training steps on the
`test` testbed): ``pytorch_lora_weights.safetensors`` + ``learned_embeds.safetensors`` (+ the kohya
LoRA export and the A1111/kohya embedding exports in sub-folders). Loading it through the path
``s2l audit`` uses (``detect`` → ``load_target``) must give the pipeline the adapter's own ``load``
gives: the new token known, its vectors in place, and the LoRA applied. Community releases (a kohya
LoRA .safetensors plus an embedding file under any name) load the same way.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from s2l_plugin.errors import FormatError
from s2l_plugin.formats import detect as fmt
from s2l_plugin.formats.loaders import load_target

TOKEN = "<s2l>"
PROMPT = f"a photo of {TOKEN}"
ATOL = 1e-5  # float32 CPU: same weights applied two ways


@pytest.fixture(scope="module")
def base(test_testbed):
    return test_testbed.load_pipeline()


@pytest.fixture(scope="module")
def pivotal(test_testbed, base, tmp_path_factory):
    """The folder the textual_inversion+lora adapter publishes, and its Artifact."""
    from s2l_plugin.adapters.base import TrainConfig
    from s2l_plugin.hooks.manager import get, make_plugin_manager

    tb = test_testbed
    domain = tb.domains[0]
    config = TrainConfig(prompt=domain.prompt, max_train_steps=3, train_batch_size=4, learning_rate=1e-2, seed=0,
                         options={"placeholder_token": TOKEN, "initializer_token": str(domain.digit), "num_vectors": 2})
    adapter = get("adapters", "textual_inversion+lora", make_plugin_manager(load_entry_points=False))
    out = tmp_path_factory.mktemp("pivotal") / "artifact"
    artifact = adapter.train(copy.deepcopy(base), tb.members(domain)[0].path.parent, config, out)
    return artifact


def _denoise(pipe, prompt: str = PROMPT) -> torch.Tensor:
    """UNet noise prediction for fixed latents and timesteps, conditioned on ``prompt`` as the pipeline encodes it
    (``encode_prompt`` expands a multi-vector token, as generation does)."""
    g = torch.Generator().manual_seed(7)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        embeds = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
        return pipe.unet(latents, torch.tensor([50, 600]), embeds.repeat(2, 1, 1)).sample


@pytest.fixture(scope="module")
def reference(pivotal, base):
    """The pipeline the adapter's own load gives (known correct) and its denoiser output on PROMPT."""
    from s2l_plugin.hooks.manager import get, make_plugin_manager

    adapter = get("adapters", "textual_inversion+lora", make_plugin_manager(load_entry_points=False))
    pipe = adapter.load(copy.deepcopy(base), pivotal)
    return _denoise(pipe)


def _token_rows(pipe, token: str = TOKEN) -> torch.Tensor:
    ids = pipe.tokenizer.convert_tokens_to_ids([token, f"{token}_1"])
    return pipe.text_encoder.get_input_embeddings().weight.detach()[ids]


def test_detect_lists_the_lora_and_the_embedding_of_a_pivotal_folder(pivotal):
    found = fmt.detect(pivotal.path)

    assert found.kind == fmt.DIFFUSERS_LORA  # `s2l audit --lora DIR` accepts it
    loaded = fmt.loaded_parts(found)
    assert [(p["file"], p["kind"]) for p in loaded] == [
        ("pytorch_lora_weights.safetensors", fmt.DIFFUSERS_LORA),
        ("learned_embeds.safetensors", fmt.TEXTUAL_INVERSION),
    ]
    assert loaded[1]["token"] == TOKEN
    # The kohya export holds the same LoRA; the known diffusers file takes precedence and the report says so.
    assert any(entry.startswith("lora_kohya.safetensors") for entry in found.extra["ignored"])


def test_load_target_on_a_pivotal_folder_gives_the_adapters_pipeline(pivotal, base, reference):
    target, found = load_target(pivotal.path, base)

    assert TOKEN in target.tokenizer.get_vocab() and f"{TOKEN}_1" in target.tokenizer.get_vocab()
    want = load_file(str(Path(pivotal.path) / "learned_embeds.safetensors"))[TOKEN]
    torch.testing.assert_close(_token_rows(target), want, rtol=0, atol=0)
    torch.testing.assert_close(_denoise(target), reference, rtol=0, atol=ATOL)
    assert TOKEN not in base.tokenizer.get_vocab()  # the base is never modified


def test_a_community_release_kohya_lora_plus_kohya_embedding_loads_both(pivotal, base, reference, tmp_path):
    # A shared release: one kohya LoRA file and one kohya-layout embedding, under the release's own names
    # (kohya and A1111 name the trigger word after the embedding file's stem).
    folder = tmp_path / "release"
    folder.mkdir()
    shutil.copy(Path(pivotal.path) / "lora_kohya.safetensors", folder / "mychar_lora.safetensors")
    shutil.copy(Path(pivotal.path) / "kohya" / "s2l.safetensors", folder / "mychar.safetensors")
    (folder / "README.md").write_text("trigger word: mychar\n")

    found = fmt.detect(folder)
    assert [(p["file"], p["kind"], p["token"]) for p in fmt.loaded_parts(found)] == [
        ("mychar_lora.safetensors", fmt.KOHYA_LORA, None),
        ("mychar.safetensors", fmt.TEXTUAL_INVERSION, "mychar"),
    ]
    target, _ = load_target(folder, base)
    # Same vectors under the file's trigger word, same LoRA in kohya layout: the adapter's denoiser output.
    torch.testing.assert_close(_denoise(target, "a photo of mychar"), reference, rtol=0, atol=ATOL)


def test_a_pickled_a1111_embedding_beside_a_lora_needs_allow_pickle(pivotal, base, reference, tmp_path):
    folder = tmp_path / "release"
    folder.mkdir()
    shutil.copy(Path(pivotal.path) / "pytorch_lora_weights.safetensors", folder / "lora.safetensors")
    shutil.copy(Path(pivotal.path) / "a1111" / "s2l.pt", folder / "s2l.pt")

    with pytest.raises(FormatError, match=r"s2l\.pt.*--allow-pickle"):
        fmt.detect(folder)  # never silently dropped
    target, found = load_target(folder, base, allow_pickle=True)
    assert [(p["file"], p["token"]) for p in fmt.loaded_parts(found)] == [("lora.safetensors", None), ("s2l.pt", TOKEN)]
    torch.testing.assert_close(_denoise(target), reference, rtol=0, atol=ATOL)


def test_two_different_lora_files_are_one_line_error_naming_both(pivotal, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    shutil.copy(Path(pivotal.path) / "lora_kohya.safetensors", folder / "a.safetensors")
    sd = load_file(str(Path(pivotal.path) / "lora_kohya.safetensors"))
    save_file({k: v * 2 for k, v in sd.items()}, str(folder / "b.safetensors"))

    with pytest.raises(FormatError) as err:
        fmt.detect(folder)
    msg = str(err.value)
    assert "\n" not in msg and "'a.safetensors'" in msg and "'b.safetensors'" in msg and "expected one LoRA" in msg


def test_a_hypernetwork_beside_a_lora_is_an_error_naming_it(pivotal, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    shutil.copy(Path(pivotal.path) / "lora_kohya.safetensors", folder / "lora.safetensors")
    save_file({"32.k.linear.0.weight": torch.zeros(4, 32), "32.v.linear.0.weight": torch.zeros(4, 32)},
              str(folder / "hn.safetensors"))

    with pytest.raises(FormatError, match=r"'hn\.safetensors' \(hypernetwork\).*expected only LoRA and Textual Inversion"):
        fmt.detect(folder)


def test_two_embeddings_with_the_same_token_are_an_error(pivotal, tmp_path):
    folder = tmp_path / "clash"
    folder.mkdir()
    shutil.copy(Path(pivotal.path) / "learned_embeds.safetensors", folder / "learned_embeds.safetensors")
    emb = load_file(str(Path(pivotal.path) / "learned_embeds.safetensors"))
    save_file({TOKEN: emb[TOKEN] * 2}, str(folder / "other.safetensors"))

    with pytest.raises(FormatError, match=r"token '<s2l>'.*learned_embeds\.safetensors.*other\.safetensors"):
        fmt.detect(folder)


def test_two_embeddings_without_a_lora_load_both(pivotal, base, tmp_path):
    folder = tmp_path / "two_embeddings"
    folder.mkdir()
    shutil.copy(Path(pivotal.path) / "learned_embeds.safetensors", folder / "learned_embeds.safetensors")
    shutil.copy(Path(pivotal.path) / "kohya" / "s2l.safetensors", folder / "second.safetensors")

    target, found = load_target(folder, base)

    assert found.kind == fmt.TEXTUAL_INVERSION
    assert [p["token"] for p in fmt.loaded_parts(found)] == [TOKEN, "second"]
    torch.testing.assert_close(_token_rows(target, "second"), _token_rows(target, TOKEN), rtol=0, atol=0)


def test_peft_adapter_folders_with_an_embedding_beside_them_load_both(pivotal, base, tmp_path):
    # Pivotal tuning saved the peft way: <folder>/unet/adapter_config.json + adapter_model.safetensors,
    # the embedding at the top, and a trainer's pickled leftovers, which stay unread (and are named).
    from peft import LoraConfig, get_peft_model
    from s2l_plugin.adapters.base import Artifact
    from s2l_plugin.adapters.textual_inversion import TextualInversionAdapter

    unet = get_peft_model(copy.deepcopy(base.unet), LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v"],
                                                                init_lora_weights="gaussian"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    folder = tmp_path / "peft_pivotal"
    unet.save_pretrained(str(folder / "unet"))
    peft_only = tmp_path / "peft_only"
    shutil.copytree(folder, peft_only)
    shutil.copy(Path(pivotal.path) / "learned_embeds.safetensors", folder / "learned_embeds.safetensors")
    torch.save({"lr": torch.tensor(1e-4)}, folder / "training_args.bin")

    target, found = load_target(folder, base)

    assert found.kind == fmt.PEFT_FOLDERS
    assert [(p["kind"], p["token"]) for p in fmt.loaded_parts(found)] == [(fmt.PEFT_FOLDERS, None), (fmt.TEXTUAL_INVERSION, TOKEN)]
    assert any(entry.startswith("training_args.bin (not read") for entry in found.extra["ignored"])
    expected, _ = load_target(peft_only, base)
    TextualInversionAdapter().load(expected, Artifact(method="textual_inversion", path=folder / "learned_embeds.safetensors"))
    want = load_file(str(folder / "learned_embeds.safetensors"))[TOKEN]
    torch.testing.assert_close(_token_rows(target), want, rtol=0, atol=0)
    torch.testing.assert_close(_denoise(target), _denoise(expected), rtol=0, atol=ATOL)


def test_a_kohya_lora_with_bundled_embeddings_is_refused_not_half_loaded(pivotal, tmp_path):
    # A1111 >= 1.7 reads TI vectors bundled into a LoRA file ("bundle_emb.<name>.*" keys); these loaders
    # do not, and must say so instead of loading the LoRA without the embedding.
    sd = load_file(str(Path(pivotal.path) / "lora_kohya.safetensors"))
    emb = load_file(str(Path(pivotal.path) / "learned_embeds.safetensors"))[TOKEN]
    file = tmp_path / "bundled.safetensors"
    save_file({**sd, "bundle_emb.s2l.string_to_param.*": emb.contiguous()}, str(file))

    with pytest.raises(FormatError, match="bundle_emb"):
        fmt.detect(file)


def test_an_advanced_script_clip_l_embedding_beside_a_lora_is_refused_not_dropped(pivotal, base, tmp_path):
    # diffusers' advanced pivotal-tuning scripts save {"clip_l": vectors} without the token names.
    folder = tmp_path / "advanced"
    folder.mkdir()
    shutil.copy(Path(pivotal.path) / "pytorch_lora_weights.safetensors", folder / "pytorch_lora_weights.safetensors")
    emb = load_file(str(Path(pivotal.path) / "learned_embeds.safetensors"))[TOKEN]
    save_file({"clip_l": emb.contiguous()}, str(folder / "advanced_emb.safetensors"))

    assert [p["file"] for p in fmt.loaded_parts(fmt.detect(folder))] == ["pytorch_lora_weights.safetensors",
                                                                         "advanced_emb.safetensors"]
    with pytest.raises(FormatError, match="'clip_l'.*stores no token names"):
        load_target(folder, base)


def test_scan_of_a_pivotal_folder_reports_the_embedding_token(pivotal):
    from s2l_plugin.audit.metadata import scan_file

    findings = scan_file(pivotal.path)

    tokens = [f for f in findings if "Textual Inversion token" in f.message]
    assert tokens and TOKEN in tokens[0].message and tokens[0].key.startswith("learned_embeds.safetensors")


def test_s2l_audit_cli_on_a_pivotal_folder_reports_both_files(test_testbed, pivotal, tmp_path):
    from s2l_plugin.cli import main
    from s2l_plugin.result import load_result

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n")
    out = tmp_path / "report"
    code = main(["audit", "--base", str(test_testbed.pipeline_dir), "--lora", str(pivotal.path),
                 "--prompts", str(prompts), "--no-memorization", "--out", str(out)])

    assert code == 0
    result = load_result(out)
    assert [(p["file"], p["kind"], p["token"]) for p in result.config["loaded"]] == [
        ("pytorch_lora_weights.safetensors", fmt.DIFFUSERS_LORA, None),
        ("learned_embeds.safetensors", fmt.TEXTUAL_INVERSION, TOKEN),
    ]
    assert any(TOKEN in f.message for f in result.audit("lora").findings)
    assert json.loads((out / "result.json").read_text())["config"]["loaded"] == result.config["loaded"]
