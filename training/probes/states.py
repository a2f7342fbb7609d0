"""Teacher-force trajectories and collect the response tokens' hidden states."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from guard.arch import decoder_blocks
from guard.capture import HiddenStateCapture


class _StopForward(Exception):
    """Raised after the deepest captured block: later layers cannot change what was captured."""


def _stop_after(block: torch.nn.Module) -> torch.utils.hooks.RemovableHandle:
    def hook(*_: object) -> None:
        raise _StopForward

    return block.register_forward_hook(hook)


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
    out: dict[str, list[np.ndarray | None]] = {name: [None] * len(sequences) for name in hook_names}
    # Batches of similar length (little padding); results go back in the caller's order.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    with HiddenStateCapture(model, list(hook_names)) as capture:
        deepest = max(point.layer for point in capture.points)
        stop = _stop_after(decoder_blocks(model)[deepest])  # after the capture hook
        try:
            for batch in tqdm(batches, desc="states", disable=not progress, leave=False):
                chunk = [(list(sequences[i][0]), list(sequences[i][1])) for i in batch]
                width = max(len(p) + len(r) for p, r in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, (p, r) in enumerate(chunk):  # right padding: positions unaffected
                    ids[row, : len(p) + len(r)] = torch.tensor(p + r)
                    mask[row, : len(p) + len(r)] = 1
                try:
                    model(ids.to(device), attention_mask=mask.to(device), logits_to_keep=1)
                except _StopForward:
                    pass
                for name in hook_names:
                    hidden = capture[name].float().cpu()  # [batch, pos, d_model]
                    for row, ((p, r), i) in enumerate(zip(chunk, batch)):
                        out[name][i] = hidden[row, len(p) : len(p) + len(r)].numpy()
        finally:
            stop.remove()
    return out  # type: ignore[return-value]
