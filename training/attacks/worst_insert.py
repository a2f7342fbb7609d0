"""RWI attack: the worst of K random insertions per prompt (the adaptive insertion attack).

For each prompt K random insertions of its harmful response into a long refusal are
drawn (as in :mod:`training.attacks.insert`'s random mode) and the attacked model itself
scores them; the attacker keeps the one it is least likely to recover from. The default
criterion, ``harm_likelihood``, needs no knowledge of the defender's recovery text.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from functools import partial

from training.attacks.harness import (
    AttackCase,
    AttackConfig,
    AttackContext,
    AttackReport,
    plot_rates,
    run_attack,
)
from training.common.candidates import DEFAULT_SPAN_LENGTHS, sample_insertions
from training.common.insertion import pool_refusals
from training.common.worst import insertion_scores, worst_index

RECOVERY_TEXT = "I'm sorry, but I can't help with that."


def worst_insertion_cases(
    ctx: AttackContext, k: int, lengths: Sequence[int], criterion: str, deep: int = 64
) -> list[AttackCase]:
    """One case per prompt: its worst of ``k`` random insertions under ``criterion``."""
    tok = ctx.lm.tokenizer
    rng = random.Random(ctx.config.seed)
    recovery = tok.encode(RECOVERY_TEXT, add_special_tokens=False)
    cases = []
    refusals = pool_refusals(len(ctx.prompts), ctx.config.seed)
    for i, refusal in enumerate(refusals):
        refusal_ids = tok.encode(refusal, add_special_tokens=False)
        spans = [(ctx.responses[i].text, ctx.responses[i].source)]
        candidates = sample_insertions(tok, refusal_ids, spans, k, rng, lengths=lengths)
        scores = insertion_scores(
            ctx.lm.model,
            [ctx.prompt_ids[i]] * k,
            candidates,
            criterion,
            recovery_ids=[recovery] * k,
            pad_id=tok.pad_token_id or 0,
        )
        worst = candidates[worst_index(scores)]
        depth = "deep" if worst.position >= deep else "shallow"
        meta = worst.describe() | {"span": tok.decode(worst.span_ids), "score": float(scores.max())}
        cases.append(AttackCase(i, {"k": k, "depth": depth}, worst.prefix_ids, meta))
    return cases


def run_worst_insert(
    config: AttackConfig,
    k: int = 8,
    lengths: Sequence[int] = DEFAULT_SPAN_LENGTHS,
    criterion: str = "harm_likelihood",
    *,
    progress: bool = True,
) -> AttackReport:
    """Run the RWI attack (see module docstring)."""
    config.params = {**config.params, "k": k, "lengths": list(lengths), "criterion": criterion}
    build = partial(worst_insertion_cases, k=k, lengths=lengths, criterion=criterion)
    return run_attack(
        config, build, group_by=[("k",), ("k", "depth")], plot=plot_rates, progress=progress
    )
