"""Where the upstream backend's token scores come from: a shadow model or the engine's stream.

Each request of :class:`server.upstream.UpstreamVLLMEngine` holds one :class:`TokenScores`:

- :class:`ShadowScores`: a copy of the model truncated after the probed layer
  (:class:`guard.shadow.ShadowScorer`) scores each arriving token with its own KV cache.
  One :class:`ShadowBatcher` per engine scores the tokens of all live requests that
  arrive within a few milliseconds of each other in one batched forward. Tokens are
  handed to it as soon as they arrive from the upstream (:meth:`TokenScores.ahead`), not
  when the request reaches them, so a scorer that falls behind catches up with several
  tokens per request in one forward instead of one forward per token.
- :class:`PluginScores` (fast path): the upstream runs the trajguard vLLM plugin with the
  same probe, so every token's score arrives on its event stream. Each upstream pass runs in
  ``observe`` mode under its own key; the score of output token ``i`` arrives while the
  engine computes token ``i + 1``, so one extra token is requested per pass. The
  assistant prefill, and each closed assistant turn of the prompt, is scored by a short
  pass that forces it (``trajguard_prefix``) after the prompt before it.

A score that cannot be had is ``None`` (the request's rules fail it closed); a lost event
stream is :class:`server.errors.EngineDeadError` (503). The stream is trusted only after
the channel's handshake (:mod:`guard.vllm.channel`): with ``TRAJGUARD_EVENTS_SECRET`` the
publisher must prove the same secret; without it only a loopback stream is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from guard.chat import Span
from guard.probe import LinearProbe
from guard.shadow import ShadowScorer, ShadowSession
from guard.vllm.channel import EventSubscriber, ScoreFeed, probe_digest, secret_key
from guard.vllm.settings import DEFAULT_EVENTS, EVENTS_SECRET_ENV, parse_address
from server.errors import EngineDeadError

logger = logging.getLogger(__name__)

Score = float | None
#: Longest wait of a shadow feed for others to batch with (a lone stream never waits).
BATCH_WINDOW_S = 0.005
#: Most sessions per batched shadow forward.
MAX_BATCH = 32
#: Most tokens of one session per batched shadow forward (a lagging session's backlog).
MAX_CHUNK = 16
#: Sends one non-streamed upstream completion of a prompt, with the ``vllm_xargs`` given.
ForcedPass = Callable[[list[int], dict], Awaitable[None]]


class TokenScores(ABC):
    """One request's per-token probe scores while the upstream generates it."""

    #: Tokens to request beyond the budget so the last kept token gets its score too.
    extra_tokens: int = 0
    #: Whether the final token of a finished upstream pass is scored.
    scores_final_token: bool = True
    #: Whether :meth:`ahead` is used (the upstream stream is then read by a task of its own).
    reads_ahead: bool = False

    @abstractmethod
    async def context(
        self,
        prompt_ids: list[int],
        prefill_ids: list[int],
        history_spans: tuple[Span, ...],
        forced_pass: ForcedPass,
    ) -> tuple[list[Score], list[list[Score]]]:
        """Start scoring; the scores of the prefill tokens and of each history span."""

    def open_pass(self, first_index: int) -> dict | None:
        """A pass starts at response index ``first_index``; its ``vllm_xargs`` (if any)."""
        return None

    def close_pass(self) -> None:
        """The pass ended."""

    def ahead(self, token_ids: list[int]) -> None:
        """The next tokens of the open pass arrived from the upstream; their scores will
        be asked for in order, unless the pass ends first (e.g. the guard fires).

        A hint: a source may start scoring them early, or ignore it.
        """

    @abstractmethod
    async def score(self, token: int, index: int) -> Score:
        """Score of the response token ``token`` at response index ``index``."""

    @abstractmethod
    async def rewind(self, n_tokens: int) -> None:
        """Forget the last ``n_tokens`` response tokens (a recovery)."""

    @abstractmethod
    async def injected(self, token_ids: tuple[int, ...]) -> list[Score]:
        """Scores of recovery tokens the proxy put into the response (never judged)."""

    def close(self) -> None:
        """The request ended (called once, whatever the outcome)."""


