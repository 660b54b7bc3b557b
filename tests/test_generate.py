"""Specification of the S2L synthetic private set (s2l_plugin.generate and ``s2l generate``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from s2l_plugin.errors import ConfigError, InputError
from s2l_plugin.generate import (
    MANIFEST_NAME,
    GenerationConfig,
    QualityError,
    batch_grid,
    choose_template,
    generate_batch,
    generate_private_set,
    image_seed,
    load_generated_set,
    partition_batches,
)

# Few steps keep the file fast; the code path is the same as at 50.
STEPS = 3


@pytest.fixture(scope="module")
def model_dir(test_testbed):
    """The `test` preset testbed's pipeline folder (trained on the digits corpus)."""
    return test_testbed.pipeline_dir


@pytest.fixture(scope="module")
def pipe(model_dir):
    from s2l_plugin.pipeline import load_pipeline

    return load_pipeline(model_dir)


def cfg(**kw) -> GenerationConfig:
    base = dict(domain="digit seven", num_images=5, num_inference_steps=STEPS, batch_size=2)
    base.update(kw)
    return GenerationConfig(**base)


def pixels(paths) -> list[np.ndarray]:
    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(np.asarray(im.convert("RGB")))
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_NAME).read_text())


# -- layouts and their consumers ------------------------------------------------------------


def test_dreambooth_folder_holds_only_images_that_a_directory_iteration_opens(pipe, tmp_path):
    result = generate_private_set(pipe, cfg(layout="dreambooth"), tmp_path / "set", progress=False)
    # diffusers' DreamBoothDataset: list(Path(instance_data_root).iterdir()), Image.open each one.
    files = list(Path(result.image_dir).iterdir())
    assert len(files) == 5
    for f in files:
        with Image.open(f) as im:
            assert im.convert("RGB").size == (16, 16)
    assert result.manifest_path == tmp_path / "set" / MANIFEST_NAME
    assert result.manifest_path.parent != result.image_dir
    assert not (tmp_path / "set" / ".s2l-partial").exists()


def test_imagefolder_is_read_by_datasets_with_its_captions(pipe, tmp_path):
    datasets = pytest.importorskip("datasets")
    result = generate_private_set(pipe, cfg(layout="imagefolder"), tmp_path / "set", progress=False)
    ds = datasets.load_dataset("imagefolder", data_dir=str(result.image_dir), split="train")
    assert len(ds) == 5
    assert set(ds.column_names) == {"image", "text"}
    assert ds[0]["image"].size == (16, 16)
    by_prompt = {r.prompt for r in result.records}
    assert set(ds["text"]) == by_prompt


def test_kohya_subset_folder_pairs_every_image_with_a_caption_file(pipe, tmp_path):
    from s2l_plugin.data import list_image_folder

    result = generate_private_set(pipe, cfg(layout="kohya", kohya_repeats=7), tmp_path / "set", progress=False)
    subsets = [d for d in result.image_dir.iterdir()]
    assert [d.name for d in subsets] == ["7_digit_seven"]
    images = sorted(subsets[0].glob("*.png"))
    assert len(images) == 5
    for img in images:
        assert img.with_suffix(".txt").read_text().strip() == "photo of digit seven"
    records = list_image_folder(result.image_dir, recursive=True)
    assert [r.caption for r in records] == ["photo of digit seven"] * 5


def test_textual_inversion_folder_is_flat_images_only(pipe, tmp_path):
    result = generate_private_set(pipe, cfg(layout="textual_inversion"), tmp_path / "set", progress=False)
    entries = list(result.image_dir.iterdir())
    assert len(entries) == 5 and all(e.is_file() and e.suffix == ".png" for e in entries)


def test_manifest_records_prompt_seed_sampler_model_and_versions(pipe, tmp_path):
    config = cfg(negative_prompt="blurry", scheduler="euler", guidance_scale=3.0)
    generate_private_set(pipe, config, tmp_path / "set", progress=False)
    m = manifest(tmp_path / "set")
    assert m["complete"] is True
    assert m["negative_prompt"] == "blurry"
    assert m["sampler"]["scheduler_class"] == "EulerDiscreteScheduler"
    assert m["sampler"]["num_inference_steps"] == STEPS and m["sampler"]["guidance_scale"] == 3.0
    assert (m["sampler"]["height"], m["sampler"]["width"]) == (16, 16)
    assert len(m["model"]["sha256"]) == 64
    assert m["versions"]["diffusers"] and m["versions"]["torch"]
    assert m["quality"]["kept"] == 5
    assert [r["seed"] for r in m["records"]] == [image_seed(0, "digit seven", i) for i in range(5)]
    assert all(r["prompt"] == "photo of digit seven" for r in m["records"])


# -- seeds, templates, determinism ------------------------------------------------------------


