"""Token-level training examples: chat prompt, an assistant prefix without loss, a target with loss.

Augmented safety data (a harmful prefix followed by a refusal) needs loss on *part* of the
assistant turn only, which TRL's prompt-completion rows cannot express. These examples are
built from token ids the way the guard and the attacks build them (prompt ids + prefill ids),
so training sees exactly the sequences the model meets at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from guard.chat import encode_chat

IGNORE_INDEX = -100


@dataclass(frozen=True, slots=True)
class TokenizedExample:
    """One training sequence and which of its tokens carry loss.

    Attributes:
        input_ids: Chat-templated prompt, assistant prefix, target, end-of-turn tokens.
        loss_mask: 1 on target and end-of-turn tokens, 0 elsewhere.
        kind: ``refusal``, ``benign``, ``qi`` or ``rwi``.
        meta: Provenance (insertion position, span length, ...).
    """

    input_ids: tuple[int, ...]
    loss_mask: tuple[int, ...]
    kind: str
    meta: dict[str, Any]

    def __len__(self) -> int:
        return len(self.input_ids)


def assistant_end_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens the chat template writes after an assistant message (e.g. ``<|im_end|>\\n``).

    Falls back to ``[eos]`` when the template does not tokenise as prompt + content + end.
    """
    user = [{"role": "user", "content": "hi"}]
    content = tokenizer.encode("ok", add_special_tokens=False)
    prompt = encode_chat(tokenizer, user).prompt_ids
    full = tokenizer.apply_chat_template(
        [*user, {"role": "assistant", "content": "ok"}], tokenize=True
    )
    if not isinstance(full, list):  # BatchEncoding in transformers v5
        full = full["input_ids"]
    head = len(prompt) + len(content)
    if list(full[: len(prompt)]) == prompt and list(full[len(prompt) : head]) == content:
        end = list(full[head:])
        if end:
            return end
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither an assistant end marker nor an eos token")
    return [tokenizer.eos_token_id]


def chat_example(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    prefix_ids: Sequence[int],
    target_ids: Sequence[int],
    *,
    kind: str,
    end_ids: Sequence[int] | None = None,
    meta: dict[str, Any] | None = None,
) -> TokenizedExample:
    """``prompt`` as a user turn, then ``prefix_ids`` (no loss), then ``target_ids`` + end (loss)."""
    prompt_ids = encode_chat(tokenizer, [{"role": "user", "content": prompt}]).prompt_ids
    end = list(assistant_end_ids(tokenizer) if end_ids is None else end_ids)
    target = [*target_ids, *end]
    return TokenizedExample(
        input_ids=(*prompt_ids, *prefix_ids, *target),
        loss_mask=(0,) * (len(prompt_ids) + len(prefix_ids)) + (1,) * len(target),
        kind=kind,
        meta=meta or {},
    )


def pad_examples(
    examples: Sequence[TokenizedExample], pad_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (-100 off the loss mask)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e)
        ids[row, :n] = torch.tensor(e.input_ids)
        mask[row, :n] = 1
        keep = torch.tensor(e.loss_mask, dtype=torch.bool)
        labels[row, :n] = torch.where(keep, ids[row, :n], IGNORE_INDEX)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
    }
