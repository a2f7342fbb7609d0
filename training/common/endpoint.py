"""An OpenAI-compatible endpoint as a generation target: ``POST /v1/completions`` with token ids.

An endpoint gets ``POST /v1/completions`` with the chat-templated prompt and the assistant
prefill as one list of token ids (the ``trajguard serve`` proxy and vLLM both take that).
A trajguard proxy (``owned_by == "trajguard"`` in ``/v1/models``) is asked for per-token
scores; its guard verdict comes back in the choice's ``trajguard`` extension. The proxy
reports neither token ids nor ``Intervention.kept``: token counts are the answer text
re-encoded, and ``kept`` is exact for ``stop`` (all scored tokens) and estimated for a
recovery (the tokens before the recovery text, at most the trigger index). The proxy
reads a token-id prompt that ends inside an open assistant turn as prompt + assistant
prefill (:func:`guard.chat.split_open_assistant_turn`) and judges the prefill as it judges
a trailing assistant chat message; a plain vLLM scores nothing. vLLM is asked for
``return_token_ids``: its ids are the exact generated ones.

An endpoint's ``identity`` is what, besides the request, decides its answers (caches key
on it): its URL, the model id it serves and the ``trajguard`` fingerprint of its
``/v1/models`` card (weights, probe, threshold, guard config), which only a trajguard
proxy over an in-process model reports. Without one, a model retrained behind the same id
cannot be told apart.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any
from urllib.parse import urlsplit

import httpx
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from guard import GenerationResult, GuardSummary, Intervention, SamplingParams
from guard.config import PolicyConfig

logger = logging.getLogger(__name__)

#: ``(prompt_ids, prefill_ids)`` of one generation request.
Request = tuple[Sequence[int], Sequence[int]]


def endpoint_base_url(url: str) -> str:
    """``http://host:8000/v1`` or ``http://host:8000/`` as ``http://host:8000``.

    Raises:
        ValueError: Not an http(s) URL.
    """
    if urlsplit(url).scheme not in ("http", "https"):
        raise ValueError(f"endpoint must be an http(s) URL, got {url!r}")
    return url.rstrip("/").removesuffix("/v1")


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
                "cannot be detected (delete the cache of its samples to regenerate)",
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

    def completed(
        self, requests: Sequence[Request], params: Sequence[SamplingParams]
    ) -> Iterator[tuple[int, GenerationResult]]:
        """``(request index, result)`` pairs as the answers arrive, in completion order.

        Requests not yet sent are cancelled when the caller stops early or a request fails.
        """
        with ThreadPoolExecutor(self.concurrency) as pool:
            futures = {
                pool.submit(self._one, i, r, p): i for i, (r, p) in enumerate(zip(requests, params))
            }
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
            finally:
                for future in futures:
                    future.cancel()

    def generate(self, requests, params, *, desc, progress):
        results: list[GenerationResult | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc=desc, disable=not progress, leave=False) as bar:
            for index, result in self.completed(requests, params):
                results[index] = result
                bar.update(1)
        return results


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
