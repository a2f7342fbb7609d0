"""Engine checks of the in-engine guard: it must refuse engines where it could not act."""

from __future__ import annotations

import pytest

from guard.errors import ConfigError
from guard.vllm.settings import ACTUATOR, check_engine


class TrajguardLogitsProcessor:  # stands in for the class, matched by module:qualname
    pass


TrajguardLogitsProcessor.__module__ = "guard.vllm.actuator"


def test_accepts_the_v1_runner_with_the_actuator_by_name_or_class():
    check_engine(use_v2_model_runner=False, logits_processors=[ACTUATOR])
    check_engine(use_v2_model_runner=False, logits_processors=["x:Y", TrajguardLogitsProcessor])


@pytest.mark.parametrize("processors", [None, [], ["other.module:Processor"]])
def test_refuses_a_missing_actuator(processors):
    with pytest.raises(ConfigError, match="--logits-processors guard.vllm.actuator"):
        check_engine(use_v2_model_runner=False, logits_processors=processors)


def test_refuses_the_v2_model_runner():
    with pytest.raises(ConfigError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        check_engine(use_v2_model_runner=True, logits_processors=[ACTUATOR])
