"""The in-engine guard's per-request logic and options (pure Python, no vLLM)."""

from __future__ import annotations

import math

import pytest

from guard.config import MonitorConfig, PolicyConfig
from guard.errors import ConfigError
from guard.monitor import StepMonitor
from guard.vllm.session import PROMPT_INDEX, RequestGuard
from guard.vllm.settings import PluginSettings, RequestOptions, parse_address

RECOVERY, REFUSAL, EOS = (101, 102, 103), (201, 202), 0


def make_guard(options: RequestOptions, *, policy=None, monitor=None, threshold=0.5):
    output: list[int] = []
    guard = RequestGuard(
        options,
        output,
        monitor=monitor or MonitorConfig(),
        policy=policy or PolicyConfig(max_recoveries=1),
        threshold=threshold,
        recovery_ids=RECOVERY,
        refusal_ids=REFUSAL,
        eos_id=EOS,
    )
    return guard, output


def decode(guard: RequestGuard, output: list[int], scores: list[float], model_token: int = 7):
    """Drive ``guard`` like vLLM: one step per score; returns (tokens, events)."""
    events = []
    for score in scores:
        step_events, forced = guard.step(score)
        events += step_events
        output.append(model_token if forced is None else forced)
    return list(output), events


def test_first_step_scores_the_prompt_and_later_steps_the_previous_token():
    guard, output = make_guard(RequestOptions(mode="observe", key="k"))
    _, events = decode(guard, output, [0.1, 0.2, 0.3])
    assert [(e.index, e.score) for e in events] == [(PROMPT_INDEX, 0.1), (0, 0.2), (1, 0.3)]
    assert guard.monitor.trace == [0.2, 0.3]


def test_stop_forces_refusal_then_eos():
    guard, output = make_guard(RequestOptions(mode="guard"), policy=PolicyConfig(kind="stop"))
    tokens, events = decode(guard, output, [0.0, 0.9] + [0.0] * 4)
    assert tokens == [7, *REFUSAL, EOS, 7, 7]  # token 0 fired at the step that makes token 1
    assert [e.action for e in events if e.action] == ["stop"]
    assert guard.stopped


def test_rollback_injects_recovery_unjudged_then_stops_after_max_recoveries():
    guard, output = make_guard(RequestOptions(mode="guard"), threshold=0.5)
    hot = [0.0, 0.9] + [0.99] * len(RECOVERY) + [0.9] + [0.0] * 4
    tokens, events = decode(guard, output, hot)
    assert tokens[: 1 + len(RECOVERY)] == [7, *RECOVERY]
    # Recovery tokens are recorded but never judged, however hot they score.
    judged = [e for e in events if e.index >= 1 and e.index <= len(RECOVERY)]
    assert all(e.level is None and not e.flagged for e in judged)
    # The first token after the recovery fires again: max_recoveries=1, so stop.
    assert [e.action for e in events if e.action] == ["rollback", "stop"]
    assert tokens[2 + len(RECOVERY) : 2 + len(RECOVERY) + len(REFUSAL) + 1] == [*REFUSAL, EOS]


def test_observe_mode_never_forces():
    guard, output = make_guard(RequestOptions(mode="observe"))
    tokens, events = decode(guard, output, [0.9] * 6)
    assert tokens == [7] * 6 and any(e.flagged for e in events)
    assert not any(e.action for e in events)


def test_threshold_override_zero_always_fires():
    guard, output = make_guard(RequestOptions(mode="guard", threshold=0.0), threshold=0.99)
    _, events = decode(guard, output, [0.0, 0.0])
    assert events[1].flagged


@pytest.mark.parametrize("k,n", [(2, 3), (1, 1)])
def test_debounce_is_step_monitor(k, n):
    """Same levels and triggers as guard.monitor.StepMonitor on the same scores."""
    scores = [0.1, 0.7, 0.2, 0.8, 0.9, 0.1, 0.95, 0.3]
    config = MonitorConfig(k=k, n=n)
    guard, output = make_guard(RequestOptions(mode="observe"), monitor=config, threshold=0.6)
    _, events = decode(guard, output, [0.0, *scores])
    reference = StepMonitor(config, threshold=0.6)
    expected = [reference.observe(s) for s in scores]
    assert [(e.level, e.flagged) for e in events[1:]] == [(v.level, v.flagged) for v in expected]


def test_partial_prefill_steps_repeat_the_same_forced_token():
    guard, output = make_guard(RequestOptions(mode="guard", prefix=(5, 6)))
    assert guard.step(0.1)[1] == 5  # a discarded chunk sample: nothing appended
    assert guard.step(0.1)[1] == 5
    output.append(5)
    assert guard.step(0.2)[1] == 6


def test_prefix_is_forced_and_judged():
    guard, output = make_guard(RequestOptions(mode="observe", prefix=(5, 6)))
    tokens, events = decode(guard, output, [0.0, 0.3, 0.4, 0.1])
    assert tokens[:2] == [5, 6]
    assert [e.level for e in events[1:3]] == [0.3, 0.4]


