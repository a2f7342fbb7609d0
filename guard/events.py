"""Typed records the guarded decoder emits (never bare tuples)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from guard.monitor import StepMonitor

FinishReason = Literal["stop", "length", "content_filter", "abort", "error"]


@dataclass(frozen=True, slots=True)
class Intervention:
    """One recovery applied to a sequence.

    Attributes:
        step: response index of the token that triggered.
        score: its P(unsafe).
        action: ``stop``, ``rollback`` or ``resample``.
        kept: response tokens kept; ``discarded`` tokens after them were never released.
        discarded: how many unreleased tokens were thrown away.
        injected: recovery tokens the guard put into the answer right after the kept ones
            (rollback); they are the guard's words, not the model's.
        turn: ``None`` when a response token fired; else the client-written assistant
            turn of the prompt that fired (0-based, in prompt order), ``step`` then
            indexing that turn's tokens, and the answer recovered from its start.
    """

    step: int
    score: float
    action: str
    kept: int
    discarded: int
    injected: int = 0
    turn: int | None = None


@dataclass(frozen=True, slots=True)
class GuardSummary:
    """Per-request guard metadata, reported when the request finishes."""

    triggered: bool
    trigger_index: int | None
    max_score: float
    action: str | None
    recoveries: int
    interventions: tuple[Intervention, ...] = ()
    scores: tuple[float, ...] = ()

    @classmethod
    def from_run(
        cls,
        monitor: StepMonitor,
        interventions: list[Intervention],
        *,
        recoveries: int,
        n_prefill: int,
    ) -> GuardSummary:
        """Summarise a finished request from its monitor trace and interventions."""
        first = interventions[0] if interventions else None
        return cls(
            triggered=first is not None,
            # A history turn that fired has no index in the response.
            trigger_index=None if first is None or first.turn is not None else first.step,
            max_score=max([i.score for i in interventions] + [monitor.max_score]),
            action=None if first is None else interventions[-1].action,
            recoveries=recoveries,
            interventions=tuple(interventions),
            scores=tuple(monitor.trace[n_prefill:]),
        )


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """What one decoding step produced for one request (a delta, like a stream chunk).

    Attributes:
        request_id: the caller's id.
        token_ids: newly released token ids (never retracted later).
        text: newly released text.
        scores: P(unsafe) of each released token (``None`` when unguarded).
        finish_reason: set on the request's last output.
        summary: guard metadata, set on the last output.
        prompt_tokens: prompt length (incl. assistant prefill).
        completion_tokens: tokens released in total, on the last output.
        error: message when ``finish_reason == "error"``.
    """

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    scores: tuple[float | None, ...] = ()
    finish_reason: FinishReason | None = None
    summary: GuardSummary | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    interventions: tuple[Intervention, ...] = field(default=())

    @property
    def finished(self) -> bool:
        """Whether this is the request's last output."""
        return self.finish_reason is not None


@dataclass
class GenerationResult:
    """A finished request, assembled from its stream of :class:`RequestOutput` deltas."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    scores: list[float | None] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    summary: GuardSummary | None = None
    interventions: list[Intervention] = field(default_factory=list)
    error: str | None = None

    def model_spans(self) -> list[tuple[int, int]]:
        """``[start, end)`` ranges of :attr:`token_ids` the model wrote.

        Everything released is the model's except the recovery tokens each rollback
        injected (``Intervention.injected`` tokens from ``Intervention.kept`` on, unless a
        later recovery discarded them). A stop's refusal message is text only, never
        tokens. Judge these spans, never the guard's own words.
        """
        owner: list[bool] = []  # per response token: written by the model
        for event in self.interventions:
            owner += [True] * max(0, event.kept - len(owner))
            del owner[event.kept :]
            owner += [False] * event.injected
        owner += [True] * max(0, len(self.token_ids) - len(owner))
        del owner[len(self.token_ids) :]
        spans, start = [], None
        for i, mine in enumerate(owner + [False]):
            if mine and start is None:
                start = i
            elif not mine and start is not None:
                spans.append((start, i))
                start = None
        return spans

    def absorb(self, out: RequestOutput) -> None:
        """Append one delta."""
        self.token_ids += out.token_ids
        self.text += out.text
        self.scores += out.scores
        self.interventions += out.interventions
        if out.finished:
            self.finish_reason, self.summary, self.error = out.finish_reason, out.summary, out.error
