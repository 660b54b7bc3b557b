"""A quiet, informative terminal: one labelled s2l bar at a time, the libraries silent unless ``-v``."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from s2l_plugin import progress
from s2l_plugin.cli import build_parser
from s2l_plugin.progress import progress_bar, quiet_libraries, stage

# `s2l demo` cut down to seconds: one method, a few images, steps and generations.
TINY_DEMO = [
    'methods=["lora"]',
    "generate.num_images=8",
    "generate.num_inference_steps=4",
    "generate.batch_size=8",
    "train.max_train_steps=2",
    "train.train_batch_size=4",
    'audit.attacks=["loss", "pia"]',
    "audit.extraction=2",
    "audit.extraction_guidance=3.0",
    "audit.extraction_steps=2",
    "audit.memorization=true",
]
# Runs the CLI with a handler on diffusers' and transformers' loggers that marks every record
# they let through, so a test sees which lines came from those loggers.
RUNNER = textwrap.dedent(
    """
    import logging, sys

    class Mark(logging.Handler):
        def emit(self, record):
            print(f"LIBLOG[{record.name}] {record.getMessage()}", file=sys.stderr)

    for name in ("diffusers", "transformers"):
        logging.getLogger(name).addHandler(Mark())
    from s2l_plugin.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)
NOISE = ("Loading pipeline components", "Loading weights", "requires torchvision", "should be kept in float32", "No LoRA keys")


def _demo(out, *flags: str) -> list[str]:
    """The terminal lines (carriage returns split too) of a tiny `s2l demo`, stdout and stderr together."""
    args = [*flags, "demo", "--out", str(out)] + [a for s in TINY_DEMO for a in ("--set", s)]
    env = {**os.environ, "COLUMNS": "100", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return proc.stdout.replace("\r", "\n").splitlines()


@pytest.mark.integration
def test_demo_is_quiet_and_labels_its_bars(tmp_path):
    lines = _demo(tmp_path / "demo")
    text = "\n".join(lines)
    for noise in NOISE:
        assert not [ln for ln in lines if noise in ln], f"{noise!r} in the terminal:\n{text[-3000:]}"
    assert not [ln for ln in lines if ln.startswith("[transformers]")], text[-3000:]
    assert not [ln for ln in lines if ln.startswith("LIBLOG[")], "diffusers / transformers logged:\n" + text[-3000:]
    # One bar per step of a stage, named by domain and method; none nested in another.
    for bar in ("seven · base · generating 'seven'", "seven · base · MIA (loss, pia)", "seven · lora · training",
                "seven · lora · MIA (loss, pia)", "seven · lora · extraction: generating"):
        assert any(ln.startswith(bar) for ln in lines), f"no {bar!r} bar:\n{text[-3000:]}"
    assert not [ln for ln in lines if "nearest (" in ln], "a bar nested in the extraction bar was shown"
    assert not [ln for ln in lines if ln.lstrip().startswith("0%|") or ln.lstrip().startswith("100%|")], "an unlabelled bar"
    # The summary at the end is still there.
    assert any(ln.startswith("result: ") for ln in lines) and any(ln.startswith("Full report: ") for ln in lines)


@pytest.mark.integration
def test_verbose_shows_the_libraries_again(tmp_path):
    lines = _demo(tmp_path / "demo", "-v")
    assert any("Loading pipeline components" in ln for ln in lines)
    assert any(ln.startswith("LIBLOG[transformers") for ln in lines)  # e.g. "requires torchvision"
    assert any("seven · lora · nearest (l2)" in ln for ln in lines)  # nested bars too


def test_verbose_flag_before_or_after_the_command():
    parser = build_parser()
    assert parser.parse_args(["-v", "demo"]).verbose is True
    assert parser.parse_args(["demo", "--verbose"]).verbose is True
    assert parser.parse_args(["demo"]).verbose is False
    assert parser.parse_args(["-v", "report", "x", "-v"]).verbose is True


def _bar(**kwargs):
    """A bar owned by the function that calls this helper (stacklevel=2), writing to a buffer."""
    return progress_bar(file=io.StringIO(), mininterval=0, stacklevel=2, **kwargs)


def test_a_bar_inside_an_open_bar_is_hidden_unless_verbose(monkeypatch):
    def inner():
        return _bar(total=1, desc="inner")

    outer = _bar(total=1, desc="outer")
    assert not outer.disable
    hidden = inner()
    assert hidden.disable
    hidden.close()
    monkeypatch.setattr(progress, "_verbose", True)
    shown = inner()
    assert not shown.disable
    shown.close()
    outer.close()
    monkeypatch.setattr(progress, "_verbose", False)
    assert not inner().disable  # the outer bar is closed


def test_a_disabled_bar_keeps_what_runs_inside_it_quiet():
    outer = _bar(total=1, desc="outer", disable=True)
    assert _bar(total=1, desc="inner").disable
    outer.close()
    for _ in _bar(iterable=range(2), desc="loop", disable=True):
        pass
    assert not _bar(total=1, desc="after").disable  # a loop's bar closes when the loop ends


def test_a_bar_left_open_by_an_exception_does_not_hide_later_bars():
    def fails():
        bar = _bar(total=1, desc="left open")
        raise RuntimeError(f"boom: {bar.desc}")

    with pytest.raises(RuntimeError) as info:
        fails()
    left_open = info.tb.tb_next.tb_frame.f_locals["bar"]  # the traceback keeps it alive, not closed
    assert left_open in progress._open
    assert not _bar(total=1, desc="next").disable


def test_stage_labels_prefix_the_bar():
    with stage("seven · lora"):
        bar = _bar(total=1, desc="training")
        with stage("audit"):
            nested_label = progress.stage_label()
    bar.close()
    assert bar.desc == "seven · lora · training"
    assert nested_label == "seven · lora · audit"
    assert progress.stage_label() == ""


def test_quiet_libraries_silences_and_restores_the_library_loggers():
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = (dlog.get_verbosity(), tlog.get_verbosity(), dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    with quiet_libraries():
        assert dlog.get_verbosity() == tlog.get_verbosity() == logging.ERROR
        assert not dlog.is_progress_bar_enabled() and not tlog.is_progress_bar_enabled()
        assert not dlog.get_logger("diffusers.models.modeling_utils").isEnabledFor(logging.WARNING)
    after = (dlog.get_verbosity(), tlog.get_verbosity(), dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
    assert after == before
    with quiet_libraries(enabled=False):
        assert dlog.get_verbosity() == before[0]


def test_quiet_libraries_reaches_a_library_imported_inside_it():
    code = (
        "from s2l_plugin.progress import quiet_libraries\n"
        "with quiet_libraries():\n"
        "    import transformers\n"
        "    transformers.CLIPImageProcessor\n"  # logs "requires torchvision" when torchvision is missing
        "    from transformers.utils import logging\n"
        "    assert logging.get_verbosity() == 40 and not logging.is_progress_bar_enabled()\n"
        "    logging.get_logger('transformers.x').warning('LOUD')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "LOUD" not in proc.stderr and "requires torchvision" not in proc.stderr, proc.stderr
