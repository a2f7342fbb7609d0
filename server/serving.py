"""What ``/v1/chat/completions`` and ``/v1/completions`` share (:class:`OpenAIServing`).

A request with ``n`` choices (times several prompts, for completions) becomes that many
engine requests. Their outputs are merged in arrival order into either one full
response or one SSE stream. The engine's deltas are final: the holdback window means
no streamed token is ever retracted, so a chunk can be sent as soon as it arrives.
The endpoints themselves live in :mod:`server.serving_chat` and
:mod:`server.serving_completion`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import asdict, dataclass, field

from guard.chat import EncodedPrompt
from guard.errors import ContextLengthError, GuardValidationError
from guard.events import GuardSummary, RequestOutput
from server.config import ServerConfig
from server.engine import GuardEngine, GuardOptions
from server.errors import (
    EngineDeadError,
    GuardFailureError,
    PromptTooLargeError,
    RequestTimeoutError,
    UnknownModelError,
    error_response,
)
from server.metrics import LatencyTracker, ServerMetrics
from server.protocol import GenerationRequest, InterventionInfo, TrajguardChoiceInfo, UsageInfo
from server.sse import DONE_FRAME, PING_FRAME, EventStream, sse_frame

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class ChoiceState:
    """One engine request: the state of one choice of the response."""

    index: int
    request_id: str
    stream: AsyncIterator[RequestOutput]
    prompt_tokens: int
    guarded: bool
    latency: LatencyTracker
    text: list[str] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    summary: GuardSummary | None = None

    def absorb(self, out: RequestOutput) -> None:
        """Add one delta; a guard failure (fail closed) or engine abort raises."""
        if out.finish_reason == "error":
            raise GuardFailureError(
                out.error or "guard monitor failed; answer withheld (fail closed)"
            )
        if out.finish_reason == "abort":
            raise EngineDeadError("the engine aborted the request")
        self.text.append(out.text)
        self.scores.extend(out.scores)
        self.latency.observe(len(out.token_ids))
        if out.finished:
            self.finish_reason, self.summary = out.finish_reason, out.summary
            self.completion_tokens = out.completion_tokens

    def info(self, *, with_scores: bool) -> TrajguardChoiceInfo:
        """The choice's ``trajguard`` extension."""
        scores = list(self.scores) if with_scores else None
        s = self.summary
        if s is None:
            return TrajguardChoiceInfo(guarded=self.guarded, scores=scores)
        return TrajguardChoiceInfo(
            guarded=True,
            triggered=s.triggered,
            trigger_index=s.trigger_index,
            max_score=s.max_score,
            action=s.action,
            recoveries=s.recoveries,
            interventions=[InterventionInfo(**asdict(i)) for i in s.interventions],
            scores=scores,
        )


@dataclass(eq=False)
class RequestState:
    """One HTTP generation request and its choices."""

    id: str
    n: int
    return_scores: bool
    start: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    choices: list[ChoiceState] = field(default_factory=list)
    abort_reason: str = "disconnect"
    closed: bool = False