@dataclass(eq=False, slots=True)
class _Feed:
    """Tokens waiting for the shadow model, and who waits for their scores."""

    session: ShadowSession
    token_ids: list[int]
    future: asyncio.Future


@dataclass(eq=False, slots=True)
class _Row:
    """One session's consecutive feeds, scored as one row of a batched forward."""

    session: ShadowSession
    feeds: list[_Feed]

    @property
    def token_ids(self) -> list[int]:
        return [token for feed in self.feeds for token in feed.token_ids]


class ShadowBatcher:
    """One scoring loop for the shadow sessions of all live upstream streams.

    Feeds that arrive within ``window_s`` of the first waiting one are scored in one
    batched forward (:meth:`guard.shadow.ShadowScorer.feed_batch`, each session with its
    own KV cache). The loop stops waiting as soon as every open session has a feed
    waiting, so a lone stream is never delayed. A session's consecutive waiting feeds are
    joined into one row of up to ``max_chunk`` tokens, so a scorer that lags behind the
    upstream scores each stream's backlog in one pass. Forwards run one at a time, off the
    event loop; rows of up to ``max_chunk`` tokens go first, longer feeds (prompts,
    recovery text) after them.

    Args:
        scorer: the shadow scorer.
        window_s: longest wait for more feeds once one is waiting.
        max_batch: most sessions per forward.
        max_chunk: most tokens of one session's joined feeds per forward.
    """

    def __init__(
        self,
        scorer: ShadowScorer,
        *,
        window_s: float = BATCH_WINDOW_S,
        max_batch: int = MAX_BATCH,
        max_chunk: int = MAX_CHUNK,
    ) -> None:
        self._scorer = scorer
        self._window_s = window_s
        self._max_batch = max_batch
        self._max_chunk = max_chunk
        self._open = 0
        self._pending: list[_Feed] = []
        self._arrived: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None  # set while no forward runs
        self._task: asyncio.Task | None = None

    def open_session(self) -> ShadowSession:
        """A new session, counted as open until :meth:`close_session`."""
        self._open += 1
        return self._scorer.session()

    def close_session(self) -> None:
        """A session will feed no more."""
        self._open -= 1
        if self._arrived is not None:
            self._arrived.set()  # the feeds waiting may now be all there will be

    def submit(self, session: ShadowSession, token_ids: list[int]) -> asyncio.Future:
        """Queue ``token_ids`` for ``session`` (after its earlier feeds); the future of
        their scores.

        The future raises what scoring raised for this session, or
        :class:`ConnectionError` if the loop was stopped.
        """
        loop = asyncio.get_running_loop()
        self._start(loop)
        future = loop.create_future()
        self._pending.append(_Feed(session, token_ids, future))
        self._arrived.set()
        return future

    async def feed(self, session: ShadowSession, token_ids: list[int]) -> list[float]:
        """Scores of ``token_ids`` fed to ``session``, from the next batched forward."""
        return await self.submit(session, token_ids)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        # Feeds left by a crashed task fail; those of a finished event loop are dropped.
        stale = [feed for feed in self._pending if feed.future.get_loop() is loop]
        self._fail(stale, ConnectionError("the shadow scoring loop stopped"))
        self._pending = []
        self._arrived = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task = loop.create_task(self._run(), name="trajguard-shadow-batcher")

    async def between_forwards(self) -> None:
        """Return once no forward is running (feeds cancelled before that stay unfed)."""
        if self._idle is not None and self._task is not None and not self._task.done():
            await self._idle.wait()

    async def close(self) -> None:
        """Stop the loop; feeds still waiting fail with :class:`ConnectionError`."""
        task, self._task = self._task, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._fail(self._pending, ConnectionError("the shadow scorer stopped"))
        self._pending = []

    async def _run(self) -> None:
        try:
            await self._serve()
        except Exception:
            logger.exception("the shadow scoring loop failed")
            self._fail(self._pending, ConnectionError("the shadow scoring loop failed"))
            raise

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = loop.time() + self._window_s
            while self._waiting_sessions() < min(self._open, self._max_batch):
                self._arrived.clear()
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._arrived.wait()
                except TimeoutError:
                    break
            batch = self._take()
            if not batch:  # every waiting request went away
                continue
            self._idle.clear()
            try:
                outcomes = await asyncio.to_thread(self._score, batch)
            except BaseException:
                self._fail(batch, ConnectionError("the shadow scorer stopped"))
                raise
            finally:
                self._idle.set()
            for row, outcome in zip(batch, outcomes):
                end = 0
                for feed in row.feeds:
                    start, end = end, end + len(feed.token_ids)
                    if feed.future.done():  # the request went away meanwhile
                        continue
                    if isinstance(outcome, BaseException):
                        feed.future.set_exception(outcome)
                    else:
                        feed.future.set_result(outcome[start:end])

    def _waiting_sessions(self) -> int:
        return len({id(feed.session) for feed in self._pending})

    def _take(self) -> list[_Row]:
        """The next batch: up to ``max_batch`` sessions, each with its waiting feeds in
        order (as many as fit in ``max_chunk`` tokens; at least the first)."""
        rows: dict[int, _Row] = {}
        closed: set[int] = set()  # sessions whose next feed waits for a later batch
        rest = []
        for feed in self._pending:
            if feed.future.done():  # cancelled: its request went away
                continue
            key = id(feed.session)
            row = rows.get(key)
            if row is None and key not in closed and len(rows) < self._max_batch:
                rows[key] = _Row(feed.session, [feed])
            elif (
                row is not None
                and key not in closed
                and len(row.token_ids) + len(feed.token_ids) <= self._max_chunk
            ):
                row.feeds.append(feed)
            else:
                closed.add(key)
                rest.append(feed)
        self._pending = rest
        return list(rows.values())

    def _score(self, batch: list[_Row]) -> list[list[float] | Exception]:
        """Run the forwards of one batch (worker thread): one for all rows of up to
        ``max_chunk`` tokens, then one per token count of the longer ones."""
        outcomes: list[list[float] | Exception] = [[] for _ in batch]
        tokens = [row.token_ids for row in batch]
        groups: dict[int, list[int]] = {}
        for i, ids in enumerate(tokens):  # key 0: the short rows, together
            groups.setdefault(0 if len(ids) <= self._max_chunk else len(ids), []).append(i)
        for _, rows in sorted(groups.items()):
            if len(rows) > 1:
                try:
                    scores = self._scorer.feed_batch(
                        [batch[i].session for i in rows], [tokens[i] for i in rows]
                    )
                except Exception:
                    logger.exception("batched shadow scoring failed; scoring rows alone")
                else:
                    for i, row_scores in zip(rows, scores):
                        outcomes[i] = row_scores
                    continue
            for i in rows:  # alone, so that a bad row fails only its own request
                try:
                    outcomes[i] = batch[i].session.feed(tokens[i])
                except Exception as exc:  # noqa: BLE001 - handed to its request
                    outcomes[i] = exc
        return outcomes

    @staticmethod
    def _fail(feeds: list[_Feed], error: Exception) -> None:
        for feed in feeds:
            if not feed.future.done():
                feed.future.set_exception(error)