def test_image_seeds_are_distinct_across_indices_and_domains_and_stable():
    seeds = {image_seed(0, d, i) for d in ("a", "b") for i in range(100)}
    assert len(seeds) == 200
    assert image_seed(0, "a", 3) == image_seed(0, "a", 3) != image_seed(1, "a", 3)


def test_template_choice_per_domain_draws_one_template_and_per_image_draws_each():
    per_domain = cfg(template_choice="per_domain", templates=["a {domain}", "b {domain}"], template_weights=[0.5, 0.5])
    assert len({choose_template(per_domain, i) for i in range(50)}) == 1
    per_image = cfg(template_choice="per_image", templates=["a {domain}", "b {domain}"], template_weights=[0.5, 0.5])
    assert {choose_template(per_image, i) for i in range(50)} == {"a {domain}", "b {domain}"}
    never_b = cfg(template_choice="per_image", templates=["a {domain}", "b {domain}"], template_weights=[1, 0])
    assert {choose_template(never_b, i) for i in range(50)} == {"a {domain}"}


def test_reference_templates_default_to_07_03_and_other_lists_to_uniform():
    ref = cfg(template_choice="per_image")
    share = sum(choose_template(ref, i) == "photo of {domain}" for i in range(2000)) / 2000
    assert 0.67 < share < 0.73
    three = cfg(templates=["a {domain}", "b {domain}", "c {domain}"])
    assert three.weights() == pytest.approx([1 / 3] * 3)
    assert cfg(template_weights=[0.7, 0.3]).identity() == cfg().identity()


def test_interrupted_then_resumed_run_equals_one_uninterrupted_run(pipe, tmp_path, monkeypatch):
    import s2l_plugin.generate as gen

    config = cfg(num_images=6, batch_size=4)
    whole = generate_private_set(pipe, config, tmp_path / "whole", progress=False)

    calls = {"n": 0}
    real = gen.generate_batch

    def dies_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gen, "generate_batch", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        generate_private_set(pipe, config, tmp_path / "resumed", progress=False)
    assert manifest(tmp_path / "resumed")["complete"] is False
    first = sorted((tmp_path / "resumed" / "images").iterdir())
    assert len(first) == 4
    mtimes = {p.name: p.stat().st_mtime_ns for p in first}
    monkeypatch.setattr(gen, "generate_batch", real)
    resumed = generate_private_set(pipe, config, tmp_path / "resumed", progress=False)

    assert [p.name for p in resumed.paths] == [p.name for p in whole.paths]
    for a, b in zip(pixels(whole.paths), pixels(resumed.paths), strict=True):
        np.testing.assert_array_equal(a, b)
    assert {p.name: p.stat().st_mtime_ns for p in first} == mtimes, "existing images were rewritten"
    assert manifest(tmp_path / "resumed")["records"] == manifest(tmp_path / "whole")["records"]


def test_rerun_of_a_complete_set_generates_nothing(pipe, tmp_path, monkeypatch):
    import s2l_plugin.generate as gen

    generate_private_set(pipe, cfg(), tmp_path / "set", progress=False)
    monkeypatch.setattr(gen, "generate_batch", lambda *a, **k: pytest.fail("regenerated an existing image"))
    again = generate_private_set(pipe, cfg(), tmp_path / "set", progress=False)
    assert again.count == 5


def test_batches_dealt_to_processes_reproduce_the_single_process_set(pipe, tmp_path):
    config = cfg(num_images=6, batch_size=2)
    single = generate_private_set(pipe, config, tmp_path / "single", progress=False)
    batches = batch_grid(0, 6, 2)
    shards = [partition_batches(batches, 2, rank) for rank in (0, 1)]
    assert sorted(i for s in shards for b in s for i in b) == list(range(6))
    merged = {}
    for shard in shards:  # each "process" generates only its own batches
        for b in shard:
            for cand in generate_batch(pipe, config, b, 16, 16):
                merged[cand["index"]] = cand["image"]
    for i, arr in enumerate(pixels(single.paths)):
        np.testing.assert_array_equal(merged[i], arr)


@pytest.mark.parametrize("n_batches,procs", [(1, 1), (5, 2), (7, 3), (2, 4)])
def test_partition_is_disjoint_complete_and_balanced(n_batches, procs):
    batches = batch_grid(0, n_batches * 3, 3)
    shares = [partition_batches(batches, procs, r) for r in range(procs)]
    flat = [tuple(b) for s in shares for b in s]
    assert sorted(flat) == sorted(tuple(b) for b in batches)
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_batch_grid_cuts_on_fixed_multiples_of_the_batch_size():
    assert batch_grid(0, 5, 2) == [[0, 1], [2, 3], [4]]
    assert batch_grid(3, 9, 4) == [[3], [4, 5, 6, 7], [8]]


