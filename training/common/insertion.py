"""Insertion geometry: where a harmful span goes into a refusal, and the span's tokens.

A position ``p`` counts refusal tokens before the span; it is moved forward to the next
word start so the span never splits a word, and ``end`` means after the whole refusal.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from training.data import refusal_pool

END = "end"
Position = int | str
_WORD_START = ("Ġ", "▁", "Ċ", " ", "\n")


def parse_positions(text: str) -> list[Position]:
    """Parse ``"0,8,end"`` into ``[0, 8, "end"]``.

    Raises:
        ValueError: A token that is neither a non-negative integer nor ``end``.
    """
    out: list[Position] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == END:
            out.append(END)
        elif part.isdigit():
            out.append(int(part))
        else:
            raise ValueError(f"positions must be non-negative integers or 'end', got {part!r}")
    return out


def word_starts(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> list[int]:
    """Indices where a word starts (0, tokens opening with whitespace, and ``len(ids)``)."""
    pieces = tokenizer.convert_ids_to_tokens(list(ids))
    return (
        [0]
        + [i for i, piece in enumerate(pieces) if i and piece.startswith(_WORD_START)]
        + [len(ids)]
    )


def insertion_point(starts: Sequence[int], p: Position) -> int | None:
    """First word start at or after ``p`` (``end``: the last); ``None`` if ``p`` is past the end."""
    if p == END:
        return starts[-1]
    return next((s for s in starts if s >= p), None) if p <= starts[-1] else None


def span_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, m: int, *, after_text: bool
) -> list[int]:
    """First ``m`` tokens of a harmful span; with a leading space when it follows text."""
    text = text.strip()
    return tokenizer.encode(" " + text if after_text else text, add_special_tokens=False)[:m]


def pool_refusals(n: int, seed: int) -> list[str]:
    """``n`` long refusals drawn (seeded, with replacement) from the refusal pool."""
    rng = random.Random(seed)
    long = [r.text for r in refusal_pool(seed=seed) if r.style == "long"]
    return [rng.choice(long) for _ in range(n)]
