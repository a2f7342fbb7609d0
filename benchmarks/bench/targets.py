"""What the bench attacks: an in-process model (plain or guarded) or an OpenAI-compatible endpoint.

Every target turns ``(prompt_ids, prefill_ids)`` requests into
:class:`~guard.GenerationResult` s, so the harness judges and summarises both the same way.
The endpoint target (:class:`~training.common.endpoint.EndpointTarget`, re-exported here)
lives in training, which generates through endpoints too; its module describes the wire
format and what the proxy does and does not report.

Each target has an ``identity``: what, besides the request, decides its answers (the
sample cache keys on it). A local target's is its weight fingerprint and, guarded, its
full resolved guard config, threshold and probe digest; an endpoint's is its URL, the
model id it serves and the ``trajguard`` fingerprint of its ``/v1/models`` card (weights,
probe, threshold, guard config), which only a trajguard proxy over an in-process model
reports. Without one, a model retrained behind the same id cannot be told apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from benchmarks.bench.cache import probe_digest
from guard import GenerationResult, GuardedEngine, SamplingParams
from guard.models import model_fingerprint
from training.common.endpoint import (
    EndpointTarget,
    Request,
    completion_result,
    endpoint_base_url,
)
from training.common.generation import generate_requests

__all__ = [
    "EndpointTarget",
    "LocalTarget",
    "ModelSpec",
    "Request",
    "Target",
    "completion_result",
]


class Target(Protocol):
    """Something that generates continuations for attack requests."""

    defence: str
    threshold: float | None
    identity: dict[str, Any]

    def generate(
        self,
        requests: Sequence[Request],
        params: Sequence[SamplingParams],
        *,
        desc: str,
        progress: bool,
    ) -> list[GenerationResult]:
        """Results in request order; ``text`` excludes the prefill."""
        ...


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A ``--model`` value: a local model, or ``[LOCAL@]URL`` of an endpoint.

    Attributes:
        local: Model (alias, HF dir, cached id) loaded in-process; for an endpoint, the
            copy whose tokenizer and chat template build the requests.
        url: Endpoint base URL, ``None`` for an in-process model.
    """

    local: str
    url: str | None = None

    @classmethod
    def parse(cls, spec: str, *, default_local: str) -> ModelSpec:
        """``smollm2-135m-instruct``, ``http://host:8000`` or ``runs/sft@http://host:8000/v1``."""
        local, _, url = spec.rpartition("@") if "://" in spec else ("", "", "")
        if not url:
            return cls(spec)
        return cls(local or default_local, endpoint_base_url(url))

    @property
    def label(self) -> str:
        """Short name for tables: the model's name, or ``name@host:port``."""
        name = self.local.rstrip("/").rsplit("/", 1)[-1]
        return name if self.url is None else f"{name}@{urlsplit(self.url).netloc}"


class LocalTarget:
    """An in-process :class:`~guard.GuardedEngine` (guarded when it has a probe).

    Args:
        engine: The decoder.
        defence: Its name in the results (``none``, ``guard:rollback``, ...).
        batch_size: Requests in the engine at once.
        fingerprint: The model's :func:`~guard.models.model_fingerprint` (computed here
            when not given: pass it to compute it once per model).
        probe_dir: Directory the engine's probe was loaded from; its files' digest is
            part of the identity (without it, the loaded probe's own state is hashed).
    """

    def __init__(
        self,
        engine: GuardedEngine,
        defence: str,
        *,
        batch_size: int,
        fingerprint: str | None = None,
        probe_dir: str | Path | None = None,
    ) -> None:
        self.engine = engine
        self.defence = defence
        self.batch_size = batch_size
        self.threshold = engine.threshold if engine.probe is not None else None
        guard = None
        if engine.probe is not None:
            guard = {
                "config": asdict(engine.config),
                "threshold": engine.threshold,
                "probe": probe_digest(probe_dir) if probe_dir else engine.probe.state_digest(),
            }
        self.identity: dict[str, Any] = {
            "model_fingerprint": fingerprint or model_fingerprint(engine.model),
            "guard": guard,
        }

    def generate(self, requests, params, *, desc, progress):
        return generate_requests(
            self.engine, requests, params, batch_size=self.batch_size, desc=desc, progress=progress
        )
