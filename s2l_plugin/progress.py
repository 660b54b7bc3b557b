"""A quiet, informative terminal: s2l's progress bars and the libraries' own output.

- :func:`progress_bar` is the one factory of s2l's progress bars (a ``tqdm.auto`` bar). While one
  s2l bar is open, a bar opened inside it (by a function its opener called) is not displayed
  (unless :func:`set_verbose`), so a stage shows one bar at a time; a bar its caller disabled
  still counts as open, so whatever runs inside it stays quiet too.
- :func:`no_sampler_bar` turns a diffusers pipeline's own sampler bar off where an s2l bar counts
  the work.
- :func:`stage` labels the bars opened inside it: ``with stage("seven · lora"):`` turns a
  ``training`` bar into ``seven · lora · training``. Stages nest.
- :func:`quiet_libraries` silences diffusers', transformers' and huggingface_hub's warnings and
  loading bars through their own APIs, inside this process only (no environment variable, so a
  child process, e.g. the training script ``s2l launch`` runs, keeps its output). A library not
  imported yet is quieted the moment it is, so a light command pays no import for it.

Importing this module imports nothing heavy: ``s2l --help`` stays instant.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import logging
import sys
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

#: the libraries whose Python warnings :func:`quiet_libraries` filters
QUIET_LIBRARIES = ("diffusers", "transformers", "huggingface_hub", "accelerate", "peft")
#: the separator between stage labels and a bar's own description
SEPARATOR = " · "

_lock = threading.Lock()
_verbose = False
_stages: list[str] = []
_open: weakref.WeakSet[Any] = weakref.WeakSet()  # s2l bars created and not yet closed


def set_verbose(verbose: bool) -> None:
    """Show bars nested in other bars (``s2l -v``); off by default."""
    global _verbose
    _verbose = bool(verbose)


def is_verbose() -> bool:
    return _verbose


@contextlib.contextmanager
def stage(label: str) -> Iterator[None]:
    """Prefix ``label`` to the description of every s2l bar opened inside the block."""
    with _lock:
        _stages.append(str(label))
    try:
        yield
    finally:
        with _lock:
            _stages.pop()


def stage_label() -> str:
    """The current stage labels joined by :data:`SEPARATOR` ("" outside any :func:`stage`)."""
    return SEPARATOR.join(_stages)


_bar_class: type | None = None


def _bar_type() -> type:
    """A ``tqdm.auto.tqdm`` subclass that tells :func:`progress_bar` when it is closed."""
    global _bar_class
    if _bar_class is None:
        from tqdm.auto import tqdm

        class S2LBar(tqdm):  # type: ignore[misc,valid-type]
            _s2l_opener: Any = None  # the frame of the function that opened the bar, while open

            def __iter__(self) -> Iterator[Any]:
                # tqdm does not close a disabled bar at the end of its iterable: do it here, so it
                # stops counting as open as soon as the loop over it ends.
                try:
                    yield from super().__iter__()
                finally:
                    self.close()

            def close(self) -> None:
                _open.discard(self)
                self._s2l_opener = None
                super().close()

        _bar_class = S2LBar
    return _bar_class


def _inside_open_bar(frame: Any) -> bool:
    """Whether an open s2l bar was opened by ``frame`` or a frame that (indirectly) called it.

    A bar left open by an exception (its function is gone from the stack) does not count.
    """
    stack = set()
    while frame is not None:
        stack.add(id(frame))
        frame = frame.f_back
    return any(id(bar._s2l_opener) in stack for bar in list(_open) if bar._s2l_opener is not None)


def progress_bar(iterable: Any = None, *, desc: str = "", total: float | None = None, unit: str = "it",
                 disable: bool = False, leave: bool = True, stacklevel: int = 1, **kwargs: Any) -> Any:
    """A ``tqdm.auto`` progress bar, labelled with the current :func:`stage`.

    Not displayed when ``disable`` is true, or when the terminal is not verbose
    (:func:`set_verbose`) and the bar opens inside another s2l bar: while a function that opened
    a bar (the caller, or ``stacklevel`` frames up for a helper) is running and the bar not
    closed. Use it like ``tqdm``: iterate over it, or ``update`` and ``close`` it; ``kwargs`` go
    to ``tqdm`` unchanged.
    """
    opener = sys._getframe(stacklevel)
    label = stage_label()
    full = f"{label}{SEPARATOR}{desc}" if label and desc else (label or desc)
    nested = _inside_open_bar(opener)
    bar = _bar_type()(iterable, desc=full, total=total, unit=unit, leave=leave,
                      disable=bool(disable) or (nested and not _verbose), **kwargs)
    bar._s2l_opener = opener
    _open.add(bar)
    return bar


@contextlib.contextmanager
def no_sampler_bar(pipeline: Any) -> Iterator[None]:
    """A diffusers pipeline's own sampler bar off inside the block (the caller's bar counts the
    work), its ``set_progress_bar_config`` setting restored after. Anything else: no change."""
    if not hasattr(pipeline, "set_progress_bar_config"):
        yield
        return
    missing = object()
    saved = getattr(pipeline, "_progress_bar_config", missing)
    pipeline.set_progress_bar_config(disable=True)
    try:
        yield
    finally:
        if saved is missing:
            with contextlib.suppress(AttributeError):
                del pipeline._progress_bar_config
        else:
            pipeline._progress_bar_config = saved


# -- the libraries' own output ------------------------------------------------------------------


class _CallbackLoader(importlib.abc.Loader):
    """Loads a module with ``loader``, then calls ``callback(module)``."""

    def __init__(self, loader: Any, callback: Callable[[ModuleType], None]) -> None:
        self._loader = loader
        self._callback = callback

    def create_module(self, spec: Any) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._callback(module)

    def __getattr__(self, name: str) -> Any:  # get_data, get_filename, is_package, …
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Calls ``callbacks[name](module)`` right after module ``name`` is imported (once)."""

    def __init__(self, callbacks: dict[str, Callable[[ModuleType], None]]) -> None:
        self.callbacks = dict(callbacks)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname not in self.callbacks:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec

        def after(module: ModuleType) -> None:
            # Popped here, not above: importlib.util.find_spec looks modules up without importing.
            callback = self.callbacks.pop(fullname, None)
            if callback is not None:
                callback(module)

        spec.loader = _CallbackLoader(spec.loader, after)
        return spec


