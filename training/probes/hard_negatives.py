"""Hard-negative rounds: refit a probe with the benign answers it scores highest up-weighted.

A probe fitted on harmful continuations against ordinary answers learns whatever separates
them most cheaply (step lists, code, markup). Each round scores every benign *training*
answer, takes the answers whose peak token score is highest (the ones that would trigger),
adds their hottest tokens to the safe class with extra weight, and refits. Calibration and
evaluation answers are never mined.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from guard.probe import LinearProbe
from training.probes.trajectories import SAFE, UNSAFE


@dataclass
class HardNegativeRounds:
    """The final probe and one report row per fit (round 0 is the plain fit)."""

    probe: LinearProbe
    rounds: list[dict[str, Any]] = field(default_factory=list)


def _peaks(probe: LinearProbe, answers: Sequence[np.ndarray]) -> np.ndarray:
    return np.array([probe.decision_function(a).max() if len(a) else -np.inf for a in answers])


def fit_with_hard_negatives(
    fit: Callable[[np.ndarray, np.ndarray, np.ndarray], LinearProbe],
    unsafe: np.ndarray,
    safe: np.ndarray,
    benign_answers: Sequence[np.ndarray],
    *,
    answer_tags: Sequence[str] | None = None,
    rounds: int = 3,
    hard_share: float = 0.05,
    tokens_per_answer: int = 8,
    weight: float = 3.0,
    tokens_per_benign_answer: int = 16,
    seed: int = 0,
) -> HardNegativeRounds:
    """Fit, then ``rounds`` times mine the hardest benign training answers and refit.

    Args:
        fit: ``fit(X, y, sample_weight) -> LinearProbe`` (the recipe's estimator).
        unsafe: Unsafe token states.
        safe: Other safe token states (refusals, reference answers).
        benign_answers: The guarded model's own benign training answers (states per answer);
            each contributes ``tokens_per_benign_answer`` random tokens to every fit.
        answer_tags: A tag per answer (e.g. its source) counted among the mined ones.
        rounds: Mining rounds after the first fit.
        hard_share: Share of benign answers mined per round (highest peak log-odds).
        tokens_per_answer: Hottest tokens taken from each mined answer.
        weight: Sample weight of mined tokens (others weigh 1).
        tokens_per_benign_answer: Random tokens per benign answer in the base set.
        seed: Subsampling seed.
    """
    rng = np.random.default_rng(seed)
    base = [safe] + [
        a[rng.choice(len(a), min(len(a), tokens_per_benign_answer), replace=False)]
        for a in benign_answers
        if len(a)
    ]
    X_safe = np.concatenate(base)
    mined: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    for round_index in range(rounds + 1):
        X_hard = np.concatenate(mined) if mined else np.empty((0, unsafe.shape[1]))
        X = np.concatenate([unsafe, X_safe, X_hard])
        y = np.concatenate(
            [np.full(len(unsafe), UNSAFE), np.full(len(X_safe) + len(X_hard), SAFE)]
        ).astype(int)
        w = np.concatenate([np.ones(len(unsafe) + len(X_safe)), np.full(len(X_hard), weight)])
        probe = fit(X, y, w)
        peaks = _peaks(probe, benign_answers)
        n_hard = max(1, int(round(hard_share * len(benign_answers))))
        hardest = np.argsort(-peaks)[:n_hard]
        row: dict[str, Any] = {
            "round": round_index,
            "n_mined_tokens": int(len(X_hard)),
            "benign_peak_logodds_q50": float(np.median(peaks)),
            "benign_peak_logodds_q95": float(np.quantile(peaks, 0.95)),
            "unsafe_logodds_q50": float(np.median(probe.decision_function(unsafe))),
        }
        if answer_tags is not None:
            tags = [answer_tags[i] for i in hardest]
            row["hardest_by_tag"] = {t: tags.count(t) for t in sorted(set(tags))}
        rows.append(row)
        if round_index == rounds:
            break
        for i in hardest:
            answer = benign_answers[i]
            hot = np.argsort(-probe.decision_function(answer))[:tokens_per_answer]
            mined.append(answer[hot])
    return HardNegativeRounds(probe, rows)
