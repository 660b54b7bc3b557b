"""The event hooks, each exercised through the code path that fires it."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import pytest
from s2l_plugin.hooks import hookimpl
from s2l_plugin.hooks.manager import make_plugin_manager

from s2l_plugin.context import AuditSpec, Run
from s2l_plugin.data import ImageRecord
from s2l_plugin.integration import add_arguments, after_training, before_training


def _records(testbed, role: str, n: int = 6) -> list[ImageRecord]:
    samples = testbed.members("seven") if role == "members" else testbed.nonmembers("seven")
    return [ImageRecord(s.path, s.caption) for s in samples[:n]]


def _audit_run(testbed, pm) -> Run:
    spec = AuditSpec(members=_records(testbed, "members"), nonmembers=_records(testbed, "nonmembers"),
                     attacks=["loss"], extraction=0, memorization=False)
    return Run(base_model=str(testbed.pipeline_dir), audit=spec, pm=pm, state={"label": "base"})


def test_hook_s2l_audit_default_and_wrapper_that_times_and_vetoes(test_testbed):
    from s2l_plugin.pipeline import load_pipeline

    class Timer:
        @hookimpl(wrapper=True)
        def s2l_audit(self, run, target, reference):
            start = time.perf_counter()
            result = yield
            run.state["audit_seconds"] = time.perf_counter() - start
            return result

    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[Timer()])
    run = _audit_run(test_testbed, pm)
    result = pm.hook.s2l_audit(run=run, target=load_pipeline(test_testbed.pipeline_dir), reference=None)
    assert result.model.label == "base"
    assert result.membership.attack("loss").member_ids and len(result.membership.attack("loss").member_scores) == 6
    assert run.state["audit_seconds"] > 0

    class Veto:
        @hookimpl(wrapper=True)
        def s2l_audit(self, run, target, reference):
            raise PermissionError("audits of this model are not allowed")
            yield  # pragma: no cover

    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[Veto()])
    with pytest.raises(PermissionError, match="not allowed"):
        pm.hook.s2l_audit(run=_audit_run(test_testbed, pm), target=None, reference=None)


def test_hook_s2l_audit_first_result_replaces_the_default(test_testbed):
    from s2l_plugin.result import AuditResult, ModelIdentity

    class Mine:
        @hookimpl
        def s2l_audit(self, run, target, reference):
            return AuditResult(model=ModelIdentity(label="mine"))

    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[Mine()])
    assert pm.hook.s2l_audit(run=_audit_run(test_testbed, pm), target=None, reference=None).model.label == "mine"


def test_hook_s2l_generate_private_set_plugin_replaces_generation(tmp_path, test_testbed):
    from s2l_plugin.generate import GeneratedSet

    own = tmp_path / "my-set"
    own.mkdir()
    for s in test_testbed.members("seven")[:3]:
        shutil.copy(s.path, own / s.path.name)

    class MySet:
        calls = 0

        @hookimpl
        def s2l_generate_private_set(self, run, pipeline):
            MySet.calls += 1
            return GeneratedSet(out_dir=tmp_path, image_dir=own, manifest_path=tmp_path / "m.json",
                                layout="dreambooth", records=[])

    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[MySet()])
    parser = add_arguments(argparse.ArgumentParser(), pm=pm)
    for name in ("pretrained_model_name_or_path", "instance_data_dir", "instance_prompt", "output_dir"):
        parser.add_argument(f"--{name}")
    args = parser.parse_args(["--pretrained_model_name_or_path", str(test_testbed.pipeline_dir), "--output_dir",
                              str(tmp_path / "out"), "--instance_data_dir", "x", "--s2l-domain", "seven"])
    before_training(args, adapter="dreambooth", pm=pm)
    assert MySet.calls == 1
    assert args.instance_data_dir == str(own)
    assert args.instance_prompt == "photo of seven"  # no prompt shared by the set: the reference template
    assert not (tmp_path / "out" / "s2l-private-set").exists()  # the built-in generator did not run


def test_hook_s2l_after_training_audits_an_unchanged_model_as_no_change(tmp_path, test_testbed):
    """A "fine-tune" that changed nothing must show ΔAUC = 0 exactly: same images, same noise."""
    seen = []

    class Spy:
        @hookimpl
        def s2l_after_training(self, run, artifact):
            seen.append((artifact.method, Path(artifact.path)))

    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[Spy()])
    out = tmp_path / "out"
    shutil.copytree(test_testbed.pipeline_dir, out)  # what train_dreambooth.py leaves: a pipeline folder
    parser = add_arguments(argparse.ArgumentParser(), pm=pm)
    parser.add_argument("--pretrained_model_name_or_path")
    parser.add_argument("--output_dir")
    members, nonmembers = test_testbed.path / "members" / "seven", test_testbed.path / "nonmembers" / "seven"
    args = parser.parse_args(["--pretrained_model_name_or_path", str(test_testbed.pipeline_dir), "--output_dir", str(out),
                              "--s2l-audit", f"members={members},nonmembers={nonmembers}", "--s2l-attacks", "loss",
                              "--s2l-report", "json"])
    result = after_training(args, pm=pm)
    assert seen == [("dreambooth", out)]
    (comparison,) = [c for c in result.comparisons if c.subset == "all"]
    assert comparison.delta_auc == 0.0 and comparison.delta_auc_ci == [0.0, 0.0]
    assert (out / "s2l-report" / "result.json").is_file()


def test_dreambooth_audit_loads_the_base_once_and_keeps_it_apart_from_the_target(tmp_path, test_testbed, monkeypatch):
    """A full fine-tune's load swaps whole components, so its target starts from the base's own
    pipeline (no second read of the base weights) and the reference keeps the base modules."""
    import s2l_plugin.pipeline as pipeline_module

    loads = []
    real_load = pipeline_module.load_pipeline
    monkeypatch.setattr(pipeline_module, "load_pipeline", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    pipes = []

    class Spy:
        @hookimpl(hookwrapper=True)
        def s2l_audit(self, run, target, reference):
            pipes.append((target, reference))
            yield

    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[Spy()])
    out = tmp_path / "out"
    shutil.copytree(test_testbed.pipeline_dir, out)
    parser = add_arguments(argparse.ArgumentParser(), pm=pm)
    parser.add_argument("--pretrained_model_name_or_path")
    parser.add_argument("--output_dir")
    members, nonmembers = test_testbed.path / "members" / "seven", test_testbed.path / "nonmembers" / "seven"
    args = parser.parse_args(["--pretrained_model_name_or_path", str(test_testbed.pipeline_dir), "--output_dir", str(out),
                              "--s2l-audit", f"members={members},nonmembers={nonmembers}", "--s2l-attacks", "loss",
                              "--s2l-report", "json"])
    after_training(args, pm=pm)
    assert len(loads) == 1
    (base, none), (target, reference) = pipes
    assert none is None and reference is base and target is not base
    for name in ("unet", "text_encoder", "vae"):  # the artifact's own modules, the base's untouched
        assert getattr(target, name) is not getattr(base, name)


def test_hook_register_extractors_a_plugin_extractor_serves_the_audit():
    from s2l_plugin.hooks.manager import collect

    from s2l_plugin.audit.api import audit_model
    from s2l_plugin.result import ExtractionResult, ModelIdentity

    calls = []

    class Fixed:
        name = "fixed"

        def extract(self, pipeline, prompts, n, references=None, **options):
            calls.append((list(prompts), n, options["guidance_scale"]))
            return ExtractionResult(prompts=list(prompts), n_per_prompt=n, n_generations=n * len(prompts), delta=0.1,
                                    tile=4, clique_k=3, base_seed=0, candidates=[], matches=[],
                                    extracted_unique={p: 0 for p in prompts}, extracted_total=0, extraction_rate=0.0)

    class Plugin:
        @hookimpl
        def register_extractors(self, register):
            register(Fixed())

    pm = make_plugin_manager(load_entry_points=False, extra_plugins=[Plugin()])
    assert {"carlini", "fixed"} <= set(collect("extractors", pm))
    spec = AuditSpec(extraction=3, extractor="fixed", extraction_guidance=2.0, memorization=False)
    result = audit_model(None, spec, identity=ModelIdentity(label="x"), prompts=["a photo of the digit one"], pm=pm)
    assert calls == [(["a photo of the digit one"], 3, 2.0)]
    assert result.extraction.n_generations == 3
    with pytest.raises(Exception, match="unknown extractor 'nope'"):
        audit_model(None, AuditSpec(extraction=3, extractor="nope", memorization=False), identity=ModelIdentity(label="x"),
                    prompts=["p"], pm=pm)
