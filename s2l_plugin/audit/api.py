"""Auditing one model, and auditing a checkpoint someone else trained (``s2l audit``).

- :func:`audit_model` runs what an :class:`~s2l_plugin.context.AuditSpec` asks on one pipeline:
  membership inference (when member and non-member sets are given), extraction (when
  ``spec.extraction`` > 0) and the data-free memorization score, plus the metadata findings.
- The default ``s2l_audit`` hook implementation (``trylast``, so a plugin may answer first or
  wrap it) calls :func:`audit_model` with ``run.audit``; the model's label is ``run.state["label"]``.
- :func:`audit_checkpoint` is ``s2l audit`` as a function: scan the file's metadata, load it onto
  the base (format by content, :mod:`s2l_plugin.formats.loaders`), audit base and target on the
  same data and noise, compare, optionally *shake* the target (S2L: generate from it, fine-tune
  briefly, audit again), then write ``result.json`` and the reports.

Every bad input fails before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from s2l_plugin.context import AuditSpec, Run
from s2l_plugin.defaults import EXTRACTION_GUIDANCE_SCALE, EXTRACTION_NUM_INFERENCE_STEPS
from s2l_plugin.errors import ConfigError, FormatError
from s2l_plugin.hooks import hookimpl

#: what the report calls a target of each detected format kind
KIND_LABELS = {
    "diffusers_lora": "lora",
    "kohya_lora": "lora",
    "peft_folders": "lora",
    "textual_inversion": "textual_inversion",
    "hypernetwork": "hypernetwork",
    "diffusers_pipeline": "model",
    "single_file_checkpoint": "model",
}
#: which format kinds each ``s2l audit`` target flag accepts
FLAG_KINDS = {
    "lora": ("diffusers_lora", "kohya_lora", "peft_folders"),
    "embedding": ("textual_inversion",),
    "hypernetwork": ("hypernetwork",),
    "model": ("diffusers_pipeline", "single_file_checkpoint"),
}


def audit_model(
    pipeline: Any,
    spec: AuditSpec,
    *,
    identity: Any,
    reference: Any = None,
    findings: Sequence[Any] = (),
    prompts: Sequence[str] = (),
    grid_dir: str | Path | None = None,
    pm: Any = None,
) -> Any:
    """Audit ``pipeline`` as ``spec`` asks; returns an AuditResult (nothing written except an extraction grid in ``grid_dir``).

    ``reference`` (the pre-fine-tune base) enables reference-calibrated attacks; without it
    attacks that need one are left out. ``prompts`` are used when ``spec.prompts`` is empty.
    """
    from s2l_plugin.result import AuditResult

    result = AuditResult(model=identity, findings=list(findings))
    prompts = list(spec.prompts or prompts)
    if spec.members is not None and spec.nonmembers is not None:
        from s2l_plugin.audit.mia import audit_membership
        from s2l_plugin.hooks.manager import collect

        attacks = list(spec.attacks)
        if reference is None:
            registry = collect("attacks", pm)
            attacks = [a for a in attacks if not getattr(registry.get(a), "needs_reference", False)]
        result.membership = audit_membership(
            pipeline, spec.members, spec.nonmembers, attacks, reference=reference, seed=spec.seed,
            member_groups=spec.member_groups or None, pm=pm, latent=spec.latent,
        )
    elif (spec.members is None) != (spec.nonmembers is None):
        raise ConfigError("membership inference needs both members and non-members; expected both folders or neither")
    if spec.extraction:
        if not prompts:
            raise ConfigError("extraction needs prompts; expected --prompts FILE or --domain NAME")
        from s2l_plugin.hooks.manager import get

        extractor = get("extractors", spec.extractor, pm)
        references = spec.references if spec.references is not None else spec.members
        grid = None
        if grid_dir is not None and references is not None:
            grid = Path(grid_dir) / f"extraction-{identity.label.replace('/', '_')}.png"
        result.extraction = extractor.extract(
            pipeline, prompts, spec.extraction, references, guidance_scale=spec.extraction_guidance,
            num_inference_steps=spec.extraction_steps, seed=spec.seed, grid_path=grid,
        )
    if spec.memorization and prompts:
        from s2l_plugin.audit.memorization import memorization_scores

        result.memorization = memorization_scores(pipeline, prompts, seed=spec.seed)
    return result


def _identity(run: Run) -> Any:
    from s2l_plugin.result import ModelIdentity

    label = run.state.get("label") or run.adapter or "target"
    return ModelIdentity(
        label=label,
        path=run.state.get("model_path") or (run.base_model if label == "base" else None),
        method=None if label == "base" else run.state.get("method", run.adapter),
        sha256=run.state.get("model_sha256"),
    )


@hookimpl(trylast=True)
def s2l_audit(run: Run, target: Any, reference: Any) -> Any:
    """Default audit: :func:`audit_model` with ``run.audit`` (an empty AuditSpec when unset).

    Reads ``run.state``: ``label`` (default the adapter name), ``findings`` (metadata findings
    already computed) or ``target_path`` (a checkpoint to scan), ``out_dir`` (extraction grids).
    """
    spec = run.audit or AuditSpec()
    findings = run.state.get("findings")
    if findings is None and run.state.get("target_path") and run.state.get("label") != "base":
        from s2l_plugin.audit.metadata import scan_file
        from s2l_plugin.result import MetadataFinding

        try:
            findings = scan_file(run.state["target_path"], allow_pickle=bool(run.options.get("allow_pickle", False)))
        except FormatError as exc:
            # The artifact loaded (a plugin method's own format, say) but the metadata scan cannot read the
            # file: the membership and extraction audit go on, and the result says what was not scanned.
            findings = [MetadataFinding(key="(metadata)", severity="info", message=f"not scanned: {exc}",
                                        value=str(run.state["target_path"]))]
    # run.prompt may be the generation template (`s2l launch --s2l-prompt "photo of {domain}"`):
    # audit the prompt the synthetic set was generated with, not the literal template.
    prompts = [run.prompt.replace("{domain}", run.domain or "")] if run.prompt else []
    return audit_model(
        target, spec, identity=_identity(run), reference=reference, findings=findings or [], prompts=prompts,
        grid_dir=run.state.get("out_dir"), pm=run.pm,
    )


# -- auditing a checkpoint ---------------------------------------------------------------------------


def merge_lora_adapters(pipe: Any) -> Any:
    """Fold every injected peft LoRA layer of ``pipe`` into its base weight (in place), leaving plain layers.

    Used before shaking a LoRA target, so the next fine-tune starts from the target's weights
    instead of stacking a second adapter over the first.
    """
    from peft.tuners.lora import LoraLayer

    for component in ("unet", "transformer", "text_encoder", "vae"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in list(model.named_modules()):
            if isinstance(module, LoraLayer) and name:
                module.merge()
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, module.get_base_layer())
    return pipe


def resolve_prompts(prompts: Sequence[str] | str | Path | None, domain: str | None, base_dir: Path | None) -> list[str]:
    """Audit prompts: a list, a file with one prompt per line, or the ``domain``'s prompt.

    For a testbed base the domain's own prompt is used (``"seven"`` → its caption); otherwise
    the S2L reference prompt ``"photo of <domain>"``.
    """
    if prompts is not None and not isinstance(prompts, (str, Path)):
        out = [str(p) for p in prompts if str(p).strip()]
    elif prompts is not None:
        path = Path(prompts)
        if not path.is_file():
            raise ConfigError(f"prompts file {str(path)!r} does not exist; expected a text file with one prompt per line")
        out = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not out:
            raise ConfigError(f"prompts file {str(path)!r} holds no prompt; expected one prompt per line")
    elif domain:
        testbed_root = base_dir.parent if base_dir is not None else None
        if testbed_root is not None and (testbed_root / "manifest.json").is_file():
            from s2l_plugin.testbed.layout import Testbed

            out = [Testbed.load(testbed_root).domain(domain).prompt]
        else:
            out = [f"photo of {domain}"]
    else:
        out = []
    return out


def _shake(
    target_pipe: Any, *, method: str, domain: str | None, prompts: list[str], out_dir: Path, seed: int,
    num_images: int, steps: int, pm: Any,
) -> tuple[Any, Any]:
    """S2L on the target: generate a synthetic set from it for the domain, fine-tune with ``method``, load the result."""
    from s2l_plugin.adapters.base import TrainConfig
    from s2l_plugin.hooks.manager import get

    adapter = get("adapters", method, pm)
    if not domain and not prompts:
        raise ConfigError("--shake needs the target domain; expected --domain NAME or --prompts FILE")
    shaken = merge_lora_adapters(copy.deepcopy(target_pipe))
    run = Run(
        domain=domain or prompts[0], prompt=prompts[0] if prompts else None, adapter=method,
        output_dir=out_dir, data_dir=out_dir / "private_set",
        options={"generate": {"num_images": num_images, "seed": seed, "layout": "imagefolder", "progress": True}}, pm=pm,
    )
    generated = pm.hook.s2l_generate_private_set(run=run, pipeline=shaken)
    if generated is None:
        raise ConfigError("no plugin generated the synthetic private set for --shake")
    config = TrainConfig(prompt=generated.prompt or (prompts[0] if prompts else f"photo of {domain}"),
                         max_train_steps=steps, seed=seed, train_batch_size=min(8, max(1, num_images)))
    artifact = adapter.train(shaken, Path(generated.image_dir), config, out_dir / "artifact")
    loaded = adapter.load(merge_lora_adapters(copy.deepcopy(target_pipe)), artifact)
    return loaded, artifact


def audit_checkpoint(
    target: str | Path,
    *,
    base: Any = None,
    base_config: str | Path | None = None,
    expect: str | None = None,
    members: Any = None,
    nonmembers: Any = None,
    member_groups: dict[str, list[int]] | None = None,
    prompts: Sequence[str] | str | Path | None = None,
    domain: str | None = None,
    attacks: Sequence[str] | None = None,
    extraction: int = 0,
    extraction_steps: int = EXTRACTION_NUM_INFERENCE_STEPS,
    extraction_guidance: float = EXTRACTION_GUIDANCE_SCALE,
    memorization: bool = True,
    allow_pickle: bool = False,
    out_dir: str | Path | None = None,
    shake: str | None = None,
    shake_images: int = 16,
    shake_steps: int = 20,
    seed: int = 0,
    write_reports: bool = True,
    fail_on: str | None = None,
    query: Any = None,
    query_attack: str | None = None,
    pm: Any = None,
) -> Any:
    """Audit checkpoint ``target`` against ``base`` and return the RunResult (``kind="audit"``).

    - ``target``: a LoRA (diffusers / kohya / PEFT folders), an embedding, a hypernetwork, a
      pipeline folder or a single-file checkpoint; the format comes from the content. ``expect``
      (``"lora"``, ``"embedding"``, ``"hypernetwork"``, ``"model"``) makes any other format an error.
    - ``base``: a diffusers folder, a pipeline, a single-file checkpoint (with ``base_config``, a
      diffusers folder of the same family whose configs it is converted with), or None = the shipped
      testbed. It is audited too, as the reference (audits[0] is ``base``, audits[1] the target).
    - ``members`` / ``nonmembers``: image folders or ImageRecord lists (both or neither) for MIA;
      ``prompts`` / ``domain``: for extraction (``extraction`` generations per prompt) and the
      memorization score; ``attacks``: MIA attack names (default the AuditSpec's).
    - ``shake``: an adapter name: S2L-fine-tune the target on its own generations for the domain
      and audit the result too (audits[2], label ``<label>+s2l``), with comparisons target → shaken.
    - ``query``: an image, a folder or a list of candidate images: each gets a score and a p-value against
      ``nonmembers`` (the null: images known not to be in the training set; ``members`` then optional),
      and the set one dataset-level test (``result.query``, :mod:`s2l_plugin.audit.query`);
      ``query_attack`` its statistic (default ``reference``: the loss calibrated by the base).
    - ``out_dir``: where ``result.json`` and the reports go (nothing is written when None).
    - ``fail_on``: a privacy-gate expression (:mod:`s2l_plugin.gate`; needs ``out_dir``): checked first,
      ``verdict.json`` written beside the result, :class:`~s2l_plugin.gate.GateFailed` raised when it trips.

    A malformed, unsafe or incompatible checkpoint is a FormatError raised before anything is
    written; a pickle needs ``allow_pickle`` (then it is read weights-only).
    """
    from s2l_plugin.audit.metadata import scan_detected
    from s2l_plugin.flow import assemble_result, audit_pair, publish
    from s2l_plugin.formats.detect import detect, file_sha256, loaded_parts
    from s2l_plugin.formats.loaders import load_base, load_target
    from s2l_plugin.hooks.manager import get_plugin_manager
    from s2l_plugin.result import ModelIdentity

    if fail_on is not None:
        from s2l_plugin.gate import parse

        parse(fail_on)  # a bad expression fails before anything is read
        if out_dir is None:
            raise ConfigError("--fail-on writes verdict.json beside result.json; expected --out DIR")
    pm = pm or get_plugin_manager()
    target = Path(target)
    found = detect(target, allow_pickle=allow_pickle)  # malformed / refused input: nothing done yet
    if expect is not None:
        if expect not in FLAG_KINDS:
            raise ConfigError(f"expect={expect!r} is not valid; expected one of: {', '.join(FLAG_KINDS)}")
        # A pivotal (TI+LoRA) folder is both: --lora and --embedding accept it, and load all of it.
        if not any(part.kind in FLAG_KINDS[expect] for part in [found, *found.parts]):
            raise FormatError(f"--{expect} {str(target)!r} is a {found.kind} checkpoint; expected {' or '.join(FLAG_KINDS[expect])}")
    if shake is not None:
        from s2l_plugin.adapters.base import check_adapter_family
        from s2l_plugin.hooks.manager import get
        from s2l_plugin.pipeline import model_family

        # An unknown method, or one that cannot train on this base's family, fails before any work.
        check_adapter_family(get("adapters", shake, pm), {}, model_family(base))
    if extraction < 0:
        raise ConfigError(f"extraction={extraction!r} is not valid; expected generations per prompt >= 0")
    if query is not None and nonmembers is None:
        raise ConfigError("--query needs a null of images known not to be in the training set; expected --nonmembers DIR")
    if attacks is not None or query_attack is not None:
        from s2l_plugin.hooks.manager import get

        for name in [*(attacks or []), *([query_attack] if query_attack else [])]:  # an unknown name fails before any model is loaded
            get("attacks", name, pm)
    findings = scan_detected(found)
    base_pipe, base_dir = load_base(base, allow_pickle=allow_pickle, config=base_config)
    target_pipe, found = load_target(target, base_pipe, allow_pickle=allow_pickle, pm=pm, detected=found)
    found.extra.pop("object", None)  # a pickled checkpoint's tensors are in the target now; free the copy
    prompt_list = resolve_prompts(prompts, domain, base_dir)

    spec = AuditSpec(members=members, nonmembers=nonmembers if query is None or members is not None else None, member_groups=dict(member_groups or {}),
                     prompts=prompt_list, extraction=int(extraction), extraction_guidance=extraction_guidance,
                     extraction_steps=extraction_steps, memorization=memorization, seed=seed)
    if attacks is not None:
        spec.attacks = list(attacks)
    label = KIND_LABELS.get(found.kind, found.kind)
    out = Path(out_dir) if out_dir is not None else None
    warnings: list[str] = []
    base_file = isinstance(base, (str, Path)) and Path(base).is_file()  # a single-file base is named, not its config folder
    common = {"base_model": str(base) if base_file else str(base_dir) if base_dir else None, "domain": domain, "audit": spec, "pm": pm,
              "options": {"allow_pickle": allow_pickle, **({"query_attack": query_attack} if query_attack else {})}}
    base_state = {"label": "base", "model_path": common["base_model"], "warnings": warnings,
                  "out_dir": str(out) if out else None}
    target_state = {"label": label, "method": found.kind, "model_path": str(target), "findings": findings,
                    "model_sha256": file_sha256(target), "warnings": warnings, "out_dir": str(out) if out else None}
    before, after = audit_pair(Run(**common, state=base_state), Run(**common, adapter=label, state=target_state),
                               base_pipe, target_pipe)
    audits = [before, after]
    pairs = [(before, after, label)]
    config: dict[str, Any] = {
        "base": common["base_model"], "target": str(target), "format": found.kind, "variant": found.variant,
        "loaded": loaded_parts(found), "ignored": list(found.extra.get("ignored", [])),
        "members": str(members) if isinstance(members, (str, Path)) else None,
        "nonmembers": str(nonmembers) if isinstance(nonmembers, (str, Path)) else None,
        "prompts": prompt_list, "domain": domain, "attacks": spec.attacks, "extraction": extraction,
        "allow_pickle": allow_pickle, "shake": shake,
    }
    query_result = None
    if query is not None:
        from s2l_plugin.flow import audit_query

        query_result = audit_query(Run(**common, adapter=label, state=target_state), target_pipe, base_pipe, query, nonmembers)
        config["query"] = str(query) if isinstance(query, (str, Path)) else None
        config["query_attack"] = query_result.attack

    if shake is not None:
        if out is None:
            raise ConfigError("--shake writes a synthetic set and a fine-tuned artifact; expected --out DIR")
        shaken_pipe, artifact = _shake(target_pipe, method=shake, domain=domain, prompts=prompt_list,
                                       out_dir=out / "shake", seed=seed, num_images=shake_images,
                                       steps=shake_steps, pm=pm)
        shaken_state = {"label": f"{label}+s2l", "method": shake, "model_path": str(artifact.path),
                        "findings": [], "warnings": warnings, "out_dir": str(out)}
        _, shaken = audit_pair(Run(**common, state=base_state), Run(**common, adapter=shake, state=shaken_state),
                               base_pipe, shaken_pipe, before=before)
        audits.append(shaken)
        pairs.append((after, shaken, f"{label}+s2l-{shake}"))
        config["shake_artifact"] = artifact.to_dict()
        config["shake_images"], config["shake_steps"] = shake_images, shake_steps

    before.model = dataclasses.replace(before.model, label="base") if isinstance(before.model, ModelIdentity) else before.model
    result = assemble_result("audit", audits, pairs=pairs, spec=spec, config=config, seeds={"audit": seed},
                             warnings=warnings, query=query_result)
    if out is not None:
        publish(result, out, pm, reports=write_reports, fail_on=fail_on)
    return result
