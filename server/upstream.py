"""Guard an upstream OpenAI-compatible vLLM server: the upstream generates, the proxy guards.

This backend streams the upstream's ``/v1/completions`` output with
``return_token_ids: true`` (prompts are sent as token ids, so the chat template is applied
once, here) and hands every arriving token to the request's
:class:`guard.trajectory.GuardedRequest`, with its score from
:mod:`server.upstream_scores` (a local shadow model, or the upstream plugin's event stream:
the fast path). On a trigger it closes the upstream stream and continues with a new
completion whose prompt is prompt + kept tokens + recovery tokens. This module owns only
the HTTP passes and their transport; the guard's rules are the request's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace

import httpx
import torch
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from guard.assets import probe_dir_for
from guard.chat import EncodedPrompt
from guard.config import GuardConfig, SamplingParams
from guard.errors import ConfigError, GuardValidationError
from guard.events import RequestOutput
from guard.models import resolve_model_path
from guard.monitor import with_calibrated_debounce
from guard.probe import LinearProbe
from guard.shadow import ShadowScorer
from guard.trajectory import GuardedRequest, Recovery
from guard.vllm.channel import EventStreamAuthError, EventSubscriber, read_hello, secret_key
from server.config import ServerConfig
from server.engine import GuardEngine, GuardOptions
from server.errors import EngineDeadError
from server.upstream_scores import (
    PluginScores,
    ShadowBatcher,
    ShadowScores,
    TokenScores,
    same_probe,
    upstream_events_address,
    upstream_events_secret,
)

logger = logging.getLogger(__name__)


class UpstreamVLLMEngine(GuardEngine):
    """A :class:`GuardEngine` whose tokens come from an upstream vLLM server.

    Args:
        upstream_url: base URL of the OpenAI-compatible server (``http://host:8000``).
        tokenizer: the served model's tokenizer (applies the chat template locally).
        scorer: shadow scorer (``None``: no shadow model; see ``probe`` and ``events``).
        config: monitor, policy and holdback; ``resample`` is not supported upstream.
        probe: the probe (default: the scorer's); ``None`` with no scorer: no guarding.
        events: ``(host, port)`` of the upstream plugin's event stream (fast path);
            used when it passes the handshake and its hello names the same probe, else
            the shadow scorer is.
        events_secret: the stream's shared secret (``None``: only an unauthenticated
            loopback stream is accepted; see :mod:`guard.vllm.channel`).
        transport: an httpx transport for the upstream (tests drive a scripted one).
        model_name: the name clients use.
        api_key: bearer token for the upstream, if it needs one.
        timeout: seconds for connecting and between streamed chunks.

    Raises:
        ConfigError: the ``resample`` policy, or too short an ``events_secret``.
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        tokenizer: PreTrainedTokenizerBase,
        scorer: ShadowScorer | None,
        config: GuardConfig,
        model_name: str,
        api_key: str | None = None,
        timeout: float = 60.0,
        probe: LinearProbe | None = None,
        events: tuple[str, int] | None = None,
        events_secret: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if config.policy.kind == "resample":
            raise ConfigError(
                "the vllm backend supports the stop and rollback policies, not resample"
            )
        self._url = upstream_url.rstrip("/")
        self._tokenizer = tokenizer
        self._scorer = scorer
        self._batcher = ShadowBatcher(scorer) if scorer is not None else None
        self._model_name = model_name
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._upstream_model: str | None = None
        self._max_len = 0
        self._dead: str | None = "engine not started"
        self._aborted: set[str] = set()
        eos = {tokenizer.eos_token_id}
        self._eos_ids = {e for e in eos if e is not None}
        self._probe = probe if probe is not None else (scorer.probe if scorer else None)
        self._config = replace(
            config, monitor=with_calibrated_debounce(config.monitor, self._probe)
        )
        if events_secret is not None:
            secret_key(events_secret)  # too short a secret fails here, not at connect
        self._events_address = events
        self._events_secret = events_secret
        self._events: EventSubscriber | None = None

    # ---- GuardEngine -----------------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._model_name

    @property
    def max_model_len(self) -> int:
        return self._max_len

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def guarded(self) -> bool:
        return self._probe is not None

    @property
    def fast_path(self) -> bool:
        """Whether scores come from the upstream plugin's event stream."""
        return self._events is not None and self._events.connected

    @property
    def errored(self) -> bool:
        return self._dead is not None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            base_url=self._url,
            headers=self._headers,
            timeout=httpx.Timeout(self._timeout),
            transport=self._transport,
        )
        try:
            models = (await self._client.get("/v1/models")).raise_for_status().json()["data"]
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            self._dead = f"upstream {self._url} unreachable: {type(exc).__name__}"
            logger.error("%s", self._dead)
            return
        self._upstream_model = models[0]["id"]
        self._max_len = int(models[0].get("max_model_len") or 2048)
        self._dead = None
        if self._events_address is not None and self._probe is not None:
            await self._connect_events()
        if self.guarded and self._scorer is None and not self.fast_path:
            self._dead = (
                "the upstream guard event stream is unavailable and no shadow scorer is loaded"
            )

    async def _connect_events(self) -> None:
        subscriber = EventSubscriber(secret=self._events_secret)
        try:
            hello = await subscriber.connect(*self._events_address)
        except ConfigError as exc:  # a remote stream and no secret: never trusted
            logger.warning("not using the event stream at %s:%d: %s", *self._events_address, exc)
            return
        except EventStreamAuthError as exc:
            logger.error("refused the event stream at %s:%d: %s", *self._events_address, exc)
            return
        except (OSError, TimeoutError, ValueError) as exc:
            logger.warning("no trajguard event stream at %s:%d (%s)", *self._events_address, exc)
            return
        if not same_probe(hello, self._probe):
            logger.warning("the upstream plugin runs another probe; using the shadow scorer")
            await subscriber.close()
            return
        self._events = subscriber
        logger.info("fast path: scores from the upstream plugin at %s:%d", *self._events_address)
        if self._events_secret is None:
            logger.warning(
                "the event stream is not authenticated: any local process holding its port "
                "could feed scores; set TRAJGUARD_EVENTS_SECRET here and on vLLM"
            )

    async def shutdown(self) -> None:
        self._dead = self._dead or "server is shutting down"
        if self._events is not None:
            await self._events.close()
        if self._batcher is not None:
            await self._batcher.close()
        if self._client is not None:
            await self._client.aclose()

    async def check_health(self) -> None:
        if self._dead is not None and self._client is not None and self._upstream_model is None:
            await self.start()  # the upstream may have come up since
        if self._dead is not None:
            raise EngineDeadError(f"engine unavailable: {self._dead}")
        if self._events is not None and not self._events.connected and self._scorer is None:
            raise EngineDeadError("the upstream guard event stream was lost")
        try:
            (await self._client.get("/health")).raise_for_status()
        except httpx.HTTPError as exc:
            raise EngineDeadError(
                f"upstream {self._url} is not healthy: {type(exc).__name__}"
            ) from exc

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)

    async def generate(
        self,
        request_id: str,
        prompt: EncodedPrompt,
        params: SamplingParams,
        *,
        guard_options: GuardOptions,
    ) -> AsyncIterator[RequestOutput]:
        await self.check_health()
        guarded = self.guarded and guard_options.guard
        request = GuardedRequest(
            request_id,
            prompt.prompt_ids,
            params,
            tokenizer=self._tokenizer,
            config=self._config,
            eos_ids=self._eos_ids,
            threshold=None if self._probe is None else self._probe.threshold_,
            guarded=guarded,
            prefill_ids=prompt.prefill_ids,
            max_context=self._max_len,
        )
        return self._stream(request)

    # ---- one request -----------------------------------------------------------------

    def _token_scores(self, request: GuardedRequest) -> TokenScores | None:
        """Where ``request``'s scores come from (``None``: unguarded)."""
        if not request.guarded:
            return None
        if self.fast_path:
            return PluginScores(self._events, request.request_id, timeout=self._timeout)
        if self._batcher is None:
            raise EngineDeadError("the upstream guard event stream was lost")
        return ShadowScores(self._batcher)

    async def _stream(self, request: GuardedRequest) -> AsyncIterator[RequestOutput]:
        scores = self._token_scores(request)  # opened on first iteration, closed below
        try:
            recovery = None
            if scores is not None:
                prefill, history = await scores.context(
                    request.prompt_ids,
                    request.response_ids[: request.n_prefill],
                    request.history_spans,
                    lambda prompt, xargs: self._forced_pass(request, prompt, xargs),
                )
                recovery = request.judge_context(prefill, history)
            while not request.finished:
                if recovery is not None:
                    await self._carry_out(request, recovery, scores)
                    if request.finished:
                        break
                recovery = None
                async for out, recovery in self._upstream_pass(request, scores):
                    if out is not None:
                        yield out
                if request.request_id in self._aborted:
                    return
                if recovery is None and not request.finished:
                    request.finish("stop")  # the upstream stream ended without a reason
            out = request.take_output()
            if out is not None:
                yield out
        finally:
            self._aborted.discard(request.request_id)
            if scores is not None:
                scores.close()

    async def _carry_out(
        self, request: GuardedRequest, recovery: Recovery, scores: TokenScores
    ) -> None:
        """Rewind the score source as ``recovery`` says and score the injected tokens."""
        if recovery.kind == "stop":
            return
        await scores.rewind(recovery.discarded)
        request.injected(await scores.injected(recovery.inject_ids))

    async def _forced_pass(self, request: GuardedRequest, prompt: list[int], xargs: dict) -> None:
        """A short pass that forces ``xargs['trajguard_prefix']`` after ``prompt`` (fast-path
        scores of prefill and history)."""
        body = self._body(request, prompt, len(xargs["trajguard_prefix"]) + 1)
        body.update(stream=False, temperature=0.0, ignore_eos=True, vllm_xargs=xargs)
        try:
            response = await self._client.post("/v1/completions", json=body)
        except httpx.HTTPError as exc:
            raise EngineDeadError(f"upstream failed scoring prefill: {type(exc).__name__}") from exc
        if response.status_code >= 400:
            raise EngineDeadError(f"upstream error {response.status_code} scoring prefill")

    def _body(self, request: GuardedRequest, prompt: list[int], max_tokens: int) -> dict:
        params = request.params
        body = {
            "model": self._upstream_model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
            "return_token_ids": True,
            "skip_special_tokens": False,
            "ignore_eos": params.ignore_eos,
        }
        if params.seed is not None:
            body["seed"] = params.seed + request.recoveries
        return body

    async def _upstream_pass(
        self, request: GuardedRequest, scores: TokenScores | None
    ) -> AsyncIterator[tuple[RequestOutput | None, Recovery | None]]:
        """Stream one upstream completion until the request finishes, the guard fires,
        the stream ends, or the client left; yields ``(output, recovery)`` as they come."""
        prompt = request.context_ids
        max_tokens = request.params.max_tokens - request.n_generated
        if scores is not None:
            max_tokens = min(max_tokens + scores.extra_tokens, self._max_len - len(prompt))
        body = self._body(request, prompt, max_tokens)
        xargs = None if scores is None else scores.open_pass(len(request.response_ids))
        if xargs is not None:
            body["vllm_xargs"] = xargs
        # The last output is yielded only after the upstream response is closed: a consumer
        # that stops (or is cancelled) once it has the finished output must not leave the
        # connection checked out of the pool (it leaked, and the pool ran dry under load).
        final: tuple[RequestOutput | None, Recovery | None] | None = None
        try:
            async with (
                self._client.stream("POST", "/v1/completions", json=body) as response,
                contextlib.aclosing(_read_ahead(_choices(response), scores)) as choices,
            ):
                await _check_status(response)
                async for choice in choices:
                    if request.request_id in self._aborted:
                        return
                    tokens = choice.get("token_ids") or []
                    reason = choice.get("finish_reason")
                    for k, token in enumerate(tokens):
                        last = reason is not None and k == len(tokens) - 1
                        recovery = await self._accept(request, scores, token, final=last)
                        if recovery is not None or request.finished:
                            final = (request.take_output(), recovery)
                            break
                        yield request.take_output(), None
                    if final is None and reason is not None:
                        request.finish("length" if reason == "length" else "stop")
                        final = (request.take_output(), None)
                    if final is not None:
                        break
        except httpx.HTTPError as exc:
            raise EngineDeadError(
                f"upstream {self._url} failed mid-stream: {type(exc).__name__}"
            ) from exc
        finally:
            if scores is not None:
                scores.close_pass()
        if final is not None:
            yield final

    async def _accept(
        self, request: GuardedRequest, scores: TokenScores | None, token: int, *, final: bool
    ) -> Recovery | None:
        """Hand one upstream token (and its score) to the request."""
        if scores is None or request.finished:
            request.append(token)
            return None
        if final and not scores.scores_final_token and token not in self._eos_ids:
            # The engine never scores a finished pass's last token: it is not released.
            request.finish("stop")
            return None
        index = len(request.response_ids)
        request.append(token)
        if request.finished:  # EOS
            return None
        return request.observe(await scores.score(token, index))


