"""Resumable stages: unchanged inputs skip a stage across runs; records survive only whole."""
from __future__ import annotations

import pytest

from s2l_plugin.errors import S2LError
from s2l_plugin.stages import STAGES_FILE, StageStore


def test_unchanged_stage_is_skipped_in_a_later_run_and_changed_one_reruns(tmp_path):
    calls: list[int] = []

    def work(value: int):
        def fn():
            calls.append(value)
            return {"value": value}
        return fn

    first = StageStore(tmp_path)
    key, out = first.run("train", {"lr": 1}, work(1))
    assert out == {"value": 1} and first.ran == ["train"]

    again = StageStore(tmp_path)  # a new process reading the record back
    key2, out2 = again.run("train", {"lr": 1}, work(2))
    assert (key2, out2) == (key, {"value": 1}) and again.skipped == ["train"] and calls == [1]

    changed = StageStore(tmp_path)
    key3, out3 = changed.run("train", {"lr": 2}, work(3))
    assert key3 != key and out3 == {"value": 3} and calls == [1, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [STAGES_FILE]  # no temporary left behind


def test_unreadable_record_is_a_one_line_error_naming_the_file(tmp_path):
    (tmp_path / STAGES_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(S2LError, match=STAGES_FILE):
        StageStore(tmp_path)
