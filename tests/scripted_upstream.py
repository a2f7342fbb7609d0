"""A scripted vLLM server for driving the proxy's upstream engine without vLLM.

:class:`ScriptedUpstream` answers ``/v1/models``, ``/health`` and ``/v1/completions``
(streamed or not, token ids in, ``token_ids`` out) as an httpx transport. Its tokens are a
pure function of the position in the context, so a rolled-back pass continues exactly as
a fresh one would. With a publisher it also plays the trajguard plugin's event stream:
every pass sent with a ``trajguard_id`` gets one scored event per output token.
:class:`ScriptedScorer` stands in for the shadow scorer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx

from guard.vllm.channel import EventPublisher

FIRST_TOKEN = 10  # token ids 10..(10 + span - 1): never special in the tiny tokenizer


class ScriptedUpstream:
    """Fake upstream: token at context position ``p`` is ``token_at(p)``.

    Args:
        token_at: context position -> token id.
        max_model_len: advertised context window.
        publisher: the fast path's event stream (``None``: a stock server).
        event_score: ``(key, output index) -> score`` published for guarded passes.
    """

    def __init__(
        self,
        *,
        token_at: Callable[[int], int] | None = None,
        max_model_len: int = 256,
        publisher: EventPublisher | None = None,
        event_score: Callable[[str, int], float] | None = None,
    ) -> None:
        self.token_at = token_at or (lambda p: FIRST_TOKEN + (7 * p) % 50)
        self.max_model_len = max_model_len
        self.publisher = publisher
        self.event_score = event_score or (lambda key, i: 0.1)
        self.bodies: list[dict] = []

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self._handle)

    async def _handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(
                200, json={"data": [{"id": "up", "max_model_len": self.max_model_len}]}
            )
        if request.url.path == "/health":
            return httpx.Response(200)
        body = json.loads(request.content)
        self.bodies.append(body)
        prompt = body["prompt"]
        prefix = list((body.get("vllm_xargs") or {}).get("trajguard_prefix", []))
        n = body["max_tokens"]
        tokens = prefix[:n] + [self.token_at(len(prompt) + i) for i in range(len(prefix), n)]
        key = (body.get("vllm_xargs") or {}).get("trajguard_id")
        if key is not None and self.publisher is not None:
            events = [{"id": key, "i": i, "s": self.event_score(key, i)} for i in range(n)]
            self.publisher.publish({"ev": events})
            await asyncio.sleep(0)
        if not body.get("stream"):
            return httpx.Response(200, json={"choices": [{"token_ids": tokens}]})
        lines = []
        for i, token in enumerate(tokens):
            reason = "length" if i == len(tokens) - 1 else None
            choice = {"token_ids": [token], "finish_reason": reason}
            lines.append(f"data: {json.dumps({'choices': [choice]})}\n\n")
        lines.append("data: [DONE]\n\n")
        return httpx.Response(
            200, content="".join(lines).encode(), headers={"content-type": "text/event-stream"}
        )


class ScriptedSession:
    """A shadow-scorer session whose scores come from ``script(call, n_tokens)``."""

    def __init__(self, script: Callable[[int, int], list[float]]) -> None:
        self.script = script
        self.calls = 0
        self.length = 0

    def feed(self, token_ids: list[int]) -> list[float]:
        scores = self.script(self.calls, len(token_ids))
        self.calls += 1
        self.length += len(token_ids)
        return scores

    def rewind(self, n_tokens: int) -> None:
        self.length -= n_tokens


class ScriptedScorer:
    """Stands in for :class:`guard.shadow.ShadowScorer` (only ``session()`` is used)."""

    def __init__(self, script: Callable[[int, int], list[float]]) -> None:
        self.script = script
        self.sessions: list[ScriptedSession] = []

    def session(self) -> ScriptedSession:
        self.sessions.append(ScriptedSession(self.script))
        return self.sessions[-1]
