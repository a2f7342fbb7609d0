"""Fixtures of the bench tests: the training fixtures (tiny model, judge, prompts) and a probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import fitted_probe
from tests.unit.training.conftest import (  # noqa: F401  (re-exported fixtures)
    isolated_home,
    split_prompts_file,
    tiny_judge_dir,
    tiny_model_dir,
)

# The tiny random model's probe scores sit near 0.5 (0.49-0.52): at this threshold the guard
# fires on some trajectories and not on others, mid-answer as well as in the prefill.
SOMETIMES = 0.508


@pytest.fixture(scope="session")
def tiny_probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real probe on the tiny model's layer 1 with a threshold that fires only sometimes."""
    probe = fitted_probe(32, "blocks.1.hook_resid_post")
    probe.threshold_ = SOMETIMES
    return probe.save(tmp_path_factory.mktemp("probe") / "probe")
