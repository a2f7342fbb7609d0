"""One guarded request, one place: the guard's per-request rules as a state machine.

Every backend holds one :class:`GuardedRequest` per request (the in-process
:class:`guard.decoding.GuardedEngine` per batch row, the proxy's upstream-vLLM engine per
stream) and only tells it what happened: the prefill was scored, a token was appended,
the newest token got its score, recovery tokens were fed. The request decides the rest:

- **Release.** A response token reaches the client only once it was scored and
  ``holdback`` later tokens were scored too, so a recovery never retracts released text.
- **Prefill is judged** from its first token (``monitor_prefill``); our own recovery
  text is recorded, never judged.
- **History is judged** (``monitor_history``): each closed assistant turn the client
  wrote into the prompt gets a fresh monitor; if one fires, the answer is recovered from
  its start (after any prefill), as if its first token had fired.
- **Unusable scores fail closed.** A missing (scoring raised), NaN or infinite score ends
  the request with ``finish_reason="error"``, unless the operator chose
  ``on_monitor_error="allow"``, which records the token as unscored.
- **Recovery.** When the monitor fires, the policy decides from a :class:`Trigger`; the
  request rewinds its monitor, truncates its response, records the
  :class:`Intervention` and returns a :class:`Recovery` telling the backend what to
  rewind and what to feed.
- **Finish.** Stop strings, ``max_tokens`` and EOS end the answer; a guarded token is
  scored before the answer ends on it.

What the client receives comes out as :class:`RequestOutput` deltas
(:meth:`GuardedRequest.take_output`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from transformers import PreTrainedTokenizerBase

from guard.chat import closed_assistant_spans
from guard.config import GuardConfig, SamplingParams
from guard.detok import ReleasedText
from guard.errors import ContextLengthError, GuardValidationError
from guard.events import FinishReason, GuardSummary, Intervention, RequestOutput
from guard.monitor import StepMonitor, usable_score
from guard.policies import Action, RecoveryPolicy, Trigger

FAIL_CLOSED_MESSAGE = "guard monitor failed; request blocked (fail closed)"


def check_context(n_context: int, max_tokens: int, max_context: int) -> None:
    """Raise :class:`ContextLengthError` unless prompt + prefill + ``max_tokens`` fit."""
    if n_context + max_tokens > max_context:
        raise ContextLengthError(
            f"prompt ({n_context} tokens) + max_tokens ({max_tokens}) exceeds the model's "
            f"context of {max_context} tokens",
            param="prompt" if n_context >= max_context else "max_tokens",
        )


@dataclass(frozen=True, slots=True)
class Recovery:
    """What the backend must do after the request applied a recovery.

    Attributes:
        kind: ``stop`` (the request has finished), ``rollback`` or ``resample``.
        keep: response tokens kept; the backend rewinds its cache to prompt + ``keep``.
        discarded: tokens dropped from the end of the response.
        inject_ids: rollback: tokens to feed next (then report them with
            :meth:`GuardedRequest.injected`).
    """

    kind: Literal["stop", "rollback", "resample"]
    keep: int
    discarded: int
    inject_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class _HistoryFire:
    """Where the monitor fired in the client-written history."""

    turn: int
    step: int
    score: float


@dataclass
class _Delta:
    """What a request produced since its last :meth:`GuardedRequest.take_output`."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    scores: list[float | None] = field(default_factory=list)
    interventions: list[Intervention] = field(default_factory=list)
    touched: bool = False


