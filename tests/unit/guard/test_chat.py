"""Chat encoding: a trailing assistant message, or an open assistant turn, is prefill."""

from __future__ import annotations

from guard.chat import assistant_header_ids, encode_chat, split_open_assistant_turn

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
