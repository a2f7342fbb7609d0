import math
from dataclasses import replace

import pytest

from guard import ConfigError, MonitorConfig, StepMonitor
from guard.monitor import peak_debounced_score, resolve_threshold, usable_score
from guard.policies import Trigger, rise_start


@pytest.mark.parametrize(
    "config, scores, fires_at",
    [
        (MonitorConfig(threshold=0.5), [0.1, 0.6, 0.1], 1),
        (MonitorConfig(threshold=0.5, k=2, n=3), [0.6, 0.1, 0.1, 0.6, 0.1, 0.7], 5),
        (MonitorConfig(threshold=0.5, k=2, n=2), [0.6, 0.1, 0.6, 0.1], None),
        (MonitorConfig(threshold=0.5, debounce="ema", ema_alpha=0.5), [0.9, 0.0, 0.6, 0.6], 0),
        (MonitorConfig(threshold=0.65, debounce="ema", ema_alpha=0.5), [0.5, 0.7, 0.9], 2),
    ],
)
def test_debounce_table(config, scores, fires_at):
    monitor = StepMonitor(config, threshold=0.99)
    flags = [monitor.observe(s).flagged for s in scores]
    assert (flags.index(True) if True in flags else None) == fires_at
    assert monitor.trace == scores


def test_peak_matches_online_monitor():
    config = MonitorConfig(threshold=0.5, k=2, n=3)
    scores = [0.2, 0.55, 0.1, 0.52, 0.3]
    monitor = StepMonitor(config, threshold=0.5)
    levels = [monitor.observe(s).level for s in scores]
    assert peak_debounced_score(scores, config) == max(levels) == 0.52


def test_rise_start_never_crosses_released():
    scores = (0.1, 0.3, 0.4, 0.45, 0.9)
    trigger = Trigger(scores, threshold=0.5, released=0, recoveries=0, response_ids=(1,) * 5)
    assert rise_start(trigger, fraction=0.5) == 1
    assert rise_start(replace(trigger, released=3), fraction=0.5) == 3


def test_threshold_rule_request_then_config_then_probe():
    assert resolve_threshold(request=0.0, config=0.7, probe=0.9) == 0.0
    assert resolve_threshold(config=0.7, probe=0.9) == 0.7
    assert resolve_threshold(probe=0.9) == 0.9
    assert resolve_threshold() == 0.5
    monitor = StepMonitor(MonitorConfig(threshold=0.7), threshold=0.9, request_threshold=0.2)
    assert monitor.threshold == 0.2


@pytest.mark.parametrize("score", [None, math.nan, math.inf, -math.inf])
def test_unusable_scores(score):
    assert not usable_score(score)
    assert usable_score(0.0) and usable_score(1.0)


@pytest.mark.parametrize(
    "bad", [{"threshold": 1.5}, {"k": 3, "n": 2}, {"debounce": "median"}, {"ema_alpha": 0}]
)
def test_invalid_monitor_config(bad):
    with pytest.raises(ConfigError):
        MonitorConfig(**bad)
