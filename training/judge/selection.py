"""Choose the learned harm judge's C on a behaviour-grouped dev split, then fit on train+dev."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.metrics import f1_score, log_loss

from training.data.records import LabelledGeneration
from training.data.splits import split_prompts
from training.judge.harm import HarmJudge

logger = logging.getLogger(__name__)

C_GRID: tuple[float, ...] = (0.25, 1.0, 4.0, 16.0)
DEV_FRACTION = 0.2
SELECTION_METRIC = "dev F1 at P(harmful) >= 0.5 (ties: lower dev log-loss, then smaller C)"


@dataclass(frozen=True, slots=True)
class CSelection:
    """Outcome of choosing C on a dev split.

    Attributes:
        grid: Candidate values of C, in the order tried.
        dev_f1: Dev F1 of a judge fitted on the train part with each C.
        dev_log_loss: Dev log-loss of the same judges.
        chosen: The C with the best dev F1 (ties: lower log-loss, then smaller C).
        n_train: Records the candidates were fitted on.
        n_dev: Records they were scored on.
    """

    grid: tuple[float, ...]
    dev_f1: tuple[float, ...]
    dev_log_loss: tuple[float, ...]
    chosen: float
    n_train: int
    n_dev: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists, not tuples), with the selection rule spelled out."""
        fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {**fields, "metric": SELECTION_METRIC}


def _fit(template: HarmJudge, C: float, records: Sequence[LabelledGeneration]) -> HarmJudge:
    """A fresh copy of ``template`` with ``C``, fitted on ``records``."""
    judge = clone(template).set_params(C=C)
    return judge.fit(
        [r.prompt for r in records], [r.generation for r in records], [r.label for r in records]
    )


def _dev_scores(judge: HarmJudge, dev: Sequence[LabelledGeneration]) -> tuple[float, float]:
    """(F1 at 0.5, log-loss) of ``judge`` on ``dev``."""
    p_harm = judge.predict_proba([r.prompt for r in dev], [r.generation for r in dev])[:, 1]
    labels = np.array([r.label for r in dev])
    f1 = f1_score(labels, (p_harm >= 0.5).astype(np.int64), zero_division=0)
    return float(f1), float(log_loss(labels, p_harm, labels=[0, 1]))


def select_C(
    train: Sequence[LabelledGeneration],
    dev: Sequence[LabelledGeneration],
    *,
    grid: Sequence[float] = C_GRID,
    template: HarmJudge | None = None,
) -> CSelection:
    """Fit one judge per C on ``train`` and keep the C with the best dev F1.

    Args:
        train: Records to fit the candidates on (both labels must occur).
        dev: Records to score them on (disjoint behaviours).
        grid: Candidate values of C.
        template: Unfitted judge whose other parameters are kept (default ``HarmJudge()``).

    Raises:
        ValueError: An empty grid or dev set.
    """
    if not grid or not dev:
        raise ValueError("C selection needs a non-empty grid and dev set")
    template = template if template is not None else HarmJudge()
    scores = [_dev_scores(_fit(template, C, train), dev) for C in grid]
    best = max(range(len(grid)), key=lambda k: (scores[k][0], -scores[k][1], -grid[k]))
    selection = CSelection(
        tuple(float(C) for C in grid),
        tuple(f1 for f1, _ in scores),
        tuple(loss for _, loss in scores),
        float(grid[best]),
        len(train),
        len(dev),
    )
    logger.info("chose C=%g by dev F1 %s", selection.chosen, dict(zip(grid, selection.dev_f1)))
    return selection


def split_train_dev(
    records: Sequence[LabelledGeneration], *, seed: int = 0, dev_fraction: float = DEV_FRACTION
) -> tuple[tuple[LabelledGeneration, ...], tuple[LabelledGeneration, ...]]:
    """Split records by behaviour (near-duplicates kept together) into train and dev."""
    splits = split_prompts(
        records, seed=seed, fractions=(1.0 - dev_fraction, dev_fraction, 0.0), key=_behavior
    )
    return splits.train + splits.test, splits.dev  # test is empty: its target size is 0


def _behavior(record: LabelledGeneration) -> str:
    return record.behavior


def fit_selected(
    records: Sequence[LabelledGeneration],
    *,
    grid: Sequence[float] = C_GRID,
    seed: int = 0,
    template: HarmJudge | None = None,
) -> tuple[HarmJudge, CSelection]:
    """Choose C on a behaviour-grouped dev split of ``records``, then fit on all of them.

    Args:
        records: Training records.
        grid: Candidate values of C.
        seed: Seed of the train/dev split.
        template: Unfitted judge whose other parameters are kept (default ``HarmJudge()``).

    Returns:
        The judge fitted on train+dev with the chosen C, and the selection.
    """
    template = template if template is not None else HarmJudge()
    train, dev = split_train_dev(records, seed=seed)
    selection = select_C(train, dev, grid=grid, template=template)
    return _fit(template, selection.chosen, records), selection
