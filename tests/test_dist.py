"""Joining an accelerate launch (s2l_plugin._dist): the rule generation and training share."""
from __future__ import annotations

import pytest

from s2l_plugin._dist import check_joined, cpu_launch, launch_world
from s2l_plugin.errors import S2LError


@pytest.fixture
def no_launch(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    return monkeypatch


def test_cpu_is_asked_for_by_the_launcher_or_the_device(no_launch):
    assert launch_world() == 1
    assert cpu_launch("cpu") and cpu_launch("cpu:0")
    no_launch.setenv("ACCELERATE_USE_CPU", "true")
    assert cpu_launch(None)


def test_multi_process_launch_without_cuda_runs_on_cpu(no_launch):
    import torch

    no_launch.setattr(torch.cuda, "is_available", lambda: False)
    assert not cpu_launch(None)  # one process: accelerate picks its own device
    no_launch.setenv("WORLD_SIZE", "2")
    assert cpu_launch(None)


def test_a_launch_accelerate_did_not_join_is_refused(no_launch):
    check_joined(1)
    no_launch.setenv("WORLD_SIZE", "2")
    check_joined(2)
    with pytest.raises(S2LError, match=r"WORLD_SIZE=2 but accelerate joined 1 process"):
        check_joined(1)
