"""MIA engine benchmark: each attack vs the bare batched UNet calls it needs, and streaming memory.

Run: ``python benchmarks/bench_mia.py [--testbed DIR] [--out benchmarks/results/mia.json]``

1. Overhead. For every attack, one batch of ``--batch`` testbed-sized images is encoded once;
   then ``attack.score_encoded`` is timed against the same UNet forwards done bare (same row
   counts, same timesteps, same text embeddings, random latents, nothing else). The two are
   interleaved ``--repeats`` times and the median of each is compared: ratio = attack / bare
   (target <= 1.15). Times are process CPU seconds (``time.process_time``) with one torch thread,
   so that other work on a shared machine does not leak into the ratio; wall-clock seconds are
   recorded beside them. Encoding (VAE + text encoder, shared by every attack) and the whole
   ``audit_membership`` call are timed too and reported beside it.
2. Streaming. ``audit_membership`` runs in a fresh subprocess on N and 10·N images written
   to a temp folder; the peak RSS of each (``ru_maxrss``) and its growth over the RSS after
   model load are compared (target: peak ratio <= 1.1).

Without ``--testbed`` the model is :func:`s2l_plugin.testbed.build_tiny_pipeline`: the testbed's
exact architecture with random weights (timing and memory do not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _pipeline(testbed: str | None) -> Any:
    if testbed:
        from s2l_plugin.testbed import Testbed

        return Testbed.load(testbed).load_pipeline()
    from s2l_plugin.testbed import build_tiny_pipeline

    return build_tiny_pipeline(seed=0)


def bare_calls(attack: Any, batch: Any) -> Any:
    """A closure doing exactly the UNet forwards ``attack`` needs for ``batch``, on random inputs."""
    import torch

    from s2l_plugin.audit.mia import LossAttack, PIAAttack, ReferenceAttack, SecMIAttack

    model, b = batch.model, batch.size
    shape = tuple(batch.latents.shape[1:])
    unet = model.unet
    if isinstance(attack, (LossAttack, ReferenceAttack)):
        k = len(attack.timesteps) * attack.n_noise
        x = torch.randn(b * k, *shape, dtype=model.dtype)
        t = torch.tensor([t for t in attack.timesteps for _ in range(attack.n_noise)]).repeat(b)
        text = batch.text.repeat_interleave(k, dim=0)
        n = 2 if isinstance(attack, ReferenceAttack) else 1
        return lambda: [unet(x, t, encoder_hidden_states=text).sample for _ in range(n)]
    x = torch.randn(b, *shape, dtype=model.dtype)
    if isinstance(attack, SecMIAttack):
        ts = [*range(0, attack.t_sec, attack.k), attack.t_sec, attack.t_sec + attack.k]
    elif isinstance(attack, PIAAttack):
        ts = [0, attack.t]
    else:
        raise TypeError(attack)
    tts = [torch.full((b,), t, dtype=torch.long) for t in ts]
    return lambda: [unet(x, tt, encoder_hidden_states=batch.text).sample for tt in tts]


def time_overhead(pipe: Any, batch_size: int, repeats: int) -> dict[str, Any]:
    import torch

    from s2l_plugin.audit.mia import builtin_attacks
    from s2l_plugin.audit.mia.engine import MEMBER, DiffusionModel, encode_batch

    torch.manual_seed(0)
    model = DiffusionModel(pipe)
    res = model.resolution
    images = torch.rand(batch_size, 3, res, res) * 2 - 1
    captions = [f"a photo of the digit {i % 10}" for i in range(batch_size)]
    keys = [(MEMBER, i) for i in range(batch_size)]
    rows: dict[str, Any] = {}
    with torch.inference_mode():
        pipe.unet.eval()
        batch = encode_batch(model, images, captions, keys, 0)
        enc = []
        for _ in range(repeats):
            t0 = time.process_time()
            encode_batch(model, images, captions, keys, 0)
            enc.append(time.process_time() - t0)
        rows["encode (VAE + text, once per batch, shared)"] = {"median_cpu_s": statistics.median(enc)}
        for attack in builtin_attacks():
            bare = bare_calls(attack, batch)
            ref = batch if attack.needs_reference else None
            attack.score_encoded(batch, ref)  # warm-up
            bare()
            ta, tb, wa, wb = [], [], [], []
            for _ in range(repeats):  # interleaved, so machine load hits both alike
                c0, w0 = time.process_time(), time.perf_counter()
                attack.score_encoded(batch, ref)
                ta.append(time.process_time() - c0)
                wa.append(time.perf_counter() - w0)
                c0, w0 = time.process_time(), time.perf_counter()
                bare()
                tb.append(time.process_time() - c0)
                wb.append(time.perf_counter() - w0)
            rows[attack.name] = {
                "unet_calls_per_image": attack.unet_calls_per_image,
                "attack_median_cpu_s": statistics.median(ta),
                "bare_unet_median_cpu_s": statistics.median(tb),
                "ratio": statistics.median(ta) / statistics.median(tb),
                "attack_median_wall_s": statistics.median(wa),
                "bare_unet_median_wall_s": statistics.median(wb),
            }
    return rows


def _write_images(folder: Path, n: int, size: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")
        lines.append(json.dumps({"file_name": f"{i:05d}.png", "text": f"a photo of the digit {i % 10}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def memory_child(args: argparse.Namespace) -> None:
    """Subprocess body: load the model, note RSS, audit the folders, print peak RSS (KiB) as JSON."""
    from s2l_plugin.audit.mia import audit_membership

    pipe = _pipeline(args.testbed)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    audit_membership(pipe, args.members, args.nonmembers, ["pia"], batch_size=args.batch, n_boot=100, progress=False)
    # ru_maxrss is the process peak (often set while loading the model); VmRSS after the audit shows
    # what the audit itself still holds.
    rss_end = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    print(json.dumps({"rss_after_load_kib": loaded, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "rss_after_audit_kib": rss_end, "audit_s": time.perf_counter() - t0}))


def time_memory(args: argparse.Namespace, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="s2l-bench-mia-") as tmp:
        for label, count in (("1x", n), ("10x", 10 * n)):
            m, nm = Path(tmp) / label / "m", Path(tmp) / label / "n"
            _write_images(m, count, 16, 0)
            _write_images(nm, count, 16, 1)
            cmd = [sys.executable, __file__, "--memory-child", "--members", str(m), "--nonmembers", str(nm), "--batch", str(args.batch)]
            if args.testbed:
                cmd += ["--testbed", args.testbed]
            proc = subprocess.run(cmd, check=True, capture_output=True, text=True)
            out[label] = {"images": 2 * count, **json.loads(proc.stdout.strip().splitlines()[-1])}
    out["peak_ratio_10x_over_1x"] = out["10x"]["peak_rss_kib"] / out["1x"]["peak_rss_kib"]
    out["growth_kib_1x"] = out["1x"]["peak_rss_kib"] - out["1x"]["rss_after_load_kib"]
    out["growth_kib_10x"] = out["10x"]["peak_rss_kib"] - out["10x"]["rss_after_load_kib"]
    out["rss_after_audit_ratio_10x_over_1x"] = out["10x"]["rss_after_audit_kib"] / out["1x"]["rss_after_audit_kib"]
    return out


def end_to_end(pipe: Any, args: argparse.Namespace, overhead: dict[str, Any]) -> dict[str, Any]:
    """The whole audit_membership (image reading, encoding, all attacks, metrics) on N + N images."""
    from s2l_plugin.audit.mia import audit_membership, builtin_attacks

    with tempfile.TemporaryDirectory(prefix="s2l-bench-mia-") as tmp:
        _write_images(Path(tmp) / "m", args.batch, 16, 0)
        _write_images(Path(tmp) / "n", args.batch, 16, 1)
        names = [a.name for a in builtin_attacks()]
        t0 = time.process_time()
        audit_membership(pipe, Path(tmp) / "m", Path(tmp) / "n", names, reference=pipe, batch_size=args.batch, n_boot=1000, progress=False)
        total = time.process_time() - t0
    bare = 2 * sum(overhead[n]["bare_unet_median_cpu_s"] for n in names)  # two batches of args.batch images
    return {"images": 2 * args.batch, "audit_cpu_s": total, "bare_unet_cpu_s_all_attacks": bare, "ratio": total / bare}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--testbed", default=None, help="a built testbed folder (default: tiny pipeline of the testbed architecture)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--memory-images", type=int, default=64, help="N per set for the streaming check (10·N is the big run)")
    p.add_argument("--out", default=str(HERE / "results" / "mia.json"))
    p.add_argument("--parts", default="overhead,end_to_end,memory", help="comma list of parts to run (others are kept from --out)")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--members", help=argparse.SUPPRESS)
    p.add_argument("--nonmembers", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    import torch

    torch.set_num_threads(1)
    pipe = _pipeline(args.testbed)
    parts = set(args.parts.split(","))
    previous = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    result: dict[str, Any] = {
        "model": args.testbed or "build_tiny_pipeline(seed=0) (testbed architecture, random weights)",
        "batch": args.batch,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    result["overhead"] = time_overhead(pipe, args.batch, args.repeats) if "overhead" in parts else previous.get("overhead")
    result["end_to_end"] = end_to_end(pipe, args, result["overhead"]) if "end_to_end" in parts else previous.get("end_to_end")
    result["memory"] = time_memory(args, args.memory_images) if "memory" in parts else previous.get("memory")
    result["load_average_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
