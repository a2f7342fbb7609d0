"""One-line drop-in for code that already calls ``model.generate(...)``.

``model.generate(**inputs, **guard.generate_kwargs())`` inside ``with GenerateGuard(...)``
scores every generated token from the capture hooks (via a ``LogitsProcessor``) and
stops a sequence (via ``StoppingCriteria``) the step its monitor fires. ``generate``
cannot rewind, so this is the ``stop`` policy; use :class:`guard.GuardedEngine` for
rollback, resample and holdback streaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from guard.arch import num_layers
from guard.capture import HiddenStateCapture
from guard.config import MonitorConfig
from guard.hooks import resolve_hook_name
from guard.monitor import StepMonitor, usable_score, with_calibrated_debounce
from guard.probe import LinearProbe


class _ScoreProcessor(LogitsProcessor):
    def __init__(self, guard: GenerateGuard) -> None:
        self.guard = guard

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.guard._observe(input_ids)
        return scores


class _TriggerStop(StoppingCriteria):
    def __init__(self, guard: GenerateGuard) -> None:
        self.guard = guard

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs
    ) -> torch.BoolTensor:
        return torch.tensor(self.guard.flagged, dtype=torch.bool, device=input_ids.device)


@dataclass(frozen=True, slots=True)
class GenerateVerdict:
    """Per-row outcome of a guarded ``generate`` call (indices count generated tokens)."""

    triggered: bool
    trigger_index: int | None
    scores: tuple[float, ...]


class GenerateGuard:
    """Attach a probe monitor to ``model.generate`` for the duration of a ``with`` block.

    Args:
        model: supported HF causal LM.
        probe: fitted probe.
        monitor: debounce/threshold (default: the probe's calibrated threshold).
    """

    def __init__(
        self, model: PreTrainedModel, probe: LinearProbe, *, monitor: MonitorConfig | None = None
    ) -> None:
        probe.check_compatible(model, strict_weights=False)
        self.probe = probe
        self.config = with_calibrated_debounce(monitor or MonitorConfig(), probe)
        self.hook_name = resolve_hook_name(probe.hook_name, num_layers(model))
        self._capture = HiddenStateCapture(model, self.hook_name, last_token_only=True)
        self.monitors: list[StepMonitor] = []
        self.flagged: list[bool] = []
        self.trigger_index: list[int | None] = []

    def __enter__(self) -> GenerateGuard:
        self._capture.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._capture.__exit__(*exc_info)

    def generate_kwargs(self) -> dict:
        """Keyword arguments to pass to ``model.generate``."""
        self.monitors, self.flagged, self.trigger_index = [], [], []
        return {
            "logits_processor": LogitsProcessorList([_ScoreProcessor(self)]),
            "stopping_criteria": StoppingCriteriaList([_TriggerStop(self)]),
        }

    def _observe(self, input_ids: torch.LongTensor) -> None:
        if not self.monitors:
            # First call follows the prompt's forward: nothing generated to score yet.
            batch = input_ids.shape[0]
            self.monitors = [
                StepMonitor(self.config, threshold=self.probe.threshold_) for _ in range(batch)
            ]
            self.flagged, self.trigger_index = [False] * batch, [None] * batch
            return
        scores = self.probe.score_tensor(self._capture.cache[self.hook_name]).tolist()  # [batch]
        for row, (monitor, score) in enumerate(zip(self.monitors, scores)):
            if self.flagged[row]:
                continue
            if usable_score(score):
                fired = monitor.observe(score).flagged
            else:  # generate() cannot end with an error: stop the row (fail closed)
                monitor.record(math.nan)
                fired = True
            if fired:
                self.flagged[row], self.trigger_index[row] = True, len(monitor.trace) - 1

    def verdicts(self) -> list[GenerateVerdict]:
        """One verdict per row of the last ``generate`` call."""
        return [
            GenerateVerdict(flag, index, tuple(m.trace))
            for flag, index, m in zip(self.flagged, self.trigger_index, self.monitors)
        ]
