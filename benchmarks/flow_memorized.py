"""The MIA attacks on a tiny flow-matching model trained from scratch to memorize duplicated testbed members.

The data are the DDPM memorized variant's (benchmarks/mia_memorized.py, :data:`MEMORIZED_KNOBS`:
the `test` preset on digits 0 and 1, 8 members per digit of which 2 are duplicated 8 times, 12
held-out images per digit; split seed 0): 16 members (4 duplicated), 24 non-members, a training
corpus of 44 entries in which each duplicated member occurs 8 times. The VAE is the recipe's
(:func:`s2l_plugin.testbed.recipe.train_vae`, 60 steps on the members, the same seeds as the DDPM
variant's build), given a flow-family latent normalisation ``(z − shift)·scale``: ``scale`` the
recipe's (1 / std of the latents), ``shift`` the mean of the members' posterior means.

The denoiser is the tiny Flux pipeline's transformer (:func:`~s2l_plugin.testbed.components.make_flux_transformer`:
one double- and one single-stream block, 2 heads of 16, ~81 k parameters; not widened), random-init
(seed = the run's seed), trained alone (CLIP and T5 frozen at their random init, as diffusers'
train_dreambooth_lora_flux.py freezes the text encoders) with the rectified-flow loss of that script:
``x_t = (1 − σ)·z0 + σ·ε``, target ``ε − z0``, unweighted MSE, σ drawn as its default
``--weighting_scheme none`` draws it (``u ~ U[0, 1)``, σ = the scheduler's training sigma at index
``⌊u·1000⌋``: unshifted for Flux, whose scheduler shifts by resolution at sampling time), guidance 3.5
fed to the guidance embedding. The rest is the testbed recipe's (AdamW lr 2e-3, weight decay 1e-2,
batch 16, caption dropout 0.1, gradient clip 1, one thread, deterministic algorithms), latents drawn
from the VAE posterior as the recipe and the diffusers script do. ``--family sd3`` trains the tiny
SD3 transformer the same way (two joint blocks; its scheduler's static shift 3.0 shifts the sigmas).

Pre-registered before any run (training length, seeds, attacks): 4,000 steps (the DDPM variant's
TEST_STEPS), seed 0, the loss attack measured at 500 / 1,000 / 2,000 / 4,000 steps on the way and
every flow attack (loss, pia, pian, secmi, clid, reference) at 4,000, each with its default settings,
each image conditioned on its own caption, audit seed 0, 200 bootstrap resamples. ``reference`` is
calibrated by the same transformer at its initialisation (the "before" of a model trained from
scratch). Done-criterion (issue #20): loss-attack AUC >= 0.9 on duplicated members against held-out
images. Results: benchmarks/results/flow_memorized.{json,md}::

    python benchmarks/flow_memorized.py                          # flux, seed 0
    python benchmarks/flow_memorized.py --family sd3             # sd3, seed 0
    python benchmarks/flow_memorized.py --family flux --seed 1   # replications (seed 1, no setting changed), also sd3
    python benchmarks/flow_memorized.py --family flux --seed 1 --diagnose   # PIA/PIAN/SecMI by t on the saved model

The seed-1 runs and the ``--diagnose`` tables were added after the seed-0 rows were seen (the
diagnostic asks why PIAN differs between the layouts; it is not a tuned setting).

A run appends its row to the JSON (replacing a row of the same family, seed and steps) and rewrites
the markdown from all rows.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "flow_memorized.json"


def _mia_memorized() -> Any:
    spec = importlib.util.spec_from_file_location("mia_memorized", REPO / "benchmarks" / "mia_memorized.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: The DDPM memorized variant's knobs (split, corpus, VAE steps), shared, not copied.
MEMORIZED_KNOBS: dict[str, Any] = _mia_memorized().MEMORIZED_KNOBS
#: Pre-registered training length and the checkpoints the loss attack is measured at on the way.
STEPS = 4000
CHECKPOINTS = (500, 1000, 2000, 4000)
#: Every attack that runs on a flow-matching model (reference needs the base).
ATTACKS = ("loss", "pia", "pian", "secmi", "clid", "reference")
#: Training length of tests/test_flow_attacks.py's small run (Flux, seed 0), set from this benchmark's
#: seed-0 curve before the test's assertion was run: see that test.
TEST_STEPS = 500


def cache_root() -> Path:
    return Path(os.environ.get("S2L_TEST_CACHE", REPO / ".s2l-cache"))


# -- data: the memorized variant's split and the recipe's VAE ------------------------------------


def flow_data(seed: int = 0, *, root: Path | None = None, progress: bool = False) -> Any:
    """The memorized variant's images (manifest.json, members/, nonmembers/) and its recipe VAE (vae/), as a
    :class:`~s2l_plugin.testbed.Testbed` folder without a pipeline; built once, cached by split seed and testbed sources."""
    import shutil

    import torch

    from s2l_plugin.testbed import Testbed, preset_config, sources_hash
    from s2l_plugin.testbed.corpus import make_manifest
    from s2l_plugin.testbed.recipe import _image_tensor, _seeds, deterministic_torch, train_vae, write_images

    out = (root or cache_root()) / f"flow-memorized-data-seed{seed}-{sources_hash()}"
    if (out / "manifest.json").exists() and (out / "vae" / "config.json").exists():
        return Testbed.load(out)
    config = preset_config("test", **MEMORIZED_KNOBS)
    manifest = make_manifest("test", config, seed)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_images(tmp, manifest)
    members = [s for s in manifest["samples"] if s["role"] != "nonmember"]
    with deterministic_torch(config.threads):
        images = _image_tensor([s["source_index"] for s in members])
        vae, stats = train_vae(images, config, _seeds(seed), progress)
        with torch.no_grad():
            shift = float(vae.encode(images).latent_dist.mean.mean())
    vae.register_to_config(shift_factor=round(shift, 4))
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    (tmp / "vae_stats.json").write_text(json.dumps({**stats, "shift_factor": round(shift, 4)}, indent=1) + "\n", encoding="utf-8")
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(tmp, ignore_errors=True)  # another process built it meanwhile
    else:
        os.replace(tmp, out)
    return Testbed.load(out)


def flow_pipeline(family: str, data: Any, seed: int) -> Any:
    """The tiny ``family`` ("flux" or "sd3") pipeline (random init from ``seed``) with ``data``'s VAE in place of its own."""
    from diffusers import AutoencoderKL

    from s2l_plugin.testbed.components import build_tiny_flux_pipeline, build_tiny_sd3_pipeline

    pipe = build_tiny_flux_pipeline(seed=seed) if family == "flux" else build_tiny_sd3_pipeline(seed=seed)
    vae = AutoencoderKL.from_pretrained(data.path / "vae").eval()
    pipe.register_modules(vae=vae)
    return pipe


