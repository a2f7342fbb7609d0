"""Guard an upstream OpenAI-compatible vLLM server with a local shadow scorer.

The upstream server generates; this backend streams its ``/v1/completions`` output with
``return_token_ids: true`` (prompts are sent as token ids, so the chat template is applied
once, here), scores each arriving token with a copy of the model truncated after the
probed layer (:class:`guard.shadow.ShadowScorer`), and applies the same monitor, policy
and holdback as the local engine. On a trigger it closes the upstream stream, crops the
shadow cache and continues with a new completion whose prompt is
prompt + kept tokens + recovery tokens.

Fast path: when the upstream runs the trajguard vLLM plugin (:mod:`guard.vllm`) with the
same probe, its event stream already carries every token's score, so no shadow model is
loaded. Each upstream pass is sent in ``observe`` mode under its own key; the score of
output token ``i`` arrives while the engine computes token ``i + 1`` (one extra token is
requested per pass for the last one). Assistant prefill is scored by a short pass that
forces the prefill tokens (``trajguard_prefix``). Recovery tokens are left unscored (NaN).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from guard.chat import EncodedPrompt
from guard.config import GuardConfig, SamplingParams
from guard.detok import ReleasedText
from guard.errors import ConfigError, ContextLengthError, GuardValidationError
from guard.events import FinishReason, GuardSummary, Intervention, RequestOutput
from guard.models import resolve_model_path
from guard.monitor import StepMonitor
from guard.policies import Action, RecoveryPolicy
from guard.probe import LinearProbe
from guard.shadow import ShadowScorer, ShadowSession
from guard.vllm.channel import EventSubscriber, ScoreFeed, probe_digest, read_hello
from guard.vllm.settings import DEFAULT_EVENTS, parse_address
from server.config import ServerConfig
from server.engine import GuardEngine, GuardOptions, probe_dir_for
from server.errors import EngineDeadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _PassEnd:
    """Why an upstream pass ended: the guard fired (``action``), the answer ended
    (``finish``), or neither (the client left)."""

    action: Action | None = None
    finish: FinishReason | None = None


@dataclass(eq=False)
class _Run:
    """One request's guard state while the upstream generates."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    n_prefill: int
    response_ids: list[int]
    detok: ReleasedText
    monitor: StepMonitor | None
    session: ShadowSession | None
    released: int
    recoveries: int = 0
    interventions: list[Intervention] = field(default_factory=list)
    passes: int = 0
    feed: ScoreFeed | None = None  # fast path: this pass's upstream scores
    feed_offset: int = 0  # response index of the pass's first upstream token
    expect_score: bool = True  # False for a pass's final token (never fed again)

    @property
    def n_generated(self) -> int:
        return len(self.response_ids) - self.n_prefill


