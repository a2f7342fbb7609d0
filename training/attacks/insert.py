"""Random insertion attack: a harmful span of m tokens inside a refusal, then the model goes on.

The assistant turn is prefilled with ``refusal[:p] + span[:m]``; the continuation the model
writes after the span is judged. ``p`` is a token position of the refusal, moved forward to
the next word start so the span never splits a word; ``end`` inserts after the whole refusal.
The span is the start of the harmful response for that prompt (see
:mod:`training.common.responses`). Refusals are long pool refusals (default) or the model's
own greedy refusal.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from guard import SamplingParams
from training.attacks.harness import (
    AttackCase,
    AttackConfig,
    AttackContext,
    AttackReport,
    CellSummary,
    plot_rates,
    run_attack,
)
from training.common.generation import generate_requests
from training.common.insertion import (
    END,
    Position,
    insertion_point,
    pool_refusals,
    span_ids,
    word_starts,
)
from training.common.plots import Curve, plot_curves
from training.judge import is_refusal

logger = logging.getLogger(__name__)

DEFAULT_POSITIONS: tuple[Position, ...] = (0, 8, 16, 32, 64, 128, END)
DEFAULT_LENGTHS: tuple[int, ...] = (4, 8, 16, 32)
REFUSAL_SOURCES: tuple[str, ...] = ("pool", "own")


def prompt_refusals(
    ctx: AttackContext, source: str, *, own_tokens: int = 160
) -> list[tuple[list[int], str]]:
    """A refusal per prompt as token ids, and where it came from.

    ``own`` takes the attacked model's greedy answer where it is a (keyword) refusal and
    falls back to a pool refusal otherwise (a model that complies has no refusal to attack).
    """
    if source not in REFUSAL_SOURCES:
        raise ValueError(f"refusal source must be one of {REFUSAL_SOURCES}, got {source!r}")
    tok = ctx.lm.tokenizer
    texts = [(t, "pool") for t in pool_refusals(len(ctx.prompts), ctx.config.seed)]
    if source == "own":
        results = generate_requests(
            ctx.plain_engine,
            [(ids, []) for ids in ctx.prompt_ids],
            SamplingParams(max_tokens=own_tokens),
            batch_size=ctx.config.batch_size,
            desc="own refusals",
        )
        texts = [
            (r.text.strip(), "own") if is_refusal(r.text) else fallback
            for r, fallback in zip(results, texts)
        ]
        logger.info("own refusals: %d of %d prompts", sum(s == "own" for _, s in texts), len(texts))
    return [(tok.encode(text, add_special_tokens=False), kind) for text, kind in texts]


def _case(
    ctx: AttackContext, i: int, refusal: list[int], kind: str, p: Position, m: int, cell: dict
) -> AttackCase | None:
    tok = ctx.lm.tokenizer
    at = insertion_point(word_starts(tok, refusal), p)
    if at is None:
        return None
    span = span_ids(tok, ctx.responses[i].text, m, after_text=at > 0)
    meta = {
        "p_eff": at,
        "refusal_tokens": len(refusal),
        "refusal_source": kind,
        "span": tok.decode(span),
    }
    return AttackCase(i, cell, refusal[:at] + span, meta | {"p": p, "m": m})


def grid_cases(
    ctx: AttackContext, positions: Sequence[Position], lengths: Sequence[int], refusal: str = "pool"
) -> list[AttackCase]:
    """One case per (prompt, p, m); positions past a refusal's end are skipped (logged)."""
    cases, skipped = [], 0
    for i, (ids, kind) in enumerate(prompt_refusals(ctx, refusal)):
        for p in positions:
            for m in lengths:
                case = _case(ctx, i, ids, kind, p, m, {"p": p, "m": m})
                skipped += case is None
                if case is not None:
                    cases.append(case)
    if skipped:
        logger.warning("skipped %d cases whose position lies past the refusal", skipped)
    ctx.config.params["skipped_cases"] = skipped
    return cases


def random_cases(
    ctx: AttackContext, n_per_prompt: int, lengths: Sequence[int], refusal: str = "pool"
) -> list[AttackCase]:
    """``n_per_prompt`` cases per prompt with p uniform over word starts, m uniform over ``lengths``."""
    rng = random.Random(ctx.config.seed)
    cases = []
    for i, (ids, kind) in enumerate(prompt_refusals(ctx, refusal)):
        starts = word_starts(ctx.lm.tokenizer, ids)
        for _ in range(n_per_prompt):
            m = rng.choice(list(lengths))
            cases.append(_case(ctx, i, ids, kind, rng.choice(starts), m, {"m": m}))
    return cases


def _x(p: Position, finite: Sequence[int]) -> float:
    return len(finite) if p == END else finite.index(p)


def plot_insert(cells: Sequence[CellSummary], path: Path, title: str) -> Path:
    """ASR against insertion position, one line per span length (grid mode)."""
    grid = [c for c in cells if "p" in c.cell]
    if not grid:  # random mode: bars by span length
        return plot_rates(cells, path, title)
    finite = sorted({c.cell["p"] for c in grid if c.cell["p"] != END})
    has_end = any(c.cell["p"] == END for c in grid)
    curves = {}
    for m in sorted({c.cell["m"] for c in grid}):
        row = sorted((c for c in grid if c.cell["m"] == m), key=lambda c: _x(c.cell["p"], finite))
        curves[f"m={m}"] = Curve(
            [_x(c.cell["p"], finite) for c in row],
            [c.asr.rate for c in row],
            [c.asr.low for c in row],
            [c.asr.high for c in row],
        )
    labels = [str(p) for p in finite] + ([END] if has_end else [])
    return plot_curves(
        path,
        curves,
        xlabel="insertion position p (refusal tokens before the span)",
        ylabel="attack success rate (95 % CI)",
        title=title,
        xticks=list(range(len(labels))),
        xticklabels=labels,
        ylim=(0.0, 1.0),
    )


def run_insert(
    config: AttackConfig,
    positions: Sequence[Position] = DEFAULT_POSITIONS,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    *,
    refusal: str = "pool",
    random_per_prompt: int = 0,
    progress: bool = True,
) -> AttackReport:
    """Run the insertion attack over the (p, m) grid, or ``random_per_prompt`` random draws."""
    if not lengths or min(lengths) < 1:
        raise ValueError(f"span lengths must be >= 1, got {list(lengths)}")
    config.params = {**config.params, "refusal": refusal, "lengths": list(lengths)}
    if random_per_prompt > 0:
        config.params["random_per_prompt"] = random_per_prompt
        build = partial(
            random_cases, n_per_prompt=random_per_prompt, lengths=lengths, refusal=refusal
        )
        return run_attack(config, build, group_by=[(), ("m",)], plot=plot_insert, progress=progress)
    config.params["positions"] = list(positions)
    build = partial(grid_cases, positions=positions, lengths=lengths, refusal=refusal)
    return run_attack(
        config, build, group_by=[("p", "m"), ("m",)], plot=plot_insert, progress=progress
    )
