"""One request's guard inside the engine: debounce the row's scores, force recovery tokens.

vLLM cannot retract tokens it has already produced, so the in-engine policies act forward:
``stop`` forces the refusal message and then EOS; ``rollback`` forces the recovery text and
lets the model continue (after ``max_recoveries`` of them a trigger stops). The debounce is
:class:`guard.monitor.StepMonitor`, exactly as in the library and the proxy.

Timing. The probe reads the state of a token when that token is fed to the model, i.e. in
the step *after* it was sampled. So at a step where the request holds ``n`` output tokens
the row's score belongs to output token ``n - 1`` (or, with ``n == 0``, to the last prompt
token), and a trigger there decides output token ``n`` onward. Forced tokens are planned by
output index, so a step whose sample vLLM throws away (a partial prefill chunk) simply
asks for the same token again.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from guard.config import MonitorConfig, PolicyConfig
from guard.monitor import StepMonitor, usable_score
from guard.policies import RecoveryPolicy, Trigger
from guard.vllm.settings import RequestOptions

#: Index of events that score the last prompt token (no output token yet).
PROMPT_INDEX = -1


@dataclass(frozen=True, slots=True)
class GuardEvent:
    """A scored token of one request, as published on the event stream.

    Attributes:
        key: the request's ``trajguard_id`` (``None`` when it gave none).
        index: output token index (:data:`PROMPT_INDEX` for the last prompt token).
        score: P(unsafe) of the token's state at the probed layer.
        level: debounced level (``None``: a forced recovery token, recorded unjudged).
        flagged: the monitor fired at this token.
        action: ``"stop"`` or ``"rollback"`` when this token triggered a recovery.
    """

    key: str | None
    index: int
    score: float
    level: float | None = None
    flagged: bool = False
    action: str | None = None

    def to_json(self) -> dict:
        """Compact wire form (see :mod:`guard.vllm.channel`)."""
        return {
            "id": self.key,
            "i": self.index,
            "s": self.score,
            "l": self.level,
            "f": self.flagged,
            "a": self.action,
        }


@dataclass(frozen=True, slots=True)
class _Plan:
    """Tokens forced from output index ``start`` on; ``judged``: scored by the monitor."""

    start: int
    tokens: tuple[int, ...]
    judged: bool

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


class RequestGuard:
    """Guard state of one request (lives as long as the request sits in the batch).

    Args:
        options: the request's parsed ``vllm_xargs``.
        output_ids: vLLM's live list of the request's output tokens (read, never written).
        monitor: debounce rule and the operator's threshold override.
        policy: in-engine policy and texts.
        threshold: the probe's calibrated threshold (a request's ``trajguard_threshold``
            and ``monitor.threshold`` come first: :func:`guard.monitor.resolve_threshold`).
        recovery_ids: tokens of ``policy.recovery_text``.
        refusal_ids: tokens of ``policy.refusal_message``.
        eos_id: token that ends the request after a stop.
        on_monitor_error: ``block`` stops the request on an unusable (NaN, infinite,
            missing) score, as every backend does; ``allow`` records it unscored.
    """

    def __init__(
        self,
        options: RequestOptions,
        output_ids: Sequence[int],
        *,
        monitor: MonitorConfig,
        policy: PolicyConfig,
        threshold: float,
        recovery_ids: Sequence[int],
        refusal_ids: Sequence[int],
        eos_id: int,
        on_monitor_error: Literal["block", "allow"] = "block",
    ) -> None:
        self.options = options
        self.output_ids = output_ids
        self.monitor = StepMonitor(
            monitor, threshold=threshold, request_threshold=options.threshold
        )
        self.kind = options.policy or policy.kind
        self.policy = RecoveryPolicy.from_config(replace(policy, kind=self.kind))
        self.on_monitor_error = on_monitor_error
        self._recovery = tuple(recovery_ids)
        self._stop = (*refusal_ids, eos_id)
        self.recoveries = 0
        self.stopped = False
        self._plans: list[_Plan] = []
        if options.prefix:
            self._plans.append(_Plan(0, options.prefix, judged=True))

    @property
    def acting(self) -> bool:
        """Whether triggers lead to recoveries (``observe`` mode only scores)."""
        return self.options.mode == "guard"

    def step(self, score: float) -> tuple[list[GuardEvent], int | None]:
        """Take the row's score of this step; return its events and the token to force.

        Args:
            score: P(unsafe) of the newest token fed for this request.

        Returns:
            The events to publish and the token id the row must sample now (``None``:
            sample normally).
        """
        n = len(self.output_ids)
        key = self.options.key
        if n == 0:
            return [GuardEvent(key, PROMPT_INDEX, score)], self._forced(0)
        events: list[GuardEvent] = []
        trace = self.monitor.trace
        while len(trace) < n - 1:  # tokens never fed on their own (preemption): unscored
            self.monitor.record(math.nan)
        if len(trace) == n - 1:
            index = n - 1
            plan = self._plan_at(index)
            if plan is not None and not plan.judged:
                self.monitor.record(score)  # our own recovery text is not judged
                events.append(GuardEvent(key, index, score))
            elif not usable_score(score):
                self.monitor.record(math.nan)
                action = None
                if self.on_monitor_error == "block" and self.acting and not self.stopped:
                    self.abort()  # fail closed
                    action = "stop"
                events.append(GuardEvent(key, index, math.nan, action=action))
            else:
                verdict = self.monitor.observe(score)
                action = None
                if verdict.flagged and self.acting and not self.stopped:
                    action = self._trigger(n)
                events.append(GuardEvent(key, index, score, verdict.level, verdict.flagged, action))
        return events, self._forced(n)

    def _trigger(self, n: int) -> str:
        """Plan the recovery from output index ``n`` (replacing any unfinished prefix).

        The policy decides as everywhere else; every token is already out of the engine,
        so the recovery starts at the next one.
        """
        trigger = Trigger(
            scores=tuple(self.monitor.trace),
            threshold=self.monitor.threshold,
            released=len(self.monitor.trace),
            recoveries=self.recoveries,
            response_ids=tuple(self.output_ids),
        )
        action = self.policy.decide(trigger)
        self._plans = [p for p in self._plans if p.end <= n]
        self.monitor.rewind(0)  # restart the debounce window after a recovery
        if action.kind == "rollback":
            self.recoveries += 1
            self._plans.append(_Plan(n, self._recovery, judged=False))
            return "rollback"
        self._plan_stop(n)
        return "stop"

    def _plan_stop(self, n: int) -> None:
        self.stopped = True
        self._plans = [p for p in self._plans if p.end <= n]
        self._plans.append(_Plan(n, self._stop, judged=False))

    def abort(self) -> None:
        """Fail closed: stop from the next token on (the step's scores are missing)."""
        if not self.stopped:
            self._plan_stop(len(self.output_ids))

    def _plan_at(self, index: int) -> _Plan | None:
        for plan in self._plans:
            if plan.start <= index < plan.end:
                return plan
        return None

    def _forced(self, index: int) -> int | None:
        plan = self._plan_at(index)
        return None if plan is None else plan.tokens[index - plan.start]