# -- training --------------------------------------------------------------------------------------


def train(pipe: Any, data: Any, steps: int, seed: int, *, checkpoints: tuple[int, ...] = (), on_checkpoint: Any = None,
          progress: bool = False) -> dict[str, Any]:
    """Train ``pipe.transformer`` in place with the rectified-flow loss on ``data``'s corpus (duplicated members
    ``copies`` times) for ``steps`` steps; ``on_checkpoint(step)`` is called after each step in ``checkpoints``.

    Returns the loss at the start and end (mean of a window) and the wall / CPU seconds of training.
    """
    import torch
    from tqdm.auto import tqdm

    from s2l_plugin.conditioning import encode_prompts, unet_forward
    from s2l_plugin.testbed import preset_config
    from s2l_plugin.testbed.recipe import _batches, _image_tensor, _seeds, deterministic_torch

    config = preset_config("test", **MEMORIZED_KNOBS)
    members = data.members()
    corpus = torch.tensor([i for i, s in enumerate(members) for _ in range(s.copies)], dtype=torch.long)
    transformer, vae, scheduler = pipe.transformer, pipe.vae, pipe.scheduler
    scale, shift = float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0)
    train_sigmas = scheduler.sigmas.float().clone()  # the scheduler's training sigmas (index 0 = σ 1)
    n_train = int(scheduler.config.num_train_timesteps)
    wall, cpu = time.perf_counter(), time.process_time()
    with deterministic_torch(config.threads):
        seeds = _seeds(seed)
        gen = torch.Generator().manual_seed(seeds["unet_data"])
        with torch.no_grad():
            images = _image_tensor([s.source_index for s in members])
            posterior = vae.encode(images).latent_dist
            lat_mean, lat_std = posterior.mean, posterior.std
            cond = encode_prompts(pipe, [s.caption for s in members] + [""], "cpu")  # row len(members) = the empty caption
        opt = torch.optim.AdamW(transformer.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        batches = _batches(len(corpus), min(config.batch_size, len(corpus)), gen)
        transformer.train()
        losses: list[float] = []
        for step in tqdm(range(1, steps + 1), desc=f"flow_memorized: {cond.family}", disable=not progress, leave=False):
            idx = corpus[next(batches)]
            b = len(idx)
            z0 = ((lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)) - shift) * scale
            noise = torch.randn(z0.shape, generator=gen)
            u = torch.rand(b, generator=gen)  # weighting_scheme "none": uniform over the training sigmas
            sigma = train_sigmas[(u * n_train).long()].view(-1, 1, 1, 1)
            drop = torch.rand(b, generator=gen) < config.caption_dropout
            rows = torch.where(drop, torch.full_like(idx, len(members)), idx)
            x_t = (1 - sigma) * z0 + sigma * noise
            pred = unet_forward(transformer, x_t, sigma.flatten() * n_train, cond[rows]).sample
            loss = torch.nn.functional.mse_loss(pred, noise - z0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(transformer.parameters(), config.grad_clip)
            opt.step()
            losses.append(loss.item())
            if step in checkpoints and on_checkpoint is not None:
                transformer.eval()
                on_checkpoint(step)
                transformer.train()
        transformer.eval()
    window = max(1, min(100, len(losses) // 4))
    return {
        "loss_first": round(sum(losses[:window]) / window, 4), "loss_last": round(sum(losses[-window:]) / window, 4),
        "loss_window": window, "train_wall_s": round(time.perf_counter() - wall, 1), "train_cpu_s": round(time.process_time() - cpu, 1),
    }


# -- auditing --------------------------------------------------------------------------------------


def audit(pipe: Any, data: Any, attacks: tuple[str, ...] = ATTACKS, *, reference: Any = None, n_boot: int = 200) -> Any:
    """``audit_membership`` of ``pipe`` on ``data``: members vs held-out, with the duplicated / non-duplicated subsets."""
    from s2l_plugin.audit.mia import audit_membership, from_testbed

    sets = from_testbed(data)
    return audit_membership(pipe, sets.members, sets.nonmembers, list(attacks), reference=reference,
                            member_groups=sets.member_groups, n_boot=n_boot, progress=False, batch_size=64)


def _aucs(result: Any, name: str) -> dict[str, Any]:
    a = result.attack(name)
    out: dict[str, Any] = {"auc": round(a.auc, 3), "auc_ci": [round(x, 3) for x in a.auc_ci]}
    for group, sub in a.subsets.items():
        out[group] = {"auc": round(sub["auc"], 3), "auc_ci": [round(x, 3) for x in sub["auc_ci"]]}
    return out


def clean_noise_norms(pipe: Any, data: Any) -> dict[str, float]:
    """Mean ‖ε̂(z0, 0, c)‖ = ‖z0 + v_θ(z0, 0, c)‖ (PIA's ε₀) and mean ‖z0‖ over duplicated members and over held-out
    images (posterior-mean latents, own captions; √d = 16 for a Gaussian draw on the 4x8x8 latent)."""
    import torch

    from s2l_plugin.audit.mia import from_testbed
    from s2l_plugin.audit.mia.engine import DiffusionModel
    from s2l_plugin.data import load_images

    sets = from_testbed(data)
    model = DiffusionModel(pipe)
    dup = sets.member_groups["duplicated"]
    out = {}
    with torch.no_grad():
        for name, records in (("duplicated", [sets.members[i] for i in dup]), ("nonmembers", sets.nonmembers)):
            z0 = model.encode_images(load_images(records, model.resolution))
            text = model.encode_text([r.caption for r in records])
            out[name] = round(float(model.eps(z0, 0, text).flatten(1).norm(dim=1).mean()), 3)
            out[f"{name}_z0"] = round(float(z0.flatten(1).norm(dim=1).mean()), 3)
    return out


def measure(family: str = "flux", seed: int = 0, steps: int = STEPS, checkpoints: tuple[int, ...] = CHECKPOINTS,
            progress: bool = False) -> dict[str, Any]:
    """Train one model (``family``, ``seed``, ``steps``), the loss attack at each checkpoint, every attack at the end."""
    import torch

    data = flow_data(0, progress=progress)
    pipe = flow_pipeline(family, data, seed)
    base = flow_pipeline(family, data, seed)  # the same transformer at its initialisation, never trained
    base.register_modules(vae=pipe.vae)
    curve: list[dict[str, Any]] = []

    def on_checkpoint(step: int) -> None:
        with torch.no_grad():
            r = audit(pipe, data, ("loss",), n_boot=200)
        curve.append({"steps": step, "loss": _aucs(r, "loss")})
        print(f"  {family} seed {seed} step {step}: loss AUC dup {curve[-1]['loss']['duplicated']['auc']:.3f}"
              f" all {curve[-1]['loss']['auc']:.3f}", flush=True)

    stats = train(pipe, data, steps, seed, checkpoints=tuple(c for c in checkpoints if c < steps), on_checkpoint=on_checkpoint,
                  progress=progress)
    t0 = time.perf_counter()
    result = audit(pipe, data, ATTACKS, reference=base)
    audit_s = round(time.perf_counter() - t0, 1)
    row: dict[str, Any] = {
        "family": family, "transformer": type(pipe.transformer).__name__,
        "transformer_params": sum(p.numel() for p in pipe.transformer.parameters()),
        "seed": seed, "steps": steps, "weighting_scheme": "none", **stats, "audit_wall_s": audit_s,
        "n_members": result.n_members, "n_nonmembers": result.n_nonmembers,
        "n_duplicated": len(result.attack("loss").subsets["duplicated"]["member_indices"]),
        "attacks": {name: _aucs(result, name) for name in ATTACKS},
        "params": {a.attack: a.params for a in result.attacks},
        "loss_curve": curve + [{"steps": steps, "loss": _aucs(result, "loss")}],
        "eps0_norm": clean_noise_norms(pipe, data),
        # The VAE-latent distribution-shift diagnostic (members vs held-out, before any model; the VAE saw the members).
        "latent_shift": {k: result.shift.get(k) for k in ("p_value", "classifier_auc", "mean_distance", "null_mean_distance")},
    }
    # Kept for diagnostics after the run (not read by anything here).
    pipe.transformer.save_pretrained(cache_root() / "flow-memorized-models" / f"{family}-s{steps}-seed{seed}")
    return row


# -- a diagnostic after the fact ------------------------------------------------------------------

#: PIA / PIAN timesteps and SecMI t_sec of :func:`diagnose` (added after the seed-0 rows were seen: Flux's defaults
#: probe less noise than SD3's; t = 430 on Flux is σ 0.43, SD3's σ at its default t = 200; t_sec = 330 on Flux is
#: σ 0.33, SD3's at its default t_sec = 140).
DIAGNOSE_PIA_T = (100, 200, 300, 430, 600)
DIAGNOSE_SECMI_T = (140, 330)


def saved_pipeline(family: str, seed: int, steps: int = STEPS) -> tuple[Any, Any]:
    """``(pipeline, data)`` with the transformer a :func:`measure` run saved in the cache."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    data = flow_data(0)
    pipe = flow_pipeline(family, data, seed)
    cls = FluxTransformer2DModel if family == "flux" else SD3Transformer2DModel
    pipe.register_modules(transformer=cls.from_pretrained(cache_root() / "flow-memorized-models" / f"{family}-s{steps}-seed{seed}").eval())
    return pipe, data


def diagnose(family: str, seed: int, steps: int = STEPS) -> dict[str, Any]:
    """PIA and PIAN at each of :data:`DIAGNOSE_PIA_T`, SecMI at each of :data:`DIAGNOSE_SECMI_T`, on a saved run's model:
    AUC duplicated / all members vs held-out, with the σ each timestep is on this family's grid. Not a tuned setting:
    the attacks' defaults are what the results table reports."""
    from s2l_plugin.audit.mia import PIAAttack, SecMIAttack
    from s2l_plugin.audit.mia.engine import flow_sigmas

    pipe, data = saved_pipeline(family, seed, steps)
    sigmas = flow_sigmas(pipe.scheduler.config)
    rows = []
    for kind, ts in (("pia", DIAGNOSE_PIA_T), ("pian", DIAGNOSE_PIA_T), ("secmi", DIAGNOSE_SECMI_T)):
        attacks = [SecMIAttack(t_sec=t) if kind == "secmi" else PIAAttack(t=t, normalize=kind == "pian") for t in ts]
        for t, attack in zip(ts, attacks, strict=True):
            attack.name = f"{kind}@{t}"
        result = audit(pipe, data, tuple(attacks), n_boot=200)
        for t, attack in zip(ts, attacks, strict=True):
            a = _aucs(result, attack.name)
            rows.append({"attack": kind, "t": t, "sigma": round(float(sigmas[t]), 3), "auc_dup": a["duplicated"]["auc"], "auc_all": a["auc"]})
    return {"family": family, "seed": seed, "steps": steps, "rows": rows}


# -- results ---------------------------------------------------------------------------------------


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results table: per run, each attack's AUC [95% CI] on duplicated members and on all members vs held-out."""
    lines = [
        "| layout | steps | seed | subset | " + " | ".join(ATTACKS) + " |",
        "|---|---|---|---|" + "---|" * len(ATTACKS),
    ]
    for r in rows:
        for subset, label in (("duplicated", "duplicated vs held-out"), (None, "all members vs held-out")):
            cells = []
            for name in ATTACKS:
                a = r["attacks"][name] if subset is None else r["attacks"][name][subset]
                cells.append(f"{a['auc']:.3f} [{a['auc_ci'][0]:.2f}, {a['auc_ci'][1]:.2f}]")
            lines.append(f"| {r['family']} | {r['steps']} | {r['seed']} | {label} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    text += "\nLoss attack on the way (AUC duplicated / all members vs held-out):\n\n| layout | seed | " + " | ".join(
        str(c) for c in CHECKPOINTS) + " |\n|---|---|" + "---|" * len(CHECKPOINTS) + "\n"
    for r in rows:
        at = {c["steps"]: c["loss"] for c in r["loss_curve"]}
        cells = [f"{at[c]['duplicated']['auc']:.3f} / {at[c]['auc']:.3f}" if c in at else "–" for c in CHECKPOINTS]
        text += f"| {r['family']} | {r['seed']} | " + " | ".join(cells) + " |\n"
    return text


def diagnostics_markdown(diags: list[dict[str, Any]]) -> str:
    """:func:`diagnose`'s rows: AUC duplicated / all members vs held-out per attack and timestep (σ on the family's grid)."""
    text = "Diagnostic (after the fact, not a tuned setting): PIA / PIAN / SecMI by timestep, AUC duplicated / all members vs held-out:\n\n"
    text += "| layout | seed | attack | t (σ) | AUC dup / all |\n|---|---|---|---|---|\n"
    for d in diags:
        for r in d["rows"]:
            text += f"| {d['family']} | {d['seed']} | {r['attack']} | {r['t']} ({r['sigma']:.3f}) | {r['auc_dup']:.3f} / {r['auc_all']:.3f} |\n"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("flux", "sd3"), default="flux")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--diagnose", action="store_true", help="no training: PIA/PIAN/SecMI by timestep on the saved model of --family/--seed/--steps")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    command = "python benchmarks/flow_memorized.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    # Measured first, the results file read after: runs of other families/seeds finished meanwhile are kept.
    new = {**diagnose(args.family, args.seed, args.steps), "command": command} if args.diagnose else measure(args.family, args.seed, args.steps, progress=True)
    payload = json.loads(out.read_text(encoding="utf-8")) if out.exists() else {"knobs": MEMORIZED_KNOBS, "runs": []}
    if args.diagnose:
        diag = new
        payload["diagnostics"] = [d for d in payload.get("diagnostics", [])
                                  if (d["family"], d["seed"], d["steps"]) != (diag["family"], diag["seed"], diag["steps"])] + [diag]
        payload["diagnostics"].sort(key=lambda d: (d["family"] != "flux", d["family"], d["steps"], d["seed"]))
    else:
        row = {**new, "command": command}
        payload["runs"] = [r for r in payload["runs"] if (r["family"], r["seed"], r["steps"]) != (row["family"], row["seed"], row["steps"])]
        payload["runs"].append(row)
        payload["runs"].sort(key=lambda r: (r["family"] != "flux", r["family"], r["steps"], r["seed"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=list) + "\n", encoding="utf-8")
    tmp.replace(out)
    md = "# MIA attacks on a tiny flow-matching model that memorized duplicated testbed members\n\n" + markdown(payload["runs"])
    if payload.get("diagnostics"):
        md += "\n" + diagnostics_markdown(payload["diagnostics"])
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
