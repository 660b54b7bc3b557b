"""Resumable stages: a stage whose inputs did not change since it finished is not run again.

A run folder holds ``stages.json``: for every finished stage, a key (a hash of everything the
stage's output depends on, upstream stages' keys included) and the stage's JSON outputs. A
rerun skips a stage whose key matches and redoes one whose inputs changed — and, because keys
chain, everything downstream of it. Records are written atomically after each stage, so an
interrupted run loses at most the stage it was in.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from s2l_plugin._io import atomic_write_text
from s2l_plugin.errors import InputError

log = logging.getLogger(__name__)

STAGES_FILE = "stages.json"


def stage_key(inputs: Any) -> str:
    """A stable hash of JSON-serialisable ``inputs`` (key order does not matter)."""
    blob = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class StageStore:
    """The record of finished stages in one run folder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / STAGES_FILE
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                self.records = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise InputError(f"{str(self.path)!r} is not a readable stage record ({exc}); "
                                 "expected the JSON s2l run writes (delete it to rerun every stage)") from exc
            if not isinstance(self.records, dict):
                raise InputError(f"{str(self.path)!r} holds a {type(self.records).__name__}; "
                                 "expected the JSON object s2l run writes (delete it to rerun every stage)")
        self.ran: list[str] = []
        self.skipped: list[str] = []

    def is_done(self, name: str, key: str) -> bool:
        rec = self.records.get(name)
        return bool(rec and rec.get("key") == key)

    def run(self, name: str, inputs: Any, fn: Callable[[], dict[str, Any]]) -> tuple[str, dict[str, Any]]:
        """Run ``fn`` unless stage ``name`` finished with the same inputs; returns ``(key, outputs)``."""
        key = stage_key(inputs)
        if self.is_done(name, key):
            log.info("stage %s: up to date, skipped", name)
            self.skipped.append(name)
            return key, self.records[name]["outputs"]
        outputs = fn()
        self.records[name] = {"key": key, "outputs": outputs}
        self._save()
        self.ran.append(name)
        return key, outputs

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.records, indent=2, sort_keys=True))