class GuardedRequest:
    """The guard state of one request, from its prompt to its last released token.

    Args:
        request_id: the caller's id.
        prompt_ids: tokenized prompt (chat template applied).
        params: sampling parameters (``max_tokens``, ``stop``, ``ignore_eos`` are used here).
        tokenizer: decodes released text and encodes the recovery text.
        config: monitor, policy, holdback and failure rules.
        eos_ids: tokens that end the answer.
        threshold: the probe's calibrated threshold; the monitor resolves the one in
            force (:func:`guard.monitor.resolve_threshold`).
        guarded: monitor this request (needs a probe).
        prefill_ids: client-written start of the answer; judged, never sent back.
        max_context: the model's context window (checked here, once, for every backend).
        vocab_size: if given, every token id must be below it.

    Raises:
        GuardValidationError: empty prompt or token ids outside the vocabulary.
        ContextLengthError: the request does not fit the context.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        tokenizer: PreTrainedTokenizerBase,
        config: GuardConfig,
        eos_ids: set[int],
        threshold: float | None,
        guarded: bool,
        prefill_ids: Sequence[int] = (),
        max_context: int,
        vocab_size: int | None = None,
    ) -> None:
        prompt_ids, prefill_ids = list(prompt_ids), list(prefill_ids)
        if not prompt_ids:
            raise GuardValidationError("prompt must contain at least one token", param="prompt")
        if vocab_size is not None and any(
            not 0 <= t < vocab_size for t in prompt_ids + prefill_ids
        ):
            raise GuardValidationError(f"token ids must be in [0, {vocab_size})", param="prompt")
        check_context(len(prompt_ids) + len(prefill_ids), params.max_tokens, max_context)
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.config = config
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.n_prefill = len(prefill_ids)
        self.response_ids = prefill_ids  # assistant prefill + generated (+ injected)
        self.monitor = StepMonitor(config.monitor, threshold=threshold) if guarded else None
        #: ``[start, end)`` ranges of the prompt holding closed assistant turns the client
        #: wrote; the backend scores them for :meth:`judge_context` (empty: nothing to judge).
        self.history_spans = (
            closed_assistant_spans(tokenizer, prompt_ids)
            if guarded and config.monitor_history
            else ()
        )
        self.policy = RecoveryPolicy.from_config(config.policy)
        self.released = self.n_prefill  # the prefill is the client's own: never sent back
        self.recoveries = 0
        self.interventions: list[Intervention] = []
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None
        self._detok = ReleasedText(tokenizer, params.stop)
        self._pending: FinishReason | None = None  # finish once the newest token is scored
        self._banned: dict[int, set[int]] = {}  # response index -> token ids (resample)
        self._delta = _Delta()
        self._summary: GuardSummary | None = None

    # ---- state ---------------------------------------------------------------------

    @property
    def guarded(self) -> bool:
        """Whether a monitor judges this request."""
        return self.monitor is not None

    @property
    def finished(self) -> bool:
        """Whether the request has ended (its last output may still be untaken)."""
        return self.finish_reason is not None

    @property
    def n_generated(self) -> int:
        """Response tokens after the prefill (injected recovery tokens included)."""
        return len(self.response_ids) - self.n_prefill

    @property
    def context_ids(self) -> list[int]:
        """Prompt + response: what the model has to have seen to go on."""
        return self.prompt_ids + self.response_ids

    def banned_next(self) -> set[int] | None:
        """Token ids that must not be sampled next (after a resample), or ``None``."""
        return self._banned.get(len(self.response_ids))

    # ---- what the backend reports ----------------------------------------------------

    def judge_context(
        self,
        prefill: Sequence[float | None] | None,
        history: Sequence[Sequence[float | None] | None] = (),
    ) -> Recovery | None:
        """Judge what the client wrote for the assistant: prefill and history turns.

        Args:
            prefill: one score per prefill token (``None``: scoring failed).
            history: one entry per :attr:`history_spans` range, one score per token of
                it (``None``: scoring failed).

        Returns:
            The recovery to apply after the prefill, if the monitor fired on either.
        """
        if self.monitor is None:
            return None
        fire = self._judge_history(history)
        if self.finished:
            return None
        fired = False
        scores = [None] * self.n_prefill if prefill is None else list(prefill)
        for score in scores[: self.n_prefill]:
            if not self.config.monitor_prefill:
                self.monitor.record(score if usable_score(score) else math.nan)
            elif self._judgeable(score):
                fired = self.monitor.observe(score).flagged or fired
            elif self.finished:
                return None
        # The prefill is the client's own text: a recovery starts after it.
        if fired:
            return self._recover()
        return self._recover(fire) if fire is not None else None

    def _judge_history(
        self, history: Sequence[Sequence[float | None] | None]
    ) -> _HistoryFire | None:
        """Each history turn under a fresh monitor; the first that fires (or ``None``).

        A turn without scores (missing, or ``None``) and an unusable score follow the rule
        of every other score (:meth:`_judgeable`).
        """
        history = list(history) + [None] * (len(self.history_spans) - len(history))
        for turn, ((begin, end), scores) in enumerate(zip(self.history_spans, history)):
            monitor = StepMonitor(self.config.monitor, threshold=self.monitor.threshold)
            scores = [None] * (end - begin) if scores is None else list(scores)
            for step, score in enumerate(scores):
                if not self._judgeable(score, monitor):
                    if self.finished:
                        return None
                elif monitor.observe(score).flagged:
                    return _HistoryFire(turn, step, float(score))
        return None

    def append(self, token: int) -> None:
        """A token was sampled (or streamed) for this request."""
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish("stop")
            return
        self.response_ids.append(token)
        reason: FinishReason | None = None
        if self._detok.hits_stop(self.response_ids[self.n_prefill :]):
            reason = "stop"
        elif self.n_generated >= self.params.max_tokens:
            reason = "length"
        if self.monitor is None:
            self._release(len(self.response_ids))
            if reason is not None:
                self.finish(reason)
            return
        self._pending = reason  # a guarded token is released only after it is scored

    def observe(self, score: float | None) -> Recovery | None:
        """The newest response token's score (``None``: scoring failed).

        Returns:
            The recovery the backend must carry out, if the monitor fired.
        """
        if self._judgeable(score):
            if self.monitor.observe(score).flagged:
                return self._recover()
        elif self.finished:
            return None
        self._release(len(self.response_ids) - self.config.holdback)
        if self._pending is not None:
            self.finish(self._pending)
        return None

    def injected(self, scores: Sequence[float | None] | None) -> None:
        """The backend fed a rollback's recovery tokens; record their scores, unjudged.

        Our own text is never judged, so an unusable score here is only recorded (NaN).
        """
        if scores is None:  # scoring failed: one unscored entry per injected token
            scores = [None] * self.interventions[-1].injected
        for score in scores:
            self.monitor.record(score if usable_score(score) else math.nan)
        if self.n_generated >= self.params.max_tokens:  # the recovery used up the budget
            self.finish("length")

    def finish(
        self, reason: FinishReason, *, append_text: str = "", error: str | None = None
    ) -> None:
        """End the request: release what is left (unless it failed) and summarise."""
        if self.finished:
            return
        if reason != "error":
            self._release(len(self.response_ids), final=True)
        if append_text:
            self._delta.text += self._detok.append(append_text)
        self.finish_reason, self.error = reason, error
        self._delta.touched = True
        if self.monitor is not None:
            self._summary = GuardSummary.from_run(
                self.monitor,
                self.interventions,
                recoveries=self.recoveries,
                n_prefill=self.n_prefill,
            )

    def take_output(self) -> RequestOutput | None:
        """What the client receives since the last call (``None``: nothing new)."""
        delta, self._delta = self._delta, _Delta()
        if not delta.touched:
            return None
        return RequestOutput(
            request_id=self.request_id,
            token_ids=tuple(delta.token_ids),
            text=delta.text,
            scores=tuple(delta.scores),
            interventions=tuple(delta.interventions),
            finish_reason=self.finish_reason,
            summary=self._summary if self.finished else None,
            prompt_tokens=len(self.prompt_ids) + self.n_prefill if self.finished else 0,
            completion_tokens=self.released - self.n_prefill if self.finished else 0,
            error=self.error,
        )

    # ---- rules ---------------------------------------------------------------------

    def _judgeable(self, score: float | None, monitor: StepMonitor | None = None) -> bool:
        """Whether ``score`` can be judged; an unusable one fails closed or is recorded
        (in ``monitor``, default the response's)."""
        if usable_score(score):
            return True
        if self.config.on_monitor_error == "allow":
            (monitor or self.monitor).record(math.nan)  # unscored; goes on unguarded here
        else:
            self.finish("error", error=FAIL_CLOSED_MESSAGE)
        return False

    def _recover(self, history: _HistoryFire | None = None) -> Recovery:
        """Ask the policy what to do about the token that fired, and apply it here.

        A history fire is decided on the response so far (at most the prefill, all of it
        released): every policy then keeps the prefill and recovers from there.
        """
        trigger = Trigger(
            scores=tuple(self.monitor.trace),
            threshold=self.monitor.threshold,
            released=self.released,
            recoveries=self.recoveries,
            response_ids=tuple(self.response_ids),
        )
        return self._apply(self.policy.decide(trigger), trigger, history)

    def _apply(
        self, action: Action, trigger: Trigger, history: _HistoryFire | None = None
    ) -> Recovery:
        discarded = len(self.response_ids) - action.keep
        inject: tuple[int, ...] = ()
        if action.kind == "rollback":
            inject = tuple(self.tokenizer.encode(action.inject_text, add_special_tokens=False))
        if history is None:
            step, score, turn = trigger.index - self.n_prefill, trigger.score, None
        else:
            step, score, turn = history.step, history.score, history.turn
        intervention = Intervention(
            step=step,
            score=score,
            action=action.kind,
            kept=action.keep - self.n_prefill,
            discarded=discarded,
            injected=len(inject),
            turn=turn,
        )
        self.interventions.append(intervention)
        self._delta.interventions.append(intervention)
        self._delta.touched = True
        self.monitor.rewind(len(self.monitor.trace) - action.keep)
        del self.response_ids[action.keep :]
        self._pending = None  # decided again by the next appended token
        if action.kind == "stop":
            self.finish("content_filter", append_text=action.append_text)
            return Recovery("stop", keep=action.keep, discarded=discarded)
        self.recoveries += 1
        if action.kind == "resample":
            self._banned.setdefault(action.keep, set()).add(action.ban_token)
            return Recovery("resample", keep=action.keep, discarded=discarded)
        self.response_ids += inject
        return Recovery("rollback", keep=action.keep, discarded=discarded, inject_ids=inject)

    def _release(self, upto: int, *, final: bool = False) -> None:
        """Send response tokens ``[released, upto)`` and their text to the client."""
        upto = max(upto, self.released)
        if upto == self.released and not final:
            return
        token_ids = self.response_ids[self.released : upto]
        if self.monitor is None:
            scores: list[float | None] = [None] * len(token_ids)
        else:
            scores = list(self.monitor.trace[self.released : upto])
        text = self._detok.advance(self.response_ids[self.n_prefill : upto], final=final)
        self.released = upto
        if token_ids or text:
            self._delta.token_ids += token_ids
            self._delta.scores += scores
            self._delta.text += text
            self._delta.touched = True