# -- quality control -----------------------------------------------------------------------------


def _patch_images(monkeypatch, edit):
    import s2l_plugin.generate as gen

    real = gen.generate_batch

    def patched(*args, **kwargs):
        cands = real(*args, **kwargs)
        for c in cands:
            edit(c)
        return cands

    monkeypatch.setattr(gen, "generate_batch", patched)


def test_blank_images_are_dropped_replaced_and_counted(pipe, tmp_path, monkeypatch):
    def blank_index_1(c):
        if c["index"] == 1:
            c["image"] = np.zeros_like(c["image"])  # what a safety-checker black-out looks like

    _patch_images(monkeypatch, blank_index_1)
    result = generate_private_set(pipe, cfg(num_images=4), tmp_path / "set", progress=False)
    assert [r.index for r in result.records] == [0, 2, 3, 4]
    assert result.dropped["blank"] == 1
    assert not (result.image_dir / "000001.png").exists()
    assert manifest(tmp_path / "set")["quality"]["blank"] == 1


def test_near_duplicates_are_dropped_when_dedup_is_on(pipe, tmp_path, monkeypatch):
    seen = {}

    def copy_0_into_2(c):
        if c["index"] == 0:
            seen[0] = c["image"].copy()
        if c["index"] == 2:
            c["image"] = seen[0].copy()

    _patch_images(monkeypatch, copy_0_into_2)
    result = generate_private_set(pipe, cfg(num_images=4, dedup=0.01), tmp_path / "set", progress=False)
    assert [r.index for r in result.records] == [0, 1, 3, 4]
    dup = next(r for r in manifest(tmp_path / "set")["records"] if r["index"] == 2)
    assert dup["status"] == "duplicate" and dup["duplicate_of"] == 0


def test_a_threshold_that_rejects_everything_stops_with_an_error(pipe, tmp_path):
    with pytest.raises(QualityError, match="kept 0 of 8 candidates"):
        generate_private_set(pipe, cfg(num_images=2, drop_blank=0.5), tmp_path / "set", progress=False)


# -- refusing and overwriting ----------------------------------------------------------------------


def test_other_settings_into_a_filled_folder_are_refused_unless_overwrite(pipe, tmp_path):
    generate_private_set(pipe, cfg(), tmp_path / "set", progress=False)
    with pytest.raises(ConfigError, match=r"not empty.*other settings \(seed: 0 -> 1\).*overwrite"):
        generate_private_set(pipe, cfg(seed=1), tmp_path / "set", progress=False)
    assert manifest(tmp_path / "set")["config"]["seed"] == 0
    result = generate_private_set(pipe, cfg(seed=1, num_images=3), tmp_path / "set", overwrite=True, progress=False)
    assert manifest(tmp_path / "set")["config"]["seed"] == 1
    assert sorted(p.name for p in result.image_dir.iterdir()) == ["000000.png", "000001.png", "000002.png"]


def test_safety_checker_flag_loads_the_models_checker_and_black_outs_are_dropped(model_dir, tmp_path):
    import shutil

    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    folder = tmp_path / "sd-with-checker"
    shutil.copytree(model_dir, folder)
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4)
    clip = CLIPConfig(text_config=small, vision_config=dict(small, image_size=16, patch_size=4), projection_dim=16)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(clip).eval()
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        folder / "feature_extractor")
    checker.save_pretrained(folder / "safety_checker")  # concept thresholds 1: cosine never exceeds, nothing flagged
    clean = generate_private_set(str(folder), cfg(num_images=2, safety_checker=True), tmp_path / "clean", progress=False)
    assert clean.count == 2
    assert [r["nsfw"] for r in manifest(tmp_path / "clean")["records"]] == [False, False]

    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-1.0)  # threshold -1: every image is flagged and blacked out
    checker.save_pretrained(folder / "safety_checker")
    with pytest.raises(QualityError):
        generate_private_set(str(folder), cfg(num_images=2, safety_checker=True), tmp_path / "flagged", progress=False)
    records = manifest(tmp_path / "flagged")["records"]
    assert records and all(r["nsfw"] is True and r["status"] == "blank" for r in records)

    with pytest.raises(ConfigError, match="no safety_checker"):
        generate_private_set(str(model_dir), cfg(safety_checker=True), tmp_path / "none", progress=False)
    assert not (tmp_path / "none").exists()


def test_a_folder_with_foreign_files_is_refused(pipe, tmp_path):
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="other files"):
        generate_private_set(pipe, cfg(), tmp_path / "set", progress=False)
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == ["notes.txt"]


