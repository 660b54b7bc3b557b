"""The `s2l run` config: validated, with --set overrides, and the shipped demo config loads."""

from __future__ import annotations

import pytest

from s2l_plugin.errors import ConfigError, InputError
from s2l_plugin.runconfig import SHIPPED_CONFIGS, apply_overrides, load_run_config


def test_shipped_demo_config_is_valid():
    config = load_run_config(SHIPPED_CONFIGS / "demo.toml")
    assert config.base == "testbed"
    assert {"dreambooth", "lora", "textual_inversion", "hypernetwork"} <= set(config.methods)


def test_overrides_parse_toml_values_and_bare_strings():
    data = apply_overrides({"generate": {"num_images": 5}}, ["generate.num_images=200", "out=runs/x", "methods=[\"lora\"]"])
    assert data == {"generate": {"num_images": 200}, "out": "runs/x", "methods": ["lora"]}


def test_per_method_training_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[train]\nlearning_rate = 1e-5\nmax_train_steps = 10\n[train.methods.lora]\nlearning_rate = 1e-4\nrank = 4\n')
    config = load_run_config(path)
    assert config.train_for("lora") == {"learning_rate": 1e-4, "max_train_steps": 10, "rank": 4}
    assert config.train_for("dreambooth") == {"learning_rate": 1e-5, "max_train_steps": 10}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('colour = "red"\n', r"unknown option\(s\) 'colour' for RunConfig"),
        ("[generate]\nnum_images = 0\n", r"generate.num_images=0 is not valid; expected a positive integer"),
        ("domains = []\n", r"domains=\[\] is not valid"),
        ('base = "/no/such/model"\n', r"\[data\] members and nonmembers folders are required"),
        ("[audit]\nattacks = []\n", r"audit.attacks=\[\] is not valid"),
        ("out = \n", r"is not valid TOML"),
    ],
)
def test_bad_config_names_the_value(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_run_config(path)


def test_config_that_is_not_utf8_is_a_config_error(tmp_path):
    """Bug fixed: a binary/Latin-1 config raised a bare UnicodeDecodeError."""
    path = tmp_path / "c.toml"
    path.write_bytes(b'out = "caf\xe9"\n')
    with pytest.raises(ConfigError, match=r"c\.toml' is not valid TOML"):
        load_run_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_run_config(tmp_path / "nope.toml")


def test_bad_override_syntax(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_run_config(path, ["generate.num_images"])


def test_every_entry_point_defaults_to_the_same_attacks(fresh_plugin_manager):
    import argparse

    from s2l_plugin.audit.mia.engine import resolve_attacks
    from s2l_plugin.commands.audit import register
    from s2l_plugin.config import DEFAULT_ATTACKS, DEFAULT_ATTACKS_WITH_BASE
    from s2l_plugin.context import AuditSpec
    from s2l_plugin.integration import add_arguments
    from s2l_plugin.runconfig import AuditSection

    with_base = list(DEFAULT_ATTACKS_WITH_BASE)
    assert with_base == [*DEFAULT_ATTACKS, "reference"]
    assert AuditSpec().attacks == AuditSection().attacks == with_base  # s2l audit / launch / API, s2l run configs
    assert add_arguments(argparse.ArgumentParser(), pm=fresh_plugin_manager).parse_args([]).s2l_attacks == with_base
    assert [a.name for a in resolve_attacks(None, has_reference=True, pm=fresh_plugin_manager)] == with_base
    assert [a.name for a in resolve_attacks(None, has_reference=False, pm=fresh_plugin_manager)] == list(DEFAULT_ATTACKS)
    # `s2l audit` without --attacks leaves the choice to AuditSpec (the base's own audit drops "reference").
    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    assert sub.choices["audit"].parse_args(["--lora", "ckpt.safetensors"]).attacks is None


def test_every_entry_point_defaults_to_the_one_defaults_table(fresh_plugin_manager):
    """Generation, extraction and memorization defaults: s2l run configs, s2l launch / the three-call API,
    s2l generate, s2l audit, AuditSpec and the Python functions all read s2l_plugin.defaults."""
    import argparse
    import inspect

    from s2l_plugin import defaults as d
    from s2l_plugin.audit.api import audit_checkpoint
    from s2l_plugin.audit.extraction import extract, generate_for_prompt
    from s2l_plugin.audit.memorization import memorization_scores
    from s2l_plugin.commands import audit as audit_cmd
    from s2l_plugin.commands import generate as generate_cmd
    from s2l_plugin.context import AuditSpec
    from s2l_plugin.generate import GenerationConfig
    from s2l_plugin.integration import add_arguments, run_from_args
    from s2l_plugin.runconfig import AuditSection, GenerateSection

    gen = (d.GENERATE_NUM_IMAGES, d.GENERATE_GUIDANCE_SCALE, d.GENERATE_NUM_INFERENCE_STEPS)
    ext = (d.EXTRACTION_GUIDANCE_SCALE, d.EXTRACTION_NUM_INFERENCE_STEPS)
    g = GenerateSection()
    assert (g.num_images, g.guidance_scale, g.num_inference_steps) == gen
    c = GenerationConfig(domain="seven")
    assert (c.num_images, c.guidance_scale, c.num_inference_steps) == gen
    parser = add_arguments(argparse.ArgumentParser(), pm=fresh_plugin_manager)
    parser.add_argument("--output_dir")
    opts = run_from_args(parser.parse_args(["--output_dir", "x"]), pm=fresh_plugin_manager).options["generate"]
    assert (opts["num_images"], opts["guidance_scale"], opts["num_inference_steps"]) == gen
    sub = argparse.ArgumentParser().add_subparsers()
    generate_cmd.register(sub)
    audit_cmd.register(sub)
    gargs = sub.choices["generate"].parse_args(["--domain", "x", "--num-images", "1", "--out", "o"])
    assert (gargs.guidance, gargs.steps) == gen[1:]
    assert sub.choices["audit"].parse_args(["--lora", "f"]).extraction_steps == ext[1]

    for spec in (AuditSpec(), AuditSection()):
        assert (spec.extraction_guidance, spec.extraction_steps) == ext
    signature = inspect.signature(audit_checkpoint).parameters
    assert (signature["extraction_guidance"].default, signature["extraction_steps"].default) == ext
    for fn in (extract, generate_for_prompt):
        p = inspect.signature(fn).parameters
        assert (p["guidance_scale"].default, p["num_inference_steps"].default) == ext, fn.__name__
    m = inspect.signature(memorization_scores).parameters
    assert (m["n"].default, m["steps"].default, m["num_inference_steps"].default, m["guidance_scale"].default) == (
        d.MEMORIZATION_N, d.MEMORIZATION_STEPS, d.MEMORIZATION_NUM_INFERENCE_STEPS, d.MEMORIZATION_GUIDANCE_SCALE)
    import s2l_plugin.audit.memorization as mem

    assert mem.RELATIVE_N == d.MEMORIZATION_RELATIVE_N  # relative_memorization_scores' n when the caller gives none
