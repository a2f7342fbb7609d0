"""A left-padded batch of per-sequence KV caches that rows can join, leave and rewind.

Rows are stored right-aligned (padding on the left) in one ``DynamicCache`` so that a
decoding step for all rows is a single forward pass. Rewinding one row (rollback) takes
the row out as an unpadded single-sequence cache, crops it with ``DynamicCache.crop`` and
puts it back; rotary positions are baked into the cached keys, so re-aligning a row's
slots does not change attention as long as ``position_ids`` count only real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


class BatchCache:
    """Batched KV cache plus the attention mask and true length of each row."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [batch, slots], 1 = real token
        self.lengths: list[int] = []

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def slots(self) -> int:
        """Padded sequence length of the batch."""
        return 0 if self.mask is None else self.mask.shape[1]

    def _state(self, op: str) -> tuple[DynamicCache, torch.Tensor]:
        """The cache and mask, which exist exactly while the batch has rows.

        Raises:
            RuntimeError: the batch is empty (a caller bug, not a user error).
        """
        if self.cache is None or self.mask is None:
            raise RuntimeError(f"BatchCache.{op}() called on an empty batch")
        return self.cache, self.mask

    def append(self, row: DynamicCache) -> None:
        """Add a single-sequence, unpadded cache as the last row."""
        length = row.get_seq_length()
        width = max(self.slots, length)
        row_layers = [
            (F.pad(k, (0, 0, width - length, 0)), F.pad(v, (0, 0, width - length, 0)))
            for k, v in _layers(row)
        ]
        row_mask = torch.zeros(1, width, dtype=torch.long, device=row_layers[0][0].device)
        row_mask[:, width - length :] = 1
        if self.cache is None:
            self.cache = DynamicCache(ddp_cache_data=row_layers)
            self.mask = row_mask
        else:
            grow = width - self.slots
            merged = [
                (
                    torch.cat([F.pad(k, (0, 0, grow, 0)), rk]),
                    torch.cat([F.pad(v, (0, 0, grow, 0)), rv]),
                )
                for (k, v), (rk, rv) in zip(_layers(self.cache), row_layers)
            ]
            self.cache = DynamicCache(ddp_cache_data=merged)
            self.mask = torch.cat([F.pad(self.mask, (grow, 0)), row_mask])
        self.lengths.append(length)

    def extract(self, row: int) -> DynamicCache:
        """Copy ``row`` out as an unpadded single-sequence cache (the batch is unchanged)."""
        cache, _ = self._state("extract")
        start = self.slots - self.lengths[row]
        return DynamicCache(
            ddp_cache_data=[
                (k[row : row + 1, :, start:].clone(), v[row : row + 1, :, start:].clone())
                for k, v in _layers(cache)
            ]
        )

    def remove(self, rows: list[int]) -> None:
        """Drop ``rows`` and trim padding no remaining row needs."""
        if not rows:
            return
        keep = [i for i in range(len(self.lengths)) if i not in set(rows)]
        self.lengths = [self.lengths[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        cache, mask = self._state("remove")
        start = self.slots - max(self.lengths)
        index = torch.tensor(keep, device=mask.device)
        self.cache = DynamicCache(
            ddp_cache_data=[(k[index, :, start:], v[index, :, start:]) for k, v in _layers(cache)]
        )
        self.mask = mask[index, start:]

    def step_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention mask ``[batch, slots + 1]`` and position ids ``[batch, 1]`` for one new token per row."""
        _, mask = self._state("step_inputs")
        mask = F.pad(mask, (0, 1), value=1)
        positions = torch.tensor(self.lengths, device=mask.device).unsqueeze(1)
        return mask, positions

    def commit_step(self, mask: torch.Tensor) -> None:
        """Record that the forward pass appended one token to every row."""
        self.mask = mask
        self.lengths = [n + 1 for n in self.lengths]
