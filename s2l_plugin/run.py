"""``s2l run``: a whole S2L experiment, as resumable stages that fire the same hooks as ``s2l launch``.

For each domain: generate the synthetic private set with the base model → audit the base →
for each method: fine-tune on the set, audit the fine-tuned model with the same images, noise
and prompts → one RunResult with the paired before/after comparisons → the report.
``[data] private_set`` replaces the generated set by a folder of images (a real-data control);
``[data] extra_nonmembers`` adds images to every audit's non-members.

Stages are recorded in ``<out>/stages.json`` (see :mod:`s2l_plugin.stages`); a rerun skips every
stage whose inputs did not change.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

from s2l_plugin.config import library_versions, to_json_dict
from s2l_plugin.context import AuditSpec, Run
from s2l_plugin.data import ImageRecord
from s2l_plugin.errors import ConfigError
from s2l_plugin.progress import SEPARATOR, stage
from s2l_plugin.runconfig import RunConfig
from s2l_plugin.stages import StageStore

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DomainData:
    """The audit data of one domain: member / non-member records, member groups and prompts."""

    name: str
    prompt: str
    members: list[ImageRecord]
    nonmembers: list[ImageRecord]
    member_groups: dict[str, list[int]]


def _testbed_data(base: str, domains: list[str]) -> tuple[str, list[DomainData]]:
    from s2l_plugin.testbed import Testbed

    tb = Testbed.load(None if base == "testbed" else Path(base))
    known = [d.name for d in tb.domains]
    out = []
    for name in domains:
        if name not in known:
            raise ConfigError(f"domain {name!r} is not a testbed domain; expected one of: {', '.join(known)}")
        domain = tb.domain(name)
        members = tb.members(name)
        nonmembers = tb.nonmembers(name)
        groups = {
            "duplicated": [i for i, s in enumerate(members) if s.role == "duplicated"],
            "non-duplicated": [i for i, s in enumerate(members) if s.role != "duplicated"],
        }
        out.append(
            DomainData(
                name=name,
                prompt=domain.prompt,
                members=[ImageRecord(s.path, s.caption) for s in members],
                nonmembers=[ImageRecord(s.path, s.caption) for s in nonmembers],
                member_groups={k: v for k, v in groups.items() if v},
            )
        )
    return str(tb.pipeline_dir), out


def _folder_data(config: RunConfig) -> list[DomainData]:
    from s2l_plugin.data import list_image_folder

    (domain,) = config.domains
    members = list_image_folder(config.data.members, caption=domain)
    nonmembers = list_image_folder(config.data.nonmembers, caption=domain)
    return [DomainData(domain, domain, members, nonmembers, {})]


def _rebase_grid(audit: Any, result_dir: Path, out: Path) -> None:
    """Make an audit's extraction grid path relative to the combined result's folder ``out``."""
    import os

    if audit.extraction is not None and audit.extraction.grid_png:
        audit.extraction.grid_png = os.path.relpath(Path(result_dir) / audit.extraction.grid_png, out)


def _records_key(records: list[ImageRecord]) -> list[list[str]]:
    return [[str(r.path), r.caption or ""] for r in records]


def _content_key(records: list[ImageRecord]) -> list[list[str]]:
    """File name, caption and a hash of the bytes of each image: the key of a given private set."""
    import hashlib

    return [[Path(r.path).name, r.caption or "", hashlib.sha256(Path(r.path).read_bytes()).hexdigest()[:16]] for r in records]


def run_experiment(config: RunConfig, *, pm: Any = None) -> Path:
    """Run (or resume) the experiment in ``config.out``; returns the path of the saved result.json."""
    from s2l_plugin.adapters.base import TrainConfig, check_adapter_family, check_adapter_options
    from s2l_plugin.flow import assemble_result, publish
    from s2l_plugin.hooks.manager import get, get_plugin_manager
    from s2l_plugin.integration import load_run_base
    from s2l_plugin.pipeline import model_family
    from s2l_plugin.result import load_result, save_result

    pm = pm or get_plugin_manager()
    # Validate every method name and its options before any work starts.
    adapters = {m: get("adapters", m, pm) for m in config.methods}
    train_configs = {}
    family = model_family(None if config.uses_testbed else config.base)
    for method, adapter in adapters.items():
        fields = config.train_for(method)
        options = {k: fields.pop(k) for k in list(fields) if k not in {f.name for f in dataclasses.fields(TrainConfig)}}
        check_adapter_options(adapter, options)  # keys and values (rank > 0, ...), for every method, before any stage
        check_adapter_family(adapter, options, family)  # a method that cannot train on this base fails now too
        train_configs[method] = (fields, options)
    for name in config.audit.attacks:
        get("attacks", name, pm)

    if config.uses_testbed:
        base_model, domains = _testbed_data(config.base, config.domains)
    else:
        if Path(config.base).is_file():  # a single-file base: its config folder is checked before any work
            from s2l_plugin.pipeline import check_single_file

            check_single_file(config.base, config.base_config, allow_pickle=config.allow_pickle)
        base_model, domains = config.base, _folder_data(config)

    out = Path(config.out)
    store = StageStore(out)
    all_audits = []
    all_comparisons = []
    for dd in domains:
        ddir = out / dd.name
        extra = config.data.folder("extra_nonmembers", dd.name)
        if extra is not None:
            from s2l_plugin.data import list_image_folder

            dd.nonmembers = [*dd.nonmembers, *list_image_folder(extra, caption=dd.prompt)]
        references = [*dd.members, *dd.nonmembers] if config.audit.extraction_references == "all" else None
        spec = AuditSpec(
            members=dd.members,
            nonmembers=dd.nonmembers,
            member_groups=dd.member_groups,
            attacks=list(config.audit.attacks),
            prompts=[dd.prompt],
            extraction=config.audit.extraction,
            extraction_guidance=config.audit.extraction_guidance,
            extraction_steps=config.audit.extraction_steps,
            memorization=config.audit.memorization,
            seed=config.seed,
            references=references,
            latent=config.audit.latent,
        )
        spec_key = to_json_dict(dataclasses.replace(spec, members=None, nonmembers=None, references=None), stamp=False)
        # Keys of runs at the defaults stay what they were before these options existed (resumable).
        if spec.latent == "mean":
            spec_key.pop("latent", None)
        if references is not None:
            spec_key["references"] = "members+nonmembers"
        audit_inputs = {
            "base": base_model,
            "spec": {**spec_key, "members": _records_key(dd.members), "nonmembers": _records_key(dd.nonmembers)},
        }
        generate_options = {
            "domain": dd.name,
            "templates": config.generate.templates or [dd.prompt],
            "template_weights": None,
            "num_images": config.generate.num_images,
            "guidance_scale": config.generate.guidance_scale,
            "num_inference_steps": config.generate.num_inference_steps,
            "batch_size": config.generate.batch_size,
            "scheduler": config.generate.scheduler,
            "negative_prompt": config.generate.negative_prompt or None,
            "seed": config.seed,
            "layout": "imagefolder",
        }
        base_run = Run(
            base_model=base_model, domain=dd.name, prompt=dd.prompt, output_dir=ddir,
            data_dir=ddir / "private_set", options={"generate": generate_options, "kind": "run", "report": [], "allow_pickle": config.allow_pickle,
                     "base_config": config.base_config},
            audit=spec, pm=pm,
        )

        def generate(run: Run = base_run) -> dict[str, Any]:
            generated = pm.hook.s2l_generate_private_set(run=run, pipeline=load_run_base(run))
            return {"image_dir": str(generated.image_dir), "count": generated.count, "prompt": generated.prompt}

        given = config.data.folder("private_set", dd.name)
        if given is not None:  # a given set (e.g. real images): nothing to generate, its content keys training
            from s2l_plugin.data import list_image_folder
            from s2l_plugin.stages import stage_key

            given_records = list_image_folder(given, caption=dd.prompt)
            gen_key = stage_key({"private_set": _content_key(given_records)})
            gen_out = {"image_dir": str(given), "count": len(given_records), "prompt": dd.prompt}
        else:
            with stage(f"{dd.name}{SEPARATOR}base"):  # its progress bars read "seven · base · …"
                gen_key, gen_out = store.run(f"{dd.name}/generate", {"base": base_model, "generate": generate_options}, generate)

        def audit_base(run: Run = base_run) -> dict[str, Any]:
            from s2l_plugin.result import RunResult as _RR

            audit_dir = Path(run.output_dir) / "audit-base"
            state = {"label": "base", "out_dir": str(audit_dir)}
            result = pm.hook.s2l_audit(run=dataclasses.replace(run, state=state), target=load_run_base(run), reference=None)
            path = save_result(_RR(kind="audit", audits=[result], versions=library_versions()), audit_dir)
            return {"result": str(path)}

        with stage(f"{dd.name}{SEPARATOR}base"):
            base_key, base_out = store.run(f"{dd.name}/audit-base", audit_inputs, audit_base)
        base_audit = load_result(base_out["result"]).audits[0]
        shown_base = copy.deepcopy(base_audit)  # the per-method results keep base_audit as saved
        _rebase_grid(shown_base, Path(base_out["result"]).parent, out)
        shown_base.model.label = f"base/{dd.name}" if len(domains) > 1 else "base"
        all_audits.append(shown_base)

        for method, adapter in adapters.items():
            fields, options = train_configs[method]
            prompt = gen_out.get("prompt") or dd.prompt
            mdir = ddir / method.replace("+", "_")
            run = dataclasses.replace(
                base_run, adapter=method, output_dir=mdir, data_dir=Path(gen_out["image_dir"]),
                options={**base_run.options, "report_dir": str(mdir / "audit")},
                state={"private_set": gen_out, "base_audit": base_audit},
            )

            def train(run: Run = run, adapter: Any = adapter, fields: dict = fields, options: dict = options,
                      prompt: str = prompt, mdir: Path = mdir) -> dict[str, Any]:
                pm.hook.s2l_before_training(run=run)
                tc = TrainConfig(**{"prompt": prompt, "seed": config.seed, **fields, "options": options})
                artifact = adapter.train(load_run_base(run), Path(run.data_dir), tc, mdir / "artifact")
                return {"artifact": artifact.to_dict()}

            with stage(f"{dd.name}{SEPARATOR}{method}"):
                train_key, train_out = store.run(
                    f"{dd.name}/train/{method}", {"generate": gen_key, "method": method, "train": [fields, options], "prompt": prompt}, train
                )

            def audit_method(run: Run = run, train_out: dict = train_out) -> dict[str, Any]:
                from s2l_plugin.adapters.base import Artifact

                artifact = Artifact.from_dict(train_out["artifact"])
                pm.hook.s2l_after_training(run=run, artifact=artifact)
                return {"result": str(run.state["result_path"])}

            with stage(f"{dd.name}{SEPARATOR}{method}"):
                _, audit_out = store.run(f"{dd.name}/audit/{method}", {"train": train_key, "base": base_key}, audit_method)
            result = load_result(audit_out["result"])
            after = result.audits[-1]
            _rebase_grid(after, Path(audit_out["result"]).parent, out)
            after.model.label = f"{method}/{dd.name}" if len(domains) > 1 else method
            all_audits.append(after)
            # The paired comparisons the method's audit computed (base_audit vs this method, the domain's
            # member groups, the run's seed): computed once, in integration.audit_pair.
            all_comparisons.extend(result.comparisons)

    result = assemble_result("run", all_audits, comparisons=all_comparisons, config=to_json_dict(config, stamp=False),
                             seeds={"run": config.seed})
    return publish(result, out, pm, fail_on=config.gate.fail_on or None)  # the gate: every method's audit
