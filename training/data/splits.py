"""De-duplication and leakage-free, seeded train/dev/test splits by prompt.

Near-duplicate prompts (same normalised text, or character n-gram TF-IDF cosine at or above
a threshold) are joined into groups with union-find; whole groups are then assigned to
splits, so a test prompt never has a near-duplicate in train.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

from training.data.text import normalize_text

logger = logging.getLogger(__name__)

R = TypeVar("R")

# NOTE: cosine of char 3-5-gram TF-IDF. At 0.7, AdvBench rewordings ("outline a plan to hack
# into a government database..." vs "outline a strategy for hacking into...") are joined while
# groups stay small (largest 17 of 1,150 harmful + XSTest prompts).
DEFAULT_THRESHOLD = 0.7
_BLOCK = 512  # rows per block of the similarity product; bounds memory at _BLOCK x n floats


@dataclass(frozen=True, slots=True)
class Splits(Generic[R]):
    """Three disjoint parts of one data set."""

    train: tuple[R, ...]
    dev: tuple[R, ...]
    test: tuple[R, ...]


def _default_key(record: object) -> str:
    return record if isinstance(record, str) else record.prompt  # type: ignore[attr-defined]


class _UnionFind:
    """Disjoint sets over ``0..n-1`` with path halving."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def _char_ngram_vectors(normalised: Sequence[str]) -> sp.csr_matrix:
    """L2-normalised character 3-5-gram TF-IDF rows, ``[n_texts, n_ngrams]``; IDF fitted here."""
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True)
    return vectorizer.fit_transform(normalised)


def similar_pairs(
    texts: Sequence[str], *, threshold: float = DEFAULT_THRESHOLD
) -> list[tuple[int, int]]:
    """Find index pairs ``(i, j)``, ``i < j``, whose texts are near-duplicates.

    Args:
        texts: Texts to compare (already normalised or not; they are normalised here).
        threshold: Minimum cosine similarity of character 3-5-gram TF-IDF vectors. The IDF
            is fitted on ``texts``, so shared template words ("write a tutorial on how to")
            count less in a large collection; compare whole collections, not pairs.

    Returns:
        All pairs at or above the threshold, sorted.
    """
    normalised = [normalize_text(t) for t in texts]
    keep = [i for i, t in enumerate(normalised) if t]  # empty texts have no n-grams
    if len(keep) < 2:
        return []
    vectors = _char_ngram_vectors([normalised[i] for i in keep])  # [n_kept, n_ngrams]
    pairs: list[tuple[int, int]] = []
    for start in range(0, vectors.shape[0], _BLOCK):
        sims = (vectors[start : start + _BLOCK] @ vectors.T).toarray()  # [block, n_kept]
        rows, cols = np.nonzero(sims >= threshold)
        pairs.extend(
            (keep[start + i], keep[j])
            for i, j in zip(rows.tolist(), cols.tolist())
            if start + i < j
        )
    return sorted(pairs)


