"""The upstream response is closed before the request's finished output is handed on.

A consumer that stops (or is cancelled) once it has the finished output must not leave the
upstream connection checked out of the pool: under load the pool ran dry after 100 such
requests and the proxy hung (found by ``benchmarks/serve_load.py`` at 32 streams).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from guard import GuardConfig, SamplingParams
from guard.chat import EncodedPrompt
from server.engine import GuardOptions
from server.upstream import UpstreamVLLMEngine
from tests.helpers import fitted_probe
from tests.scripted_upstream import ScriptedScorer, ScriptedUpstream


class _TrackedStream(httpx.AsyncByteStream):
    def __init__(self, content: bytes, log: list[str]) -> None:
        self.content, self.log = content, log

    async def __aiter__(self):
        for line in self.content.split(b"\n\n"):
            if line:
                yield line + b"\n\n"

    async def aclose(self) -> None:
        self.log.append("closed")


def _tracking_transport(upstream: ScriptedUpstream, log: list[str]) -> httpx.MockTransport:
    async def handle(request: httpx.Request) -> httpx.Response:
        response = await upstream._handle(request)
        if request.url.path != "/v1/completions" or not response.headers.get(
            "content-type", ""
        ).startswith("text/event-stream"):
            return response
        log.append("opened")
        return httpx.Response(
            200, headers=response.headers, stream=_TrackedStream(response.content, log)
        )

    return httpx.MockTransport(handle)


@pytest.mark.parametrize("guarded", [True, False])
def test_the_finished_output_comes_after_the_upstream_response_is_closed(tiny_tokenizer, guarded):
    log: list[str] = []
    probe = fitted_probe(32)
    probe.threshold_ = 0.5
    engine = UpstreamVLLMEngine(
        "http://upstream",
        tokenizer=tiny_tokenizer,
        scorer=ScriptedScorer(lambda call, n: [0.1] * n),
        config=GuardConfig(holdback=2),
        model_name="m",
        probe=probe,
        transport=_tracking_transport(ScriptedUpstream(), log),
    )

    async def go() -> list[str]:
        await engine.start()
        try:
            stream = await engine.generate(
                "r",
                EncodedPrompt([1, 5, 6], []),
                SamplingParams(max_tokens=6, ignore_eos=True),
                guard_options=GuardOptions(guard=guarded),
            )
            async for out in stream:
                if out.finished:
                    return list(log)  # what had happened when the consumer got it
            raise AssertionError("no finished output")
        finally:
            await engine.shutdown()

    assert asyncio.run(go()) == ["opened", "closed"]
