"""Binomial rates with Wilson score confidence intervals."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any


def wilson_interval(successes: int, n: int, *, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion.

    Args:
        successes: Number of successes, ``0 <= successes <= n``.
        n: Number of trials; ``n == 0`` gives the uninformative ``(0.0, 1.0)``.
        confidence: Two-sided confidence level in (0, 1).

    Returns:
        ``(low, high)``, clipped to [0, 1].

    Raises:
        ValueError: Counts out of range or a confidence outside (0, 1).
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True, slots=True)
class Rate:
    """A proportion with its 95 % Wilson interval."""

    successes: int
    n: int
    rate: float
    low: float
    high: float

    @classmethod
    def of(cls, successes: int, n: int, *, confidence: float = 0.95) -> Rate:
        """Build from counts (``rate`` is NaN when ``n == 0``)."""
        low, high = wilson_interval(successes, n, confidence=confidence)
        return cls(successes, n, successes / n if n else math.nan, low, high)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.rate:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.successes}/{self.n})"
