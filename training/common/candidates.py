"""Random insertions: a harmful span of m tokens at a random word start p of a refusal.

A candidate is what the random insertion attack prefills (``refusal[:p] + span[:m]``),
plus the tokens the span itself goes on with, used by the harm-likelihood criterion.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from training.common.insertion import span_ids, word_starts

DEFAULT_SPAN_LENGTHS: tuple[int, ...] = (4, 8, 16, 32)
CONTINUATION_TOKENS = 16


@dataclass(frozen=True, slots=True)
class Insertion:
    """A harmful span inserted into a refusal.

    Attributes:
        refusal_ids: The whole refusal the span goes into.
        position: Refusal tokens before the span (a word start).
        span_ids: The inserted span (m tokens).
        continuation_ids: How the span's source text goes on after the span.
        span_source: Provenance of the span text.
    """

    refusal_ids: tuple[int, ...]
    position: int
    span_ids: tuple[int, ...]
    continuation_ids: tuple[int, ...]
    span_source: str

    @property
    def prefix_ids(self) -> list[int]:
        """The assistant prefill: refusal tokens before ``position``, then the span."""
        return [*self.refusal_ids[: self.position], *self.span_ids]

    def describe(self) -> dict[str, int | str]:
        """Position, span length and source, for logs and records."""
        return {
            "p": self.position,
            "m": len(self.span_ids),
            "refusal_tokens": len(self.refusal_ids),
            "span_source": self.span_source,
        }


def make_insertion(
    tokenizer: PreTrainedTokenizerBase,
    refusal_ids: Sequence[int],
    position: int,
    span_text: str,
    m: int,
    *,
    span_source: str = "",
    continuation_tokens: int = CONTINUATION_TOKENS,
) -> Insertion:
    """Insert the first ``m`` tokens of ``span_text`` at ``position`` of the refusal."""
    ids = span_ids(tokenizer, span_text, m + continuation_tokens, after_text=position > 0)
    return Insertion(tuple(refusal_ids), position, tuple(ids[:m]), tuple(ids[m:]), span_source)


def sample_insertions(
    tokenizer: PreTrainedTokenizerBase,
    refusal_ids: Sequence[int],
    spans: Sequence[tuple[str, str]],
    k: int,
    rng: random.Random,
    *,
    lengths: Sequence[int] = DEFAULT_SPAN_LENGTHS,
) -> list[Insertion]:
    """``k`` random insertions: p uniform over the refusal's word starts (its end included),
    span text uniform over ``spans`` (``(text, source)`` pairs), m uniform over ``lengths``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not spans:
        raise ValueError("no harmful spans to insert")
    if not lengths or min(lengths) < 1:
        raise ValueError(f"span lengths must be >= 1, got {list(lengths)}")
    starts = word_starts(tokenizer, refusal_ids)
    out = []
    for _ in range(k):
        text, source = rng.choice(spans)
        out.append(
            make_insertion(
                tokenizer,
                refusal_ids,
                rng.choice(starts),
                text,
                rng.choice(list(lengths)),
                span_source=source,
            )
        )
    return out
