"""Run many requests through a :class:`~guard.GuardedEngine` with a bounded live batch."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from tqdm.auto import tqdm

from guard import GenerationResult, GuardedEngine, SamplingParams

logger = logging.getLogger(__name__)


def generate_requests(
    engine: GuardedEngine,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    params: SamplingParams | Sequence[SamplingParams],
    *,
    batch_size: int = 8,
    desc: str = "generate",
    progress: bool = True,
) -> list[GenerationResult]:
    """Decode ``(prompt_ids, prefill_ids)`` requests, at most ``batch_size`` live at once.

    Continuous batching: a finished request (e.g. a short refusal) is replaced by the next
    one at the following step, so early stops do not idle the batch.

    Args:
        engine: The (guarded or plain) engine.
        requests: Prompt ids and assistant prefill ids per request.
        params: One sampling setting for all, or one per request.
        batch_size: Maximum live requests.
        desc: Progress bar label.
        progress: Show a progress bar.

    Returns:
        Results in request order; ``text`` excludes the prefill.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_request = [params] * len(requests) if isinstance(params, SamplingParams) else list(params)
    if len(per_request) != len(requests):
        raise ValueError(f"got {len(per_request)} sampling params for {len(requests)} requests")
    ids = [f"req-{i}" for i in range(len(requests))]
    results = {rid: GenerationResult(rid) for rid in ids}
    next_index, live = 0, 0
    with tqdm(total=len(requests), desc=desc, disable=not progress, leave=False) as bar:
        while next_index < len(requests) or live:
            while live < batch_size and next_index < len(requests):
                prompt_ids, prefill_ids = requests[next_index]
                engine.add_request(
                    ids[next_index], prompt_ids, per_request[next_index], prefill_ids=prefill_ids
                )
                next_index, live = next_index + 1, live + 1
            for out in engine.step():
                results[out.request_id].absorb(out)
                if out.finished:
                    live -= 1
                    bar.update(1)
    return [results[rid] for rid in ids]
