"""Worst-of-K selection: which insertion the current model is least likely to recover from.

Two criteria, both computed with one batched teacher-forced pass:

- ``recovery_loss``: mean NLL of the safe recovery target after the insertion (higher: the
  model is further from turning back).
- ``harm_likelihood``: mean log-probability of the span's own harmful continuation
  (higher: the model is readier to keep going). An attacker without the recovery target
  can use only this one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from training.common.candidates import Insertion

CRITERIA: tuple[str, ...] = ("recovery_loss", "harm_likelihood")


@torch.no_grad()
def mean_target_logprobs(
    model: PreTrainedModel,
    contexts: Sequence[Sequence[int]],
    targets: Sequence[Sequence[int]],
    *,
    pad_id: int = 0,
    batch_size: int = 16,
) -> np.ndarray:
    """Mean log-probability of each target given its context (``nan`` for an empty target)."""
    device = next(model.parameters()).device
    out = np.full(len(contexts), np.nan)
    rows = [(i, list(c), list(t)) for i, (c, t) in enumerate(zip(contexts, targets)) if t]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(c) + len(t) for _, c, t in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (_, c, t) in enumerate(chunk):
            ids[row, : len(c) + len(t)] = torch.tensor(c + t)
            mask[row, : len(c) + len(t)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, (i, c, t) in enumerate(chunk):
            positions = torch.arange(len(c) - 1, len(c) + len(t) - 1, device=logprobs.device)
            picked = logprobs[row, positions, torch.tensor(t, device=logprobs.device)]
            out[i] = float(picked.mean())
    return out


def insertion_scores(
    model: PreTrainedModel,
    prompt_ids: Sequence[Sequence[int]],
    insertions: Sequence[Insertion],
    criterion: str,
    *,
    recovery_ids: Sequence[Sequence[int]] | None = None,
    pad_id: int = 0,
    batch_size: int = 16,
) -> np.ndarray:
    """How bad each insertion is for the model under ``criterion`` (higher: worse).

    Args:
        model: The current model.
        prompt_ids: Chat-templated prompt per insertion.
        insertions: Candidates.
        criterion: One of :data:`CRITERIA`.
        recovery_ids: Recovery target per insertion (``recovery_loss`` only).
        pad_id: Padding id.
        batch_size: Sequences per forward pass.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    contexts = [[*p, *ins.prefix_ids] for p, ins in zip(prompt_ids, insertions)]
    if criterion == "recovery_loss":
        if recovery_ids is None:
            raise ValueError("recovery_loss needs recovery_ids")
        lp = mean_target_logprobs(
            model, contexts, recovery_ids, pad_id=pad_id, batch_size=batch_size
        )
        return -lp
    targets = [ins.continuation_ids for ins in insertions]
    lp = mean_target_logprobs(model, contexts, targets, pad_id=pad_id, batch_size=batch_size)
    return np.nan_to_num(lp, nan=-np.inf)  # a span with no continuation is never the worst


def worst_index(scores: np.ndarray) -> int:
    """Index of the worst candidate (first on ties)."""
    return int(np.argmax(scores))
