"""Turn chat messages into prompt token ids (plus monitored assistant prefill), and find
the assistant turns a prompt holds."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from guard.errors import GuardValidationError

Span = tuple[int, int]


@dataclass(frozen=True, slots=True)
class EncodedPrompt:
    """Prompt ids, and the ids of a client-written assistant prefix to continue."""

    prompt_ids: list[int]
    prefill_ids: list[int]


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]
) -> EncodedPrompt:
    """Apply the chat template; a trailing assistant message becomes monitored prefill.

    Raises:
        GuardValidationError: no messages, or a message without string content.
    """
    if not messages:
        raise GuardValidationError("messages must not be empty", param="messages")
    for message in messages:
        if not isinstance(message.get("content"), str) or "role" not in message:
            raise GuardValidationError(
                "each message needs a role and string content", param="messages"
            )
    prefill = ""
    if messages[-1]["role"] == "assistant":
        prefill = messages[-1]["content"]
        messages = messages[:-1]
    prompt_ids = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=True
    )
    if not isinstance(prompt_ids, list):  # BatchEncoding in transformers v5
        prompt_ids = prompt_ids["input_ids"]
    prefill_ids = tokenizer.encode(prefill, add_special_tokens=False) if prefill else []
    return EncodedPrompt(list(prompt_ids), list(prefill_ids))


_HEADERS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, tuple[int, ...]] = (
    weakref.WeakKeyDictionary()
)


def assistant_header_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The ids the chat template's generation prompt adds (e.g. ``<|im_start|>assistant\\n``).

    Empty when the tokenizer has no chat template or the generation prompt adds nothing.
    """
    if tokenizer in _HEADERS:
        return _HEADERS[tokenizer]
    header: tuple[int, ...] = ()
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": "x"}]
        opened = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        closed = tokenizer.apply_chat_template(
            messages, add_generation_prompt=False, tokenize=False
        )
        if isinstance(opened, str) and isinstance(closed, str) and opened.startswith(closed):
            header = tuple(tokenizer.encode(opened[len(closed) :], add_special_tokens=False))
    _HEADERS[tokenizer] = header
    return header


def split_open_assistant_turn(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]
) -> EncodedPrompt:
    """A raw prompt that ends inside an open assistant turn: that turn's text is prefill.

    A ``/v1/completions`` prompt may carry the chat template itself, ending with the
    assistant header and the start of an answer the client wrote. That is an assistant
    prefill like a trailing assistant chat message, and is monitored the same way. The
    tokens after the last assistant header are prefill when none of them is a special
    token (a closed turn or a new one); otherwise the whole prompt is prompt.
    """
    ids = list(ids)
    header = list(assistant_header_ids(tokenizer))
    if header:
        special = set(tokenizer.all_special_ids)
        for start in range(len(ids) - len(header), -1, -1):
            if ids[start : start + len(header)] == header:
                cut = start + len(header)
                if not any(t in special for t in ids[cut:]):
                    return EncodedPrompt(ids[:cut], ids[cut:])
                break
    return EncodedPrompt(ids, [])


def closed_assistant_spans(
    tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]
) -> tuple[Span, ...]:
    """``[start, end)`` ranges of ``ids`` holding the text of closed assistant turns.

    A closed turn is the assistant header (:func:`assistant_header_ids`) followed by
    text up to the next special token (the end of turn). Those turns are written by the
    client, not by the model this time: a harmful answer planted there and followed by
    "continue" is a multi-turn insertion, so the guard judges them like prefill. A turn
    still open at the end (the generation prompt, or prefill) is not history; empty
    turns give no span. Ids are matched, not text, so a header smuggled into a message
    that the template turned into special tokens counts too (the model reads it as one).
    """
    header = list(assistant_header_ids(tokenizer))
    if not header:
        return ()
    ids = list(ids)
    special = set(tokenizer.all_special_ids)
    spans: list[Span] = []
    start = 0
    while True:
        start = _find(ids, header, start)
        if start < 0:
            break
        begin = end = start + len(header)
        while end < len(ids) and ids[end] not in special:
            end += 1
        if end == len(ids):  # never closed
            break
        if end > begin:
            spans.append((begin, end))
        start = end
    return tuple(spans)


def _find(ids: list[int], needle: list[int], start: int) -> int:
    """First index ``>= start`` where ``needle`` occurs in ``ids`` (``-1``: none)."""
    first = needle[0]
    for i in range(start, len(ids) - len(needle) + 1):
        if ids[i] == first and ids[i : i + len(needle)] == needle:
            return i
    return -1