class UpstreamVLLMEngine(GuardEngine):
    """A :class:`GuardEngine` whose tokens come from an upstream vLLM server.

    Args:
        upstream_url: base URL of the OpenAI-compatible server (``http://host:8000``).
        tokenizer: the served model's tokenizer (applies the chat template locally).
        scorer: shadow scorer (``None``: no shadow model; see ``probe`` and ``events``).
        config: monitor, policy and holdback; ``resample`` is not supported upstream.
        probe: the probe (default: the scorer's); ``None`` with no scorer: no guarding.
        events: ``(host, port)`` of the upstream plugin's event stream (fast path);
            used when its hello names the same probe, else the shadow scorer is.
        model_name: the name clients use.
        api_key: bearer token for the upstream, if it needs one.
        timeout: seconds for connecting and between streamed chunks.
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
    ) -> None:
        if config.policy.kind == "resample":
            raise ConfigError(
                "the vllm backend supports the stop and rollback policies, not resample"
            )
        self._url = upstream_url.rstrip("/")
        self._tokenizer = tokenizer
        self._scorer = scorer
        self._config = config
        self._policy = RecoveryPolicy.from_config(config.policy)
        self._model_name = model_name
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._timeout = timeout
        self._client: httpx.AsyncClient | None = None
        self._upstream_model: str | None = None
        self._max_len = 0
        self._dead: str | None = "engine not started"
        self._aborted: set[str] = set()
        eos = {tokenizer.eos_token_id}
        self._eos_ids = {e for e in eos if e is not None}
        self._probe = probe if probe is not None else (scorer.probe if scorer else None)
        self._events_address = events
        self._events: EventSubscriber | None = None
        threshold = None if self._probe is None else self._probe.threshold_
        self._threshold = config.monitor.threshold or threshold or 0.5

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
            base_url=self._url, headers=self._headers, timeout=httpx.Timeout(self._timeout)
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
        subscriber = EventSubscriber()
        try:
            hello = await subscriber.connect(*self._events_address)
        except (OSError, TimeoutError, ValueError) as exc:
            logger.warning("no trajguard event stream at %s:%d (%s)", *self._events_address, exc)
            return
        if not _same_probe(hello, self._probe):
            logger.warning("the upstream plugin runs another probe; using the shadow scorer")
            await subscriber.close()
            return
        self._events = subscriber
        logger.info("fast path: scores from the upstream plugin at %s:%d", *self._events_address)

    async def shutdown(self) -> None:
        self._dead = self._dead or "server is shutting down"
        if self._events is not None:
            await self._events.close()
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
        ids = prompt.prompt_ids + prompt.prefill_ids
        if not prompt.prompt_ids:
            raise GuardValidationError("prompt must contain at least one token", param="prompt")
        if len(ids) + params.max_tokens > self._max_len:
            raise ContextLengthError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self._max_len} tokens",
                param="prompt" if len(ids) >= self._max_len else "max_tokens",
            )
        guarded = self.guarded and guard_options.guard
        shadow = guarded and not self.fast_path
        run = _Run(
            request_id=request_id,
            prompt_ids=list(prompt.prompt_ids),
            params=params,
            n_prefill=len(prompt.prefill_ids),
            response_ids=list(prompt.prefill_ids),
            detok=ReleasedText(self._tokenizer, params.stop),
            monitor=StepMonitor(self._config.monitor, threshold=self._threshold)
            if guarded
            else None,
            session=self._scorer.session() if shadow else None,
            released=len(prompt.prefill_ids),
        )
        return self._stream(run)

    # ---- one request -----------------------------------------------------------------

    async def _stream(self, run: _Run) -> AsyncIterator[RequestOutput]:
        try:
            action = await self._score_prefill(run)
            while True:
                if action is not None:
                    done = await self._recover(run, action)
                    if done is not None:
                        yield done
                        return
                if run.n_generated >= run.params.max_tokens:  # a recovery used up the budget
                    yield self._finish(run, "length")
                    return
                action, finish = None, None
                async for item in self._upstream_pass(run):
                    if isinstance(item, _PassEnd):
                        action, finish = item.action, item.finish
                    elif item.token_ids or item.text:
                        yield item
                if finish is not None:
                    yield self._finish(run, finish)
                    return
                if action is None and run.request_id in self._aborted:
                    return
        finally:
            self._aborted.discard(run.request_id)

    async def _score(self, run: _Run, token_ids: list[int]) -> list[float]:
        if run.session is not None:
            # Scoring runs torch: keep it off the event loop.
            return await asyncio.to_thread(run.session.feed, token_ids)
        if run.feed is None or not run.expect_score:
            return [math.nan] * len(token_ids)  # prompt, recovery text, a pass's last token
        # Fast path: token_ids is the one token just appended to the response.
        index = len(run.response_ids) - 1 - run.feed_offset
        try:
            event = await run.feed.get(index, timeout=self._timeout)
        except (TimeoutError, ConnectionError) as exc:
            raise EngineDeadError(f"no upstream guard score for token {index}: {exc}") from exc
        return [float(event["s"])]

    async def _fast_prefill_scores(self, run: _Run) -> list[float]:
        """Scores of the assistant prefill: a pass that forces it (``trajguard_prefix``)."""
        key = self._begin_pass(run, offset=0)
        body = self._body(run, run.prompt_ids, run.n_prefill + 1, key)
        body.update(stream=False, temperature=0.0, ignore_eos=True)
        body["vllm_xargs"]["trajguard_prefix"] = list(run.response_ids)
        try:
            response = await self._client.post("/v1/completions", json=body)
            if response.status_code >= 400:
                raise EngineDeadError(f"upstream error {response.status_code} scoring prefill")
            return [
                float((await run.feed.get(i, timeout=self._timeout))["s"])
                for i in range(run.n_prefill)
            ]
        except (httpx.HTTPError, TimeoutError, ConnectionError) as exc:
            raise EngineDeadError(f"upstream failed scoring prefill: {type(exc).__name__}") from exc
        finally:
            self._end_pass(run, key)

    def _begin_pass(self, run: _Run, *, offset: int) -> str:
        run.passes += 1
        key = f"{run.request_id}/{run.passes}"
        run.feed = self._events.watch(key)
        run.feed_offset = offset
        run.expect_score = True
        return key

    def _end_pass(self, run: _Run, key: str) -> None:
        self._events.unwatch(key)
        run.feed = None

    def _body(self, run: _Run, prompt: list[int], max_tokens: int, key: str | None) -> dict:
        body = {
            "model": self._upstream_model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": run.params.temperature,
            "top_p": run.params.top_p,
            "stream": True,
            "return_token_ids": True,
            "skip_special_tokens": False,
            "ignore_eos": run.params.ignore_eos,
        }
        if key is not None:
            body["vllm_xargs"] = {"trajguard": "observe", "trajguard_id": key}
        if run.params.seed is not None:
            body["seed"] = run.params.seed + run.recoveries
        return body

    async def _score_prefill(self, run: _Run) -> Action | None:
        if run.monitor is None:
            return None
        if run.session is None:  # fast path
            if not (run.n_prefill and self._config.monitor_prefill):
                return None
            prefix = await self._fast_prefill_scores(run)
            scores = [math.nan] * len(run.prompt_ids) + prefix
        else:
            scores = await self._score(run, run.prompt_ids + run.response_ids)
        action = None
        for score in scores[len(run.prompt_ids) :]:
            flagged = run.monitor.observe(score).flagged if self._config.monitor_prefill else False
            if flagged and action is None:
                action = self._policy.decide(
                    run.monitor,
                    released=run.n_prefill,
                    recoveries=run.recoveries,
                    response_ids=run.response_ids,
                )
        return action

    async def _upstream_pass(self, run: _Run) -> AsyncIterator[RequestOutput | _PassEnd]:
        """Stream one upstream completion until it ends, the guard fires, or the client left.

        Yields releases as tokens clear the holdback window, then one :class:`_PassEnd`.
        """
        prompt = run.prompt_ids + run.response_ids
        max_tokens = run.params.max_tokens - run.n_generated
        key = None
        if run.monitor is not None and run.session is None:  # fast path
            key = self._begin_pass(run, offset=len(run.response_ids))
            # One more token, so the engine also scores the last one we keep.
            max_tokens = min(max_tokens + 1, self._max_len - len(prompt))
        body = self._body(run, prompt, max_tokens, key)
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    detail = (await response.aread()).decode(errors="replace")[:500]
                    if response.status_code < 500:
                        raise GuardValidationError(f"upstream rejected the request: {detail}")
                    raise EngineDeadError(f"upstream error {response.status_code}")
                async for line in response.aiter_lines():
                    if run.request_id in self._aborted:
                        yield _PassEnd()
                        return
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    choice = json.loads(line[6:])["choices"][0]
                    tokens = choice.get("token_ids") or []
                    for k, token in enumerate(tokens):
                        # vLLM never feeds the last token of a finished request again.
                        run.expect_score = not (
                            choice.get("finish_reason") and k == len(tokens) - 1
                        )
                        end = await self._accept(run, token)
                        if end is not None:
                            yield end
                            return
                        yield self._release(run, len(run.response_ids) - self._holdback(run))
                    if choice.get("finish_reason"):
                        reason = "length" if choice["finish_reason"] == "length" else "stop"
                        yield _PassEnd(finish=reason)
                        return
        except httpx.HTTPError as exc:
            raise EngineDeadError(
                f"upstream {self._url} failed mid-stream: {type(exc).__name__}"
            ) from exc
        finally:
            if key is not None:
                self._end_pass(run, key)
        yield _PassEnd(finish="stop")

    def _holdback(self, run: _Run) -> int:
        return self._config.holdback if run.monitor is not None else 0

    async def _accept(self, run: _Run, token: int) -> _PassEnd | None:
        """Score one upstream token; a :class:`_PassEnd` when the guard fires or the answer ends."""
        if token in self._eos_ids and not run.params.ignore_eos:
            return _PassEnd(finish="stop")
        run.response_ids.append(token)
        if run.monitor is not None:
            (score,) = await self._score(run, [token])
            if run.monitor.observe(score).flagged:
                action = self._policy.decide(
                    run.monitor,
                    released=run.released,
                    recoveries=run.recoveries,
                    response_ids=run.response_ids,
                )
                return _PassEnd(action=action)
        if run.detok.hits_stop(run.response_ids[run.n_prefill :]):
            return _PassEnd(finish="stop")
        if run.n_generated >= run.params.max_tokens:
            return _PassEnd(finish="length")
        return None

    async def _recover(self, run: _Run, action: Action) -> RequestOutput | None:
        """Apply ``action``; a final output when the request ends (stop), else ``None``."""
        intervention = Intervention(
            step=len(run.monitor.trace) - 1 - run.n_prefill,
            score=run.monitor.trace[-1],
            action=action.kind,
            kept=action.keep - run.n_prefill,
            discarded=len(run.response_ids) - action.keep,
        )
        run.interventions.append(intervention)
        discard = len(run.response_ids) - action.keep
        run.monitor.rewind(len(run.monitor.trace) - action.keep)
        if run.session is not None:
            run.session.rewind(discard)
        del run.response_ids[action.keep :]
        if action.kind == "stop":
            return self._finish(run, "content_filter", append_text=action.append_text)
        run.recoveries += 1
        inject = self._tokenizer.encode(action.inject_text, add_special_tokens=False)
        for score in await self._score(run, inject):
            run.monitor.record(score)  # our own recovery text is not judged
        run.response_ids += inject
        return None

    def _release(self, run: _Run, upto: int, *, final: bool = False) -> RequestOutput:
        """Release response tokens ``[released, upto)`` (clamped: nothing is released twice)."""
        upto = max(upto, run.released)
        token_ids = run.response_ids[run.released : upto]
        scores = run.monitor.trace[run.released : upto] if run.monitor else [None] * len(token_ids)
        text = run.detok.advance(run.response_ids[run.n_prefill : upto], final=final)
        run.released = upto
        return RequestOutput(
            run.request_id, token_ids=tuple(token_ids), text=text, scores=tuple(scores)
        )

    def _finish(self, run: _Run, reason: FinishReason, *, append_text: str = "") -> RequestOutput:
        last = self._release(run, len(run.response_ids), final=True)
        text = last.text + (run.detok.append(append_text) if append_text else "")
        summary = None
        if run.monitor is not None:
            summary = GuardSummary.from_run(
                run.monitor, run.interventions, recoveries=run.recoveries, n_prefill=run.n_prefill
            )
        return RequestOutput(
            run.request_id,
            token_ids=last.token_ids,
            text=text,
            scores=last.scores,
            finish_reason=reason,
            summary=summary,
            prompt_tokens=len(run.prompt_ids) + run.n_prefill,
            completion_tokens=run.released - run.n_prefill,
            interventions=tuple(run.interventions),
        )


def _same_probe(hello: Mapping | None, probe: LinearProbe) -> bool:
    """Whether the upstream plugin's hello names ``probe``."""
    return (
        hello is not None
        and hello.get("hook_name") == probe.hook_name
        and hello.get("probe_digest") == probe_digest(probe.coef_, probe.intercept_)
    )


