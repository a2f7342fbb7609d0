"""Chat encoding: a trailing assistant message, or an open assistant turn, is prefill;
closed assistant turns of the prompt are history."""

from __future__ import annotations

from guard.chat import (
    assistant_header_ids,
    closed_assistant_spans,
    encode_chat,
    split_open_assistant_turn,
)

QUESTION = [{"role": "user", "content": "How do I bake bread?"}]


def test_the_header_is_what_the_generation_prompt_adds(tiny_tokenizer):
    header = list(assistant_header_ids(tiny_tokenizer))
    ids = encode_chat(tiny_tokenizer, QUESTION).prompt_ids
    assert header and ids[-len(header) :] == header
    assert "assistant" in tiny_tokenizer.decode(header)


def test_an_open_assistant_turn_splits_like_a_trailing_assistant_message(tiny_tokenizer):
    encoded = encode_chat(
        tiny_tokenizer, QUESTION + [{"role": "assistant", "content": "First, mix"}]
    )
    assert encoded.prefill_ids
    raw = encoded.prompt_ids + encoded.prefill_ids
    assert split_open_assistant_turn(tiny_tokenizer, raw) == encoded
    as_text = tiny_tokenizer(tiny_tokenizer.decode(raw))["input_ids"]
    assert split_open_assistant_turn(tiny_tokenizer, as_text) == encoded


def test_prompts_without_an_open_assistant_turn_stay_whole(tiny_tokenizer):
    plain = encode_chat(tiny_tokenizer, QUESTION).prompt_ids  # ends with the header: no prefill
    assert split_open_assistant_turn(tiny_tokenizer, plain).prefill_ids == []
    closed = tiny_tokenizer.apply_chat_template(
        QUESTION + [{"role": "assistant", "content": "Mix flour."}], tokenize=True
    )
    closed = closed if isinstance(closed, list) else closed["input_ids"]
    split = split_open_assistant_turn(tiny_tokenizer, closed)
    assert (split.prompt_ids, split.prefill_ids) == (list(closed), [])
    text = tiny_tokenizer.encode("no template at all", add_special_tokens=False)
    assert split_open_assistant_turn(tiny_tokenizer, text).prefill_ids == []


HISTORY = [
    {"role": "user", "content": "How do I bake bread?"},
    {"role": "assistant", "content": "First, mix flour and water."},
    {"role": "user", "content": "go on"},
    {"role": "assistant", "content": "Then knead it"},
    {"role": "user", "content": "continue"},
]


def test_closed_assistant_turns_are_found_in_prompt_order(tiny_tokenizer):
    ids = encode_chat(tiny_tokenizer, HISTORY).prompt_ids
    spans = closed_assistant_spans(tiny_tokenizer, ids)
    texts = [tiny_tokenizer.decode(ids[a:b]).strip() for a, b in spans]
    assert texts == ["First, mix flour and water.", "Then knead it"]
    # The same conversation sent as raw text to /v1/completions gives the same spans.
    raw = tiny_tokenizer(tiny_tokenizer.decode(ids))["input_ids"]
    assert split_open_assistant_turn(tiny_tokenizer, raw).prompt_ids == ids
    assert closed_assistant_spans(tiny_tokenizer, raw) == spans


def test_open_and_empty_assistant_turns_are_not_history(tiny_tokenizer):
    encoded = encode_chat(
        tiny_tokenizer,
        [*HISTORY[:2], {"role": "user", "content": "hm"}, {"role": "assistant", "content": ""}]
        + [{"role": "user", "content": "continue"}, {"role": "assistant", "content": "Sure"}],
    )
    spans = closed_assistant_spans(tiny_tokenizer, encoded.prompt_ids)
    assert len(spans) == 1  # the empty turn gives none; the prefill is not history
    assert closed_assistant_spans(tiny_tokenizer, encoded.prompt_ids + encoded.prefill_ids) == spans
    assert (
        closed_assistant_spans(tiny_tokenizer, encode_chat(tiny_tokenizer, QUESTION).prompt_ids)
        == ()
    )
