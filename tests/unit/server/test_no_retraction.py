"""Property: whatever the score trace, no released token is ever retracted — on every backend.

The same random score traces drive the local engine (a scripted probe) and the proxy's
upstream-vLLM engine (a scripted upstream server and shadow scorer).
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guard import GuardConfig, GuardedEngine, PolicyConfig, SamplingParams
from guard.chat import EncodedPrompt
from guard.events import RequestOutput
from server.engine import GuardOptions
from server.upstream import UpstreamVLLMEngine
from tests.helpers import ScriptedProbe, fitted_probe
from tests.scripted_upstream import ScriptedScorer, ScriptedUpstream

RECOVERY_TEXT = "No."
PARAMS = SamplingParams(max_tokens=15, ignore_eos=True)


def local_outputs(model, tokenizer, config, prompt_ids, script) -> list[RequestOutput]:
    engine = GuardedEngine(model, tokenizer, ScriptedProbe(fitted_probe(32), script), config)
    engine.add_request("r", prompt_ids, PARAMS)
    return list(engine.run())


def upstream_outputs(tokenizer, config, prompt_ids, script) -> list[RequestOutput]:
    probe = ScriptedProbe(fitted_probe(32), script)
    engine = UpstreamVLLMEngine(
        "http://upstream",
        tokenizer=tokenizer,
        scorer=ScriptedScorer(script),
        config=config,
        model_name="m",
        probe=probe,
        transport=ScriptedUpstream().transport(),
    )

    async def go():
        await engine.start()
        stream = await engine.generate(
            "r", EncodedPrompt(prompt_ids, []), PARAMS, guard_options=GuardOptions()
        )
        return [out async for out in stream]

    return asyncio.run(go())


def check_no_retraction(outputs: list[RequestOutput], recovery_ids: list[int]) -> None:
    released = 0
    for out in outputs:
        for event in out.interventions:
            # A recovery may only discard tokens that were never released.
            assert event.kept >= released
        released += len(out.token_ids)
    final = outputs[-1]
    assert final.finished and final.completion_tokens == released
    # Every released token cleared the monitor, except our own injected recovery text
    # (a rollback kept K tokens, then forced the recovery tokens at K, K+1, ...).
    forced = {
        event.kept + j
        for out in outputs
        for event in out.interventions
        if event.action == "rollback"
        for j in range(len(recovery_ids))
    }
    scores = [s for o in outputs for s in o.scores]
    for i, score in enumerate(scores):
        assert score < 0.5 or i in forced


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    trace=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=40),
    holdback=st.integers(0, 5),
    kind=st.sampled_from(["stop", "rollback", "resample"]),
    max_recoveries=st.integers(0, 3),
    backend=st.sampled_from(["local", "upstream"]),
)
def test_released_tokens_are_never_retracted(
    tiny_llama, tiny_tokenizer, trace, holdback, kind, max_recoveries, backend
):
    if backend == "upstream" and kind == "resample":
        kind = "rollback"  # the upstream backend supports stop and rollback
    config = GuardConfig(
        holdback=holdback,
        policy=PolicyConfig(
            kind=kind, max_recoveries=max_recoveries, recovery_text=RECOVERY_TEXT, resample_window=2
        ),
    )

    def script(call: int, n: int) -> list[float]:
        return [trace[call % len(trace)]] * n

    prompt_ids = tiny_tokenizer.encode("Sure, here is")
    if backend == "local":
        outputs = local_outputs(tiny_llama, tiny_tokenizer, config, prompt_ids, script)
    else:
        outputs = upstream_outputs(tiny_tokenizer, config, prompt_ids, script)
    check_no_retraction(outputs, tiny_tokenizer.encode(RECOVERY_TEXT))
