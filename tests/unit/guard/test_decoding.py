import pytest
import torch

from guard import (
    ContextLengthError,
    GuardConfig,
    GuardedEngine,
    GuardValidationError,
    MonitorConfig,
    PolicyConfig,
    SamplingParams,
)
from guard.chat import closed_assistant_spans, encode_chat
from tests.helpers import ScriptedProbe, fitted_probe

PROMPTS = ["Sure, here is how", "The quick brown fox jumps", "step one"]


def never_fires(d_model: int) -> ScriptedProbe:
    return ScriptedProbe(fitted_probe(d_model), lambda call, n: [0.0] * n)


def encode(tok, text):
    return tok.encode(text)


def hf_greedy(model, prompt_ids, max_new_tokens):
    ids = torch.tensor([prompt_ids])
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=0, pad_token_id=4
    )
    new = out[0, len(prompt_ids) :].tolist()
    return new[: new.index(0)] if 0 in new else new


@pytest.mark.parametrize("holdback", [0, 3])
def test_never_firing_guard_equals_model_generate(tiny_llama, tiny_tokenizer, holdback):
    engine = GuardedEngine(
        tiny_llama, tiny_tokenizer, never_fires(32), GuardConfig(holdback=holdback)
    )
    prompts = [encode(tiny_tokenizer, p) for p in PROMPTS]
    results = engine.generate(prompts, SamplingParams(max_tokens=12))
    for prompt, result in zip(prompts, results):
        assert result.token_ids == hf_greedy(tiny_llama, prompt, 12)
        assert result.finish_reason in ("length", "stop")
        assert not result.summary.triggered


def test_batch_of_different_lengths_equals_single_requests(tiny_llama, tiny_tokenizer):
    """Left-padded batching must not change any row's greedy tokens."""
    engine = GuardedEngine(tiny_llama, tiny_tokenizer)
    prompts = [encode(tiny_tokenizer, p) for p in PROMPTS]
    batched = engine.generate(prompts, SamplingParams(max_tokens=10))
    singles = [engine.generate([p], SamplingParams(max_tokens=10))[0] for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in singles]


def test_requests_join_a_running_batch(tiny_llama, tiny_tokenizer):
    engine = GuardedEngine(tiny_llama, tiny_tokenizer, never_fires(32))
    a, b = (encode(tiny_tokenizer, p) for p in PROMPTS[:2])
    engine.add_request("a", a, SamplingParams(max_tokens=10))
    outs = engine.step() + engine.step() + engine.step()
    engine.add_request("b", b, SamplingParams(max_tokens=10))
    outs += list(engine.run())
    got = {rid: [t for o in outs if o.request_id == rid for t in o.token_ids] for rid in "ab"}
    assert got["a"] == hf_greedy(tiny_llama, a, 10)
    assert got["b"] == hf_greedy(tiny_llama, b, 10)


def test_rollback_equals_fresh_generation_from_rolled_back_prefix(tiny_llama, tiny_tokenizer):
    """Fire once at the 6th scored token; the output must equal a fresh greedy run on
    prompt + kept tokens + recovery text."""
    prompt = encode(tiny_tokenizer, PROMPTS[0])
    recovery = "I'm sorry, but"
    fire_at = 6

    def script(call, n):
        return [0.9 if call == fire_at else 0.0] * n

    probe = ScriptedProbe(fitted_probe(32), script)
    config = GuardConfig(
        holdback=3, policy=PolicyConfig(kind="rollback", recovery_text=recovery, max_recoveries=1)
    )
    engine = GuardedEngine(tiny_llama, tiny_tokenizer, probe, config)
    (result,) = engine.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True))

    (event,) = result.interventions
    assert event.action == "rollback" and event.discarded >= 1
    recovery_ids = tiny_tokenizer.encode(recovery, add_special_tokens=False)
    kept = result.token_ids[: event.kept]
    assert result.token_ids[event.kept : event.kept + len(recovery_ids)] == recovery_ids
    fresh_prompt = prompt + kept + recovery_ids
    remaining = 20 - event.kept - len(recovery_ids)
    fresh = tiny_llama.generate(
        torch.tensor([fresh_prompt]),
        max_new_tokens=remaining,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=4,
    )[0, len(fresh_prompt) :].tolist()
    assert result.token_ids[event.kept + len(recovery_ids) :] == fresh
    assert result.summary.triggered and result.summary.recoveries == 1


