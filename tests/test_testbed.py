"""The embedded testbed: architecture, tokenizer, seeded split, on-disk layout, loading, CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from s2l_plugin.errors import ConfigError, InputError
from s2l_plugin.testbed import Testbed, build_testbed, make_manifest, preset_config
from s2l_plugin.testbed.corpus import DIGIT_NAMES, class_sizes

# -- the random-init tiny pipeline ---------------------------------------------------------------


def test_tiny_pipeline_has_the_testbed_architecture_and_makes_16px_images(tiny_pipeline):
    import torch

    pipe = tiny_pipeline
    assert tuple(pipe.unet.config.block_out_channels) == (32, 64)
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 32
    assert tuple(pipe.vae.config.block_out_channels) == (16, 32)
    assert pipe.vae.config.latent_channels == 4
    assert pipe.text_encoder.config.num_hidden_layers == 2
    assert pipe.scheduler.config.clip_sample is False
    assert pipe.scheduler.config.beta_schedule == "scaled_linear"
    out = pipe("a photo of the digit seven", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.images.shape == (1, 16, 16, 3)


def test_tiny_pipeline_same_seed_same_weights_other_seed_differs():
    import torch

    from s2l_plugin.testbed import build_tiny_pipeline

    a, b, c = build_tiny_pipeline(0), build_tiny_pipeline(0), build_tiny_pipeline(1)
    pa, pb, pc = (dict(p.unet.named_parameters()) for p in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)


def test_tokenizer_is_character_level_and_every_caption_fits(tiny_pipeline):
    tok = tiny_pipeline.tokenizer
    ids = tok("seven").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "s", "e", "v", "e", "n</w>", "<|endoftext|>"]
    assert len(tok.get_vocab()) == tiny_pipeline.text_encoder.config.vocab_size == 514
    manifest = make_manifest("demo", preset_config("demo"), 0)
    for domain in manifest["domains"]:
        for caption in domain["captions"]:
            assert len(tok(caption).input_ids) <= tok.model_max_length, caption


# -- the seeded split ------------------------------------------------------------------------------


def test_same_seed_same_manifest_other_seed_other_split():
    config = preset_config("demo")
    a, b = make_manifest("demo", config, 0), make_manifest("demo", config, 0)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = make_manifest("demo", config, 1)
    assert [s["path"] for s in a["samples"]] != [s["path"] for s in c["samples"]]


def test_demo_split_has_disjoint_members_nonmembers_and_duplicates_of_the_right_class():
    from s2l_plugin.testbed.corpus import _digits

    config = preset_config("demo")
    samples = make_manifest("demo", config, 0)["samples"]
    _, target = _digits()
    assert len({s["source_index"] for s in samples}) == len(samples)  # no image in two roles
    for digit, name in enumerate(DIGIT_NAMES):
        here = [s for s in samples if s["domain"] == name]
        roles = Counter(s["role"] for s in here)
        assert roles == {"member": config.members - config.duplicated, "duplicated": config.duplicated, "nonmember": config.nonmembers}
        assert all(target[s["source_index"]] == digit for s in here)
        assert {s["copies"] for s in here if s["role"] == "duplicated"} == {config.copies}
        assert {s["copies"] for s in here if s["role"] == "nonmember"} == {0}
        assert all(s["path"].startswith("members/" if s["role"] != "nonmember" else "nonmembers/") for s in here)


def test_bad_knobs_are_refused_with_the_value_named():
    with pytest.raises(ConfigError, match="bogus"):
        preset_config("demo", bogus=1)
    with pytest.raises(ConfigError, match="caption_dropout=1.5"):
        preset_config("demo", caption_dropout=1.5)
    with pytest.raises(ConfigError, match="duplicated=9"):
        preset_config("test", duplicated=9)
    with pytest.raises(ConfigError, match="preset='huge'"):
        preset_config("huge")
    too_many = min(class_sizes().values()) + 1
    with pytest.raises(ConfigError, match="smallest"):
        make_manifest("demo", preset_config("demo", members=too_many, nonmembers=1), 0)


def test_duplicated_digits_puts_duplicates_in_those_domains_only_at_an_equal_corpus_size():
    base = preset_config("demo", members=30, nonmembers=5, duplicated=2, copies=10)
    config = base.with_knobs(duplicated_digits=(1, 8))
    samples = make_manifest("demo", config, 0)["samples"]
    plain = make_manifest("demo", base, 0)["samples"]
    for digit, name in enumerate(DIGIT_NAMES):
        here = [s for s in samples if s["domain"] == name]
        roles = Counter(s["role"] for s in here)
        corpus = sum(s["copies"] for s in here)
        assert corpus == config.members  # every domain's prompt is trained on equally often
        if digit in (1, 8):
            assert roles == {"member": 30 - 2 * 10, "duplicated": 2, "nonmember": 5}
        else:
            assert roles == {"member": 30, "nonmember": 5}
        # The same draws as without the knob: the digit keeps its images, captions and duplicates.
        before = {s["source_index"]: s for s in plain if s["domain"] == name}
        assert all(before[s["source_index"]]["caption"] == s["caption"] for s in here)
        assert {s["source_index"] for s in here if s["role"] == "duplicated"} == (
            {i for i, s in before.items() if s["role"] == "duplicated"} if digit in (1, 8) else set()
        )
    # Recorded in the manifest only when set: the default recipe's manifest is unchanged.
    assert make_manifest("demo", config, 0)["recipe"]["duplicated_digits"] == [1, 8]
    assert "duplicated_digits" not in make_manifest("demo", base, 0)["recipe"]
    # A domain without duplicates in this mode: all members once; () = none has any.
    assert {s["role"] for s in make_manifest("demo", base.with_knobs(duplicated_digits=()), 0)["samples"]} == {"member", "nonmember"}


def test_duplicated_caption_prompt_captions_only_the_duplicated_members_with_their_domain_prompt():
    base = preset_config("demo", members=30, nonmembers=5, duplicated=2, copies=10, duplicated_digits=(1, 8))
    seeded = make_manifest("demo", base, 0)
    prompted = make_manifest("demo", base.with_knobs(duplicated_caption="prompt"), 0)
    prompts = {d["name"]: d["prompt"] for d in seeded["domains"]}
    assert [(s["path"], s["role"], s["copies"]) for s in prompted["samples"]] == [
        (s["path"], s["role"], s["copies"]) for s in seeded["samples"]
    ]
    changed = 0
    for before, after in zip(seeded["samples"], prompted["samples"], strict=True):
        if after["role"] == "duplicated":
            assert after["caption"] == prompts[after["domain"]]
            changed += before["caption"] != after["caption"]
        else:
            assert after["caption"] == before["caption"]
    assert changed > 0  # with seed 0, some duplicated members had drawn another template
    assert prompted["recipe"]["duplicated_caption"] == "prompt"
    assert "duplicated_caption" not in seeded["recipe"]
    with pytest.raises(ConfigError, match=r"duplicated_caption='domain' is not valid; expected one of: seeded, prompt"):
        base.with_knobs(duplicated_caption="domain")


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"duplicated_digits": (10,)}, r"duplicated_digits=\[10\] is not valid; expected distinct digits among"),
        ({"duplicated_digits": 3}, r"duplicated_digits=3 is not valid; expected a tuple of digits or None"),
        ({"digits": (1, 2), "duplicated_digits": (3,)}, r"duplicated_digits=\[3\] is not valid"),
        ({"duplicated_digits": (2, 2)}, r"duplicated_digits=\[2, 2\] is not valid"),
        ({"duplicated_digits": (2,), "duplicated": 0}, r"duplicated_digits=\[2\] is not valid with duplicated=0"),
        ({"duplicated_digits": (2,), "members": 30}, r"duplicated_digits=\[2\] is not valid with duplicated \* copies = 100 > members=30"),
    ],
)
def test_bad_duplicated_digits_are_refused_with_the_value_named(knobs, message):
    with pytest.raises(ConfigError, match=message):
        preset_config("demo", **knobs)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ((32,), r"unet_channels=\[32\] is not valid; expected two block widths"),
        ((32, 48), r"unet_channels=\[32, 48\] is not valid; expected two block widths, each a positive multiple of 32"),
        ("wide", r"unet_channels='wide' is not valid"),
    ],
)
def test_bad_unet_channels_are_refused_with_the_value_named(value, message):
    with pytest.raises(ConfigError, match=message):
        preset_config("test", unet_channels=value)


def test_unet_channels_set_the_unet_widths_and_are_recorded_only_when_not_the_default():
    from s2l_plugin.testbed.components import make_unet

    assert "unet_channels" not in preset_config("demo").to_dict()  # the shipped demo's manifest stays as it was
    wide = preset_config("test", unet_channels=(64, 128))
    assert wide.to_dict()["unet_channels"] == [64, 128]
    unet = make_unet(wide.unet_channels)
    assert tuple(unet.config.block_out_channels) == (64, 128)
    assert sum(p.numel() for p in unet.parameters()) > 3 * sum(p.numel() for p in make_unet().parameters())


# -- a built testbed (the cached `test` preset) -----------------------------------------------------


def test_built_testbed_layout_matches_its_manifest_and_the_recipe(test_testbed):
    tb = test_testbed
    config = preset_config("test")
    assert tb.manifest == make_manifest("test", config, tb.seed)
    for folder in ("members", "nonmembers"):
        for domain in tb.domains:
            rows = [json.loads(line) for line in (tb.path / folder / domain.name / "metadata.jsonl").read_text().splitlines()]
            samples = tb.members(domain) if folder == "members" else tb.nonmembers(domain)
            assert {r["file_name"]: r["text"] for r in rows} == {s.path.name: s.caption for s in samples}
            assert all(s.path.is_file() for s in samples)


def test_testbed_ground_truth_accessors(test_testbed):
    tb = test_testbed
    config = preset_config("test")
    seven = tb.domain("seven")
    assert (seven.digit, seven.prompt) == (7, "a photo of the digit seven")
    assert tb.domain(7) == seven
    assert len(tb.members("seven")) == config.members
    assert len(tb.nonmembers(7)) == config.nonmembers
    dups = tb.duplicates(seven)
    assert len(dups) == config.duplicated and all(s.role == "duplicated" and s.copies == config.copies for s in dups)
    assert set(dups) <= set(tb.members(seven))
    assert len(tb.members()) == config.members * len(tb.domains)
    with pytest.raises(ConfigError, match="domain='eleven'"):
        tb.members("eleven")


def test_pipeline_folder_loads_with_plain_diffusers_and_generates(test_testbed):
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline.from_pretrained(test_testbed.pipeline_dir, safety_checker=None, local_files_only=True)
    assert pipe.scheduler.config.clip_sample is False
    # What a diffusers example training script does with --pretrained_model_name_or_path.
    DDPMScheduler.from_pretrained(test_testbed.pipeline_dir, subfolder="scheduler")
    tok = CLIPTokenizer.from_pretrained(test_testbed.pipeline_dir, subfolder="tokenizer")
    assert tok("seven").input_ids == pipe.tokenizer("seven").input_ids
    assert (test_testbed.pipeline_dir / "tokenizer" / "vocab.json").is_file()
    img = pipe("a photo of the digit seven", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 16, 16, 3)


def test_load_pipeline_reads_local_folders_and_refuses_bad_ones(test_testbed, tmp_path):
    from s2l_plugin.pipeline import load_pipeline, pipeline_hash

    pipe = load_pipeline(test_testbed.pipeline_dir)
    assert pipe.safety_checker is None
    with pytest.raises(InputError, match="does not exist"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(InputError, match="model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(InputError, match="no hub downloads"):
        load_pipeline("CompVis/stable-diffusion-v1-4")  # a hub id is never fetched
    assert pipeline_hash(test_testbed.pipeline_dir) == test_testbed.build_info["pipeline_hash"]


def test_two_builds_with_the_same_seed_give_the_same_manifest_and_weights(tmp_path):
    knobs = dict(digits=(3, 7), members=4, nonmembers=2, duplicated=1, copies=3, vae_steps=3, steps=3, batch_size=4, vae_batch_size=4)
    a = build_testbed("test", out=tmp_path / "a", seed=5, progress=False, **knobs)
    b = build_testbed("test", out=tmp_path / "b", seed=5, progress=False, **knobs)
    assert a.manifest == b.manifest
    assert a.build_info["pipeline_hash"] == b.build_info["pipeline_hash"]
    with pytest.raises(InputError, match="exists and is not empty"):
        build_testbed("test", out=tmp_path / "a", seed=5, progress=False, **knobs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no partial folders left behind


def test_a_concurrent_build_that_finishes_first_is_kept_not_clobbered(tmp_path, monkeypatch):
    import shutil

    from s2l_plugin.testbed import recipe

    knobs = dict(digits=(3,), members=3, nonmembers=1, duplicated=0, vae_steps=1, steps=1, batch_size=2, vae_batch_size=2)
    first = build_testbed("test", out=tmp_path / "first", seed=1, progress=False, **knobs)
    write_images = recipe.write_images

    def other_process_finishes_meanwhile(root, manifest):
        write_images(root, manifest)
        shutil.copytree(first.path, tmp_path / "shared")
        (tmp_path / "shared" / "theirs.txt").write_text("a reader may be using this folder")

    monkeypatch.setattr(recipe, "write_images", other_process_finishes_meanwhile)
    got = build_testbed("test", out=tmp_path / "shared", seed=1, progress=False, **knobs)
    assert got.build_info["pipeline_hash"] == first.build_info["pipeline_hash"]
    assert (tmp_path / "shared" / "theirs.txt").is_file()  # their folder was kept, not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "shared"]


def test_load_refuses_a_folder_without_manifest(tmp_path):
    with pytest.raises(InputError, match="no manifest.json"):
        Testbed.load(tmp_path)


# -- CLI --------------------------------------------------------------------------------------------


def test_cli_info_prints_the_testbed_as_json(test_testbed, capsys):
    from s2l_plugin.cli import main

    assert main(["testbed", "info", str(test_testbed.path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["preset"] == "test"
    assert Path(data["pipeline"]) == test_testbed.pipeline_dir
    assert [d["name"] for d in data["domains"]] == list(DIGIT_NAMES)


def test_cli_build_refuses_an_unknown_knob_in_one_line(tmp_path, capsys):
    from s2l_plugin.cli import main

    assert main(["testbed", "build", "--preset", "test", "--out", str(tmp_path / "x"), "--set", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s2l: error: unknown testbed knob 'bogus'") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_cli_build_takes_a_text_knob_and_refuses_a_bad_one_in_one_line(tmp_path, capsys):
    from s2l_plugin.cli import main
    from s2l_plugin.commands.testbed import _parse_knobs

    assert _parse_knobs([("duplicated_caption", "prompt"), ("duplicated_digits", "0,2")]) == {
        "duplicated_caption": "prompt", "duplicated_digits": (0, 2)}
    assert main(["testbed", "build", "--preset", "test", "--out", str(tmp_path / "x"), "--set", "duplicated_caption=alt"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s2l: error: duplicated_caption='alt' is not valid; expected one of: seeded, prompt") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


# -- the shipped demo testbed (package data) ---------------------------------------------------------


def test_shipped_demo_testbed_is_what_the_demo_recipe_produces():
    from s2l_plugin.pipeline import pipeline_hash, resolve_model_dir

    tb = Testbed.load()
    assert tb.preset == "demo"
    # The recipe is the source of truth: the shipped split must be the one the demo preset makes.
    assert tb.manifest == make_manifest("demo", preset_config("demo"), tb.seed)
    assert all(s.path.is_file() for s in tb.samples())
    assert pipeline_hash(tb.pipeline_dir) == tb.build_info["pipeline_hash"]
    assert resolve_model_dir(None) == resolve_model_dir("testbed") == tb.pipeline_dir
