"""Where the upstream backend's token scores come from: a shadow model or the engine's stream.

Each request of :class:`server.upstream.UpstreamVLLMEngine` holds one :class:`TokenScores`:

- :class:`ShadowScores`: a copy of the model truncated after the probed layer
  (:class:`guard.shadow.ShadowScorer`) scores each arriving token with its own KV cache.
- :class:`PluginScores` (fast path): the upstream runs the trajguard vLLM plugin with the
  same probe, so every token's score arrives on its event stream. Each upstream pass runs in
  ``observe`` mode under its own key; the score of output token ``i`` arrives while the
  engine computes token ``i + 1``, so one extra token is requested per pass. The
  assistant prefill is scored by a short pass that forces it (``trajguard_prefix``).

A score that cannot be had is ``None`` (the request's rules fail it closed); a lost event
stream is :class:`server.errors.EngineDeadError` (503).
"""

from __future__ import annotations

import asyncio
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlsplit

from guard.probe import LinearProbe
from guard.shadow import ShadowScorer
from guard.vllm.channel import EventSubscriber, ScoreFeed, probe_digest
from guard.vllm.settings import DEFAULT_EVENTS, parse_address
from server.errors import EngineDeadError

logger = logging.getLogger(__name__)

Score = float | None
#: Sends one non-streamed upstream completion whose ``vllm_xargs`` are given.
ForcedPass = Callable[[dict], Awaitable[None]]


class TokenScores(ABC):
    """One request's per-token probe scores while the upstream generates it."""

    #: Tokens to request beyond the budget so the last kept token gets its score too.
    extra_tokens: int = 0
    #: Whether the final token of a finished upstream pass is scored.
    scores_final_token: bool = True

    @abstractmethod
    async def prefill(
        self, prompt_ids: list[int], prefill_ids: list[int], forced_pass: ForcedPass
    ) -> list[Score]:
        """Start scoring; the scores of the assistant prefill tokens."""

    def open_pass(self, first_index: int) -> dict | None:
        """A pass starts at response index ``first_index``; its ``vllm_xargs`` (if any)."""
        return None

    def close_pass(self) -> None:
        """The pass ended."""

    @abstractmethod
    async def score(self, token: int, index: int) -> Score:
        """Score of the response token ``token`` at response index ``index``."""

    @abstractmethod
    async def rewind(self, n_tokens: int) -> None:
        """Forget the last ``n_tokens`` response tokens (a recovery)."""

    @abstractmethod
    async def injected(self, token_ids: tuple[int, ...]) -> list[Score]:
        """Scores of recovery tokens the proxy put into the response (never judged)."""


class ShadowScores(TokenScores):
    """Scores from a local shadow model (one incremental session per request)."""

    def __init__(self, scorer: ShadowScorer) -> None:
        self._session = scorer.session()

    async def _feed(self, token_ids: list[int]) -> list[Score]:
        try:
            # Scoring runs torch: keep it off the event loop.
            return await asyncio.to_thread(self._session.feed, token_ids)
        except Exception:
            logger.exception("shadow scoring failed")
            return [None] * len(token_ids)

    async def prefill(self, prompt_ids, prefill_ids, forced_pass):
        scores = await self._feed(prompt_ids + prefill_ids)
        return scores[len(prompt_ids) :]

    async def score(self, token: int, index: int) -> Score:
        (score,) = await self._feed([token])
        return score

    async def rewind(self, n_tokens: int) -> None:
        self._session.rewind(n_tokens)

    async def injected(self, token_ids: tuple[int, ...]) -> list[Score]:
        return await self._feed(list(token_ids))


class PluginScores(TokenScores):
    """Scores from the upstream plugin's event stream (no model in the proxy)."""

    extra_tokens = 1
    scores_final_token = False  # vLLM never feeds a finished request's last token again

    def __init__(self, events: EventSubscriber, request_id: str, *, timeout: float) -> None:
        self._events = events
        self._request_id = request_id
        self._timeout = timeout
        self._passes = 0
        self._key: str | None = None
        self._feed: ScoreFeed | None = None
        self._offset = 0

    def open_pass(self, first_index: int) -> dict:
        self._passes += 1
        self._key = f"{self._request_id}/{self._passes}"
        self._feed = self._events.watch(self._key)
        self._offset = first_index
        return {"trajguard": "observe", "trajguard_id": self._key}

    def close_pass(self) -> None:
        if self._key is not None:
            self._events.unwatch(self._key)
        self._key, self._feed = None, None

    async def _get(self, index: int) -> Score:
        try:
            event = await self._feed.get(index, timeout=self._timeout)
        except (TimeoutError, ConnectionError) as exc:
            raise EngineDeadError(f"no upstream guard score for token {index}: {exc}") from exc
        try:
            return float(event["s"])
        except (KeyError, TypeError, ValueError):
            return None

    async def prefill(self, prompt_ids, prefill_ids, forced_pass):
        if not prefill_ids:
            return []
        xargs = self.open_pass(0)
        try:
            await forced_pass({**xargs, "trajguard_prefix": list(prefill_ids)})
            return [await self._get(i) for i in range(len(prefill_ids))]
        finally:
            self.close_pass()

    async def score(self, token: int, index: int) -> Score:
        return await self._get(index - self._offset)

    async def rewind(self, n_tokens: int) -> None:
        return None  # the next pass sends the kept tokens as its prompt

    async def injected(self, token_ids: tuple[int, ...]) -> list[Score]:
        return [None] * len(token_ids)  # fed as prompt of the next pass: not scored


def same_probe(hello: Mapping | None, probe: LinearProbe) -> bool:
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