def upstream_events_address(
    upstream: str, environ: Mapping[str, str] | None = None
) -> tuple[str, int] | None:
    """Where the upstream plugin's event stream should be: ``TRAJGUARD_UPSTREAM_EVENTS``
    (``host:port``, or ``off``), else the plugin's default port on the upstream host."""
    env = os.environ if environ is None else environ
    value = env.get("TRAJGUARD_UPSTREAM_EVENTS", "").strip()
    if value.lower() in ("off", "0", "false"):
        return None
    if value:
        return parse_address(value)
    return urlsplit(upstream).hostname or "127.0.0.1", parse_address(DEFAULT_EVENTS)[1]


def build_upstream_engine(
    config: ServerConfig, *, environ: Mapping[str, str] | None = None
) -> UpstreamVLLMEngine:
    """Load the tokenizer, and the truncated shadow model unless the upstream runs the
    trajguard plugin with the same probe (fast path; see the module docstring).

    Raises:
        ConfigError: no probe given for a model without a shipped one.
        ModelNotFoundError, ProbeMismatchError: the model or probe cannot be used.
    """
    path = resolve_model_path(config.model)
    probe_dir = config.probe or probe_dir_for(config.model)
    probe = LinearProbe.load(probe_dir)
    events = upstream_events_address(config.upstream, environ)
    scorer = None
    if events is None or not _same_probe(read_hello(*events), probe):
        n_layers = int(AutoConfig.from_pretrained(path).num_hidden_layers)
        scorer = ShadowScorer.from_pretrained(path, probe, n_layers=n_layers)
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
    )
