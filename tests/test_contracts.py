"""The adapter, loader, extractor and report-writer contracts (docs/hooks.md; the attack contract is
tests/test_attack_contract.py): every registered object meets its contract, and registration refuses
what breaks it in one line naming the plugin.

Parametrized over the registries themselves: a newly registered built-in is checked without editing
this file."""

from __future__ import annotations

from pathlib import Path

import pytest
from s2l_plugin.adapters.base import adapter_problem
from s2l_plugin.hooks import hookimpl
from s2l_plugin.hooks.manager import REGISTRIES, collect, make_plugin_manager

from s2l_plugin.audit.extractor import extractor_problem
from s2l_plugin.errors import PluginError
from s2l_plugin.formats.loaders import loader_problem
from s2l_plugin.report.writers import report_writer_problem

_PM = make_plugin_manager(load_entry_points=False)
ADAPTERS = collect("adapters", _PM)
LOADERS = collect("loaders", _PM)
EXTRACTORS = collect("extractors", _PM)
WRITERS = collect("report_writers", _PM)

PROBLEM = {
    "adapters": adapter_problem,
    "loaders": loader_problem,
    "extractors": extractor_problem,
    "report_writers": report_writer_problem,
}
REGISTERED = {"adapters": ADAPTERS, "loaders": LOADERS, "extractors": EXTRACTORS, "report_writers": WRITERS}


def test_every_registry_has_its_contract_wired():
    for registry in REGISTRIES:
        assert REGISTRIES[registry].contract, f"registry {registry!r} has no contract"
    for registry, problem in PROBLEM.items():
        assert REGISTRIES[registry].contract.endswith(f":{problem.__name__}")


@pytest.mark.parametrize(("registry", "name"), [(r, n) for r, objs in REGISTERED.items() for n in sorted(objs)])
def test_registered_object_meets_its_contract(registry, name):
    obj = REGISTERED[registry][name]
    assert PROBLEM[registry](obj) is None
    assert obj.name == name  # the registry's key: names are unique (collect refuses a taken one)


# -- adapters -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_detect_finds_nothing_in_a_folder_without_its_artifact(name, tmp_path):
    adapter = ADAPTERS[name]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert adapter.detect(empty) is None
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not an artifact\n")
    (other / "empty.safetensors").write_bytes(b"")
    assert adapter.detect(other) is None


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_script_args_point_each_known_script_at_the_data(name, tmp_path):
    from s2l_plugin.integration import DATA_ARGS
    from s2l_plugin.launch import SCRIPT_KINDS

    adapter = ADAPTERS[name]
    kinds = getattr(adapter, "script_kinds", ())
    assert set(kinds) <= set(SCRIPT_KINDS), "a script kind s2l launch cannot recognise"
    data_dir, out_dir = tmp_path / "data", tmp_path / "out"
    for kind in kinds:
        updates = adapter.script_args(kind, data_dir, "a photo of the digit seven", out_dir)
        assert isinstance(updates, dict) and updates, kind
        assert all(isinstance(k, str) and k.startswith("--") for k in updates), kind
        assert all(v is None or isinstance(v, str) for v in updates.values()), kind
        assert any(updates.get(flag) == str(data_dir) for flag in DATA_ARGS), f"{kind}: no data argument names {data_dir}"


# -- loaders --------------------------------------------------------------------------------------


