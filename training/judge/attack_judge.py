"""The attack benchmark's harm judge: fitted without the evaluation behaviours, C chosen on dev.

:func:`fit_attack_judge` drops every labelled generation of an evaluation behaviour (see
:mod:`training.judge.exclusion`), chooses C on a behaviour-grouped dev split of the rest
(:mod:`training.judge.selection`), fits on all the rest and records what it did in
``judge.report`` (saved in ``config.json``). :func:`attack_judge_key` names the cached judge.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from training.common.harmful_split import DEFAULT_SPLIT_SEED
from training.data.records import LabelledGeneration
from training.data.text import normalize_text
from training.judge.exclusion import (
    MIN_CONTAINED_WORDS,
    NEAR_DUPLICATE_THRESHOLD,
    PARAPHRASE_THRESHOLD,
    RecordSelection,
)
from training.judge.harm import HarmJudge
from training.judge.selection import C_GRID, DEV_FRACTION, CSelection, fit_selected

logger = logging.getLogger(__name__)

KEY_VERSION = "attack-judge-v2"  # bump when the fitting recipe changes
SELECTION_SEED = 0


def counts_by_source(records: Iterable[LabelledGeneration]) -> dict[str, dict[str, int]]:
    """``{source: {"0": n_not_harmful, "1": n_harmful}}``, sources in order of appearance."""
    counts: dict[str, Counter[int]] = {}
    for r in records:
        counts.setdefault(r.source, Counter())[r.label] += 1
    return {source: {str(k): c[k] for k in (0, 1)} for source, c in counts.items()}


def prompts_digest(prompts: Iterable[str]) -> str:
    """SHA-256 of the exclusion set (normalised, sorted, so order and case do not matter)."""
    texts = sorted({normalize_text(p) for p in prompts})
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def attack_judge_key(
    records: Sequence[LabelledGeneration],
    prompts: Iterable[str],
    *,
    grid: Sequence[float] = C_GRID,
    seed: int = SELECTION_SEED,
) -> str:
    """Cache key: the training records actually used, the exclusion set and the C grid.

    Args:
        records: The records the judge is fitted on (after exclusion).
        prompts: The evaluation prompts they were filtered against.
        grid: Candidate values of C.
        seed: Seed of the dev split.
    """
    digest = hashlib.sha256(f"{KEY_VERSION}\x00grid={list(grid)}\x00seed={seed}".encode())
    digest.update(f"dev={DEV_FRACTION}\x00exclude={prompts_digest(prompts)}\x01".encode())
    for r in records:
        digest.update(f"{r.label}\x00{r.behavior}\x00{r.prompt}\x00{r.generation}\x01".encode())
    return digest.hexdigest()[:16]


def training_report(
    selection: RecordSelection, c_selection: CSelection, prompts: Sequence[str]
) -> dict[str, Any]:
    """What an attack judge was trained on, for ``judge.report`` / ``config.json``."""
    return {
        "purpose": "attack-benchmark harm judge; evaluation behaviours held out",
        "n_records": len(selection.kept),
        "sources": counts_by_source(selection.kept),
        "excluded": {
            "n_records": len(selection.excluded),
            "by_reason": selection.reason_counts(),
            "by_source": counts_by_source(selection.excluded),
            "evaluation_prompts": "default harmful split (seed "
            f"{DEFAULT_SPLIT_SEED}) test and dev parts, plus any exclude_prompts",
            "n_evaluation_prompts": len(prompts),
            "evaluation_prompts_sha256": prompts_digest(prompts),
            "rules": {
                "evaluation prompt": "normalised behaviour or prompt equals, contains or is "
                f"contained in an evaluation prompt (shorter side >= {MIN_CONTAINED_WORDS} words)",
                "near-duplicate": "char 3-5-gram TF-IDF cosine >= "
                f"{NEAR_DUPLICATE_THRESHOLD} (training.data.splits)",
                "paraphrase": "content-word unigram+bigram TF-IDF cosine >= "
                f"{PARAPHRASE_THRESHOLD}",
            },
        },
        "C_selection": c_selection.to_dict(),
        "C": c_selection.chosen,
    }


def fit_attack_judge(
    selection: RecordSelection,
    prompts: Sequence[str],
    *,
    grid: Sequence[float] = C_GRID,
    seed: int = SELECTION_SEED,
) -> HarmJudge:
    """Fit a judge on ``selection.kept`` with C chosen on dev; ``judge.report`` says how.

    Args:
        selection: Labelled generations split by :func:`~training.judge.exclusion.select_records`.
        prompts: The evaluation prompts ``selection`` was made against (for the report).
        grid: Candidate values of C.
        seed: Seed of the behaviour-grouped train/dev split.
    """
    logger.info(
        "fitting the attack harm judge on %d labelled generations (%d excluded)",
        len(selection.kept),
        len(selection.excluded),
    )
    judge, c_selection = fit_selected(selection.kept, grid=grid, seed=seed)
    judge.report = training_report(selection, c_selection, prompts)
    return judge
