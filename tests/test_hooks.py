"""The hook system: documented, exercised, validated, and loadable from entry points."""

from __future__ import annotations

import inspect
import re
import sys
import textwrap
from pathlib import Path

import pytest
from s2l_plugin.hooks import hookimpl, specs
from s2l_plugin.hooks.manager import DEFAULT_PLUGINS, collect, get, make_plugin_manager, plugin_table

from s2l_plugin.errors import PluginError

REPO = Path(__file__).resolve().parents[1]
HOOK_NAMES = sorted(n for n, f in inspect.getmembers(specs, inspect.isfunction) if hasattr(f, "s2l_spec"))


def test_every_hookspec_found():
    assert "register_adapters" in HOOK_NAMES and "s2l_audit" in HOOK_NAMES
    assert len(HOOK_NAMES) == 11


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_hook_is_documented_with_exact_signature(name):
    fn = getattr(specs, name)
    signature = f"{name}({', '.join(inspect.signature(fn).parameters)})"
    docs = (REPO / "docs" / "hooks.md").read_text()
    assert f"### {signature}" in docs, f"docs/hooks.md has no heading '### {signature}'"
    assert fn.__doc__ and fn.__doc__.strip(), f"hookspec {name} has no docstring"


@pytest.mark.parametrize("name", HOOK_NAMES)
def test_hook_is_exercised_by_a_test(name):
    pattern = re.compile(rf"def test_hook_{name}\w*\(")
    sources = [p.read_text() for d in ("tests", "integration_tests") for p in (REPO / d).glob("test_*.py")]
    assert any(pattern.search(s) for s in sources), f"no test named test_hook_{name}* exercises hook {name}"


class _Thing:
    def __init__(self, name):
        self.name = name

    def score(self, *a, **k):
        return None


def test_hook_register_attacks_collects_and_validates():
    class Good:
        @hookimpl
        def register_attacks(self, register):
            register(_Thing("mine"))

    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[Good()])
    assert isinstance(collect("attacks", pm)["mine"], _Thing)
    assert get("attacks", "mine", pm).name == "mine"


def test_registry_error_names_plugin_hook_and_rule():
    class NotAnAttack:
        name = "broken"

    class Bad:
        @hookimpl
        def register_attacks(self, register):
            register(NotAnAttack())

    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[Bad()])
    with pytest.raises(PluginError, match=r"hook register_attacks: .* is not a attack \(missing score or score_encoded\)"):
        collect("attacks", pm)


def test_registry_refuses_duplicate_names_naming_both_plugins():
    class One:
        @hookimpl
        def register_attacks(self, register):
            register(_Thing("dup"))

    class Two:
        @hookimpl
        def register_attacks(self, register):
            register(_Thing("dup"))

    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[One(), Two()])
    with pytest.raises(PluginError, match="'dup' is already registered by plugin"):
        collect("attacks", pm)


def test_unknown_registry_name_lists_choices():
    pm = make_plugin_manager(load_entry_points=False)
    with pytest.raises(Exception, match=r"unknown attack 'nope'; expected one of"):
        get("attacks", "nope", pm)


def test_misspelled_hookimpl_fails_loudly():
    class Typo:
        @hookimpl
        def register_atacks(self, register):  # misspelled on purpose
            pass

    with pytest.raises(PluginError, match="register_atacks"):
        make_plugin_manager(load_entry_points=False, extra_plugins=[Typo()])


def test_builtins_are_plugins():
    pm = make_plugin_manager(load_entry_points=False)
    names = {row["name"] for row in plugin_table(pm) if row["builtin"]}
    assert names == set(DEFAULT_PLUGINS)


def _fake_distribution(tmp_path: Path, dist: str, ep_name: str, module: str, body: str) -> None:
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(body))
    info = tmp_path / f"{dist}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[s2l_plugin]\n{ep_name} = {module}\n")


PLUGIN_BODY = """
from s2l_plugin import hookimpl

class Attack:
    name = "fake-attack"
    def score(self, pipeline, images, captions, **kwargs):
        return [0.0] * len(images)

@hookimpl
def register_attacks(register):
    register(Attack())
"""


def test_entry_point_plugin_loads(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "s2l-fake-plugin", "fake", "s2l_fake_plugin_mod", PLUGIN_BODY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("S2L_PLUGINS", raising=False)
    pm = make_plugin_manager()
    assert "fake-attack" in collect("attacks", pm)
    row = next(r for r in plugin_table(pm) if r["name"] == "fake")
    assert row == {"name": "fake", "builtin": False, "hooks": ["register_attacks"], "distribution": "s2l-fake-plugin", "version": "0.3"}
    sys.modules.pop("s2l_fake_plugin_mod", None)


@pytest.mark.parametrize(("env", "loaded"), [("", False), ("fake", True), ("s2l-fake-plugin", True), ("other", False)])
def test_s2l_plugins_env_restricts_entry_points(tmp_path, monkeypatch, env, loaded):
    _fake_distribution(tmp_path, "s2l-fake-plugin", "fake", "s2l_fake_plugin_mod2", PLUGIN_BODY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("S2L_PLUGINS", env)
    pm = make_plugin_manager()
    assert (pm.get_plugin("fake") is not None) is loaded
    sys.modules.pop("s2l_fake_plugin_mod2", None)


def test_broken_entry_point_names_the_plugin(tmp_path, monkeypatch):
    _fake_distribution(tmp_path, "s2l-broken", "broken", "s2l_broken_mod", "raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("S2L_PLUGINS", raising=False)
    with pytest.raises(PluginError, match=r"plugin 'broken' .*s2l-broken.* failed to import: boom"):
        make_plugin_manager()


def test_hook_s2l_add_arguments_is_historic():
    import argparse

    class Late:
        @hookimpl
        def s2l_add_arguments(self, parser):
            parser.add_argument("--late-flag", default="x")

    pm = make_plugin_manager(load_entry_points=False)
    parser = argparse.ArgumentParser()
    pm.hook.s2l_add_arguments.call_historic(kwargs={"parser": parser})
    pm.register(Late())  # registered after the call: still sees the parser
    assert parser.parse_args([]).late_flag == "x"
