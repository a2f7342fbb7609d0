"""The engine interface the server depends on, and its in-process implementation.

``GuardEngine`` mirrors vLLM's ``EngineClient``: the serving layer only ever calls
``generate``/``abort``/``check_health``, so an upstream-vLLM backend can be added
beside :class:`LocalGuardEngine` without touching ``serving.py``.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from guard.assets import default_probe_dir
from guard.chat import EncodedPrompt
from guard.config import SamplingParams
from guard.decoding import GuardedEngine
from guard.errors import ConfigError
from guard.events import RequestOutput
from guard.models import DEFAULT_MODEL, load_model
from guard.probe import LinearProbe
from server.config import ServerConfig
from server.errors import EngineDeadError, EngineStepError

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_STEP_FAILURES = 2  # then the engine is declared dead


@dataclass(frozen=True, slots=True)
class GuardOptions:
    """Per-request guard switches (already checked against the server's config)."""

    guard: bool = True


class GuardEngine(ABC):
    """What the serving layer needs from a backend."""

    @property
    @abstractmethod
    def model_name(self) -> str:
        """The served model name."""

    @property
    @abstractmethod
    def max_model_len(self) -> int:
        """Context window in tokens (prompt + completion)."""

    @property
    @abstractmethod
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The model's tokenizer (chat template included)."""

    @property
    @abstractmethod
    def guarded(self) -> bool:
        """Whether a probe monitors requests."""

    @property
    @abstractmethod
    def errored(self) -> bool:
        """Whether the engine has failed and cannot serve."""

    @abstractmethod
    async def start(self) -> None:
        """Start serving (called from the app's lifespan)."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop; live requests end with :class:`EngineDeadError`."""

    @abstractmethod
    async def generate(
        self,
        request_id: str,
        prompt: EncodedPrompt,
        params: SamplingParams,
        *,
        guard_options: GuardOptions,
    ) -> AsyncIterator[RequestOutput]:
        """Submit a request and return the stream of its output deltas.

        Validation happens here, before anything is streamed, so a bad request is an
        HTTP error and never a broken stream.

        Raises:
            GuardValidationError: invalid prompt or parameters (400).
            ContextLengthError: the request does not fit the context (400).
            EngineDeadError: the engine cannot serve (503).
        """

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Stop a request and free its resources; a no-op once it finished."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raise :class:`EngineDeadError` unless the engine can serve."""


class _Closed:
    """Queue sentinel: the request was aborted."""


class _RequestStream:
    """Async iterator over one request's outputs, fed by the engine thread."""

    def __init__(self, request_id: str, queue: asyncio.Queue) -> None:
        self.request_id = request_id
        self._queue = queue
        self._done = False

    def __aiter__(self) -> _RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if isinstance(item, _Closed):
            self._done = True
            raise StopAsyncIteration
        self._done = item.finished
        return item


class LocalGuardEngine(GuardEngine):
    """Runs a :class:`guard.GuardedEngine` in one background thread.

    The thread calls ``step()`` while any request is live (concurrent requests share
    the batch through continuous batching) and hands each step's outputs to the event
    loop with ``call_soon_threadsafe``, where they go to per-request queues.

    Args:
        engine: the guarded decoder; only this class's thread calls its ``step``.
        model_name: the name clients pass as ``model``.
    """

    def __init__(self, engine: GuardedEngine, *, model_name: str) -> None:
        self._engine = engine
        self._model_name = model_name
        self._queues: dict[str, asyncio.Queue] = {}
        self._wake = threading.Event()
        self._stopping = False
        self._dead: str | None = "engine not started"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.peak_batch = 0  # largest decoding batch seen (a continuous-batching witness)

    # ---- GuardEngine -----------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_model_len(self) -> int:
        return self._engine.max_context

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._engine.tokenizer

    @property
    def guarded(self) -> bool:
        return self._engine.probe is not None

    @property
    def errored(self) -> bool:
        return self._dead is not None

    def has_unfinished(self) -> bool:
        """Whether the decoder still holds a request (waiting or decoding)."""
        return self._engine.has_unfinished()

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._dead = None
        self._thread = threading.Thread(target=self._run, name="trajguard-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30.0)
        self._dead = self._dead or "server is shutting down"
        self._fail_all(EngineDeadError(self._dead))

    async def generate(
        self,
        request_id: str,
        prompt: EncodedPrompt,
        params: SamplingParams,
        *,
        guard_options: GuardOptions,
    ) -> AsyncIterator[RequestOutput]:
        await self.check_health()
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = queue
        try:
            self._engine.add_request(
                request_id,
                prompt.prompt_ids,
                params,
                prefill_ids=prompt.prefill_ids,
                guard=guard_options.guard,
            )
        except BaseException:
            self._queues.pop(request_id, None)
            raise
        self._wake.set()
        return _RequestStream(request_id, queue)

    async def abort(self, request_id: str) -> None:
        queue = self._queues.pop(request_id, None)
        if queue is not None:
            queue.put_nowait(_Closed())
        self._engine.abort(request_id)
        self._wake.set()

    async def check_health(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"engine unavailable: {self._dead}")
        if self._thread is not None and not self._thread.is_alive():
            raise EngineDeadError("engine unavailable: its thread has exited")

    # ---- the engine thread ---------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping:
            if not self._engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self._engine.step()
                failures = 0
            except Exception:  # a failed step drops the batch; repeated failures kill the engine
                failures += 1
                if failures >= MAX_CONSECUTIVE_STEP_FAILURES:
                    logger.exception("engine step failed again; the engine is now unavailable")
                    self._dead = "the engine failed (see server logs)"
                    self._post(self._fail_all, EngineDeadError(f"engine unavailable: {self._dead}"))
                    return
                logger.exception("engine step failed; dropping the live requests")
                # Abort from the event loop (it owns the queues), then let the next step drop the rows.
                dropped = threading.Event()
                self._post(self._drop_live, dropped)
                dropped.wait(5.0)
                continue
            self.peak_batch = max(self.peak_batch, self._engine.num_running)
            if outputs:
                self._post(self._dispatch, outputs)

    def _post(self, callback: Callable[[Any], None], arg: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, arg)
        except RuntimeError:  # the event loop closed during shutdown
            pass

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Event-loop side: route each output to its request's queue."""
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is None:  # aborted meanwhile
                continue
            queue.put_nowait(out)
            if out.finished:
                del self._queues[out.request_id]

    def _drop_live(self, dropped: threading.Event) -> None:
        """Event-loop side, after a failed step: fail and abort every live request."""
        live = list(self._queues)
        self._fail_all(
            EngineStepError(
                "the engine failed while decoding this request (see server logs); it was dropped"
            )
        )
        for request_id in live:
            self._engine.abort(request_id)
        dropped.set()

    def _fail_all(self, error: EngineDeadError) -> None:
        queues, self._queues = self._queues, {}
        for queue in queues.values():
            queue.put_nowait(error)


def probe_dir_for(model: str) -> Path:
    """The probe shipped for ``model``.

    Raises:
        ConfigError: nothing is shipped for ``model`` (pass ``--probe``).
    """
    if model != DEFAULT_MODEL:
        raise ConfigError(f"--probe is required for models other than {DEFAULT_MODEL}")
    return default_probe_dir()


def build_engine(config: ServerConfig) -> GuardEngine:
    """The backend ``config.backend`` names (slow: call it off the event loop)."""
    if config.backend == "vllm":
        from server.upstream import build_upstream_engine

        return build_upstream_engine(config)
    return build_local_engine(config)


def build_local_engine(config: ServerConfig) -> LocalGuardEngine:
    """Load the model and probe named by ``config`` (slow: call it off the event loop).

    Raises:
        ConfigError: no probe given for a model without a shipped one.
        ModelNotFoundError, ProbeMismatchError: the model or probe cannot be used.
    """
    lm = load_model(config.model)
    probe = LinearProbe.load(config.probe or probe_dir_for(config.model))
    engine = GuardedEngine(lm.model, lm.tokenizer, probe, config.guard_config())
    return LocalGuardEngine(engine, model_name=config.model_name)
