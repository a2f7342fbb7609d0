"""Prefilling attack: the assistant turn starts with the first k tokens of a harmful response."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from training.attacks.harness import (
    AttackCase,
    AttackConfig,
    AttackContext,
    AttackReport,
    CellSummary,
    run_attack,
)
from training.common.plots import Curve, plot_curves

DEFAULT_KS: tuple[int, ...] = (5, 10, 20, 40)


def prefill_cases(ctx: AttackContext, ks: Sequence[int]) -> list[AttackCase]:
    """One case per (prompt, k); ``meta.k_eff`` < k where the response is shorter than k."""
    if not ks or min(ks) < 0:
        raise ValueError(f"prefill lengths must be non-negative, got {list(ks)}")
    tok = ctx.lm.tokenizer
    cases = []
    for i, response in enumerate(ctx.responses):
        ids = tok.encode(response.text, add_special_tokens=False)
        for k in ks:
            meta = {"k_eff": min(k, len(ids)), "response_source": response.source}
            cases.append(AttackCase(i, {"k": k}, ids[:k], meta))
    return cases


def plot_prefill(cells: Sequence[CellSummary], path: Path, title: str) -> Path:
    """ASR against the number of prefilled harmful tokens."""
    cells = sorted(cells, key=lambda c: c.cell["k"])
    curve = Curve(
        [c.cell["k"] for c in cells],
        [c.asr.rate for c in cells],
        [c.asr.low for c in cells],
        [c.asr.high for c in cells],
    )
    return plot_curves(
        path,
        {"ASR": curve},
        xlabel="prefilled harmful tokens k",
        ylabel="attack success rate (95 % CI)",
        title=title,
        ylim=(0.0, 1.0),
    )


def run_prefill(
    config: AttackConfig, ks: Sequence[int] = DEFAULT_KS, *, progress: bool = True
) -> AttackReport:
    """Run the prefilling attack for every k in ``ks``."""
    config.params = {**config.params, "ks": list(ks)}
    return run_attack(
        config,
        partial(prefill_cases, ks=ks),
        group_by=[("k",)],
        plot=plot_prefill,
        progress=progress,
    )
