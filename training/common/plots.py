"""PNG figures (matplotlib, Agg canvas, no global pyplot state) shared by the training features."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Curve:
    """One line: ``y`` over ``x``, with an optional ``[low, high]`` band drawn as error bars."""

    x: Sequence[float]
    y: Sequence[float]
    low: Sequence[float] | None = None
    high: Sequence[float] | None = None


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    logger.info("wrote %s", path)
    return path


def plot_curves(
    path: str | Path,
    curves: Mapping[str, Curve],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    xticks: Sequence[float] | None = None,
    xticklabels: Sequence[str] | None = None,
    ylim: tuple[float, float] | None = None,
    logy: bool = False,
) -> Path:
    """Line plot of named curves (error bars where a curve has a band); returns the path."""
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.add_subplot()
    for name, c in curves.items():
        if c.low is not None and c.high is not None:
            err = [
                [max(0.0, y - lo) for y, lo in zip(c.y, c.low)],
                [max(0.0, hi - y) for y, hi in zip(c.y, c.high)],
            ]
            ax.errorbar(c.x, c.y, yerr=err, marker="o", ms=3, capsize=3, label=name)
        else:
            ax.plot(c.x, c.y, marker="o", ms=3, label=name)
    if xticks is not None:
        ax.set_xticks(list(xticks), labels=list(xticklabels) if xticklabels is not None else None)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_bars(
    path: str | Path,
    labels: Sequence[str],
    values: Sequence[float],
    *,
    low: Sequence[float] | None = None,
    high: Sequence[float] | None = None,
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = (0.0, 1.0),
) -> Path:
    """Bar chart with optional ``[low, high]`` error bars; returns the path."""
    fig = Figure(figsize=(max(4.0, 0.6 * len(labels) + 2), 4.0))
    ax = fig.add_subplot()
    err = None
    if low is not None and high is not None:
        err = [
            [max(0.0, v - lo) for v, lo in zip(values, low)],
            [max(0.0, hi - v) for v, hi in zip(values, high)],
        ]
    ax.bar(range(len(values)), values, yerr=err, capsize=3)
    ax.set_xticks(range(len(labels)), labels=list(labels), rotation=30 if len(labels) > 6 else 0)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
