"""The bench's attacks, each built from the attack harness's own case builders.

A cell is a name, a case builder ``AttackContext -> list[AttackCase]`` and the cell-key
groupings to summarise. A new attack plugs in by adding one :class:`AttackCell`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

from guard import GuardConfig, LinearProbe
from training.attacks.direct import direct_cases
from training.attacks.evasion import evasion_cases
from training.attacks.harness import AttackCase, AttackContext
from training.attacks.insert import grid_cases
from training.attacks.multiturn import multiturn_cases
from training.attacks.prefill import prefill_cases
from training.attacks.probe_aware import DEFAULT_STEPS as PROBE_AWARE_STEPS
from training.attacks.probe_aware import probe_aware_cases
from training.attacks.rap import DEFAULT_TOP_K, PrefixCache, rap_cases
from training.attacks.worst_insert import worst_insertion_cases
from training.common.benign import benign_sets
from training.common.insertion import Position
from training.common.prompts import AttackPrompt
from training.data import load_xstest_prompts
from training.data.loaders import PathLike

ATTACKS: tuple[str, ...] = (
    "direct", "prefill", "insert", "adaptive", "rwi", "multiturn", "evasion",
)  # fmt: skip
OPT_IN_ATTACKS: tuple[str, ...] = ("rap", "probe_aware")
"""Families left out of the default run for their cost (RAP: a top-k search per prompt;
probe_aware: a gradient search per prompt, and it needs the guard's probe)."""
ALL_ATTACKS: tuple[str, ...] = ATTACKS + OPT_IN_ATTACKS
HOLDBACK = GuardConfig().holdback  # the guard's default holdback window (library and proxy)


@dataclass(frozen=True)
class AttackCell:
    """One attack of the bench.

    Attributes:
        name: Attack name (``direct``, ``prefill``, ...).
        build: Case builder on the attacked model's context.
        group_by: Cell-key groupings summarised (``()``: all cases of the attack).
    """

    name: str
    build: Callable[[AttackContext], list[AttackCase]]
    group_by: tuple[tuple[str, ...], ...]


def attack_cells(
    attacks: Sequence[str],
    *,
    ks: Sequence[int],
    positions: Sequence[Position],
    lengths: Sequence[int],
    refusal: str = "pool",
    rwi_k: int = 8,
    rwi_criterion: str = "harm_likelihood",
    rap_top_k: int = DEFAULT_TOP_K,
    probe_aware_steps: Sequence[int] = PROBE_AWARE_STEPS,
) -> list[AttackCell]:
    """The requested cells, in :data:`ALL_ATTACKS` order.

    ``insert`` is the (position, span length) grid of random insertions; ``adaptive``
    places the span right after the guard's holdback window (p = holdback), where an
    attacker who knows the guard expects it to have released the refusal's first tokens;
    ``rwi`` is the adaptive worst-of-``rwi_k`` random insertion, chosen by the attacked
    model itself under ``rwi_criterion`` (spans of ``lengths``); ``multiturn`` puts a span
    of each of ``lengths`` in earlier assistant turns (one turn, or split over two) and asks
    the model to continue (:mod:`training.attacks.multiturn`); ``evasion`` asks for the
    answer in base64, leetspeak, French/Spanish/German or code comments, one cell per form
    (:mod:`training.attacks.evasion`); ``rap`` (opt-in) prefills the first k of ``ks``
    tokens of a rank-assisted prefix, each among the model's ``rap_top_k`` next tokens
    (:mod:`training.attacks.rap`), so its cells compare with ``prefill``'s; ``probe_aware``
    (opt-in) optimises an inserted span against the guard's own probe (the run's single
    ``--probe``), one cell per attacker budget of ``probe_aware_steps``
    (:mod:`training.attacks.probe_aware`).

    Raises:
        ValueError: An unknown attack name.
    """
    unknown = set(attacks) - set(ALL_ATTACKS)
    if unknown:
        raise ValueError(f"unknown attacks {sorted(unknown)}; choose from {ALL_ATTACKS}")
    rap_searches: PrefixCache = {}  # one search per prompt and model, shared by the seeds
    grid = partial(grid_cases, lengths=lengths, refusal=refusal)
    cells = {
        "direct": AttackCell("direct", direct_cases, ((),)),
        "prefill": AttackCell("prefill", partial(prefill_cases, ks=ks), (("k",),)),
        "insert": AttackCell(
            "insert", partial(grid, positions=positions), (("p", "m"), ("p",), ("m",), ())
        ),
        "adaptive": AttackCell("adaptive", partial(grid, positions=[HOLDBACK]), (("m",), ())),
        "rwi": AttackCell(  # the one adapter to the RWI attack's case builder
            "rwi",
            partial(worst_insertion_cases, k=rwi_k, lengths=lengths, criterion=rwi_criterion),
            (("k",), ("k", "depth")),
        ),
        "multiturn": AttackCell(
            "multiturn",
            partial(multiturn_cases, lengths=lengths),
            (("variant", "m"), ("variant",), ()),
        ),
        # Per form only: a pool would mix in the forms the judges cannot read.
        "evasion": AttackCell("evasion", evasion_cases, (("form",),)),
        "rap": AttackCell(
            "rap", partial(rap_cases, ks=ks, top_k=rap_top_k, cache=rap_searches), (("k",),)
        ),
        "probe_aware": AttackCell(
            "probe_aware", partial(_probe_aware_build, steps=probe_aware_steps), (("steps",),)
        ),
    }
    return [cells[name] for name in ALL_ATTACKS if name in attacks]


def _probe_aware_build(ctx: AttackContext, steps: Sequence[int]) -> list[AttackCase]:
    """Probe-aware cases at the budgets ``steps``, against the run's guard probe.

    Raises:
        ValueError: The run has no single guard probe (``ctx.config.probe``).
    """
    if ctx.config.probe is None:
        raise ValueError("the probe_aware family needs one guard probe for every model (--probe)")
    return probe_aware_cases(ctx, LinearProbe.load(ctx.config.probe), steps)


def benign_prompts(
    limit: int | None, *, seed: int = 0, data_dir: PathLike = None
) -> list[AttackPrompt]:
    """The XSTest safe prompts of the benign evaluation set (60 with the default split).

    They never fit or calibrate a probe (:func:`training.common.benign.benign_sets` with its
    defaults, which probe training uses); ``limit`` keeps a sample drawn with ``seed``.
    """
    safe = {p.prompt: p for p in load_xstest_prompts(data_dir) if p.label == "safe"}
    held_out = benign_sets(data_dir=data_dir).eval_prompts
    prompts = [
        AttackPrompt(text, None, f"xstest:{safe[text].type}", safe[text].source_id)
        for text in held_out
        if text in safe
    ]
    if limit is not None and limit < len(prompts):
        prompts = random.Random(seed).sample(prompts, limit)
    return prompts
