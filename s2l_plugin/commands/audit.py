"""``s2l audit``: audit a checkpoint someone else trained -- metadata scan, MIA, extraction, memorization, S2L shake."""

from __future__ import annotations

import argparse

from s2l_plugin.defaults import EXTRACTION_NUM_INFERENCE_STEPS


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="audit a LoRA / embedding / hypernetwork / model for training-data leakage",
        description="Load a checkpoint onto its base (format found from the content; no code from it runs), "
        "scan its metadata, run membership inference (with --members/--nonmembers) and extraction on it and on "
        "the base as reference, and write result.json plus the reports.",
    )
    p.add_argument("--base", default=None, help="base model: a diffusers pipeline folder (default: the shipped testbed), "
                   "or a single-file checkpoint with --base-config")
    p.add_argument("--base-config", default=None, metavar="DIR",
                   help="with a single-file --base: a local diffusers pipeline folder of the same model family (its configs "
                   "and tokenizers are read; nothing is downloaded)")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--lora", metavar="F", help="diffusers/kohya LoRA file, PEFT adapter folders, or a folder with "
                        "one LoRA and its Textual Inversion embeddings (pivotal tuning: all of them are loaded)")
    target.add_argument("--embedding", metavar="F", help="Textual Inversion embedding (diffusers, kohya, A1111 .pt), "
                        "or a folder of embeddings (with a LoRA: all are loaded)")
    target.add_argument("--hypernetwork", metavar="F", help="AUTOMATIC1111 hypernetwork (.pt or safetensors form)")
    target.add_argument("--model", metavar="DIR", help="fine-tuned pipeline folder or single-file checkpoint")
    p.add_argument("--members", metavar="DIR", help="images the model may have been trained on (for MIA)")
    p.add_argument("--nonmembers", metavar="DIR", help="images it was not trained on (for MIA; with --query, the null)")
    p.add_argument("--query", metavar="IMG_OR_DIR", help="candidate image(s): each gets a score and a p-value against "
                   "--nonmembers (images known not to be in the training set), and the set one dataset-level test; "
                   "--members is then optional")
    p.add_argument("--query-attack", metavar="NAME", default=None,
                   help="the per-image statistic of --query (default: reference, the loss calibrated by the base)")
    prompts = p.add_mutually_exclusive_group()
    prompts.add_argument("--prompts", metavar="FILE", help="prompts for extraction / memorization, one per line")
    prompts.add_argument("--domain", metavar="NAME", help="target domain (its prompt is used; --shake generates for it)")
    p.add_argument("--attacks", type=_csv, default=None, help="MIA attacks, comma-separated (default: loss,secmi,pia,pian,reference; "
                   "reference scores the checkpoint against the base only)")
    p.add_argument("--extraction", nargs="?", type=int, const=64, default=0, metavar="N",
                   help="run extraction with N generations per prompt (default when given: 64)")
    p.add_argument("--extraction-steps", type=int, default=EXTRACTION_NUM_INFERENCE_STEPS,
                   help=f"sampling steps for extraction (default {EXTRACTION_NUM_INFERENCE_STEPS})")
    p.add_argument("--no-memorization", action="store_true", help="skip the data-free memorization score")
    p.add_argument("--allow-pickle", action="store_true",
                   help="read pickled .pt/.ckpt/.bin files with torch.load(weights_only=True); refused by default")
    p.add_argument("--out", metavar="DIR", default=None, help="write result.json and the reports here")
    p.add_argument("--shake", metavar="METHOD", default=None,
                   help="also apply S2L to the target: generate for the domain, fine-tune briefly with METHOD, audit again")
    p.add_argument("--shake-images", type=int, default=16, help="synthetic images for --shake (default 16)")
    p.add_argument("--shake-steps", type=int, default=20, help="fine-tuning steps for --shake (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of every noise draw and generation (default 0)")
    p.add_argument("--fail-on", metavar="EXPR", default=None,
                   help="privacy gate: exit 3 and write verdict.json when the target meets a condition, "
                   "e.g. 'loss.auc.lower>0.55,extracted>0' (needs --out; see docs/cli.md)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from s2l_plugin.audit.api import audit_checkpoint

    expect, target = next((k, getattr(args, k)) for k in ("lora", "embedding", "hypernetwork", "model") if getattr(args, k))
    result = audit_checkpoint(
        target, base=args.base, base_config=args.base_config, expect=expect, members=args.members, nonmembers=args.nonmembers,
        prompts=args.prompts, domain=args.domain, attacks=args.attacks, extraction=args.extraction,
        extraction_steps=args.extraction_steps, memorization=not args.no_memorization,
        allow_pickle=args.allow_pickle, out_dir=args.out, shake=args.shake, shake_images=args.shake_images,
        shake_steps=args.shake_steps, seed=args.seed, fail_on=args.fail_on,
        query=args.query, query_attack=args.query_attack,
    )
    if args.out is None:
        from rich.console import Console
        from rich.markup import escape

        console = Console()
        # What the target is made of (a pivotal folder is a LoRA *and* embeddings); names come from the
        # checkpoint folder, so they are escaped, never parsed as markup.
        loaded = [f"{p['file']} ({p['kind']}{', token ' + repr(p['token']) if p['token'] else ''})"
                  for p in result.config.get("loaded", [])]
        if loaded:
            console.print(f"loaded: {escape(', '.join(loaded))}")
        for entry in result.config.get("ignored", []):
            console.print(f"not loaded: {escape(entry)}")
        for audit in result.audits:
            parts = [f"[bold]{audit.model.label}[/]"]
            if audit.membership is not None:
                parts += [f"{a.attack} AUC {a.auc:.3f}" for a in audit.membership.attacks]
            if audit.extraction is not None:
                parts.append(f"extracted {audit.extraction.extracted_total}")
            if audit.memorization is not None:
                parts += [f"memorization {m.score:.4g} ({m.prompt!r})" for m in audit.memorization.scores]
            if audit.findings:
                parts.append(f"{len(audit.findings)} metadata findings ({audit.findings[0].severity} first)")
            console.print("  ".join(parts))
        if result.query is not None:
            from s2l_plugin.report.view import query_line
            from s2l_plugin.result import to_dict

            q = result.query
            console.print(escape(query_line({"query": to_dict(q)})))
            console.print(f"image  score  p  ({q.attack}; {len(q.null_scores)} null images)")
            for im in q.images:
                console.print(f"{escape(im.id)}  {im.score:.4g}  {im.p_value:.3g}")
    return 0
