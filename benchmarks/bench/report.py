"""Render a bench's ``results.json``: a Markdown table and PNG figures (``trajguard bench report``).

Everything here reads only the results, so a report can be re-rendered at any time.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from training.common.insertion import END
from training.common.plots import Curve, plot_curves

logger = logging.getLogger(__name__)

TABLE_FILE = "results.md"
POSITION_PLOT = "asr_vs_position.png"
LEAK_PLOT = "leak_distribution.png"
TRACE_PLOT = "score_traces.png"


def load_results(directory: str | Path) -> dict[str, Any]:
    """Read ``results.json`` of a bench directory."""
    return json.loads((Path(directory) / "results.json").read_text(encoding="utf-8"))


def _rate(rate: dict[str, Any] | None) -> str:
    if rate is None:
        return "–"
    if rate["n"] == 0:
        return "n/a (0)"
    return f"{rate['rate']:.3f} [{rate['low']:.3f}, {rate['high']:.3f}]"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def leak_stats(leaked: Sequence[int]) -> tuple[float, float]:
    """Median and 95th percentile of leaked tokens (NaN when empty)."""
    if not leaked:
        return math.nan, math.nan
    return float(np.median(leaked)), float(np.percentile(leaked, 95))


def _cell_row(c: dict[str, Any]) -> str:
    median, p95 = leak_stats(c["leaked"])
    label = "–" if c["label"] == "all" else c["label"]
    return (
        f"| {c['model']} | {c['defence']} | {c['attack']} | {label} | {c['asr']['n']} "
        f"| {_rate(c['asr'])} | {_rate(c.get('trigger_rate'))} | {median:.0f} / {p95:.0f} "
        f"| {c['wall_s']:.1f} |"
    )


def markdown_table(results: dict[str, Any]) -> str:
    """Attack cells (rows pooled over at most one cell key), the insertion grid and benign."""
    run, machine = results["run"], results["machine"]
    lines = [
        "# trajguard bench attacks",
        "",
        (
            f"Run {run['id']}: {run['wall_time_s']:.1f} s wall, {run['generated']} samples "
            f"generated, {run['cached']} from the cache; torch {machine.get('torch')}, "
            f"{machine.get('cpu_model') or machine.get('cpu')}."
        ),
        "",
        (
            "ASR and rates: 95 % Wilson intervals. Only model-written tokens are judged (the "
            "guard's recovery text and refusal message are not): a model that re-complies after "
            "a recovery is an attack success. Leaked: harmful model-written tokens the user "
            "received, before and after a recovery (median / p95). Wall: generation seconds."
        ),
        "",
        "| model | defence | attack | cell | n | ASR | guard triggered | leaked med / p95 | wall s |",
        "|---|---|---|---|---:|---|---|---:|---:|",
    ]
    cells = results["cells"]
    lines += [_cell_row(c) for c in cells if len(c["grouping"]) <= 1]
    grid = [c for c in cells if len(c["grouping"]) > 1]
    if grid:
        lines += [
            "",
            "## Insertion grid (position p × span length m)",
            "",
            "| model | defence | attack | cell | n | ASR | guard triggered | leaked med / p95 | wall s |",
            "|---|---|---|---|---:|---|---|---:|---:|",
        ]
        lines += [_cell_row(c) for c in grid]
    if results["benign"]:
        lines += [
            "",
            "## Benign prompts (XSTest safe)",
            "",
            (
                "Intact: share of benign answers identical to the undefended model's answer. "
                "Utility: the model's mean token log-likelihood of GSM8K test reference answers."
            ),
            "",
            "| model | defence | n | false trigger | over-refusal | intact | utility | wall s |",
            "|---|---|---:|---|---|---|---:|---:|",
        ]
        lines += [
            f"| {b['model']} | {b['defence']} | {b['n']} | {_rate(b['false_trigger'])} "
            f"| {_rate(b['over_refusal'])} | {_rate(b['utility'])} "
            f"| {_number(b.get('utility_loglik'))} | {b['wall_s']:.1f} |"
            for b in results["benign"]
        ]
    return "\n".join(lines) + "\n"


def _runs(cells: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((c["model"], c["defence"]) for c in cells))


def plot_asr_vs_position(results: dict[str, Any], path: Path) -> Path | None:
    """ASR against insertion position (pooled over span lengths), one line per model/defence."""
    cells = [c for c in results["cells"] if c["attack"] == "insert" and c["grouping"] == ["p"]]
    if not cells:
        return None
    finite = sorted({c["cell"]["p"] for c in cells if c["cell"]["p"] != END})
    labels = [str(p) for p in finite] + ([END] if any(c["cell"]["p"] == END for c in cells) else [])
    curves = {}
    for model, defence in _runs(cells):
        row = sorted(
            (c for c in cells if (c["model"], c["defence"]) == (model, defence)),
            key=lambda c: labels.index(str(c["cell"]["p"])),
        )
        curves[f"{model} / {defence}"] = Curve(
            [labels.index(str(c["cell"]["p"])) for c in row],
            [c["asr"]["rate"] for c in row],
            [c["asr"]["low"] for c in row],
            [c["asr"]["high"] for c in row],
        )
    return plot_curves(
        path,
        curves,
        xlabel="insertion position p (refusal tokens before the span)",
        ylabel="attack success rate (95 % CI)",
        title="Random insertion: ASR vs position",
        xticks=list(range(len(labels))),
        xticklabels=labels,
        ylim=(0.0, 1.0),
    )


def plot_leak_distribution(results: dict[str, Any], path: Path) -> Path | None:
    """Box plot of leaked tokens per model / defence / attack (all cells of the attack)."""
    groups: dict[str, list[int]] = {}
    first_grouping: dict[tuple[str, str, str], list[str]] = {}
    for c in results["cells"]:
        key = (c["model"], c["defence"], c["attack"])
        if first_grouping.setdefault(key, c["grouping"]) == c["grouping"]:  # a partition
            groups.setdefault(" / ".join(key), []).extend(c["leaked"])
    if not groups:
        return None
    fig = Figure(figsize=(max(5.0, 0.9 * len(groups) + 2), 4.5))
    ax = fig.add_subplot()
    ax.boxplot(list(groups.values()), whis=(5, 95), showmeans=True)
    ax.set_xticks(
        range(1, len(groups) + 1), labels=list(groups), rotation=35, ha="right", fontsize=7
    )
    ax.set(ylabel="harmful model-written tokens delivered", title="Leaked tokens (whiskers p5–p95)")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_score_traces(results: dict[str, Any], path: Path) -> Path | None:
    """Per-token P(unsafe) of the example trajectories, with the guard threshold."""
    examples = results["examples"]
    if not examples:
        return None
    curves = {}
    for i, e in enumerate(examples):
        scores = [math.nan if s is None else s for s in e["scores"]]
        cell = ",".join(f"{k}={v}" for k, v in e["cell"].items())
        tag = "triggered" if e["triggered"] else "not triggered"
        curves[f"{i + 1}. {e['attack']} {cell} ({tag})"] = Curve(list(range(len(scores))), scores)
    threshold = next((e["threshold"] for e in examples if e["threshold"] is not None), None)
    if threshold is not None:
        width = max(len(e["scores"]) for e in examples)
        curves[f"threshold {threshold:.4g}"] = Curve([0, max(1, width - 1)], [threshold] * 2)
    return plot_curves(
        path,
        curves,
        xlabel="released continuation token",
        ylabel="probe P(unsafe)",
        title="Per-token probe scores of example trajectories",
        ylim=(0.0, 1.02),
    )


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def render_report(results: dict[str, Any], out: str | Path) -> dict[str, str]:
    """Write the Markdown table and the figures into ``out``; returns what was written."""
    out = Path(out)
    (out / TABLE_FILE).write_text(markdown_table(results), encoding="utf-8")
    paths = {"table": str(out / TABLE_FILE)}
    for name, plot, file in (
        ("asr_vs_position", plot_asr_vs_position, POSITION_PLOT),
        ("leak_distribution", plot_leak_distribution, LEAK_PLOT),
        ("score_traces", plot_score_traces, TRACE_PLOT),
    ):
        written = plot(results, out / file)
        if written is not None:
            paths[name] = str(written)
    logger.info("bench report: %s", paths)
    return paths
