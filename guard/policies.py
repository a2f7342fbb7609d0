"""Recovery policies: what to do with a sequence once the monitor fires.

A policy decides from a :class:`Trigger` (what fired, where, and what was released) and
never reaches into a monitor or a backend: it only says which tokens to keep and how to go
on. :class:`guard.trajectory.GuardedRequest` applies the decision.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal

from guard.config import PolicyConfig


@dataclass(frozen=True, slots=True)
class Trigger:
    """The monitor just fired on the newest response token.

    Attributes:
        scores: per-token scores of the response so far (prefill first; unscored tokens NaN),
            ending at the token that fired.
        threshold: the monitor's threshold.
        released: response tokens already sent to the client; they are never discarded.
        recoveries: recoveries this request already had.
        response_ids: response tokens so far (the triggering token is the last).
    """

    scores: tuple[float, ...]
    threshold: float
    released: int
    recoveries: int
    response_ids: tuple[int, ...]

    @property
    def index(self) -> int:
        """Response index of the token that fired."""
        return len(self.scores) - 1

    @property
    def score(self) -> float:
        """Its score."""
        return self.scores[-1]


@dataclass(frozen=True, slots=True)
class Action:
    """A recovery decision for one sequence.

    Attributes:
        kind: ``stop``, ``rollback`` or ``resample``.
        keep: response tokens kept (everything from index ``keep`` on is discarded).
        inject_text: text fed to the model after the kept tokens (rollback).
        append_text: text appended to the answer without the model (stop).
        ban_token: token id banned at position ``keep`` when sampling again (resample).
    """

    kind: Literal["stop", "rollback", "resample"]
    keep: int
    inject_text: str = ""
    append_text: str = ""
    ban_token: int | None = None


def rise_start(trigger: Trigger, fraction: float) -> int:
    """First index of the run of scores ≥ ``fraction * threshold`` that ends at the trigger.

    Never earlier than ``trigger.released`` (tokens before it were sent to the client).
    """
    cut = fraction * trigger.threshold
    index = trigger.index
    while index - 1 >= trigger.released and trigger.scores[index - 1] >= cut:
        index -= 1
    return max(index, trigger.released)


class RecoveryPolicy(ABC):
    """Decides an :class:`Action` from a :class:`Trigger`."""

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    @classmethod
    def from_config(cls, config: PolicyConfig) -> RecoveryPolicy:
        """The policy class named by ``config.kind``."""
        return _POLICIES[config.kind](config)

    @abstractmethod
    def decide(self, trigger: Trigger) -> Action:
        """Recovery for a request whose newest token just triggered the monitor."""

    def _stop(self, trigger: Trigger) -> Action:
        keep = rise_start(trigger, self.config.rise_fraction)
        return Action("stop", keep=keep, append_text=self.config.refusal_message)


class StopPolicy(RecoveryPolicy):
    """Truncate before the rise of the score and end with ``content_filter``."""

    def decide(self, trigger: Trigger) -> Action:
        return self._stop(trigger)


class RollbackPolicy(RecoveryPolicy):
    """Discard back to where the score began to rise, inject a recovery prefix, go on."""

    def decide(self, trigger: Trigger) -> Action:
        if trigger.recoveries >= self.config.max_recoveries:
            return self._stop(trigger)
        keep = rise_start(trigger, self.config.rise_fraction)
        return Action("rollback", keep=keep, inject_text=self.config.recovery_text)


class ResamplePolicy(RecoveryPolicy):
    """Rewind a few tokens and sample again with the first discarded token banned."""

    def decide(self, trigger: Trigger) -> Action:
        n_response = len(trigger.response_ids)
        keep = max(trigger.released, n_response - self.config.resample_window)
        if trigger.recoveries >= self.config.max_recoveries or keep >= n_response:
            return self._stop(trigger)
        return Action("resample", keep=keep, ban_token=trigger.response_ids[keep])


_POLICIES: dict[str, type[RecoveryPolicy]] = {
    "stop": StopPolicy,
    "rollback": RollbackPolicy,
    "resample": ResamplePolicy,
}