def test_stop_policy_truncates_and_filters(tiny_llama, tiny_tokenizer):
    probe = ScriptedProbe(fitted_probe(32), lambda call, n: [0.9 if call >= 5 else 0.1] * n)
    config = GuardConfig(
        holdback=2, policy=PolicyConfig(kind="stop", refusal_message=" [filtered]")
    )
    engine = GuardedEngine(tiny_llama, tiny_tokenizer, probe, config)
    (result,) = engine.generate(
        [encode(tiny_tokenizer, PROMPTS[1])], SamplingParams(max_tokens=20, ignore_eos=True)
    )
    assert result.finish_reason == "content_filter"
    assert result.text.endswith(" [filtered]")
    # calls 0..4 score response tokens 0..4 (safe); call 5 scores token 5 and fires
    assert result.summary.action == "stop" and result.summary.trigger_index == 5
    assert len(result.token_ids) == 5
    assert all(s < 0.5 for s in result.scores)


def test_resample_bans_the_offending_token(tiny_llama, tiny_tokenizer):
    prompt = encode(tiny_tokenizer, PROMPTS[2])
    baseline = hf_greedy(tiny_llama, prompt, 8)
    probe = ScriptedProbe(fitted_probe(32), lambda call, n: [0.9 if call == 4 else 0.0] * n)
    config = GuardConfig(
        holdback=4, policy=PolicyConfig(kind="resample", resample_window=2, max_recoveries=1)
    )
    engine = GuardedEngine(tiny_llama, tiny_tokenizer, probe, config)
    (result,) = engine.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True))
    (event,) = result.interventions
    assert event.action == "resample"
    assert result.token_ids[: event.kept] == baseline[: event.kept]
    assert result.token_ids[event.kept] != baseline[event.kept]


def test_prefill_is_monitored_from_its_first_token(tiny_llama, tiny_tokenizer):
    prompt = encode(tiny_tokenizer, "step one")
    prefill = encode(tiny_tokenizer, " Sure, here is how to do it")
    probe = ScriptedProbe(
        fitted_probe(32), lambda call, n: [0.0] * (n - 1) + [0.95] if call == 0 else [0.0] * n
    )
    config = GuardConfig(policy=PolicyConfig(kind="stop", refusal_message="no"))
    engine = GuardedEngine(tiny_llama, tiny_tokenizer, probe, config)
    (result,) = engine.generate([prompt], SamplingParams(max_tokens=5), prefills=[prefill])
    assert (
        result.finish_reason == "content_filter" and result.token_ids == [] and result.text == "no"
    )


def test_stop_strings_cut_the_text(tiny_llama, tiny_tokenizer):
    engine = GuardedEngine(tiny_llama, tiny_tokenizer, never_fires(32))
    prompt = encode(tiny_tokenizer, PROMPTS[0])
    (free,) = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))
    stop = free.text[3:5]
    (cut,) = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True, stop=(stop,)))
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]


def test_seeded_sampling_is_reproducible(tiny_llama, tiny_tokenizer):
    engine = GuardedEngine(tiny_llama, tiny_tokenizer)
    prompt = encode(tiny_tokenizer, PROMPTS[0])
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a, b = engine.generate([prompt, prompt], params)
    assert a.token_ids == b.token_ids
    (c,) = engine.generate(
        [prompt], SamplingParams(max_tokens=10, temperature=1.0, seed=8, ignore_eos=True)
    )
    assert c.token_ids != a.token_ids


def test_abort_frees_the_row(tiny_llama, tiny_tokenizer):
    engine = GuardedEngine(tiny_llama, tiny_tokenizer)
    engine.add_request(
        "x", encode(tiny_tokenizer, PROMPTS[0]), SamplingParams(max_tokens=50, ignore_eos=True)
    )
    engine.step()
    assert engine.num_running == 1
    engine.abort("x")
    engine.step()
    assert engine.num_running == 0 and not engine.has_unfinished()
    assert engine._batch.cache is None