async def _choices(response: httpx.Response) -> AsyncIterator[dict]:
    """The choice of each event of a streamed upstream completion."""
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])["choices"][0]


_END = object()


async def _read_ahead(choices: AsyncIterator[dict], scores: TokenScores | None) -> AsyncIterator:
    """``choices`` as they come, read by a task of their own that announces each one's
    tokens to ``scores`` (:meth:`TokenScores.ahead`) on arrival, while the request may
    still be waiting for an earlier token's score."""
    if scores is None or not scores.reads_ahead:
        async for choice in choices:
            yield choice
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        try:
            async for choice in choices:
                scores.ahead(list(choice.get("token_ids") or []))
                queue.put_nowait(choice)
        except Exception as exc:  # noqa: BLE001 - raised where the choices are consumed
            queue.put_nowait(exc)
        else:
            queue.put_nowait(_END)

    task = asyncio.create_task(pump(), name="trajguard-upstream-reader")
    try:
        while (item := await queue.get()) is not _END:
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _check_status(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    detail = (await response.aread()).decode(errors="replace")[:500]
    if response.status_code < 500:
        raise GuardValidationError(f"upstream rejected the request: {detail}")
    raise EngineDeadError(f"upstream error {response.status_code}")


def build_upstream_engine(
    config: ServerConfig, *, environ: Mapping[str, str] | None = None
) -> UpstreamVLLMEngine:
    """Load the tokenizer, and the truncated shadow model unless the upstream runs the
    trajguard plugin with the same probe (fast path; see the module docstring).

    Raises:
        ConfigError: no probe given for a model without a shipped one, or too short a
            ``TRAJGUARD_EVENTS_SECRET``.
        ModelNotFoundError, ProbeMismatchError: the model or probe cannot be used.
    """
    path = resolve_model_path(config.model)
    probe_dir = config.probe or probe_dir_for(config.model)
    probe = LinearProbe.load(probe_dir)
    events = upstream_events_address(config.upstream, environ)
    secret = upstream_events_secret(environ)
    scorer = None
    if events is None or not same_probe(_checked_hello(events, secret), probe):
        n_layers = int(AutoConfig.from_pretrained(path).num_hidden_layers)
        scorer = ShadowScorer.from_pretrained(
            path, probe, n_layers=n_layers, dtype=getattr(torch, config.shadow_dtype)
        )
    return UpstreamVLLMEngine(
        config.upstream,
        tokenizer=AutoTokenizer.from_pretrained(path),
        scorer=scorer,
        config=config.guard_config(),
        model_name=config.model_name,
        api_key=config.upstream_api_key,
        timeout=config.request_timeout_s,
        probe=probe,
        events=events,
        events_secret=secret,
    )


def _checked_hello(events: tuple[str, int], secret: str | None) -> dict | None:
    """The upstream plugin's hello if its stream passes the handshake, else ``None``."""
    try:
        return read_hello(*events, secret=secret)
    except ConfigError as exc:  # a remote stream and no secret: never trusted
        logger.warning("not using the event stream at %s:%d: %s", *events, exc)
        return None