# -- bad input: one-line error, nothing written -------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_images": 0}, "num_images=0"),
        ({"num_images": -3}, "num_images=-3"),
        ({"scheduler": "warp"}, "scheduler='warp'.*ddim"),
        ({"layout": "zip"}, "layout='zip'"),
        ({"templates": ["photo of {person}"]}, r"\{person\}"),
        ({"templates": ["a {domain}", "b {domain}", "c {domain}"], "template_weights": [1, 2]}, "3 weights"),
        ({"drop_blank": 2.0}, "drop_blank=2.0"),
    ],
)
def test_invalid_config_values_are_named(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        cfg(**kwargs)


def test_resolution_not_a_multiple_of_the_vae_factor_writes_nothing(pipe, tmp_path):
    with pytest.raises(ConfigError, match="height=12 is not valid; expected a multiple of 8"):
        generate_private_set(pipe, cfg(height=12), tmp_path / "set", progress=False)
    assert not (tmp_path / "set").exists()


def test_unwritable_output_is_refused_before_anything_is_written(pipe, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        generate_private_set(pipe, cfg(), blocker / "set", progress=False)
    with pytest.raises(InputError, match="not writable"):
        generate_private_set(pipe, cfg(), Path("/proc/s2l-no-such/set"), progress=False)


def _cli(capsys, *argv):
    from s2l_plugin.cli import main

    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "{tmp}/no-model"], "does not exist"),
        (["--scheduler", "warp"], "scheduler='warp'"),
        (["--num-images", "0"], "num_images=0"),
        (["--layout", "zip"], "layout='zip'"),
        (["--height", "12"], "height=12"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, model_dir, extra, message):
    argv = ["generate", "--model", str(model_dir), "--domain", "digit seven", "--num-images", "2",
            "--out", str(tmp_path / "out"), "--steps", "1"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code, _, err = _cli(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("s2l:")]
    assert len(lines) == 1 and message.split("=")[0] in lines[0], err
    assert not (tmp_path / "out").exists()


def test_cli_domains_file_writes_one_set_per_domain_with_distinct_seeds(capsys, tmp_path, model_dir):
    domains = tmp_path / "domains.json"
    domains.write_text(json.dumps(["digit seven", "digit three"]))
    code, out, err = _cli(capsys, "generate", "--model", str(model_dir), "--domains", str(domains),
                          "--num-images", "2", "--out", str(tmp_path / "out"), "--steps", "1",
                          "--layout", "imagefolder", "--no-progress")
    assert code == 0, err
    seven, three = load_generated_set(tmp_path / "out" / "digit_seven"), load_generated_set(tmp_path / "out" / "digit_three")
    # One template per domain (the reference's rule), drawn from (seed, domain).
    assert seven.prompt in ("photo of digit seven", "face of digit seven")
    assert three.prompt in ("photo of digit three", "face of digit three")
    assert not {r.seed for r in seven.records} & {r.seed for r in three.records}
    assert "digit seven: 2 images" in out


# -- the hook ---------------------------------------------------------------------------------------


def test_default_hook_generates_from_the_run(pipe, tmp_path):
    from s2l_plugin.hooks.manager import make_plugin_manager

    from s2l_plugin.context import Run

    pm = make_plugin_manager(load_entry_points=False)
    run = Run(domain="digit three", output_dir=tmp_path,
              options={"generate": {"num_images": 3, "num_inference_steps": 1, "progress": False}})
    result = pm.hook.s2l_generate_private_set(run=run, pipeline=pipe)
    assert result.count == 3 and result.out_dir == tmp_path / "s2l-private-set"
    assert run.state["private_set"] is result
    assert result.prompt in ("photo of digit three", "face of digit three")  # one template per domain


def test_a_plugin_can_replace_generation_or_defer_to_the_default(pipe, tmp_path):
    from s2l_plugin.hooks import hookimpl
    from s2l_plugin.hooks.manager import make_plugin_manager

    from s2l_plugin.context import Run

    class Defers:
        @hookimpl
        def s2l_generate_private_set(self, run):
            run.state["deferred"] = True

    class Replaces:
        @hookimpl
        def s2l_generate_private_set(self, run, pipeline):
            return "my set"

    run = Run(domain="digit three", output_dir=tmp_path, prompt="a photo of {domain}",
              options={"generate": {"num_images": 1, "num_inference_steps": 1, "progress": False}})
    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[Defers()])
    result = pm.hook.s2l_generate_private_set(run=run, pipeline=pipe)
    assert run.state["deferred"] and result.prompt == "a photo of digit three"
    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[Replaces()])
    assert pm.hook.s2l_generate_private_set(run=run, pipeline=pipe) == "my set"


def test_hook_refuses_unknown_generation_options(tmp_path):
    from s2l_plugin.context import Run
    from s2l_plugin.generate import config_from_run

    with pytest.raises(ConfigError, match="unknown option.*'steps'"):
        config_from_run(Run(domain="x", output_dir=tmp_path, options={"generate": {"steps": 3}}))
