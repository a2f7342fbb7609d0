"""What the bench attacks: an in-process model (plain or guarded) or an OpenAI-compatible endpoint.

Every target turns ``(prompt_ids, prefill_ids)`` requests into
:class:`~guard.GenerationResult` s, so the harness judges and summarises both the same way.

An endpoint gets ``POST /v1/completions`` with the chat-templated prompt and the assistant
prefill as one list of token ids (the ``trajguard serve`` proxy and vLLM both take that).
A trajguard proxy (``owned_by == "trajguard"`` in ``/v1/models``) is asked for per-token
scores; its guard verdict comes back in the choice's ``trajguard`` extension. The proxy
reports neither token ids nor ``Intervention.kept``: token counts are the answer text
re-encoded, and ``kept`` is exact for ``stop`` (all scored tokens) and estimated for a
recovery (the tokens before the recovery text, at most the trigger index). The proxy
treats the whole token-id prompt, prefill included, as prompt: it scores only the tokens
it generates.

Each target has an ``identity``: what, besides the request, decides its answers (the
sample cache keys on it). A local target's is its weight fingerprint and, guarded, its
full resolved guard config, threshold and probe digest; an endpoint's is its URL, the
model id it serves and the ``trajguard`` fingerprint of its ``/v1/models`` card (weights,
probe, threshold, guard config), which only a trajguard proxy over an in-process model
reports. Without one, a model retrained behind the same id cannot be told apart.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import httpx
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from benchmarks.bench.cache import probe_digest
from guard import GenerationResult, GuardedEngine, GuardSummary, Intervention, SamplingParams
from guard.config import PolicyConfig
from guard.models import model_fingerprint
from training.common.generation import generate_requests

logger = logging.getLogger(__name__)

Request = tuple[Sequence[int], Sequence[int]]


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
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"endpoint must be an http(s) URL, got {url!r}")
        return cls(local or default_local, url.rstrip("/").removesuffix("/v1"))

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


class EndpointTarget:
    """An OpenAI-compatible server, ``concurrency`` requests in flight."""

    defence = "served"
    threshold = None

    def __init__(
        self,
        url: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        concurrency: int = 8,
        timeout: float = 600.0,
        api_key: str | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=url, timeout=timeout, headers=headers)
        self.tokenizer = tokenizer
        self.concurrency = concurrency
        models = self.client.get("/v1/models")
        models.raise_for_status()
        card = models.json()["data"][0]
        self.model_id: str = card["id"]
        self.trajguard = card.get("owned_by") == "trajguard"
        reported = card.get("trajguard")  # a trajguard proxy's fingerprint, if it has one
        self.identity: dict[str, Any] = {
            "url": url,
            "model_id": self.model_id,
            "reported": reported,
        }
        logger.info("endpoint %s serves %r (trajguard=%s)", url, self.model_id, self.trajguard)
        if not reported:
            logger.warning(
                "endpoint %s reports no weight fingerprint: its cached samples are keyed by "
                "the model id %r alone, so a model retrained or re-guarded behind the same id "
                "cannot be detected (delete the bench's cache.jsonl to regenerate)",
                url,
                self.model_id,
            )

    def close(self) -> None:
        """Close the HTTP client."""
        self.client.close()

    def _body(self, request: Request, params: SamplingParams) -> dict[str, Any]:
        prompt_ids, prefill_ids = request
        body: dict[str, Any] = {
            "model": self.model_id,
            "prompt": [*prompt_ids, *prefill_ids],
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "seed": params.seed,
        }
        if self.trajguard:
            body["trajguard"] = {"return_scores": True}
        else:
            body["return_token_ids"] = True  # vLLM: the exact generated ids
        return body

    def _one(self, index: int, request: Request, params: SamplingParams) -> GenerationResult:
        response = self.client.post("/v1/completions", json=self._body(request, params))
        if response.status_code != 200:
            raise RuntimeError(f"endpoint answered {response.status_code}: {response.text[:300]}")
        return completion_result(f"req-{index}", response.json()["choices"][0], self.tokenizer)

    def generate(self, requests, params, *, desc, progress):
        with (
            ThreadPoolExecutor(self.concurrency) as pool,
            tqdm(total=len(requests), desc=desc, disable=not progress, leave=False) as bar,
        ):
            futures = [
                pool.submit(self._one, i, r, p) for i, (r, p) in enumerate(zip(requests, params))
            ]
            for future in futures:
                future.add_done_callback(lambda _: bar.update(1))
            return [f.result() for f in futures]


def _kept_tokens(text: str, info: dict[str, Any], tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens released before the proxy's first recovery (the proxy's default policy texts).

    Exact for an immediate ``stop`` (every scored token was kept); for a recovery, the
    re-encoded text before the recovery text, never more than the trigger index.
    """
    trigger = int(info.get("trigger_index") or 0)
    scores = info.get("scores")
    if info.get("recoveries", 0) == 0 and info.get("action") == "stop" and scores is not None:
        return len(scores)  # ``stop`` appends its refusal as text, without tokens
    cut = text.find(PolicyConfig().recovery_text)
    if cut < 0:
        return trigger
    return min(trigger, len(tokenizer.encode(text[:cut], add_special_tokens=False)))


def completion_result(
    request_id: str, choice: dict[str, Any], tokenizer: PreTrainedTokenizerBase
) -> GenerationResult:
    """A ``/v1/completions`` choice as a :class:`~guard.GenerationResult`.

    Token ids are the server's (vLLM ``return_token_ids``). The proxy sends none, only one
    score per released token: its ids are the text re-encoded, cut or padded to that exact
    count, so only their number is meaningful. Interventions come from the proxy's
    ``trajguard.interventions``; a server that reports only ``triggered`` gets one
    :class:`~guard.Intervention` whose ``kept`` is read off the answer (``discarded`` and
    ``injected`` unknown, left 0).
    """
    text = choice.get("text") or ""
    info = choice.get("trajguard") or {}
    scores = info.get("scores")
    token_ids = choice.get("token_ids")
    if token_ids is None:
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        if scores is not None:
            pad = tokenizer.pad_token_id or 0
            token_ids = (token_ids + [pad] * len(scores))[: len(scores)]
    summary, interventions = None, []
    if info.get("guarded"):
        if info.get("interventions") is not None:  # our proxy reports them exactly
            interventions = [Intervention(**i) for i in info["interventions"]]
        elif info.get("triggered"):
            kept = _kept_tokens(text, info, tokenizer)
            interventions = [
                Intervention(
                    step=info.get("trigger_index") or 0,
                    score=info.get("max_score") or 0.0,
                    action=info.get("action") or "",
                    kept=kept,
                    discarded=0,
                )
            ]
        summary = GuardSummary(
            triggered=bool(info.get("triggered")),
            trigger_index=info.get("trigger_index"),
            max_score=info.get("max_score") or 0.0,
            action=info.get("action"),
            recoveries=info.get("recoveries", 0),
            interventions=tuple(interventions),
        )
    return GenerationResult(
        request_id=request_id,
        token_ids=list(token_ids),
        text=text,
        scores=list(scores) if scores is not None else [None] * len(token_ids),
        finish_reason=choice.get("finish_reason"),
        summary=summary,
        interventions=interventions,
    )
