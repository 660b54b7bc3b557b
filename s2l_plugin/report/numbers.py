"""How every report shows a number: the one rounding rule, used by every writer (and the tests).

A shown metric is the JSON value rounded half-even to :data:`DECIMALS` decimals (Python's
``format``); so a number parsed back from any report lies within :func:`tolerance` of the
value in ``result.json``. Missing values (``None``) show as :data:`MISSING`.
"""

from __future__ import annotations

from collections.abc import Sequence

DECIMALS = 3
MISSING = "—"


def tolerance() -> float:
    """Largest difference between a shown number and its JSON value: half a unit in the last shown place."""
    return 0.5 * 10.0**-DECIMALS + 1e-12


def num(x: float | None) -> str:
    """A metric (AUC, TPR, rate, distance, score): ``0.613``; None → ``—``."""
    return MISSING if x is None else f"{float(x):.{DECIMALS}f}"


def signed(x: float | None) -> str:
    """A difference, always with its sign: ``+0.043`` / ``-0.010``; None → ``—``."""
    return MISSING if x is None else f"{float(x):+.{DECIMALS}f}"


def count(n: int | None) -> str:
    """A count (images, generations, steps), exact; None → ``—``."""
    return MISSING if n is None else str(int(n))


def count_delta(n: int | None) -> str:
    """A difference of counts, with its sign: ``+2`` / ``-1`` / ``+0``; None → ``—``."""
    return MISSING if n is None else f"{int(n):+d}"


def interval(ci: Sequence[float] | None, *, sign: bool = False) -> str:
    """A ``[low, high]`` interval with :func:`num` (or :func:`signed` for differences); None/empty → ``—``."""
    if not ci:
        return MISSING
    f = signed if sign else num
    return f"[{f(ci[0])}, {f(ci[1])}]"