def max_similarity(texts: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Near-duplicate similarity of each text to its closest reference, ``[n_texts]``.

    The same measure as :func:`similar_pairs` (cosine of character 3-5-gram TF-IDF of the
    normalised texts), with the IDF fitted on ``references`` and ``texts`` together, so
    ``max_similarity(texts, refs) >= DEFAULT_THRESHOLD`` flags near-duplicates of a
    reference. Empty texts (and an empty ``references``) score 0.
    """
    normalised = [normalize_text(t) for t in texts]
    refs = [r for r in (normalize_text(t) for t in references) if r]
    best = np.zeros(len(normalised))
    keep = [i for i, t in enumerate(normalised) if t]
    if not keep or not refs:
        return best
    vectors = _char_ngram_vectors([*refs, *(normalised[i] for i in keep)])
    best[keep] = best_cosine(vectors[len(refs) :], vectors[: len(refs)])
    return best


def best_cosine(text_vectors: sp.csr_matrix, ref_vectors: sp.csr_matrix) -> np.ndarray:
    """Largest dot product of each (L2-normalised) text row with any reference row, in
    blocks of rows so memory stays at ``_BLOCK x n_refs``; ``[n_texts]``."""
    best = np.zeros(text_vectors.shape[0])
    for start in range(0, text_vectors.shape[0], _BLOCK):
        sims = (text_vectors[start : start + _BLOCK] @ ref_vectors.T).toarray()  # [block, n_refs]
        best[start : start + _BLOCK] = sims.max(axis=1)
    return best


def group_near_duplicates(
    texts: Sequence[str], *, threshold: float = DEFAULT_THRESHOLD
) -> list[int]:
    """Assign a group id to every text; exact (normalised) and near-duplicates share one.

    Args:
        texts: Texts to group.
        threshold: See :func:`similar_pairs`.

    Returns:
        ``group[i]`` for each text: the smallest index of its group.
    """
    normalised = [normalize_text(t) for t in texts]
    first_index: dict[str, int] = {}
    for i, text in enumerate(normalised):
        first_index.setdefault(text, i)
    uniques = list(first_index)  # unique normalised texts, in order of first appearance
    sets = _UnionFind(len(uniques))
    for i, j in similar_pairs(uniques, threshold=threshold):
        sets.union(i, j)
    # uniques are in order of first appearance, so the min-index root is the group's first text
    group_of = {text: first_index[uniques[sets.find(k)]] for k, text in enumerate(uniques)}
    return [group_of[text] for text in normalised]


def deduplicate(
    records: Sequence[R],
    *,
    key: Callable[[R], str] = _default_key,
    near: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[R]:
    """Keep the first record of each duplicate group, in input order.

    Args:
        records: Records (or plain strings) to de-duplicate across sources.
        key: Text that identifies a record; defaults to ``record.prompt`` (or the string).
        near: Also drop near-duplicates, not only exact normalised matches.
        threshold: Similarity threshold when ``near`` is set.

    Returns:
        The surviving records.
    """
    texts = [key(r) for r in records]
    if near:
        groups = group_near_duplicates(texts, threshold=threshold)
    else:
        first: dict[str, int] = {}
        groups = [first.setdefault(normalize_text(t), i) for i, t in enumerate(texts)]
    return [r for i, r in enumerate(records) if groups[i] == i]


def split_prompts(
    records: Sequence[R],
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    key: Callable[[R], str] = _default_key,
    threshold: float = DEFAULT_THRESHOLD,
) -> Splits[R]:
    """Split records into train/dev/test by prompt, keeping near-duplicate groups together.

    Groups are shuffled with ``seed`` and each goes, whole, to the split furthest below its
    target size, so the fractions hold approximately (exactly when all groups are singletons).

    Args:
        records: Records (or plain strings) to split.
        seed: Seed of the group shuffle.
        fractions: Target (train, dev, test) fractions of records; must sum to 1.
        key: Text that groups records (default ``record.prompt``).
        threshold: Near-duplicate similarity threshold (see :func:`similar_pairs`).

    Returns:
        The three splits, each in input order.

    Raises:
        ValueError: Fractions that are negative or do not sum to 1.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"fractions must be three non-negative numbers summing to 1, got {fractions}"
        )
    groups = group_near_duplicates([key(r) for r in records], threshold=threshold)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    order = list(members)
    np.random.default_rng(seed).shuffle(order)
    targets = np.asarray(fractions) * len(records)
    counts = np.zeros(3)
    assignment = np.empty(len(records), dtype=np.int64)
    for g in order:
        part = int(np.argmax(targets - counts))  # split furthest below its target
        assignment[members[g]] = part
        counts[part] += len(members[g])
    logger.info("split %d records in %d groups into %s", len(records), len(order), counts.tolist())
    parts = tuple(tuple(r for r, a in zip(records, assignment) if a == k) for k in range(3))
    return Splits(*parts)
