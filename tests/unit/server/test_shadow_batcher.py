"""The proxy's batched shadow scoring: one loop scores all live upstream streams together,
with the same results as one stream at a time, and a lone stream does not wait."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from guard import GuardConfig, MonitorConfig, PolicyConfig, SamplingParams
from guard.chat import EncodedPrompt
from guard.shadow import ShadowScorer
from server.engine import GuardOptions
from server.upstream import UpstreamVLLMEngine
from server.upstream_scores import ShadowBatcher, ShadowScores
from tests.conftest import build_tiny_model
from tests.helpers import fitted_probe
from tests.scripted_upstream import ScriptedUpstream

PARAMS = SamplingParams(max_tokens=12, ignore_eos=True)
PROMPTS = [[12, 13], [12, 13, 14, 15, 16, 17, 18], [20], [21, 22, 23, 24]]


@pytest.fixture
def scorer(tiny_tokenizer):
    model = build_tiny_model("llama", len(tiny_tokenizer), n_layers=3)
    return ShadowScorer.from_model(model, fitted_probe(32, hook="blocks.-2.hook_resid_post"))


def record_batch_sizes(scorer: ShadowScorer) -> list[int]:
    sizes: list[int] = []
    feed_batch = scorer.feed_batch

    def recording(sessions, token_ids):
        sizes.append(len(sessions))
        return feed_batch(sessions, token_ids)

    scorer.feed_batch = recording
    return sizes


def run(engine: UpstreamVLLMEngine, prompts, *, concurrent: bool):
    async def one(i, prompt):
        stream = await engine.generate(
            f"r{i}", EncodedPrompt(prompt, []), PARAMS, guard_options=GuardOptions()
        )
        return [out async for out in stream]

    async def go():
        await engine.start()
        try:
            if concurrent:
                return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            return [await one(i, p) for i, p in enumerate(prompts)]
        finally:
            await engine.shutdown()

    return asyncio.run(go())


def engine_for(tokenizer, scorer, threshold: float) -> UpstreamVLLMEngine:
    config = GuardConfig(
        monitor=MonitorConfig(threshold=threshold),
        holdback=2,
        policy=PolicyConfig(kind="rollback", recovery_text=" No.", max_recoveries=1),
    )
    return UpstreamVLLMEngine(
        "http://upstream",
        tokenizer=tokenizer,
        scorer=scorer,
        config=config,
        model_name="m",
        transport=ScriptedUpstream().transport(),
    )


def firing_threshold(scores: list[float]) -> float:
    """A threshold in the widest gap among the upper half of ``scores`` (some fire)."""
    ordered = sorted(scores)
    upper = ordered[len(ordered) // 2 : len(ordered) * 19 // 20]
    gap, low = max((b - a, a) for a, b in itertools.pairwise(upper))
    assert gap > 1e-5, "scores too close together to pick a robust threshold"
    return low + gap / 2


def summary(outputs) -> tuple:
    final = outputs[-1]
    tokens = [t for o in outputs for t in o.token_ids]
    return tokens, final.finish_reason, final.summary.interventions, final.summary.scores


def test_concurrent_streams_are_batched_and_score_as_one_at_a_time(tiny_tokenizer, scorer):
    quiet = run(engine_for(tiny_tokenizer, scorer, 1 - 1e-9), PROMPTS, concurrent=False)
    threshold = firing_threshold([s for out in quiet for s in out[-1].summary.scores])

    one_at_a_time = run(engine_for(tiny_tokenizer, scorer, threshold), PROMPTS, concurrent=False)
    sizes = record_batch_sizes(scorer)
    together = run(engine_for(tiny_tokenizer, scorer, threshold), PROMPTS, concurrent=True)

    assert max(sizes) > 1  # tokens of different requests shared forward passes
    assert any(out[-1].summary.interventions for out in one_at_a_time)  # a rollback ran
    for alone, batched in zip(one_at_a_time, together, strict=True):
        tokens, reason, interventions, scores = summary(batched)
        assert (tokens, reason, interventions) == summary(alone)[:3]
        assert scores == pytest.approx(summary(alone)[3], abs=2e-6, nan_ok=True)


def test_tokens_read_ahead_score_as_tokens_fed_when_reached(tiny_tokenizer, scorer, monkeypatch):
    """Upstream tokens are fed to the shadow as they arrive, so a request's backlog goes in
    one pass (several tokens per row, far fewer forwards); with rollbacks in between
    (tokens fed ahead that the request never reached are taken back), every output equals
    feeding each token only when the request reaches it."""
    quiet = run(engine_for(tiny_tokenizer, scorer, 1 - 1e-9), PROMPTS, concurrent=False)
    threshold = firing_threshold([s for out in quiet for s in out[-1].summary.scores])
    monkeypatch.setattr(ShadowScores, "reads_ahead", False)
    forwards_when_reached = record_batch_sizes(scorer)
    when_reached = run(engine_for(tiny_tokenizer, scorer, threshold), PROMPTS, concurrent=True)
    monkeypatch.setattr(ShadowScores, "reads_ahead", True)
    del scorer.feed_batch
    forwards_read_ahead = record_batch_sizes(scorer)
    read_ahead = run(engine_for(tiny_tokenizer, scorer, threshold), PROMPTS, concurrent=True)

    assert len(forwards_read_ahead) * 2 <= len(forwards_when_reached)
    assert any(out[-1].summary.interventions for out in when_reached)  # a rollback ran
    for reached, ahead in zip(when_reached, read_ahead, strict=True):
        tokens, reason, interventions, scores = summary(ahead)
        assert (tokens, reason, interventions) == summary(reached)[:3]
        assert scores == pytest.approx(summary(reached)[3], abs=2e-6, nan_ok=True)


def test_a_lone_stream_does_not_wait_for_the_window(scorer):
    batcher = ShadowBatcher(scorer, window_s=10.0)  # waiting would take 10 s per feed
    feeds = [[12, 13, 14], *([t] for t in range(15, 25))]

    async def go():
        session = batcher.open_session()
        start = time.monotonic()
        scores = [await batcher.feed(session, tokens) for tokens in feeds]
        elapsed = time.monotonic() - start
        batcher.close_session()
        await batcher.close()
        return scores, elapsed

    scores, elapsed = asyncio.run(go())
    assert elapsed < 5
    alone = scorer.session()
    assert scores == [alone.feed(tokens) for tokens in feeds]


class FlakySession:
    """A session that scores ``0.25`` per token, or raises when ``bad``."""

    def __init__(self, bad: bool) -> None:
        self.bad = bad

    def feed(self, token_ids):
        if self.bad:
            raise RuntimeError("this row cannot be scored")
        return [0.25] * len(token_ids)


class FailingBatchScorer:
    """Every batched forward raises; rows alone work unless their session is bad."""

    def __init__(self) -> None:
        self.bad = iter([False, True, False])

    def session(self):
        return FlakySession(next(self.bad))

    def feed_batch(self, sessions, token_ids):
        raise RuntimeError("batched forward failed")


def test_a_failed_batch_fails_only_the_bad_row():
    batcher = ShadowBatcher(FailingBatchScorer(), window_s=1.0)

    async def go():
        sessions = [batcher.open_session() for _ in range(3)]
        results = await asyncio.gather(
            *(batcher.feed(s, [5]) for s in sessions), return_exceptions=True
        )
        await batcher.close()
        return results

    good, bad, also_good = asyncio.run(go())
    assert good == also_good == [0.25]
    assert isinstance(bad, RuntimeError)
