"""Teacher-force trajectories and collect the response tokens' hidden states."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from guard.capture import HiddenStateCapture


@torch.inference_mode()
def token_states(
    model: PreTrainedModel,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    hook_names: Sequence[str],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = True,
) -> dict[str, list[np.ndarray]]:
    """States of every response token at each hook, per ``(prompt_ids, response_ids)`` pair.

    The state of response token ``t`` is the residual stream at its own position, which is
    exactly what the guarded decoder scores when that token is fed back in.

    Returns:
        ``{hook_name: [(n_response_tokens, d_model) float32 array per sequence]}``, keyed by
        the names as given.
    """
    device = next(model.parameters()).device
    out: dict[str, list[np.ndarray]] = {name: [] for name in hook_names}
    batches = range(0, len(sequences), batch_size)
    with HiddenStateCapture(model, list(hook_names)) as capture:
        for start in tqdm(batches, desc="states", disable=not progress, leave=False):
            chunk = [(list(p), list(r)) for p, r in sequences[start : start + batch_size]]
            width = max(len(p) + len(r) for p, r in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, (p, r) in enumerate(chunk):  # right padding: positions are unaffected
                ids[row, : len(p) + len(r)] = torch.tensor(p + r)
                mask[row, : len(p) + len(r)] = 1
            model(ids.to(device), attention_mask=mask.to(device), logits_to_keep=1)
            for name in hook_names:
                hidden = capture[name].float().cpu()  # [batch, pos, d_model]
                for row, (p, r) in enumerate(chunk):
                    out[name].append(hidden[row, len(p) : len(p) + len(r)].numpy())
    return out