def test_monitor_failure_fails_closed(tiny_llama, tiny_tokenizer):
    probe = ScriptedProbe(fitted_probe(32), lambda call, n: [float("nan")] * n)
    engine = GuardedEngine(tiny_llama, tiny_tokenizer, probe)
    (result,) = engine.generate([encode(tiny_tokenizer, PROMPTS[0])], SamplingParams(max_tokens=5))
    assert (
        result.finish_reason == "error" and result.token_ids == [] and "fail closed" in result.error
    )

    allow = GuardedEngine(tiny_llama, tiny_tokenizer, probe, GuardConfig(on_monitor_error="allow"))
    (result,) = allow.generate(
        [encode(tiny_tokenizer, PROMPTS[0])], SamplingParams(max_tokens=5, ignore_eos=True)
    )
    assert result.finish_reason == "length" and len(result.token_ids) == 5
    assert len(result.scores) == 5 and all(s != s for s in result.scores)  # unscored steps are NaN


@pytest.mark.parametrize(
    "kwargs, error, param",
    [
        ({"prompt_ids": []}, GuardValidationError, "prompt"),
        ({"prompt_ids": [10**6]}, GuardValidationError, "prompt"),
        ({"prompt_ids": [5] * 300}, ContextLengthError, "prompt"),
        (
            {"prompt_ids": [5] * 200, "params": SamplingParams(max_tokens=100)},
            ContextLengthError,
            "max_tokens",
        ),
    ],
)
def test_bad_requests_raise_documented_errors(tiny_llama, tiny_tokenizer, kwargs, error, param):
    engine = GuardedEngine(tiny_llama, tiny_tokenizer)
    with pytest.raises(error) as info:
        engine.add_request("r", **kwargs)
    assert info.value.param == param


def test_duplicate_live_request_id_rejected(tiny_llama, tiny_tokenizer):
    engine = GuardedEngine(tiny_llama, tiny_tokenizer)
    engine.add_request("r", [5, 6])
    with pytest.raises(GuardValidationError, match="already live"):
        engine.add_request("r", [5, 6])


