"""Per-step monitoring: probe scores in, debounced trigger verdicts out."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from guard.config import MonitorConfig


@dataclass(frozen=True, slots=True)
class StepVerdict:
    """The monitor's view of one scored token.

    Attributes:
        step: index of the token in the response (0-based; prefill tokens included).
        score: P(unsafe) of this token's state.
        level: debounced statistic compared with the threshold.
        flagged: whether the monitor fires at this step.
    """

    step: int
    score: float
    level: float
    flagged: bool


class _Debouncer:
    """Running debounced statistic of a score stream (k-th largest of last n, or EMA)."""

    def __init__(self, config: MonitorConfig) -> None:
        self.config = config
        self.window: deque[float] = deque(maxlen=config.n)
        self.ema: float | None = None

    def push(self, score: float) -> float:
        if self.config.debounce == "ema":
            alpha = self.config.ema_alpha
            self.ema = score if self.ema is None else alpha * score + (1 - alpha) * self.ema
            return self.ema
        self.window.append(score)
        if len(self.window) < self.config.k:
            return 0.0
        # k of n hot <=> the k-th largest score in the window is hot.
        return sorted(self.window, reverse=True)[self.config.k - 1]


def peak_debounced_score(scores: Iterable[float], config: MonitorConfig) -> float:
    """Largest debounced level over a whole response (what calibration thresholds)."""
    debouncer = _Debouncer(config)
    return max((debouncer.push(float(s)) for s in scores), default=0.0)


def with_calibrated_debounce(config: MonitorConfig, probe: Any) -> MonitorConfig:
    """``config`` with the probe's calibrated debounce rule when it names none.

    A probe's threshold bounds its false-trigger rate only under the rule it was
    calibrated with (``calibration.debounce`` in its metadata); an operator's explicit
    rule wins. A probe that records none keeps the one-hot-step default.
    """
    if config.debounce is not None or probe is None:
        return config
    rule = ((getattr(probe, "metadata_", None) or {}).get("calibration") or {}).get("debounce")
    if not rule:
        return config
    return replace(
        config,
        debounce=rule.get("kind", "k_of_n"),
        k=int(rule.get("k", 1)),
        n=int(rule.get("n", 1)),
        ema_alpha=float(rule.get("ema_alpha", 0.5)),
    )


#: Threshold of a probe that was never calibrated (its ``predict`` uses the same).
UNCALIBRATED_THRESHOLD = 0.5


def resolve_threshold(
    *, request: float | None = None, config: float | None = None, probe: float | None = None
) -> float:
    """The threshold in force: a request's override, else the operator's config, else the
    probe's calibrated value, else :data:`UNCALIBRATED_THRESHOLD`.

    A request override may be 0 or 1 (tests, kill switches); the others are in (0, 1).
    """
    for value in (request, config, probe):
        if value is not None:
            return float(value)
    return UNCALIBRATED_THRESHOLD


def usable_score(score: float | None) -> bool:
    """Whether a probe score can be judged: ``None`` (scoring raised), NaN or ±inf cannot.

    What happens to an unusable score is the operator's choice (``on_monitor_error``):
    the request fails closed, or the token is recorded unscored.
    """
    return score is not None and math.isfinite(score)


class StepMonitor:
    """Debounced trigger over one sequence's per-token scores, with a diagnostic trace.

    Args:
        config: debounce rule and the operator's threshold override.
        threshold: the probe's calibrated threshold (``None``: uncalibrated).
        request_threshold: a per-request override (see :func:`resolve_threshold`).
    """

    def __init__(
        self,
        config: MonitorConfig,
        *,
        threshold: float | None,
        request_threshold: float | None = None,
    ) -> None:
        self.config = config
        self.threshold = resolve_threshold(
            request=request_threshold, config=config.threshold, probe=threshold
        )
        self.trace: list[float] = []
        self._debouncer = _Debouncer(config)

    def observe(self, score: float) -> StepVerdict:
        """Record the score of the next token and say whether the monitor fires."""
        step = len(self.trace)
        self.trace.append(score)
        level = self._debouncer.push(score)
        return StepVerdict(step, score, level, level >= self.threshold)

    def record(self, score: float) -> None:
        """Record a score without judging it (forced recovery tokens)."""
        self.trace.append(score)

    def rewind(self, n_tokens: int) -> None:
        """Forget the last ``n_tokens`` scores and restart the debounce window."""
        if n_tokens:
            del self.trace[-n_tokens:]
        self._debouncer = _Debouncer(self.config)

    @property
    def max_score(self) -> float:
        """Highest score seen so far (0 when nothing was scored; unscored steps are NaN)."""
        return max((s for s in self.trace if not math.isnan(s)), default=0.0)