class ShadowScores(TokenScores):
    """Scores from the local shadow model (one incremental session per request), fed
    through the shared :class:`ShadowBatcher`.

    Tokens announced by :meth:`ahead` are fed at once. Those the request never reached
    (its pass ended first) are cancelled if still waiting, and taken back from the
    session's cache (they are its last tokens) before it is fed again; no token is fed
    ahead until they are.
    """

    reads_ahead = True

    def __init__(self, batcher: ShadowBatcher) -> None:
        self._batcher = batcher
        self._session: ShadowSession | None = batcher.open_session()
        self._length = 0  # tokens of the session the request has reached
        self._next_index = 0  # response index of the next token announced ahead
        self._ahead: dict[int, tuple[int, asyncio.Future]] = {}  # index -> token, scores
        self._unused: list[asyncio.Future] = []  # fed ahead, never reached

    async def _feed(self, token_ids: list[int]) -> list[Score]:
        await self._settle()
        self._length += len(token_ids)
        return await self._scores(self._batcher.submit(self._session, token_ids), len(token_ids))

    @staticmethod
    async def _scores(future: asyncio.Future, n: int) -> list[Score]:
        try:
            return await future
        except Exception:
            logger.exception("shadow scoring failed")
            return [None] * n

    def _retire_ahead(self) -> None:
        self._unused += [future for _, future in self._ahead.values()]
        self._ahead.clear()

    def _cancel_unused(self) -> bool:
        """Cancel the feeds of tokens never reached (one not yet in a forward is dropped);
        whether there were any."""
        self._retire_ahead()
        unused, self._unused = self._unused, []
        for future in unused:
            future.cancel()
        return bool(unused)

    async def _settle(self) -> None:
        """Take back the tokens fed ahead that the request never reached."""
        if not self._cancel_unused():
            return
        await self._batcher.between_forwards()  # one already in a forward has entered
        if self._session.length > self._length:
            self._session.rewind(self._session.length - self._length)

    async def context(self, prompt_ids, prefill_ids, history_spans, forced_pass):
        scores = await self._feed(prompt_ids + prefill_ids)
        return scores[len(prompt_ids) :], [scores[a:b] for a, b in history_spans]

    def open_pass(self, first_index: int) -> None:
        self._retire_ahead()
        self._next_index = first_index
        return None

    def ahead(self, token_ids: list[int]) -> None:
        if self._session is None or self._unused:
            return  # tokens still to take back: this pass's tokens are fed when reached
        for token in token_ids:
            self._ahead[self._next_index] = (token, self._batcher.submit(self._session, [token]))
            self._next_index += 1

    async def score(self, token: int, index: int) -> Score:
        fed = self._ahead.get(index)
        if fed is None or fed[0] != token:
            (score,) = await self._feed([token])
            return score
        del self._ahead[index]
        self._length += 1
        (score,) = await self._scores(fed[1], 1)
        return score

    async def rewind(self, n_tokens: int) -> None:
        await self._settle()
        self._length -= n_tokens
        self._session.rewind(n_tokens)

    async def injected(self, token_ids: tuple[int, ...]) -> list[Score]:
        return await self._feed(list(token_ids))

    def close(self) -> None:
        if self._session is not None:
            self._session = None
            self._cancel_unused()
            self._batcher.close_session()


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

    async def context(self, prompt_ids, prefill_ids, history_spans, forced_pass):
        history = [
            await self._forced(prompt_ids[:a], prompt_ids[a:b], forced_pass)
            for a, b in history_spans
        ]
        prefill = await self._forced(prompt_ids, prefill_ids, forced_pass)
        return prefill, history

    async def _forced(
        self, prompt_ids: list[int], forced_ids: list[int], forced_pass: ForcedPass
    ) -> list[Score]:
        """Scores of ``forced_ids`` after ``prompt_ids``, from one forced upstream pass."""
        if not forced_ids:
            return []
        xargs = self.open_pass(0)
        try:
            await forced_pass(list(prompt_ids), {**xargs, "trajguard_prefix": list(forced_ids)})
            return [await self._get(i) for i in range(len(forced_ids))]
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


def upstream_events_secret(environ: Mapping[str, str] | None = None) -> str | None:
    """The event stream's shared secret: ``TRAJGUARD_EVENTS_SECRET`` (the plugin's too).

    Raises:
        ConfigError: too short a secret.
    """
    env = os.environ if environ is None else environ
    secret = env.get(EVENTS_SECRET_ENV, "").strip() or None
    if secret is not None:
        secret_key(secret)
    return secret