class OpenAIServing:
    """What chat and text completions share: checks, submission, merging, cleanup.

    Args:
        engine: the backend.
        config: limits and defaults.
        metrics: where to record (``None``: nowhere).
    """

    id_prefix = "cmpl"

    def __init__(
        self, engine: GuardEngine, config: ServerConfig, *, metrics: ServerMetrics | None = None
    ) -> None:
        self.engine = engine
        self.config = config
        self.metrics = metrics

    # ---- before generation ---------------------------------------------------------------

    async def _check(self, request: GenerationRequest) -> GuardOptions:
        if request.model is not None and request.model != self.engine.model_name:
            raise UnknownModelError(
                f"model {request.model[:100]!r} does not exist; this server serves "
                f"{self.engine.model_name!r}",
                param="model",
            )
        request.check_supported()
        if not request.trajguard.guard and not self.config.allow_unguarded_requests:
            raise GuardValidationError(
                "this server does not allow unguarded requests", param="trajguard.guard"
            )
        await self.engine.check_health()
        return GuardOptions(guard=request.trajguard.guard)

    def _check_prompt(self, prompt: EncodedPrompt) -> int:
        n_tokens = len(prompt.prompt_ids) + len(prompt.prefill_ids)
        limit = self.config.max_prompt_tokens
        if limit is not None and n_tokens > limit:
            raise PromptTooLargeError(
                f"prompt has {n_tokens} tokens; this server accepts at most {limit}", param="prompt"
            )
        return n_tokens

    def _max_tokens(self, request: GenerationRequest, prompt_tokens: int) -> int:
        requested = request.requested_max_tokens()
        if requested is not None:
            return requested  # the engine checks it against the context
        room = self.engine.max_model_len - prompt_tokens
        if room < 1:
            raise ContextLengthError(
                f"prompt ({prompt_tokens} tokens) fills the model's context of "
                f"{self.engine.max_model_len} tokens",
                param="prompt",
            )
        return min(self.config.default_max_tokens, room)

    async def _submit(
        self, request: GenerationRequest, prompts: list[EncodedPrompt], guard_options: GuardOptions
    ) -> RequestState:
        """Validate every prompt, then start ``n`` engine requests per prompt."""
        if len(prompts) * request.n > self.config.max_n:
            raise GuardValidationError(f"prompts x n must be <= {self.config.max_n}", param="n")
        sizes = [self._check_prompt(p) for p in prompts]
        req = RequestState(
            id=f"{self.id_prefix}-{uuid.uuid4().hex}",
            n=request.n,
            return_scores=request.trajguard.return_scores,
        )
        try:
            for p, (prompt, size) in enumerate(zip(prompts, sizes)):
                max_tokens = self._max_tokens(request, size)
                for i in range(request.n):
                    params = request.to_sampling_params(
                        max_tokens=max_tokens,
                        choice=i,
                        default_temperature=self.config.default_temperature,
                    )
                    index = p * request.n + i
                    rid = f"{req.id}-{index}"
                    stream = await self.engine.generate(
                        rid, prompt, params, guard_options=guard_options
                    )
                    guarded = guard_options.guard and self.engine.guarded
                    req.choices.append(
                        ChoiceState(
                            index,
                            rid,
                            stream,
                            size,
                            guarded,
                            LatencyTracker(self.metrics, req.start),
                        )
                    )
        except BaseException:
            req.abort_reason = "rejected"
            await self._abort(req)
            raise
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(sum(sizes))
        if self.config.log_bodies:
            logger.debug("request %s body: %s", req.id, request.model_dump_json())
        return req

    # ---- during and after generation -------------------------------------------------------

    async def _outputs(
        self, req: RequestState
    ) -> AsyncGenerator[tuple[ChoiceState, RequestOutput] | None, None]:
        """Merge the choices' outputs in arrival order; ``None`` is a keep-alive tick.

        Raises:
            RequestTimeoutError: the request ran past ``request_timeout_s``.
            EngineDeadError: the engine failed.
        """
        queue: asyncio.Queue = asyncio.Queue()
        tasks: set[asyncio.Task] = set()

        async def pump(choice: ChoiceState) -> None:
            finished = False
            try:
                async for out in choice.stream:
                    finished = out.finished
                    queue.put_nowait((choice, out))
                if not finished:  # a backend must end every stream with a finished output
                    raise EngineDeadError("the engine ended the request without finishing it")
            except Exception as exc:  # noqa: BLE001 - handed to the consumer
                queue.put_nowait((choice, exc))

        for choice in req.choices:
            task = asyncio.create_task(pump(choice))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        deadline = req.start + self.config.request_timeout_s
        ping = self.config.sse_ping_interval_s
        pending = len(req.choices)
        try:
            while pending:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    req.abort_reason = "timeout"
                    raise RequestTimeoutError(
                        f"request timed out after {self.config.request_timeout_s:g} s"
                    )
                try:
                    async with asyncio.timeout(remaining if ping is None else min(remaining, ping)):
                        choice, item = await queue.get()
                except TimeoutError:
                    if time.perf_counter() < deadline:
                        yield None
                    continue
                if isinstance(item, BaseException):
                    raise item
                pending -= item.finished
                yield choice, item
        finally:
            for task in list(tasks):
                task.cancel()

    async def _collect(self, req: RequestState) -> None:
        """Run every choice to its end (non-streaming)."""
        try:
            async with aclosing(self._outputs(req)) as outputs:
                async for item in outputs:
                    if item is not None:
                        item[0].absorb(item[1])
        except Exception:
            if req.abort_reason == "disconnect":
                req.abort_reason = "error"
            raise
        finally:  # also on cancellation: the client went away
            await self._abort(req)
        self._record(req)

    async def _abort(self, req: RequestState) -> None:
        """Abort the choices still running (frees their KV rows); once per request."""
        if req.closed:
            return
        req.closed = True
        unfinished = [c for c in req.choices if c.finish_reason is None]
        for choice in unfinished:
            await self.engine.abort(choice.request_id)
        if unfinished:
            logger.info(
                "request %s aborted (%s): %d choices", req.id, req.abort_reason, len(unfinished)
            )
            if self.metrics is not None:
                self.metrics.aborted.labels(reason=req.abort_reason).inc()

    def _usage(self, req: RequestState) -> UsageInfo:
        prompt = sum(c.prompt_tokens for c in req.choices if c.index % req.n == 0)
        completion = sum(c.completion_tokens for c in req.choices)
        return UsageInfo(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    def _record(self, req: RequestState) -> None:
        for c in req.choices:
            if self.metrics is not None:
                self.metrics.generation_tokens.inc(c.completion_tokens)
                self.metrics.finished.labels(finish_reason=c.finish_reason).inc()
                if c.summary is not None and c.summary.triggered:
                    self.metrics.triggers.labels(action=c.summary.action).inc()
            if self.config.log_bodies:
                logger.debug("request %s choice %d text: %r", req.id, c.index, "".join(c.text))
        logger.info(
            "request %s done in %.2fs: choices=%d completion_tokens=%d finish=%s triggered=%d",
            req.id,
            time.perf_counter() - req.start,
            len(req.choices),
            sum(c.completion_tokens for c in req.choices),
            ",".join(sorted({str(c.finish_reason) for c in req.choices})),
            sum(bool(c.summary and c.summary.triggered) for c in req.choices),
        )

    def _error_frame(self, req: RequestState, exc: BaseException) -> str:
        status, body = error_response(exc)
        if status >= 500 and not isinstance(
            exc, (GuardFailureError, EngineDeadError, RequestTimeoutError)
        ):
            logger.exception("request %s failed mid-stream", req.id, exc_info=exc)
        else:
            logger.warning("request %s ended with error %d %s", req.id, status, body.error.code)
        if req.abort_reason == "disconnect":
            req.abort_reason = "error"
        return sse_frame(body)

    def _event_stream(self, req: RequestState, frames: AsyncGenerator[str, None]) -> EventStream:
        return EventStream(frames, on_close=lambda: self._abort(req))

    @staticmethod
    def _chunk_info(
        req: RequestState, choice: ChoiceState, out: RequestOutput
    ) -> TrajguardChoiceInfo | None:
        """A chunk's ``trajguard``: its tokens' scores if asked, the guard summary at the end."""
        info = choice.info(with_scores=False) if out.finished else None
        if req.return_scores and out.scores:
            info = (info or TrajguardChoiceInfo(guarded=choice.guarded)).model_copy(
                update={"scores": list(out.scores)}
            )
        return info

    @staticmethod
    def _worth_sending(req: RequestState, out: RequestOutput) -> bool:
        return bool(out.text or out.finished or (req.return_scores and out.scores))

    async def _stream_frames(
        self,
        req: RequestState,
        chunk: Callable[[ChoiceState, RequestOutput], str],
        usage_frame: Callable[[], str] | None,
    ) -> AsyncGenerator[str, None]:
        """Frames of a stream: deltas as they come, the usage chunk, ``[DONE]``.

        A failure yields one error frame before ``[DONE]``.
        """
        try:
            async with aclosing(self._outputs(req)) as outputs:
                async for item in outputs:
                    if item is None:
                        yield PING_FRAME
                        continue
                    choice, out = item
                    choice.absorb(out)
                    if self._worth_sending(req, out):
                        yield chunk(choice, out)
            self._record(req)
            if usage_frame is not None:
                yield usage_frame()
        except Exception as exc:  # noqa: BLE001 - every failure becomes one error frame
            yield self._error_frame(req, exc)
        yield DONE_FRAME
