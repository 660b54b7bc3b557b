"""The object every event hook receives as ``run``: one S2L run's settings and state.

The same Run flows through ``s2l run``, ``s2l launch``, ``s2l audit`` and the Python API, so
a plugin sees the same shape whichever way the user came in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Run:
    """One S2L run.

    - ``base_model``: path of the pretrained pipeline (or single-file checkpoint);
    - ``domain`` / ``prompt``: the target domain and the prompt its synthetic set uses;
    - ``adapter``: the fine-tuning method's name;
    - ``output_dir``: where training writes its artifact (the report goes here too);
    - ``data_dir``: the synthetic private set, once generated;
    - ``script`` / ``script_args``: a wrapped training script and its argument list
      (``s2l_before_training`` may rewrite ``script_args``);
    - ``options``: S2L options (generation, audit) as parsed;
    - ``state``: what stages record for later ones (paths, results).
    """

    base_model: str | None = None
    domain: str | None = None
    prompt: str | None = None
    adapter: str | None = None
    output_dir: Path | None = None
    data_dir: Path | None = None
    script: str | None = None
    script_args: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)
    pm: Any = None
