"""`s2l launch` under a two-process CPU launch (torchrun, gloo): the before- and after-training
hooks run once, on the main process, not once per copy."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

_TRAINER = """
import argparse, json, os
p = argparse.ArgumentParser()
for a in ("--pretrained_model_name_or_path", "--instance_data_dir", "--instance_prompt", "--output_dir"):
    p.add_argument(a)
args = p.parse_args()
os.makedirs(os.path.join(args.output_dir, "unet"), exist_ok=True)
with open(os.path.join(args.output_dir, "model_index.json"), "w") as fh:
    json.dump({}, fh)
"""

_DRIVER = """
import os, sys
from s2l_plugin.hooks import hookimpl
from s2l_plugin.hooks.manager import make_plugin_manager
from s2l_plugin.launch import launch

log, script, out = sys.argv[1:4]

class Spy:
    def _note(self, event):
        with open(log, "a") as fh:
            fh.write(f"{event} {os.environ.get('RANK')}\\n")

    @hookimpl(tryfirst=True)
    def s2l_before_training(self, run):
        self._note("before")

    @hookimpl(tryfirst=True)
    def s2l_after_training(self, run, artifact):
        self._note("after")

launch(["--", script, "--pretrained_model_name_or_path", out, "--output_dir", out,
        "--instance_data_dir", "x", "--instance_prompt", "y"],
       pm=make_plugin_manager(load_entry_points=False, extra_plugins=[Spy()]))
"""


def test_hooks_run_once_on_the_main_process_under_two_cpu_processes(tmp_path):
    """Bug fixed: launch's plain PartialState() saw each torchrun copy on a CPU machine as a lone
    main process, so every copy generated the private set and audited the artifact."""
    script, driver = tmp_path / "train_dreambooth.py", tmp_path / "driver.py"
    script.write_text(_TRAINER)
    driver.write_text(_DRIVER)
    log = tmp_path / "hooks.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(driver), str(log), str(script), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(log.read_text().split("\n")[:-1]) == ["after 0", "before 0"]