def _quiet_hf_logging(module: ModuleType, undo: list[Callable[[], None]]) -> None:
    """Error-only logging and no progress bars for diffusers' or transformers' ``utils.logging``."""
    level, bars = module.get_verbosity(), module.is_progress_bar_enabled()
    module.set_verbosity_error()
    module.disable_progress_bar()

    def restore() -> None:
        module.set_verbosity(level)
        if bars:
            module.enable_progress_bar()

    undo.append(restore)


def _quiet_hub(undo: list[Callable[[], None]]) -> None:
    from huggingface_hub import utils as hub  # light: its utils load on first use

    level, disabled = hub.logging.get_verbosity(), hub.are_progress_bars_disabled()
    hub.logging.set_verbosity_error()
    hub.disable_progress_bars()

    def restore() -> None:
        hub.logging.set_verbosity(level)
        if not disabled:
            hub.enable_progress_bars()

    undo.append(restore)


@contextlib.contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """Inside the block, the ML libraries print errors only and no loading bars.

    diffusers and transformers: ``utils.logging.set_verbosity_error()`` and
    ``disable_progress_bar()`` (applied as soon as each is imported, so the warnings transformers
    logs at import time, e.g. "requires torchvision", are silenced too); huggingface_hub: the same
    through its ``utils``; accelerate's and peft's loggers at ERROR; Python warnings raised from
    any of :data:`QUIET_LIBRARIES` ignored. Everything is restored on exit. ``enabled=False``
    changes nothing.
    """
    if not enabled:
        yield
        return
    undo: list[Callable[[], None]] = []
    finder = _AfterImport({})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=rf"({'|'.join(QUIET_LIBRARIES)})(\.|$)")
        try:
            for name in ("diffusers.utils.logging", "transformers.utils.logging"):
                if name in sys.modules:
                    _quiet_hf_logging(sys.modules[name], undo)
                else:
                    finder.callbacks[name] = lambda module: _quiet_hf_logging(module, undo)
            sys.meta_path.insert(0, finder)
            with contextlib.suppress(ImportError):
                _quiet_hub(undo)
            for name in ("accelerate", "peft"):
                logger = logging.getLogger(name)
                undo.append(lambda logger=logger, level=logger.level: logger.setLevel(level))
                logger.setLevel(logging.ERROR)
            yield
        finally:
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(finder)
            for restore in reversed(undo):
                restore()
