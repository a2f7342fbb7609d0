"""Held-out evaluation of the harm judges and of the refusal judge.

Two figures for the learned harm judge:

* behaviour-grouped held-out test split of all labelled generations, C chosen on the dev
  split (:func:`evaluate_harm_judges`);
* agreement with the human labels on the labelled generations of the attack-evaluation
  behaviours, for the judge the attack benchmark uses (fitted without them) and, as the
  "before" reference, for the old recipe (all records, C=4, so scored in-sample)
  (:func:`evaluate_attack_judge`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.base import clone
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

from training.data.labelled import load_labelled_generations
from training.data.loaders import PathLike, load_xstest_completions
from training.data.records import LabelledGeneration
from training.data.splits import split_prompts
from training.judge.exclusion import RecordSelection, evaluation_prompts, select_records
from training.judge.harm import HarmJudge, HarmScorer, KeywordHarmJudge
from training.judge.refusal import GCG_TEST_PREFIXES, is_refusal
from training.judge.selection import C_GRID, CSelection, select_C

logger = logging.getLogger(__name__)

LEARNED = "learned"  # TF-IDF + logistic regression (HarmJudge)
BEFORE = "before"  # the old attack judge: all labelled generations, C=4 (scored in-sample)
AFTER = "after"  # load_or_fit_judge: evaluation behaviours held out, C chosen on dev
EVAL_BEHAVIOURS = "eval-behaviours"  # labelled generations of the attack-evaluation behaviours
OLD_C = 4.0


@dataclass(frozen=True, slots=True)
class JudgeScores:
    """Binary classification scores of one judge on one evaluation set (positive = 1)."""

    judge: str
    subset: str
    n: int
    n_positive: int
    accuracy: float
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True, slots=True)
class EvaluationReport:
    """Everything ``trajguard judge eval`` reports.

    Attributes:
        seed: Seed of the behaviour-grouped train/dev/test split.
        n_train: Records the held-out learned judge was fitted on (train + dev).
        n_dev: Of those, the dev records C was chosen on.
        n_test: Held-out test records.
        harm: Harm judges on the held-out test split.
        refusal: Refusal judges on XSTest.
        params: C grids, the chosen Cs and the attack judge's training report.
        attack_judge: ``before`` / ``after`` scores on the attack-evaluation behaviours.
    """

    seed: int
    n_train: int
    n_dev: int
    n_test: int
    harm: tuple[JudgeScores, ...]
    refusal: tuple[JudgeScores, ...]
    params: dict[str, Any] = field(default_factory=dict)
    attack_judge: tuple[JudgeScores, ...] = ()

    @property
    def learned_f1(self) -> float:
        """F1 of the learned harm judge on the whole test split."""
        return next(s.f1 for s in self.harm if s.judge == LEARNED and s.subset == "test")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class HeldOutEvaluation:
    """Scores on a behaviour-grouped test split and how the learned judge's C was chosen."""

    scores: tuple[JudgeScores, ...]
    n_train: int
    n_dev: int
    n_test: int
    selection: CSelection


def score(judge: str, subset: str, y_true: Sequence[int], y_pred: Sequence[int]) -> JudgeScores:
    """Compute accuracy, precision, recall and F1 of ``y_pred`` against ``y_true``.

    Args:
        judge: Judge name for the report.
        subset: Evaluation set name for the report.
        y_true: Reference 0/1 labels.
        y_pred: Predicted 0/1 labels.

    Returns:
        The scores (precision/recall/F1 are 0 where undefined).
    """
    true, pred = np.asarray(y_true), np.asarray(y_pred)
    precision, recall, f1, _ = precision_recall_fscore_support(
        true, pred, average="binary", zero_division=0
    )
    return JudgeScores(
        judge,
        subset,
        len(true),
        int(true.sum()),
        float(accuracy_score(true, pred)),
        float(precision),
        float(recall),
        float(f1),
    )


def _predict(judge: HarmScorer, records: Sequence[LabelledGeneration]) -> np.ndarray:
    proba = judge.predict_proba([r.prompt for r in records], [r.generation for r in records])
    return (proba[:, 1] >= 0.5).astype(np.int64)


def _scores_by_subset(
    name: str, judge: HarmScorer, records: Sequence[LabelledGeneration], subset: str = "test"
) -> list[JudgeScores]:
    """Scores on all ``records`` (``subset``) and on each source's part (``subset/<source>``)."""
    pred = _predict(judge, records)
    labels = np.array([r.label for r in records])
    sources = np.array([r.source for r in records])
    out = [score(name, subset, labels, pred)]
    for source in dict.fromkeys(sources.tolist()):
        mask = sources == source
        out.append(score(name, f"{subset}/{source}", labels[mask], pred[mask]))
    return out


def _fit(judge: HarmJudge, records: Sequence[LabelledGeneration]) -> HarmJudge:
    return judge.fit(
        [r.prompt for r in records], [r.generation for r in records], [r.label for r in records]
    )


