"""The in-process backend: a :class:`guard.GuardedEngine` stepped by one background thread."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from transformers import PreTrainedTokenizerBase

from guard.assets import probe_dir_for
from guard.chat import EncodedPrompt
from guard.config import SamplingParams
from guard.decoding import GuardedEngine
from guard.events import RequestOutput
from guard.models import load_model, model_fingerprint
from guard.probe import LinearProbe
from server.config import ServerConfig
from server.engine import GuardEngine, GuardOptions
from server.errors import EngineDeadError, EngineStepError

logger = logging.getLogger(__name__)

MAX_CONSECUTIVE_STEP_FAILURES = 2  # then the engine is declared dead


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


def engine_fingerprint(engine: GuardedEngine) -> dict[str, Any]:
    """The ``/v1/models`` fingerprint of a decoder: its weights, probe, threshold, config."""
    probe, probe_digest, threshold = engine.probe, None, None
    if probe is not None:
        probe_digest, threshold = probe.state_digest(), engine.threshold
    config = json.dumps(dataclasses.asdict(engine.config), sort_keys=True, default=str)
    return {
        "model_fingerprint": model_fingerprint(engine.model),
        "probe_digest": probe_digest,
        "threshold": threshold,
        "guard_config": hashlib.sha256(config.encode()).hexdigest()[:16],
    }


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
        self._fingerprint = engine_fingerprint(engine)  # once: hashing weights is not free

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

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(self._fingerprint)

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