def _unrelated(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.txt"
    text.write_text("a text file, no checkpoint\n")
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00" * 32)
    folder = tmp_path / "folder"
    folder.mkdir()
    return {"text": text, "empty": empty, "junk": junk, "folder": folder}


@pytest.mark.parametrize("what", ["text", "empty", "junk", "folder"])
@pytest.mark.parametrize("name", sorted(LOADERS))
def test_loader_sniff_says_false_and_does_not_raise_on_what_it_cannot_read(name, what, tmp_path):
    assert LOADERS[name].sniff(_unrelated(tmp_path)[what]) is False


# -- extractors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXTRACTORS))
def test_extractor_returns_an_extraction_result_for_what_the_audit_passes(name, tiny_pipeline, test_testbed, tmp_path):
    """Called as ``audit_model`` calls it (the arguments of s2l_plugin.audit.extractor.Extractor)."""
    from s2l_plugin.data import ImageRecord
    from s2l_plugin.result import ExtractionResult

    prompts = ["a photo of the digit seven"]
    references = [ImageRecord(s.path, s.caption) for s in test_testbed.members("seven")[:3]]
    result = EXTRACTORS[name].extract(
        tiny_pipeline, prompts, 2, references, guidance_scale=1.0, num_inference_steps=1,
        seed=0, grid_path=tmp_path / "extraction.png",
    )
    assert isinstance(result, ExtractionResult)
    assert result.n_generations == 2 * len(prompts)


# -- report writers -------------------------------------------------------------------------------


def _minimal_result(out_dir: Path, *, membership: bool) -> Path:
    """One audited model (with one attack, or nothing audited), saved as the audit saves it."""
    import numpy as np
    from report_data import _attack

    from s2l_plugin.result import AuditResult, MembershipResult, ModelIdentity, RunResult, save_result

    audit = AuditResult(ModelIdentity("base", "testbed/test", None, None))
    if membership:
        rng = np.random.default_rng(0)
        attack = _attack("loss", rng.normal(0.5, 1, 40), rng.normal(0, 1, 40), seed=0)
        audit.membership = MembershipResult(attacks=[attack], n_members=40, n_nonmembers=40, seed=0)
    return save_result(RunResult(kind="audit", audits=[audit]), out_dir)


@pytest.mark.parametrize("membership", [True, False], ids=["one-attack", "nothing-audited"])
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_report_writer_writes_a_saved_result(name, membership, tmp_path, capsys):
    json_path = _minimal_result(tmp_path / "run", membership=membership)
    out_dir = tmp_path / "report"
    written = WRITERS[name].write(json_path, out_dir)
    for path in written or []:
        assert Path(path).is_file() and Path(path).resolve().is_relative_to(out_dir.resolve()), path


# -- registration refuses what breaks a contract --------------------------------------------------


class _Obj:
    def __init__(self, **members):
        for key, value in members.items():
            setattr(self, key, value)

    def __repr__(self):
        return "<obj>"


def _adapter(**changes):
    members = {
        "name": "mine",
        "train": lambda base, dataset_dir, config, output_dir: None,
        "load": lambda base_pipeline, artifact: base_pipeline,
        "script_args": lambda script_kind, data_dir, prompt, output_dir: {},
        "detect": lambda output_dir: None,
    }
    members.update(changes)
    return _Obj(**{k: v for k, v in members.items() if v is not _MISSING})


def _loader(**changes):
    members = {"name": "mine", "sniff": lambda path: False, "load": lambda path, base: base}
    members.update(changes)
    return _Obj(**{k: v for k, v in members.items() if v is not _MISSING})


def _extractor(**changes):
    members = {"name": "mine", "extract": lambda pipeline, prompts, n, references=None, **options: None}
    members.update(changes)
    return _Obj(**{k: v for k, v in members.items() if v is not _MISSING})


def _writer(**changes):
    members = {"name": "mine", "write": lambda result_json_path, out_dir: []}
    members.update(changes)
    return _Obj(**{k: v for k, v in members.items() if v is not _MISSING})


_MISSING = object()
BUILD = {"adapters": _adapter, "loaders": _loader, "extractors": _extractor, "report_writers": _writer}

REFUSED = [
    ("adapters", {"detect": _MISSING}, "missing detect"),
    ("adapters", {"train": _MISSING, "load": _MISSING}, "missing train, load"),
    ("adapters", {"script_args": "--data"}, "script_args is not callable"),
    ("adapters", {"load": lambda pipeline: pipeline},
     "load cannot be called as load(base_pipeline, artifact): too many positional arguments"),
    ("adapters", {"script_kinds": "train_dreambooth"}, "script_kinds must be a tuple of non-empty strings, got 'train_dreambooth'"),
    ("adapters", {"load_replaces_components": "yes"}, "load_replaces_components must be True or False, got 'yes'"),
    ("adapters", {"default_learning_rate": 0}, "default_learning_rate must be None or a positive number, got 0"),
    ("adapters", {"check_options": {"rank": 4}}, "check_options is not callable"),
    ("loaders", {"sniff": _MISSING}, "missing sniff"),
    ("loaders", {"load": None}, "missing load"),
    ("loaders", {"sniff": lambda: True}, "sniff cannot be called as sniff(path): too many positional arguments"),
    ("loaders", {"load": lambda path, base, device: base},
     "load cannot be called as load(path, base): missing a required argument: 'device'"),
    ("extractors", {"extract": _MISSING}, "missing extract"),
    ("extractors", {"extract": lambda pipeline, prompts, n, references=None: None},
     "extract cannot be called as extract(pipeline, prompts, n_per_prompt, references, guidance_scale=..., "
     "num_inference_steps=..., seed=..., grid_path=...): got an unexpected keyword argument 'guidance_scale'"),
    ("report_writers", {"write": _MISSING}, "missing write"),
    ("report_writers", {"write": "report.html"}, "write is not callable"),
    ("report_writers", {"write": lambda result_json_path: []},
     "write cannot be called as write(result_json_path, out_dir): too many positional arguments"),
]


@pytest.mark.parametrize(("registry", "changes", "rule"), REFUSED, ids=[f"{r}-{rule.split(':')[0]}" for r, _, rule in REFUSED])
def test_registration_refuses_what_breaks_the_contract_in_one_line_naming_the_plugin(registry, changes, rule):
    spec = REGISTRIES[registry]
    obj = BUILD[registry](**changes)

    class Plugin:
        pass

    def register_all(register):
        register(obj)

    setattr(Plugin, spec.hook, staticmethod(hookimpl(register_all)))
    plugin = Plugin()
    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[plugin])
    with pytest.raises(PluginError) as info:
        collect(registry, pm)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"plugin {pm.get_name(plugin)!r}, hook {spec.hook}: ")
    assert message.endswith(f"registered <obj> is not a {spec.kind} ({rule})")


@pytest.mark.parametrize("registry", sorted(BUILD))
def test_registration_accepts_an_object_with_only_the_required_members(registry):
    spec = REGISTRIES[registry]
    obj = BUILD[registry]()
    assert PROBLEM[registry](obj) is None

    class Plugin:
        pass

    def register_all(register):
        register(obj)

    setattr(Plugin, spec.hook, staticmethod(hookimpl(register_all)))
    assert collect(registry, make_plugin_manager(load_entry_points=False, extra_plugins=[Plugin()]))["mine"] is obj


@pytest.mark.parametrize("registry", sorted(BUILD))
def test_a_name_that_is_not_a_string_is_refused(registry):
    assert PROBLEM[registry](BUILD[registry](name=7)) == "name must be a non-empty string, got 7"


def test_the_adapter_unit_tests_cover_every_registered_adapter():
    """The two adapter test modules each train their own list of methods; together they must cover the registry."""
    import importlib.util
    from pathlib import Path

    from s2l_plugin.hooks.manager import collect, make_plugin_manager

    lists = []
    for name in ("test_adapters_dreambooth_lora", "test_adapters_ti_hypernetwork"):
        spec = importlib.util.spec_from_file_location(f"_cover_{name}", Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        lists += list(module.METHODS)
    assert sorted(lists) == sorted(collect("adapters", make_plugin_manager(load_entry_points=False)))
