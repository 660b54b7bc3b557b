"""How a process joins an accelerate launch: one rule for generation and training.

Processes launched without a GPU (``accelerate launch --cpu``, or torchrun on a CPU machine)
must tell accelerate so, or it sees each copy as a lone process that does all the work (and
writes the same folder) by itself; such a launch is refused rather than run N times over.
"""
from __future__ import annotations

import os

from s2l_plugin.errors import ConfigError


def launch_world() -> int:
    """``WORLD_SIZE`` of the launch this process belongs to (1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def cpu_launch(device: str | None = None) -> bool:
    """Whether accelerate should be told ``cpu=True``: asked for by ``accelerate launch --cpu``
    or by ``device`` (``"cpu"``), or a multi-process launch on a machine without CUDA."""
    import torch

    return (
        os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        or (device or "").startswith("cpu")
        or (launch_world() > 1 and not torch.cuda.is_available())
    )


def check_joined(num_processes: int) -> None:
    """ConfigError when accelerate joined fewer processes than the launch started (``WORLD_SIZE``)."""
    world = launch_world()
    if world > 1 and num_processes != world:
        raise ConfigError(
            f"WORLD_SIZE={world} but accelerate joined {num_processes} process(es); "
            "expected a launch accelerate recognises (accelerate launch / torchrun)"
        )
