"""Report figures as PNG bytes (matplotlib's Agg canvas; no global backend state, no display).

The figures draw stored values only: ROC curves from a result's ``roc_fpr`` / ``roc_tpr``,
histograms of its per-sample scores; legends show AUCs formatted by
:mod:`s2l_plugin.report.numbers`. matplotlib is imported inside the functions so the CLI
stays light.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from s2l_plugin.report import numbers as fmt

DPI = 100


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


LINESTYLES = ("-", "--", "-.", ":")


def roc_png(
    curves: Sequence[tuple[str, Sequence[float], Sequence[float], float]],
    *,
    loglog: bool,
    title: str,
    floor: float | None = None,
) -> bytes:
    """ROC curves (label, FPR, TPR, AUC) on one axes, linear or log-log, as PNG bytes.

    On log-log axes a zero FPR/TPR cannot be drawn; such points sit at ``floor`` (callers pass
    half the smallest rate the data resolves, 1 / (2 · #non-members); default: half the
    smallest positive rate in the curves), so the low-FPR regime — where a membership attack
    matters — stays visible. Line styles differ per curve so identical curves stay visible.
    """
    fig = _figure(4.6, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    if floor is None:
        positive = [v for _, fpr, tpr, _ in curves for v in (*fpr, *tpr) if v > 0]
        floor = min(positive) / 2 if positive else 1e-3
    for i, (label, fpr, tpr, auc) in enumerate(curves):
        if loglog:
            fpr = [max(f, floor) for f in fpr]
            tpr = [max(t, floor) for t in tpr]
        ax.plot(
            fpr, tpr, drawstyle="steps-post", linewidth=1.8, linestyle=LINESTYLES[i % len(LINESTYLES)],
            label=f"{label} (AUC {fmt.num(auc)})",
        )
    if loglog:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.plot([floor, 1], [floor, 1], linestyle=":", color="grey", linewidth=1, label="chance")
        ax.set_xlim(floor, 1.05)
        ax.set_ylim(floor, 1.05)
    else:
        ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1, label="chance")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title + (" (log-log)" if loglog else ""), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def score_hist_png(member_scores: Sequence[float], nonmember_scores: Sequence[float], *, title: str) -> bytes:
    """Overlaid histograms of member and non-member scores (higher = member), as PNG bytes."""
    fig = _figure(4.6, 3.0)
    ax = fig.add_subplot(1, 1, 1)
    values = list(member_scores) + list(nonmember_scores)
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    bins = [lo + (hi - lo) * i / 30 for i in range(31)]
    ax.hist(list(nonmember_scores), bins=bins, alpha=0.55, label=f"non-members ({len(nonmember_scores)})", color="tab:blue")
    ax.hist(list(member_scores), bins=bins, alpha=0.55, label=f"members ({len(member_scores)})", color="tab:red")
    ax.set_xlabel("score (higher = member)")
    ax.set_ylabel("images")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)
