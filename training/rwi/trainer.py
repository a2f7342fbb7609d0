"""HF ``Trainer`` that re-picks the worst insertion of every group with the current weights.

Each batch holds fixed examples (refusals, benign answers, Qi augmentation) and insertion
groups. Before the loss, every group's K candidates are scored in one no-grad pass with
the model as it is at that step, and only the worst candidate joins the batch: the
augmentation is adversarial, not fixed. Under ``accelerate launch`` every rank selects for
its own shard, so the same code runs data-parallel / FSDP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import Trainer

from training.common.worst import CRITERIA, insertion_scores, worst_index
from training.finetune.tokenized import TokenizedExample, pad_examples
from training.rwi.data import InsertionGroup


@dataclass
class MixedBatchCollator:
    """Keeps examples and groups as Python objects; the trainer pads after selection."""

    def __call__(self, items: Sequence[TokenizedExample | InsertionGroup]) -> dict[str, Any]:
        return {
            "examples": [i for i in items if isinstance(i, TokenizedExample)],
            "groups": [i for i in items if isinstance(i, InsertionGroup)],
        }


@dataclass
class SelectionLog:
    """What the worst-of-K selection picked, step by step."""

    records: list[dict[str, Any]] = field(default_factory=list)

    def add(self, step: int, group: InsertionGroup, scores: np.ndarray, chosen: int) -> None:
        """Record one group's scores and the chosen candidate."""
        self.records.append(
            {
                "step": step,
                "chosen": group.insertions[chosen].describe(),
                "chosen_score": float(scores[chosen]),
                "mean_score": float(np.mean(scores)),
                "candidates": [ins.describe() for ins in group.insertions],
            }
        )

    def summary(self) -> dict[str, Any]:
        """Mean worst-minus-mean score gap and how deep the chosen insertions sat."""
        if not self.records:
            return {"n": 0}
        chosen_p = [r["chosen"]["p"] for r in self.records]
        all_p = [c["p"] for r in self.records for c in r["candidates"]]
        return {
            "n": len(self.records),
            "mean_gap_worst_minus_mean": float(
                np.mean([r["chosen_score"] - r["mean_score"] for r in self.records])
            ),
            "chosen_p_mean": float(np.mean(chosen_p)),
            "candidate_p_mean": float(np.mean(all_p)),
            "chosen_p_ge_64_share": float(np.mean([p >= 64 for p in chosen_p])),
            "candidate_p_ge_64_share": float(np.mean([p >= 64 for p in all_p])),
        }


class WorstInsertionTrainer(Trainer):
    """``Trainer`` whose batches may contain :class:`InsertionGroup` s (see module docstring).

    Args:
        criterion: Worst-of-K criterion (see :data:`training.common.worst.CRITERIA`).
        pad_id: Padding id for the padded batch.
        selection_log: Where the choices are recorded.
        **kwargs: Passed to :class:`transformers.Trainer`.
    """

    def __init__(
        self,
        *args: Any,
        criterion: str = "recovery_loss",
        pad_id: int = 0,
        selection_log: SelectionLog | None = None,
        **kwargs: Any,
    ) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
        kwargs.setdefault("data_collator", MixedBatchCollator())
        super().__init__(*args, **kwargs)
        self.criterion = criterion
        self.pad_id = pad_id
        self.selection_log = selection_log if selection_log is not None else SelectionLog()

    def select_worst(
        self, model: torch.nn.Module, groups: Sequence[InsertionGroup]
    ) -> list[TokenizedExample]:
        """The worst candidate of each group, scored with the current weights."""
        flat = [(g, ins) for g in groups for ins in g.insertions]
        was_training = model.training
        model.eval()
        try:
            scores = insertion_scores(
                model,
                [g.prompt_ids for g, _ in flat],
                [ins for _, ins in flat],
                self.criterion,
                recovery_ids=[[*g.recovery_ids, *g.end_ids] for g, _ in flat],
                pad_id=self.pad_id,
            )
        finally:
            model.train(was_training)
        chosen, offset = [], 0
        for group in groups:
            group_scores = scores[offset : offset + len(group.insertions)]
            offset += len(group.insertions)
            index = worst_index(group_scores)
            self.selection_log.add(self.state.global_step, group, group_scores, index)
            chosen.append(group.example(index))
        return chosen

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        examples = list(inputs["examples"])
        if inputs["groups"]:
            examples += self.select_worst(model, inputs["groups"])
        device = next(model.parameters()).device
        batch = pad_examples(examples, self.pad_id, device)
        return super().compute_loss(model, batch, return_outputs, num_items_in_batch)
