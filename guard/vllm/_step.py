"""Hand-off of one step's per-row scores from the model wrapper to the logits processor.

Both run in the same worker process and thread, in order: ``compute_logits`` (which
unpacks the scores) then the sampler (which applies the logits processors).
"""

from __future__ import annotations

import torch


class StepScores:
    """The latest ``[num_rows]`` float32 scores, taken at most once."""

    def __init__(self) -> None:
        self._scores: torch.Tensor | None = None

    def put(self, scores: torch.Tensor) -> None:
        self._scores = scores

    def take(self) -> torch.Tensor | None:
        scores, self._scores = self._scores, None
        return scores


#: The worker's single hand-off slot.
STEP_SCORES = StepScores()
