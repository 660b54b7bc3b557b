"""The built-in training loop under a two-process launch (torchrun, gloo on CPU) trains what one
process trains: same per-step losses, replicas kept identical, weights equal up to float
reduction order."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

# End2End's parameter set: the UNet and text encoder are DDP-wrapped, the VAE (trained through
# encode(), not a DDP forward) is averaged by hand, so both gradient paths are exercised.
_SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
from accelerate import PartialState
from safetensors.torch import save_file
from s2l_plugin.adapters.base import TrainConfig
from s2l_plugin.adapters.training import Trainable, train_loop
from s2l_plugin.data import list_image_folder
from s2l_plugin.testbed import build_tiny_pipeline

data, batch, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
pipe = build_tiny_pipeline(seed=0)
params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters(), *pipe.vae.parameters()]
cfg = TrainConfig(prompt="digit seven", max_train_steps=3, learning_rate=1e-3, train_batch_size=batch,
                  random_flip=True, resume=False, seed=0)
result = train_loop(pipe, list_image_folder(data), cfg, Trainable(params), output_dir=out + "-run", progress=False)
state = PartialState()
weights = {f"{name}.{k}": v.detach().contiguous() for name in ("unet", "text_encoder", "vae")
           for k, v in getattr(pipe, name).state_dict().items()}
save_file(weights, f"{out}-rank{state.process_index}.safetensors")
if state.is_main_process:
    json.dump({"losses": result.losses, "num_processes": state.num_processes}, open(out + ".json", "w"))
"""


def _env() -> dict[str, str]:
    # The session's thread count (1 unless OMP_NUM_THREADS says otherwise), in both runs alike.
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("WORLD_SIZE", None)
    return env


def _digits(folder) -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder.mkdir()
    for i in range(8):
        arr = np.kron(digits.images[i] / 16.0 * 255.0, np.ones((2, 2))).astype("uint8")
        Image.fromarray(np.stack([arr] * 3, axis=-1)).save(folder / f"{i}.png")


def float32_relative_error_bound(*modules) -> float:
    """A first-order worst-case bound on the relative float32 error of a pass through ``modules``.

    A dot product of K terms summed in any order carries relative error at most K·u (u = 2^-24,
    Higham's gamma_K to first order); every Conv2d (K = in_channels/groups x kernel area) and Linear
    (K = in_features) adds its own, so a loss computed through all of them differs between two
    summation orders (one process, or two gloo processes reducing halves) by at most u x the sum of K.
    """
    import torch

    u = 2.0**-24
    total = 0
    for module in modules:
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d):
                total += m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            elif isinstance(m, torch.nn.Linear):
                total += m.in_features
    return u * total


def test_two_processes_train_what_one_process_trains(tmp_path):
    import torch
    from safetensors.torch import load_file

    data = tmp_path / "data"
    _digits(data)
    script = tmp_path / "train.py"
    script.write_text(_SCRIPT)
    single = subprocess.run([sys.executable, str(script), str(data), "4", str(tmp_path / "single")],
                            env=_env(), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            str(script), str(data), "2", str(tmp_path / "multi")],
                           env=_env(), capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]

    one = json.loads((tmp_path / "single.json").read_text())
    two = json.loads((tmp_path / "multi.json").read_text())
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    # Each process drew its half of the global batch of 4 and gradients were averaged: same losses, up
    # to the order float32 sums in (the weights after each step differ by that order too; checked below).
    from s2l_plugin.testbed import build_tiny_pipeline

    pipe = build_tiny_pipeline(seed=0)
    tolerance = float32_relative_error_bound(pipe.unet, pipe.text_encoder, pipe.vae)
    assert tolerance < 1e-2  # a bound that still tells a sharding bug (a wrong batch, a missed all-reduce) apart
    worst_loss = max(abs(a - b) / abs(b) for a, b in zip(two["losses"], one["losses"], strict=True))
    print(f"threads {os.environ.get('OMP_NUM_THREADS', '1')}: worst relative loss difference {worst_loss:.2e}, bound {tolerance:.2e}")
    assert two["losses"] == pytest.approx(one["losses"], rel=tolerance)

    rank0, rank1 = load_file(str(tmp_path / "multi-rank0.safetensors")), load_file(str(tmp_path / "multi-rank1.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "replicas diverged: some gradients were not synchronised"
    alone = load_file(str(tmp_path / "single-rank0.safetensors"))
    # Adam divides by sqrt(v): entries whose gradient is ~0 move by up to lr per step in the direction
    # float summation order picks, so the bound is a fraction of the 3e-3 (lr x steps) an entry can move.
    worst = max((alone[k] - rank0[k]).abs().max().item() for k in alone)
    assert worst < 1e-3, f"max |single - two-process| weight difference {worst:.2e}"
