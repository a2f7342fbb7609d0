"""Per-position loss and gradient norm during SFT (a ``TrainerCallback``).

Every ``every`` optimizer steps the callback teacher-forces a fixed small batch of
(prompt, response) pairs and records, for each response position ``t``, the mean token loss,
and for each position bucket (``[0,1)``, ``[1,2)``, ``[2,4)``, ...), the L2 norm of the
gradient of that bucket's mean loss with respect to the trainable parameters. Shallow
alignment shows up as loss and gradient concentrated in the first few positions.
Gradients are taken with ``torch.autograd.grad`` on the unwrapped model, so the trainer's
own ``.grad`` buffers (and DDP hooks) are untouched; it runs on the main process only.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase, TrainerCallback

from training.common.plots import Curve, plot_curves
from training.dynamics.teacher import collate, encode_pairs, response_nll

logger = logging.getLogger(__name__)

DEFAULT_EDGES: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32)


def bucket_labels(edges: Sequence[int]) -> list[str]:
    """``[0,1)``-style labels of consecutive edges."""
    return [f"[{a},{b})" for a, b in itertools.pairwise(edges)]


def measure_positional(
    model: torch.nn.Module,
    batch_pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    *,
    edges: Sequence[int] = DEFAULT_EDGES,
) -> dict[str, list[float]]:
    """Per-position mean loss and per-bucket gradient norms on one teacher-forced batch.

    Args:
        model: The model being trained (its trainable parameters define the gradient).
        batch_pairs: Encoded ``(prompt_ids, response_ids)`` pairs.
        pad_id: Padding id.
        edges: Bucket edges over response positions; buckets with no tokens get NaN.

    Returns:
        ``loss`` per position ``0..edges[-1]-1`` (NaN where no row reaches it) and
        ``grad_norm`` per bucket.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    batch = collate(batch_pairs, pad_id).to(device)
    was_training = model.training
    model.eval()  # no dropout while measuring
    try:
        with torch.enable_grad():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            nll = response_nll(logits, batch)  # [batch, max_len]
            mask = batch.response_mask.to(device)
            n_positions = edges[-1]
            counts = mask.sum(0)  # [max_len]
            loss = [
                float(nll[:, t].detach().sum() / counts[t])
                if t < len(counts) and counts[t] > 0
                else float("nan")
                for t in range(n_positions)
            ]
            grad_norm = []
            buckets = list(itertools.pairwise(edges))
            for k, (a, b) in enumerate(buckets):
                tokens = mask[:, a:b].sum()
                if tokens == 0:
                    grad_norm.append(float("nan"))
                    continue
                bucket_loss = nll[:, a:b].sum() / tokens
                grads = torch.autograd.grad(
                    bucket_loss, params, retain_graph=k < len(buckets) - 1, allow_unused=True
                )
                grad_norm.append(
                    float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
                )
    finally:
        model.train(was_training)
    return {"loss": loss, "grad_norm": grad_norm}


class PositionalDynamicsCallback(TrainerCallback):
    """Record :func:`measure_positional` every ``every`` steps and write it to ``out_path``.

    Args:
        tokenizer: Tokenizer of the trained model.
        pairs: Fixed ``(prompt, response)`` texts to teacher-force.
        out_path: JSON file, rewritten after each measurement.
        every: Measure at step 0 and every ``every`` optimizer steps (and at the end).
        edges: Position bucket edges; responses are truncated to ``edges[-1]`` tokens.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        pairs: Sequence[tuple[str, str]],
        out_path: str | Path,
        *,
        every: int = 10,
        edges: Sequence[int] = DEFAULT_EDGES,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.encoded = encode_pairs(tokenizer, pairs, max_response_tokens=edges[-1])
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.out_path = Path(out_path)
        self.every = every
        self.edges = list(edges)
        self.records: list[dict[str, Any]] = []

    def _record(self, state: Any, model: torch.nn.Module) -> None:
        if not state.is_world_process_zero or (
            self.records and self.records[-1]["step"] == state.global_step
        ):
            return
        result = measure_positional(model, self.encoded, self.pad_id, edges=self.edges)
        self.records.append({"step": state.global_step, "epoch": state.epoch, **result})
        payload = {
            "edges": self.edges,
            "buckets": bucket_labels(self.edges),
            "n_sequences": len(self.encoded),
            "response_lengths": [len(r) for _, r in self.encoded],
            "records": self.records,
        }
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        self.out_path.write_text(json.dumps(payload, indent=2), encoding="utf-8")

    def on_train_begin(
        self, args: Any, state: Any, control: Any, model: torch.nn.Module = None, **kwargs: Any
    ) -> None:
        """Measure before the first update."""
        self._record(state, model)

    def on_step_end(
        self, args: Any, state: Any, control: Any, model: torch.nn.Module = None, **kwargs: Any
    ) -> None:
        """Measure every ``every`` steps."""
        if state.global_step % self.every == 0:
            self._record(state, model)

    def on_train_end(
        self, args: Any, state: Any, control: Any, model: torch.nn.Module = None, **kwargs: Any
    ) -> None:
        """Measure the final model."""
        self._record(state, model)


def _pick(records: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    if len(records) <= n:
        return records
    idx = sorted({round(i * (len(records) - 1) / (n - 1)) for i in range(n)})
    return [records[i] for i in idx]


def plot_positional(json_path: str | Path, out_dir: str | Path, *, n_curves: int = 6) -> list[Path]:
    """Draw ``positional_loss.png`` and ``positional_grad.png`` from a callback JSON."""
    data = json.loads(Path(json_path).read_text(encoding="utf-8"))
    records = _pick(data["records"], n_curves)
    out_dir = Path(out_dir)
    loss_curves = {
        f"step {r['step']}": Curve(list(range(len(r["loss"]))), r["loss"]) for r in records
    }
    grad_curves = {
        f"step {r['step']}": Curve(list(range(len(r["grad_norm"]))), r["grad_norm"])
        for r in records
    }
    n = data["n_sequences"]
    return [
        plot_curves(
            out_dir / "positional_loss.png",
            loss_curves,
            xlabel="response token position",
            ylabel="token loss (NLL)",
            title=f"SFT per-position loss on {n} refusal examples",
        ),
        plot_curves(
            out_dir / "positional_grad.png",
            grad_curves,
            xlabel="response position bucket",
            ylabel="||grad of bucket mean loss||",
            title=f"SFT per-position gradient norm ({n} refusal examples)",
            xticks=list(range(len(data["buckets"]))),
            xticklabels=data["buckets"],
            logy=True,
        ),
    ]
