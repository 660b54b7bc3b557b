"""DreamBooth, End2End, LoRA and LoRA+DreamBooth: train, save, reload, resume, refuse bad input.

The per-method train / reload / loss tests fine-tune the `test` testbed preset (pretrained) on 8
member images of its first domain. Resume, prior preservation, mixed precision and bad-input
tests use the testbed's tiny pipeline architecture (random init, seed 0) and 8 sklearn digits.
"Same denoiser output" means the UNet's prediction for fixed latents, timesteps and prompt
(through the text encoder) agrees within atol 1e-5 (fp32).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from s2l_plugin.adapters.base import TrainConfig

from s2l_plugin.errors import ConfigError, InputError

PROMPT = "digit seven"
METHODS = ("dreambooth", "end2end", "lora", "lora_dreambooth")
# Learning rates as the diffusers scripts scale them (LoRA factors take a 10x larger step than full
# weights), 10x below the testbed's own pretraining rate of 1e-3.
SETTINGS = {
    "dreambooth": {"learning_rate": 1e-4, "options": {}},
    "end2end": {"learning_rate": 1e-4, "options": {}},
    "lora": {"learning_rate": 1e-3, "options": {"rank": 4, "alpha": 8.0}},
    "lora_dreambooth": {"learning_rate": 1e-3, "options": {"rank": 4, "alpha": 8.0}},
}
TRAIN_STEPS = 10
ATOL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded, and on a shared 2-core machine 2 threads thrash."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digit_folder(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = tmp_path_factory.mktemp("digits")
    sevens = digits.images[digits.target == 7][:8]
    for i, img in enumerate(sevens):
        arr = np.kron(img / 16.0 * 255.0, np.ones((2, 2))).astype("uint8")
        Image.fromarray(np.stack([arr] * 3, axis=-1)).save(folder / f"{i:02d}.png")
    return folder


def _config(method: str, **overrides) -> TrainConfig:
    s = SETTINGS[method]
    fields = {"prompt": PROMPT, "max_train_steps": 6, "train_batch_size": 4, "learning_rate": s["learning_rate"],
              "options": dict(s["options"]), "seed": 0}
    fields.update(overrides)
    return TrainConfig(**fields)


def _adapter(name: str):
    from s2l_plugin.hooks.manager import get

    return get("adapters", name)


def _denoise(pipe) -> torch.Tensor:
    """The UNet's prediction on fixed latents at three timesteps, conditioned on PROMPT through the text encoder."""
    g = torch.Generator().manual_seed(7)
    size = pipe.unet.config.sample_size
    latents = torch.randn(3, pipe.unet.config.in_channels, size, size, generator=g)
    ids = pipe.tokenizer([PROMPT] * 3, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    for m in (pipe.unet, pipe.text_encoder):
        m.eval()
    with torch.no_grad():
        return pipe.unet(latents, torch.tensor([50, 400, 900]), pipe.text_encoder(ids)[0]).sample


@pytest.fixture(scope="module")
def testbed_base(test_testbed, tmp_path_factory):
    """(fresh pretrained pipeline factory, folder of 8 members of the first domain, its prompt)."""
    import shutil

    domain = test_testbed.domains[0]
    folder = tmp_path_factory.mktemp("members")
    for sample in test_testbed.members(domain)[:8]:
        shutil.copy(sample.path, folder / sample.path.name)
    return test_testbed.load_pipeline, folder, domain.prompt


@pytest.fixture(scope="module")
def trained(testbed_base, tmp_path_factory):
    """Each method trained once on the testbed (lazily): (in-memory pipeline, artifact, loss before, loss after)."""
    from s2l_plugin.adapters.training import fixed_batch_loss

    from s2l_plugin.data import list_image_folder

    fresh, folder, prompt = testbed_base
    cache: dict[str, tuple] = {}
    records = list_image_folder(folder)

    def get(method: str):
        if method not in cache:
            pipe = fresh()
            cfg = _config(method, prompt=prompt, max_train_steps=TRAIN_STEPS, train_batch_size=8)
            before = fixed_batch_loss(pipe, records, cfg, draws=4)
            artifact = _adapter(method).train(pipe, folder, cfg, tmp_path_factory.mktemp(method) / "out")
            after = fixed_batch_loss(pipe, records, cfg, draws=4)
            cache[method] = (pipe, artifact, before, after)
        return cache[method]

    return get


@pytest.mark.parametrize("method", METHODS)
def test_training_lowers_the_loss_on_a_fixed_batch(method, trained):
    _, artifact, before, after = trained(method)
    assert after < before, f"{method}: fixed-batch loss {before:.4f} -> {after:.4f}"
    assert len(artifact.metadata["losses"]) == TRAIN_STEPS


@pytest.mark.parametrize("method", METHODS)
def test_artifact_loaded_on_a_fresh_base_matches_the_trained_model_and_unloads(method, trained, testbed_base):
    pipe, artifact, _, _ = trained(method)
    adapter = _adapter(method)
    fresh = testbed_base[0]()
    base_out = _denoise(fresh)
    trained_out = _denoise(pipe)
    assert (trained_out - base_out).abs().max() > 1e-3  # training changed the model
    loaded = adapter.load(fresh, artifact)
    torch.testing.assert_close(_denoise(loaded), trained_out, atol=ATOL, rtol=0)
    restored = adapter.unload(loaded, artifact)
    torch.testing.assert_close(_denoise(restored), base_out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_detect_finds_what_train_wrote(method, trained):
    _, artifact, _, _ = trained(method)
    found = _adapter(method).detect(artifact.path)
    assert found is not None and found.method == method
    assert set(found.files) <= set(artifact.files)
    record = json.loads((Path(artifact.path) / "s2l_training.json").read_text())
    assert record["method"] == method and record["losses"] == artifact.metadata["losses"]


def test_full_finetune_artifact_is_a_pipeline_folder_diffusers_loads(trained):
    from diffusers import StableDiffusionPipeline

    pipe, artifact, _, _ = trained("dreambooth")
    loaded = StableDiffusionPipeline.from_pretrained(str(artifact.path), local_files_only=True)
    torch.testing.assert_close(_denoise(loaded), _denoise(pipe), atol=ATOL, rtol=0)


def test_end2end_also_changes_the_vae_and_dreambooth_does_not(trained, testbed_base):
    base_vae = testbed_base[0]().vae.state_dict()
    for method, changed in (("end2end", True), ("dreambooth", False)):
        vae = trained(method)[0].vae.state_dict()
        differs = any(not torch.equal(vae[k].float(), base_vae[k].float()) for k in base_vae)
        assert differs is changed, method


@pytest.mark.parametrize("method", ("lora", "lora_dreambooth"))
def test_diffusers_file_and_kohya_export_load_with_plain_diffusers_to_the_same_model(method, trained, testbed_base):
    pipe, artifact, _, _ = trained(method)
    outs = {}
    for weight in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        fresh = testbed_base[0]()
        fresh.load_lora_weights(str(artifact.path), weight_name=weight)
        outs[weight] = _denoise(fresh)
    torch.testing.assert_close(outs["lora_kohya.safetensors"], outs["pytorch_lora_weights.safetensors"], atol=1e-6, rtol=0)
    torch.testing.assert_close(outs["pytorch_lora_weights.safetensors"], _denoise(pipe), atol=ATOL, rtol=0)


def test_lora_dreambooth_trains_the_text_encoder_and_plain_lora_does_not(trained):
    from safetensors import safe_open

    for method, has_te in (("lora_dreambooth", True), ("lora", False)):
        path = Path(trained(method)[1].path)
        with safe_open(str(path / "pytorch_lora_weights.safetensors"), "pt") as f:
            assert any(k.startswith("text_encoder.") for k in f.keys()) is has_te, method
        with safe_open(str(path / "lora_kohya.safetensors"), "pt") as f:
            assert any(k.startswith("lora_te_") for k in f.keys()) is has_te, method


def test_resumed_run_ends_where_the_uninterrupted_run_ends(digit_folder, tmp_path):
    """Stop at step 2 (checkpoint), resume to step 4: LoRA weights, Adam state and dropout draws
    line up, so the saved factors are bit-identical (tolerance 0) to a 4-step run."""
    from safetensors.torch import load_file

    adapter = _adapter("lora_dreambooth")
    options = {"rank": 4, "dropout": 0.1}
    common = {"gradient_accumulation_steps": 2, "options": options}
    full = adapter.train(str(_pipeline_dir(tmp_path)), digit_folder, _config("lora_dreambooth", max_train_steps=4, **common), tmp_path / "a")
    adapter.train(str(_pipeline_dir(tmp_path)), digit_folder,
                  _config("lora_dreambooth", max_train_steps=2, checkpointing_steps=2, **common), tmp_path / "b")
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2" / "loop_state.json").is_file()
    resumed = adapter.train(str(_pipeline_dir(tmp_path)), digit_folder,
                            _config("lora_dreambooth", max_train_steps=4, checkpointing_steps=2, **common), tmp_path / "b")
    assert resumed.metadata["losses"] == full.metadata["losses"]
    assert full.metadata["resumed_from"] is None and resumed.metadata["resumed_from"].endswith("checkpoint-2")
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_under_a_different_config_is_refused(digit_folder, tmp_path):
    adapter = _adapter("lora")
    adapter.train(str(_pipeline_dir(tmp_path)), digit_folder, _config("lora", max_train_steps=1, checkpointing_steps=1), tmp_path / "o")
    with pytest.raises(ConfigError, match="learning_rate"):
        adapter.train(str(_pipeline_dir(tmp_path)), digit_folder,
                      _config("lora", max_train_steps=2, checkpointing_steps=1, learning_rate=5e-3), tmp_path / "o")


def _pipeline_dir(tmp_path: Path) -> Path:
    """The seed-0 tiny pipeline saved once per test folder (so a path can be passed as the base)."""
    from s2l_plugin.testbed import build_tiny_pipeline

    folder = tmp_path / "base"
    if not (folder / "model_index.json").exists():
        build_tiny_pipeline(seed=0).save_pretrained(folder)
    return folder


def test_prior_preservation_generates_missing_class_images_once(digit_folder, tmp_path):
    adapter = _adapter("dreambooth")
    opts = {"with_prior_preservation": True, "class_prompt": "digit", "num_class_images": 2, "class_inference_steps": 2,
            "class_data_dir": str(tmp_path / "class")}
    cfg = _config("dreambooth", max_train_steps=1, options=opts)
    artifact = adapter.train(str(_pipeline_dir(tmp_path)), digit_folder, cfg, tmp_path / "o1")
    first = sorted(p.name for p in (tmp_path / "class").iterdir())
    assert len(first) == 2 and all(name.split("-")[0] in ("0", "1") and name.endswith(".png") for name in first)
    assert len(artifact.metadata["losses"]) == 1
    adapter.train(str(_pipeline_dir(tmp_path)), digit_folder, cfg, tmp_path / "o2")
    assert sorted(p.name for p in (tmp_path / "class").iterdir()) == first


def test_class_image_write_interrupted_leaves_no_image_for_the_next_run(digit_folder, tmp_path, monkeypatch):
    """Bug fixed: a crash while saving a class image left '.0.tmp.png', counted and trained on as a class image."""
    from PIL import Image

    def crash(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", crash)
    opts = {"with_prior_preservation": True, "class_prompt": "digit", "num_class_images": 1, "class_inference_steps": 1,
            "class_data_dir": str(tmp_path / "class")}
    with pytest.raises(OSError, match="disk full"):
        _adapter("dreambooth").train(str(_pipeline_dir(tmp_path)), digit_folder, _config("dreambooth", max_train_steps=1, options=opts),
                                     tmp_path / "o")
    assert list((tmp_path / "class").iterdir()) == []


def test_script_args_name_the_data_prompt_and_output(tmp_path):
    data, out = tmp_path / "d", tmp_path / "o"
    db = _adapter("dreambooth").script_args("train_dreambooth", data, "photo of x", out)
    assert db["--instance_data_dir"] == str(data) and db["--instance_prompt"] == "photo of x" and db["--output_dir"] == str(out)
    t2i = _adapter("lora").script_args("train_text_to_image_lora", data, "photo of x", out)
    assert t2i["--train_data_dir"] == str(data) and t2i["--caption_column"] == "text"
    assert _adapter("lora_dreambooth").script_args("train_dreambooth_lora", data, "p", out)["--instance_prompt"] == "p"
    assert _adapter("lora").script_args("train_network", data, "p", out)["--train_data_dir"] == str(data)
    with pytest.raises(ConfigError, match="script_kind"):
        _adapter("lora").script_args("train_dreambooth", data, "p", out)
    with pytest.raises(ConfigError, match="no matching diffusers training script"):
        _adapter("end2end").script_args("train_dreambooth", data, "p", out)


def test_detect_recognises_a_kohya_file_and_ignores_other_folders(trained, tmp_path):
    import shutil

    _, artifact, _, _ = trained("lora")
    shutil.copy(Path(artifact.path) / "lora_kohya.safetensors", tmp_path / "my_lora.safetensors")
    found = _adapter("lora").detect(tmp_path)
    assert found is not None and found.metadata == {"weight_name": "my_lora.safetensors", "format": "kohya"}
    assert _adapter("lora").detect(tmp_path / "nothing") is None
    assert _adapter("dreambooth").detect(tmp_path) is None


# -- bad input: one line, exit code 2, nothing written ------------------------------------------------


@pytest.fixture
def folders(tmp_path, digit_folder):
    empty = tmp_path / "empty"
    empty.mkdir()
    text_only = tmp_path / "text_only"
    text_only.mkdir()
    (text_only / "notes.txt").write_text("not an image")
    (text_only / "metadata.jsonl").write_text("")
    not_pipeline = tmp_path / "not_pipeline"
    not_pipeline.mkdir()
    (not_pipeline / "unet").mkdir()
    return {"empty": empty, "text_only": text_only, "not_pipeline": not_pipeline, "data": digit_folder}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "lora", "--data", "{empty}"], "holds no images"),
        (["--method", "lora", "--data", "{text_only}"], "holds no images"),
        (["--method", "no_such_method", "--data", "{data}"], "unknown adapter 'no_such_method'"),
        (["--method", "lora", "--data", "{data}", "--option", "bogus=1"], "unknown option(s) 'bogus'"),
        (["--method", "dreambooth", "--data", "{data}", "--rank", "4"], "unknown option(s) 'rank'"),
        (["--method", "lora", "--data", "{data}", "--rank", "0"], "rank=0"),
        (["--method", "lora_dreambooth", "--data", "{data}", "--rank", "-2"], "rank=-2"),
        (["--method", "lora", "--data", "{data}", "--model", "{not_pipeline}"], "not a diffusers pipeline folder"),
        (["--method", "lora", "--data", "{data}", "--steps", "0"], "max_train_steps=0"),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, folders, tmp_path, capsys):
    from s2l_plugin.cli import main

    out = tmp_path / "out"
    code = main(["finetune", *[a.format(**folders) for a in argv], "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("s2l: error: ") and "\n" not in err and message in err
    assert not out.exists()
    assert not any(p.name.startswith(".out.partial") for p in tmp_path.iterdir())


def test_cli_unknown_flag_is_a_usage_error(folders, tmp_path, capsys):
    from s2l_plugin.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--method", "lora", "--data", str(folders["data"]), "--out", str(tmp_path / "o"), "--ranq", "4"])
    assert exc.value.code == 2 and "--ranq" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_api_bad_input_raises_before_writing(folders, tmp_path):
    with pytest.raises(ConfigError, match="rank=0"):
        _adapter("lora").train(str(_pipeline_dir(tmp_path)), folders["data"], _config("lora", options={"rank": 0}), tmp_path / "o")
    with pytest.raises(InputError, match="holds no images"):
        _adapter("dreambooth").train(str(_pipeline_dir(tmp_path)), folders["empty"], _config("dreambooth"), tmp_path / "o")
    with pytest.raises(InputError, match="not a diffusers pipeline folder"):
        _adapter("dreambooth").train(str(folders["not_pipeline"]), folders["data"], _config("dreambooth"), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli_trains_the_given_model_and_prints_the_artifact(folders, tmp_path, capsys):
    from s2l_plugin.cli import main

    out = tmp_path / "out"
    code = main(["finetune", "--method", "lora", "--model", str(_pipeline_dir(tmp_path)), "--data", str(folders["data"]),
                 "--out", str(out), "--steps", "1", "--batch-size", "2", "--rank", "2", "--prompt", PROMPT, "--json"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["method"] == "lora" and "pytorch_lora_weights.safetensors" in printed["files"]
    assert (out / "lora_kohya.safetensors").is_file()


def test_bf16_run_after_an_fp32_run_in_one_process_keeps_trained_weights_fp32(digit_folder, tmp_path):
    """Several fine-tunes in one Python session may change mixed precision; trained weights stay
    fp32 (as the diffusers scripts keep them); frozen components, run in bf16 meanwhile, come back
    bit-identical in their own dtype (so a saved pipeline folder is not silently downcast)."""
    from s2l_plugin.adapters.training import Trainable, train_loop

    from s2l_plugin.data import list_image_folder
    from s2l_plugin.testbed import build_tiny_pipeline

    records = list_image_folder(digit_folder)
    for precision in ("no", "bf16"):
        pipe = build_tiny_pipeline(seed=0)
        before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
        vae_before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
        cfg = _config("dreambooth", max_train_steps=2, mixed_precision=precision)
        result = train_loop(pipe, records, cfg, Trainable(list(pipe.unet.parameters())), output_dir=tmp_path / precision, progress=False)
        assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
        assert all(p.dtype == torch.float32 for p in pipe.unet.parameters())
        assert all(torch.equal(vae_before[k], v) for k, v in pipe.vae.state_dict().items())
        assert any(not torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())


def test_captions_come_from_the_data_only_when_asked_and_must_exist(tmp_path, digit_folder):
    import shutil

    from s2l_plugin.adapters.training import captions_for

    from s2l_plugin.data import list_image_folder

    folder = tmp_path / "captioned"
    shutil.copytree(digit_folder, folder)
    names = sorted(p.name for p in folder.glob("*.png"))
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": f"seven {i}"}) + "\n"
                                                   for i, n in enumerate(names[:-1])))
    records = list_image_folder(folder)
    assert captions_for(records, _config("lora")) == [PROMPT] * len(names)
    with pytest.raises(InputError, match=names[-1]):
        captions_for(records, _config("lora", caption_from_data=True))
    (folder / names[-1]).with_suffix(".txt").write_text("last seven")
    captions = captions_for(list_image_folder(folder), _config("lora", caption_from_data=True))
    assert captions[0] == "seven 0" and captions[-1] == "last seven"


def test_v_prediction_training_lowers_the_v_prediction_loss(digit_folder, tmp_path):
    from s2l_plugin.adapters.training import Trainable, fixed_batch_loss, train_loop

    from s2l_plugin.data import list_image_folder
    from s2l_plugin.testbed import build_tiny_pipeline

    records = list_image_folder(digit_folder)
    pipe = build_tiny_pipeline(seed=0)
    cfg = _config("dreambooth", prediction_type="v_prediction", learning_rate=1e-3, max_train_steps=6)
    eps_cfg = _config("dreambooth", learning_rate=1e-3, max_train_steps=6)
    before_v, before_eps = fixed_batch_loss(pipe, records, cfg, draws=2), fixed_batch_loss(pipe, records, eps_cfg, draws=2)
    assert before_v != before_eps  # the objective really changed
    train_loop(pipe, records, cfg, Trainable(list(pipe.unet.parameters())), output_dir=tmp_path, progress=False)
    assert fixed_batch_loss(pipe, records, cfg, draws=2) < before_v