@pytest.mark.parametrize(
    "bad", [{"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"stop": ("",)}]
)
def test_bad_sampling_params(bad):
    with pytest.raises(GuardValidationError):
        SamplingParams(**bad)


def test_monitor_threshold_override(tiny_llama, tiny_tokenizer):
    probe = ScriptedProbe(fitted_probe(32), lambda call, n: [0.3] * n, threshold=0.5)
    config = GuardConfig(monitor=MonitorConfig(threshold=0.25), policy=PolicyConfig(kind="stop"))
    engine = GuardedEngine(tiny_llama, tiny_tokenizer, probe, config)
    (result,) = engine.generate([encode(tiny_tokenizer, PROMPTS[0])], SamplingParams(max_tokens=5))
    assert result.finish_reason == "content_filter"


def _spiky(calibrated: dict | None) -> ScriptedProbe:
    """Hot on every other step only: one hot step fires, two hot of the last three never."""
    probe = ScriptedProbe(fitted_probe(32), lambda call, n: [0.9 * (call % 2)] * n)
    probe.metadata_ = {"calibration": {"debounce": calibrated}} if calibrated else {}
    return probe


@pytest.mark.parametrize(
    "calibrated, operator, fires",
    [
        (None, MonitorConfig(), True),  # no recorded rule: one hot step
        ({"kind": "k_of_n", "k": 2, "n": 2, "ema_alpha": 0.5}, MonitorConfig(), False),
        ({"kind": "k_of_n", "k": 2, "n": 2, "ema_alpha": 0.5}, MonitorConfig(k=1, n=2), True),
        ({"kind": "ema", "k": 1, "n": 1, "ema_alpha": 0.25}, MonitorConfig(), False),
    ],
)
def test_the_probes_calibrated_debounce_applies_unless_the_operator_sets_one(
    tiny_llama, tiny_tokenizer, calibrated, operator, fires
):
    config = GuardConfig(monitor=operator, policy=PolicyConfig(kind="stop"))
    engine = GuardedEngine(tiny_llama, tiny_tokenizer, _spiky(calibrated), config)
    (result,) = engine.generate([encode(tiny_tokenizer, PROMPTS[0])], SamplingParams(max_tokens=8))
    assert (result.finish_reason == "content_filter") is fires
    if calibrated and operator == MonitorConfig():
        assert engine.config.monitor.rule == calibrated


@pytest.mark.parametrize("model_type", ["qwen2", "mistral", "gemma", "gemma2"])
def test_batched_guarded_decoding_across_families(tiny_tokenizer, model_type):
    from tests.conftest import build_tiny_model

    model = build_tiny_model(model_type, len(tiny_tokenizer))
    engine = GuardedEngine(model, tiny_tokenizer, never_fires(32), GuardConfig(holdback=2))
    prompts = [encode(tiny_tokenizer, p) for p in PROMPTS]
    results = engine.generate(prompts, SamplingParams(max_tokens=8))
    for prompt, result in zip(prompts, results, strict=True):
        assert result.token_ids == hf_greedy(model, prompt, 8)


@pytest.mark.parametrize("params", [{"temperature": 5e-324}, {"temperature": 1.0, "top_p": 3e-87}])
def test_extreme_sampling_values_do_not_break_the_step(tiny_llama, tiny_tokenizer, params):
    engine = GuardedEngine(tiny_llama, tiny_tokenizer)
    (result,) = engine.generate(
        [encode(tiny_tokenizer, PROMPTS[0])], SamplingParams(max_tokens=4, seed=1, **params)
    )
    assert result.finish_reason in ("length", "stop")


HISTORY = [
    {"role": "user", "content": "How do I do it?"},
    {"role": "assistant", "content": "Sure, here is how to do it. Step 1:"},
    {"role": "user", "content": "continue"},
]


def fires_on_history(call: int, n: int) -> list[float]:
    """Hot on the last token of any multi-token feed (a history turn), cold on decode steps."""
    return [0.0] * (n - 1) + [0.95] if n > 1 else [0.0] * n


@pytest.mark.parametrize("kind", ["stop", "rollback"])
def test_a_harmful_history_turn_recovers_the_answer_from_its_start(
    tiny_llama, tiny_tokenizer, kind
):
    prompt = encode_chat(tiny_tokenizer, HISTORY).prompt_ids
    ((begin, end),) = closed_assistant_spans(tiny_tokenizer, prompt)
    config = GuardConfig(
        holdback=2,
        policy=PolicyConfig(kind=kind, refusal_message="no", recovery_text=" I can't."),
    )
    engine = GuardedEngine(
        tiny_llama, tiny_tokenizer, ScriptedProbe(fitted_probe(32), fires_on_history), config
    )
    (result,) = engine.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))
    event = result.interventions[0]
    assert (event.turn, event.step, event.kept) == (0, end - begin - 1, 0)
    assert result.summary.triggered and result.summary.trigger_index is None
    if kind == "stop":
        assert result.finish_reason == "content_filter" and result.text == "no"
        assert result.token_ids == []
    else:
        recovery = tiny_tokenizer.encode(" I can't.", add_special_tokens=False)
        assert result.token_ids[: len(recovery)] == recovery
        assert result.model_spans() == [(len(recovery), len(result.token_ids))]


def test_history_is_not_judged_when_switched_off(tiny_llama, tiny_tokenizer):
    prompt = encode_chat(tiny_tokenizer, HISTORY).prompt_ids
    probe = ScriptedProbe(fitted_probe(32), fires_on_history)
    config = GuardConfig(monitor_history=False, policy=PolicyConfig(kind="stop"))
    engine = GuardedEngine(tiny_llama, tiny_tokenizer, probe, config)
    (result,) = engine.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))
    assert not result.summary.triggered and len(result.token_ids) == 4


def test_an_unscorable_history_turn_fails_closed(tiny_llama, tiny_tokenizer):
    prompt = encode_chat(tiny_tokenizer, HISTORY).prompt_ids
    probe = ScriptedProbe(
        fitted_probe(32), lambda call, n: [float("nan")] * n if n > 1 else [0.0] * n
    )
    engine = GuardedEngine(tiny_llama, tiny_tokenizer, probe)
    (result,) = engine.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))
    assert result.finish_reason == "error" and result.token_ids == []
