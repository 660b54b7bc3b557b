"""`s2l generate` killed midway by a real signal, then rerun, gives the set of an uninterrupted run;
two processes (torchrun, gloo on CPU) give the set of one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

NUM_IMAGES = 24
BATCH = 4


def _command(model_dir: Path, out: Path) -> list[str]:
    script = Path(sys.executable).parent / "s2l"  # the installed console script, as a user runs it
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "s2l_plugin.cli"]
    return [
        *entry, "generate",
        "--model", str(model_dir), "--domain", "the digit seven",
        "--num-images", str(NUM_IMAGES), "--batch-size", str(BATCH), "--steps", "20",
        "--layout", "kohya", "--out", str(out), "--no-progress",
    ]


def _env() -> dict[str, str]:
    # One intra-op thread: the shared 2-core machine runs a tiny model far faster that way.
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _images(out: Path) -> list[Path]:
    return sorted((out / "images").rglob("*.png"))


def test_killed_generation_resumes_to_the_uninterrupted_set(test_testbed, tmp_path):
    import numpy as np
    from PIL import Image

    model_dir = test_testbed.pipeline_dir
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_command(model_dir, killed), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while len(_images(killed)) < BATCH + 1:  # the first batch and part of the second are on disk
            assert proc.poll() is None, f"s2l generate ended before it was killed: {proc.communicate()}"
            assert time.monotonic() < deadline, "no image appeared within 300 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    at_kill = json.loads((killed / "manifest.json").read_text())
    assert at_kill["complete"] is False
    done = [killed / r["file"] for r in at_kill["records"] if r["status"] == "kept"]
    assert 0 < len(done) < NUM_IMAGES, "the run must be killed midway for this test to mean anything"
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done}

    rerun = subprocess.run(_command(model_dir, killed), env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    whole = tmp_path / "whole"
    fresh = subprocess.run(_command(model_dir, whole), env=_env(), capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stderr

    # Images finished before the kill were kept as they were, not regenerated.
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done} == stamps
    # The same files, bit for bit, with the same captions, and the same manifest records.
    resumed_files = sorted(p.relative_to(killed) for p in (killed / "images").rglob("*") if p.is_file())
    whole_files = sorted(p.relative_to(whole) for p in (whole / "images").rglob("*") if p.is_file())
    assert resumed_files == whole_files
    assert len([f for f in whole_files if f.suffix == ".png"]) == NUM_IMAGES
    for rel in whole_files:
        if rel.suffix == ".png":
            with Image.open(killed / rel) as a, Image.open(whole / rel) as b:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            assert (killed / rel).read_text() == (whole / rel).read_text()
    m_killed = json.loads((killed / "manifest.json").read_text())
    m_whole = json.loads((whole / "manifest.json").read_text())
    assert m_killed["complete"] and m_whole["complete"]
    assert m_killed["records"] == m_whole["records"]
    assert not (killed / ".s2l-partial").exists()


_TWO_PROCESS_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
from s2l_plugin.generate import GenerationConfig, generate_private_set
config = GenerationConfig(domain="the digit seven", num_images=8, num_inference_steps=10, batch_size=2,
                          drop_blank=float(sys.argv[3]), dedup=0.05)
generate_private_set(sys.argv[1], config, sys.argv[2], progress=False)
"""


def test_two_processes_write_the_single_process_set(test_testbed, tmp_path):
    """Batches are dealt to the processes, images gathered and judged in index order, so the set (with
    quality-control replacements) is the single-process set, byte for byte."""
    import torch

    from s2l_plugin.generate import GenerationConfig, generate_private_set

    # A threshold inside the testbed's range of image contrast, so replacement rounds happen too.
    drop_blank = 0.3
    script = tmp_path / "gen.py"
    script.write_text(_TWO_PROCESS_SCRIPT)
    multi = tmp_path / "multi"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(test_testbed.pipeline_dir), str(multi), str(drop_blank)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = GenerationConfig(domain="the digit seven", num_images=8, num_inference_steps=10, batch_size=2,
                                  drop_blank=drop_blank, dedup=0.05)
        generate_private_set(str(test_testbed.pipeline_dir), config, tmp_path / "single", progress=False)
    finally:
        torch.set_num_threads(threads)

    m_single = json.loads((tmp_path / "single" / "manifest.json").read_text())
    m_multi = json.loads((multi / "manifest.json").read_text())
    assert (m_single["sampler"]["num_processes"], m_multi["sampler"]["num_processes"]) == (1, 2)
    assert m_single["quality"]["blank"] > 0, "drop_blank no longer triggers replacements on this testbed"
    assert m_multi["records"] == m_single["records"]
    files = sorted(p.name for p in (tmp_path / "single" / "images").iterdir())
    assert files == sorted(p.name for p in (multi / "images").iterdir())
    for name in files:
        assert (multi / "images" / name).read_bytes() == (tmp_path / "single" / "images" / name).read_bytes()
