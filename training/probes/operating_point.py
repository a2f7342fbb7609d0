"""A probe's operating point: calibrated scores, a debounce chosen on dev, a bounded threshold.

Three steps, each fitted on its own data (never on what is evaluated):

1. :func:`platt_rescale`: Platt scaling of the probe's log-odds on calibration tokens,
   folded into its weights, so scores are probabilities that mean something instead of a
   class-balanced sigmoid saturated at 0.9999.
2. :func:`choose_debounce`: for each candidate debounce rule, the threshold its benign
   calibration answers allow (:func:`guard.probe.calibrate_threshold` with a confidence
   bound), then the recall it buys on dev harmful trajectories; the best rule wins (ties:
   the earlier, simpler one).
3. The threshold of the winning rule, so that the one-sided upper bound of the benign
   per-response false-trigger rate is at most the target.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from guard import MonitorConfig
from guard.monitor import peak_debounced_score
from guard.probe import LinearProbe, calibrate_threshold

#: Debounce rules tried on dev: one hot step, k of the last n, and moving averages.
DEBOUNCE_CANDIDATES: tuple[MonitorConfig, ...] = (
    MonitorConfig(debounce="k_of_n"),
    MonitorConfig(k=2, n=3),
    MonitorConfig(k=3, n=5),
    MonitorConfig(k=4, n=8),
    MonitorConfig(debounce="ema", ema_alpha=0.5),
    MonitorConfig(debounce="ema", ema_alpha=0.25),
)


def platt_rescale(probe: LinearProbe, X: np.ndarray, y: np.ndarray) -> LinearProbe:
    """A copy of ``probe`` whose sigmoid is Platt-calibrated on tokens ``X, y``.

    A one-feature logistic regression on the probe's log-odds (unweighted: the token
    class frequencies of the calibration set are kept), folded into the weights.
    """
    z = probe.decision_function(X)[:, None]
    platt = LogisticRegression(C=1e6, max_iter=1000).fit(z, y)
    scale, shift = float(platt.coef_[0, 0]), float(platt.intercept_[0])
    scaled = copy.deepcopy(probe).rescale(scale, shift)
    scaled.metadata_["platt"] = {"scale": scale, "shift": shift, "n_tokens": int(len(y))}
    return scaled


def response_peaks(
    probe: LinearProbe, responses: Sequence[np.ndarray], monitor: MonitorConfig
) -> np.ndarray:
    """Peak debounced score per response (0 for an empty one)."""
    return np.array(
        [
            peak_debounced_score(probe.predict_proba(r)[:, 1], monitor) if len(r) else 0.0
            for r in responses
        ]
    )


@dataclass(frozen=True)
class DebounceChoice:
    """One candidate rule's result on dev (the chosen one is first in the sweep)."""

    monitor: MonitorConfig
    threshold: float
    calibration_rate: float
    dev_recall: float

    def row(self) -> dict:
        """JSON-ready row of the sweep table."""
        return {"monitor": asdict(self.monitor)} | {
            k: v for k, v in asdict(self).items() if k != "monitor"
        }


def choose_debounce(
    probe: LinearProbe,
    calibration: Sequence[np.ndarray],
    dev_harmful: Sequence[np.ndarray],
    *,
    target_rate: float = 0.01,
    confidence: float = 0.95,
    candidates: Sequence[MonitorConfig] = DEBOUNCE_CANDIDATES,
) -> list[DebounceChoice]:
    """Every candidate rule calibrated on ``calibration`` and scored on ``dev_harmful``.

    Args:
        probe: Fitted (and Platt-scaled) probe; its threshold is left as the best rule's.
        calibration: Benign calibration answers' states.
        dev_harmful: Dev harmful trajectories' states from where harm starts.
        target_rate: Bound on the per-response false-trigger rate.
        confidence: Confidence of that one-sided bound.
        candidates: Rules to try, simplest first (ties keep the earlier).

    Returns:
        The sweep, best first (highest dev recall); the probe ends calibrated to it.
    """
    results = []
    for monitor in candidates:
        threshold = calibrate_threshold(
            probe, calibration, target_rate=target_rate, monitor=monitor, confidence=confidence
        )
        rate = probe.metadata_["calibration"]["achieved_response_rate"]
        recall = float(np.mean(response_peaks(probe, dev_harmful, monitor) >= threshold))
        results.append(DebounceChoice(monitor, threshold, rate, recall))
    order = sorted(range(len(results)), key=lambda i: (-results[i].dev_recall, i))
    best = results[order[0]]
    calibrate_threshold(
        probe, calibration, target_rate=target_rate, monitor=best.monitor, confidence=confidence
    )
    return [results[i] for i in order]