def test_missing_steps_are_recorded_unscored():
    guard, output = make_guard(RequestOptions(mode="observe"))
    output.extend([1, 2, 3])  # e.g. resumed after preemption
    guard.step(0.5)
    assert math.isnan(guard.monitor.trace[0]) and guard.monitor.trace[-1] == 0.5


def test_abort_stops_at_the_next_token():
    guard, output = make_guard(RequestOptions(mode="guard"))
    output.append(9)
    guard.abort()
    assert guard.step(math.nan)[1] == REFUSAL[0]


@pytest.mark.parametrize(
    "xargs,expected",
    [
        (None, RequestOptions()),
        ({"trajguard": "on"}, RequestOptions(mode="guard")),
        (
            {"trajguard": True, "trajguard_threshold": 0},
            RequestOptions(mode="guard", threshold=0.0),
        ),
        ({"trajguard": "observe", "trajguard_id": 7}, RequestOptions(mode="observe", key="7")),
        ({"trajguard": 1, "trajguard_policy": "stop"}, RequestOptions(mode="guard", policy="stop")),
        (
            {"trajguard": "on", "trajguard_prefix": [1, 2]},
            RequestOptions(mode="guard", prefix=(1, 2)),
        ),
        ({"other": 1}, RequestOptions()),
    ],
)
def test_request_options(xargs, expected):
    assert RequestOptions.from_extra_args(xargs) == expected


@pytest.mark.parametrize(
    "xargs",
    [
        {"trajguard": "maybe"},
        {"trajguard_threshold": 1.5},
        {"trajguard_threshold": "high"},
        {"trajguard_policy": "resample"},
        {"trajguard_prefix": [1, "a"]},
        {"trajguard_prefix": [1]},  # guard off
        {"trajguard_typo": 1},
    ],
)
def test_bad_request_options_raise_value_error(xargs):
    with pytest.raises(ValueError):
        RequestOptions.from_extra_args(xargs)


def test_guard_all_makes_on_the_default():
    assert RequestOptions.from_extra_args({}, guard_all=True).mode == "guard"
    assert RequestOptions.from_extra_args({"trajguard": "off"}, guard_all=True).mode == "off"


def test_settings_from_env():
    settings = PluginSettings.from_env(
        {
            "TRAJGUARD_PROBE": "/p",
            "TRAJGUARD_EVENTS": "0.0.0.0:9000",
            "TRAJGUARD_EVENTS_SECRET": "a-secret-of-24-characters",
            "TRAJGUARD_POLICY": "stop",
            "TRAJGUARD_K": "2",
            "TRAJGUARD_N": "3",
            "TRAJGUARD_THRESHOLD": "0.8",
            "TRAJGUARD_GUARD_ALL": "1",
        }
    )
    assert str(settings.probe) == "/p" and settings.events == ("0.0.0.0", 9000)
    assert settings.events_secret == "a-secret-of-24-characters"
    assert "a-secret" not in repr(settings)
    assert settings.policy.kind == "stop" and settings.guard_all
    assert (settings.monitor.k, settings.monitor.n, settings.monitor.threshold) == (2, 3, 0.8)
    empty = PluginSettings.from_env({"TRAJGUARD_EVENTS": "off"})
    assert empty.probe is None and empty.events is None


@pytest.mark.parametrize("bad", ["nohost", "h:x", ":1", "h:70000"])
def test_parse_address_rejects(bad):
    with pytest.raises(ValueError):
        parse_address(bad)


def test_resample_is_not_an_in_engine_policy():
    with pytest.raises(ValueError):
        PluginSettings.from_env({"TRAJGUARD_POLICY": "resample"})


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_unusable_score_fails_closed_like_every_backend(bad):
    guard, output = make_guard(RequestOptions(mode="guard", key="k"))
    tokens, events = decode(guard, output, [0.0, 0.1, bad] + [0.0] * 4)
    assert tokens[:2] == [7, 7] and tokens[2 : 2 + len(REFUSAL) + 1] == [*REFUSAL, EOS]
    assert guard.stopped and [e.action for e in events if e.action] == ["stop"]


def test_unusable_score_is_recorded_unscored_when_allowed():
    output: list[int] = []
    guard = RequestGuard(
        RequestOptions(mode="guard"),
        output,
        monitor=MonitorConfig(),
        policy=PolicyConfig(),
        threshold=0.5,
        recovery_ids=RECOVERY,
        refusal_ids=REFUSAL,
        eos_id=EOS,
        on_monitor_error="allow",
    )
    tokens, _ = decode(guard, output, [0.0, 0.1, math.nan, 0.1])
    assert tokens == [7, 7, 7, 7] and not guard.stopped
    assert math.isnan(guard.monitor.trace[1])


def test_plugin_settings_read_on_monitor_error():
    assert PluginSettings.from_env({}).on_monitor_error == "block"
    env = {"TRAJGUARD_ON_MONITOR_ERROR": "allow"}
    assert PluginSettings.from_env(env).on_monitor_error == "allow"
    with pytest.raises(ConfigError):
        PluginSettings.from_env({"TRAJGUARD_ON_MONITOR_ERROR": "maybe"})