def evaluate_harm_judges(
    records: Sequence[LabelledGeneration],
    *,
    seed: int = 0,
    judge: HarmJudge | None = None,
    C_grid: Sequence[float] = C_GRID,
) -> HeldOutEvaluation:
    """Score the learned judge and the keyword baselines on a behaviour-grouped test split.

    C is chosen from ``C_grid`` by F1 on the dev split (candidates fitted on train), then the
    learned judge is refitted on train+dev and scored on test.

    Args:
        records: Labelled generations (see :func:`training.data.load_labelled_generations`).
        seed: Split seed. Splits are keyed on ``behavior`` so every generation of one
            behaviour (and of its near-duplicates) lands in one split.
        judge: Unfitted learned judge whose other parameters are kept (default
            ``HarmJudge()``).
        C_grid: Candidate values of C.

    Returns:
        The scores, the split sizes and the C selection.
    """
    splits = split_prompts(records, seed=seed, key=lambda r: r.behavior)
    template = judge if judge is not None else HarmJudge()
    selection = select_C(splits.train, splits.dev, grid=C_grid, template=template)
    learned = _fit(clone(template).set_params(C=selection.chosen), splits.train + splits.dev)
    judges: list[tuple[str, HarmScorer]] = [
        (LEARNED, learned),
        ("keyword", KeywordHarmJudge()),  # not a curated refusal, >= 20 words
        ("gcg-prefixes", KeywordHarmJudge(min_words=0, window=None, phrases=GCG_TEST_PREFIXES)),
    ]
    scores = [s for name, j in judges for s in _scores_by_subset(name, j, splits.test)]
    n_train = len(splits.train) + len(splits.dev)
    return HeldOutEvaluation(tuple(scores), n_train, len(splits.dev), len(splits.test), selection)


def evaluate_attack_judge(
    records: Sequence[LabelledGeneration],
    selection: RecordSelection,
    after: HarmScorer,
    *,
    before_C: float = OLD_C,
) -> list[JudgeScores]:
    """Agreement with human labels on the generations of the attack-evaluation behaviours.

    Args:
        records: All labelled generations (the old judge's training data).
        selection: ``records`` split against the evaluation prompts; its ``excluded``
            records are scored.
        after: The attack judge, fitted without ``selection.excluded``.
        before_C: C of the old judge, fitted on all ``records`` (so these are in-sample).

    Returns:
        ``before`` and ``after`` scores on ``eval-behaviours`` and per source.
    """
    before = _fit(HarmJudge(before_C), records)
    return [
        *_scores_by_subset(BEFORE, before, selection.excluded, EVAL_BEHAVIOURS),
        *_scores_by_subset(AFTER, after, selection.excluded, EVAL_BEHAVIOURS),
    ]


def evaluate_refusal_judges(data_dir: PathLike = None) -> list[JudgeScores]:
    """Score keyword refusal judges against XSTest human labels (refusal = full or partial).

    Returns:
        Scores of the curated phrase list and of the GCG prefix list, over both models'
        completions.
    """
    completions = load_xstest_completions(data_dir)
    labels = [int(c.is_refusal) for c in completions]
    variants = {
        "keyword": {},  # curated phrases in the first 250 characters
        "gcg-prefixes": {"window": None, "phrases": GCG_TEST_PREFIXES},
    }
    return [
        score(name, "xstest", labels, [int(is_refusal(c.completion, **kw)) for c in completions])
        for name, kw in variants.items()
    ]


def _attack_judge(
    data_dir: PathLike, extra_prompts: Sequence[str] | None, C_grid: Sequence[float]
) -> HarmJudge:
    """The judge the attack benchmark uses (cached under ``$TRAJGUARD_HOME/judges``)."""
    # imported here: training.attacks imports this package (and torch) at import time
    from training.attacks.judging import load_or_fit_judge

    return load_or_fit_judge(data_dir=data_dir, exclude_prompts=extra_prompts, C_grid=C_grid)


def run_evaluation(
    data_dir: PathLike = None,
    *,
    seed: int = 0,
    C_grid: Sequence[float] = C_GRID,
    extra_prompts: Sequence[str] | None = None,
) -> EvaluationReport:
    """Run the full judge evaluation (a few minutes on 2 CPU cores; the attack judge is cached).

    Args:
        data_dir: Data directory override.
        seed: Split seed of the held-out evaluation.
        C_grid: Candidate values of the learned judge's C.
        extra_prompts: Evaluation prompts besides the default split's test+dev parts (as
            passed to the attack judge's ``exclude_prompts``).

    Returns:
        The report.
    """
    records = load_labelled_generations(data_dir)
    held_out = evaluate_harm_judges(records, seed=seed, C_grid=C_grid)
    selection = select_records(records, evaluation_prompts(data_dir, extra_prompts))
    after = _attack_judge(data_dir, extra_prompts, C_grid)
    attack = evaluate_attack_judge(records, selection, after)
    refusal = evaluate_refusal_judges(data_dir)
    params = {
        "C_grid": list(C_grid),
        "held_out_C_selection": held_out.selection.to_dict(),
        "attack_judge": {
            "before": {"C": OLD_C, "n_records": len(records), "scored": "in-sample"},
            "after": {**after.report, "scored": "held-out"},
        },
    }
    return EvaluationReport(
        seed,
        held_out.n_train,
        held_out.n_dev,
        held_out.n_test,
        held_out.scores,
        tuple(refusal),
        params,
        tuple(attack),
    )
