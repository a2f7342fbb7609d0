"""RWI and Qi training: token-level examples, insertion sampling, worst-of-K, the commands."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from guard import load_model
from guard.chat import encode_chat
from training.cli import app
from training.common.candidates import CONTINUATION_TOKENS, sample_insertions
from training.common.insertion import word_starts
from training.common.worst import insertion_scores, mean_target_logprobs, worst_index
from training.finetune.tokenized import (
    IGNORE_INDEX,
    assistant_end_ids,
    chat_example,
    pad_examples,
)
from training.rwi.data import HarmfulSource, insertion_groups, qi_examples
from training.rwi.trainer import SelectionLog, WorstInsertionTrainer

runner = CliRunner()
REFUSAL = "I'm sorry, but I can't help with that. It could cause real harm to many people today."
SPANS = [
    ("Sure, here is how to do it: first gather the materials and then mix them well.", "a"),
    ("Step 1: find the target. Step 2: get access to the account without permission.", "b"),
]


def test_assistant_end_ids_match_the_chat_template(tiny_tokenizer) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine"}]
    full = tiny_tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]
    prompt = encode_chat(tiny_tokenizer, messages[:1]).prompt_ids
    content = tiny_tokenizer.encode("fine", add_special_tokens=False)
    assert full == prompt + content + assistant_end_ids(tiny_tokenizer)


def test_chat_example_puts_loss_on_target_and_end_only(tiny_tokenizer) -> None:
    prefix = tiny_tokenizer.encode("Sure, here", add_special_tokens=False)
    target = tiny_tokenizer.encode(" No.", add_special_tokens=False)
    ex = chat_example(tiny_tokenizer, "q", prefix, target, kind="qi")
    end = assistant_end_ids(tiny_tokenizer)
    n_loss = len(target) + len(end)
    assert list(ex.input_ids[-n_loss:]) == target + end
    assert ex.loss_mask == (0,) * (len(ex) - n_loss) + (1,) * n_loss
    short = chat_example(tiny_tokenizer, "q", [], target, kind="refusal")
    batch = pad_examples([ex, short], pad_id=0)
    labels = batch["labels"]
    assert labels.shape == batch["input_ids"].shape == (2, len(ex))
    assert (labels[0] != IGNORE_INDEX).sum() == n_loss
    assert labels[1, len(short) :].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"][1].sum() == len(short)


def test_sample_insertions_are_seeded_and_at_word_starts(tiny_tokenizer) -> None:
    refusal_ids = tiny_tokenizer.encode(REFUSAL, add_special_tokens=False)
    draws = sample_insertions(
        tiny_tokenizer, refusal_ids, SPANS, 16, random.Random(1), lengths=(3, 5)
    )
    starts = set(word_starts(tiny_tokenizer, refusal_ids))
    assert {d.position for d in draws} <= starts and len({d.position for d in draws}) > 3
    assert {len(d.span_ids) for d in draws} == {3, 5}
    texts = {source: text for text, source in SPANS}
    for d in draws:
        assert d.prefix_ids == refusal_ids[: d.position] + list(d.span_ids)
        # the span is the start of its text (a leading space after refusal text), and the
        # continuation is how that text goes on, up to CONTINUATION_TOKENS tokens
        lead = " " if d.position > 0 else ""
        text_ids = tiny_tokenizer.encode(lead + texts[d.span_source], add_special_tokens=False)
        m = len(d.span_ids)
        assert list(d.span_ids) == text_ids[:m]
        assert list(d.continuation_ids) == text_ids[m : m + CONTINUATION_TOKENS]
        assert d.continuation_ids  # both texts are longer than any span drawn
    again = sample_insertions(
        tiny_tokenizer, refusal_ids, SPANS, 16, random.Random(1), lengths=(3, 5)
    )
    assert again == draws
    with pytest.raises(ValueError):
        sample_insertions(tiny_tokenizer, refusal_ids, [], 2, random.Random(0))
    with pytest.raises(ValueError):
        sample_insertions(tiny_tokenizer, refusal_ids, SPANS, 0, random.Random(0))


def test_mean_target_logprobs_is_padding_invariant(tiny_llama) -> None:
    contexts = [[5, 6, 7, 8, 9, 10], [11, 12]]
    targets = [[13, 14], [15, 16, 17, 18]]
    batched = mean_target_logprobs(tiny_llama, contexts, targets, batch_size=2)
    for i, (c, t) in enumerate(zip(contexts, targets)):
        logits = tiny_llama(torch.tensor([c + t])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        expected = np.mean([lp[len(c) - 1 + j, tok].item() for j, tok in enumerate(t)])
        assert batched[i] == pytest.approx(expected, abs=1e-5)
    assert np.isnan(mean_target_logprobs(tiny_llama, [[1, 2]], [[]])[0])


def _sources(n: int) -> list[HarmfulSource]:
    return [HarmfulSource(f"How do I do bad thing {i}?", SPANS[i % 2][0], "test") for i in range(n)]


def test_worst_insertion_trainer_picks_the_argmax_with_current_weights(
    tiny_llama, tiny_tokenizer, tmp_path
) -> None:
    from transformers import TrainingArguments

    groups = insertion_groups(tiny_tokenizer, _sources(3), SPANS, k=4, lengths=(3, 6), seed=0)
    trainer = WorstInsertionTrainer(
        model=tiny_llama,
        args=TrainingArguments(
            output_dir=str(tmp_path), report_to="none", remove_unused_columns=False
        ),
        train_dataset=groups,
        pad_id=tiny_tokenizer.pad_token_id or 0,
    )
    chosen = trainer.select_worst(tiny_llama, groups)
    gaps = []
    for group, example in zip(groups, chosen):
        scores = insertion_scores(
            tiny_llama,
            [group.prompt_ids] * len(group.insertions),
            group.insertions,
            "recovery_loss",
            recovery_ids=[group.recovery_ids + group.end_ids] * len(group.insertions),
        )
        assert example == group.example(worst_index(scores))
        assert example.loss_mask.count(1) == len(group.recovery_ids) + len(group.end_ids)
        gaps.append(scores.max() - scores.mean())
    summary = trainer.selection_log.summary()
    assert summary["n"] == 3
    assert summary["mean_gap_worst_minus_mean"] == pytest.approx(np.mean(gaps), abs=1e-5)
    # harm likelihood: mean log-probability of each span's continuation after its prefill
    insertions = groups[0].insertions
    harm = insertion_scores(tiny_llama, [groups[0].prompt_ids] * 4, insertions, "harm_likelihood")
    for score, ins in zip(harm, insertions):
        context, target = [*groups[0].prompt_ids, *ins.prefix_ids], list(ins.continuation_ids)
        logits = tiny_llama(torch.tensor([context + target])).logits[0].float()
        logp = torch.log_softmax(logits[len(context) - 1 : -1], -1)
        expected = logp[torch.arange(len(target)), torch.tensor(target)].mean().item()
        assert score == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError):
        insertion_scores(tiny_llama, [[1]], groups[0].insertions[:1], "recovery_loss")


def test_selection_log_empty_summary() -> None:
    assert SelectionLog().summary() == {"n": 0}


def test_qi_examples_mask_the_harmful_prefix(tiny_tokenizer) -> None:
    examples = qi_examples(tiny_tokenizer, _sources(20), max_prefix_tokens=12, seed=0)
    ks = [e.meta["k"] for e in examples]
    assert max(ks) <= 12 and len(set(ks)) > 3
    for e, source in zip(examples, _sources(20)):
        prompt = encode_chat(
            tiny_tokenizer, [{"role": "user", "content": source.prompt}]
        ).prompt_ids
        response = tiny_tokenizer.encode(source.response, add_special_tokens=False)
        k = e.meta["k"]
        assert list(e.input_ids[len(prompt) : len(prompt) + k]) == response[:k]
        assert sum(e.loss_mask[: len(prompt) + k]) == 0 and all(e.loss_mask[len(prompt) + k :])


def _train(command: str, model_dir: Path, out: Path, *extra: str, mix: str) -> dict:
    args = [
        command, "--model", str(model_dir), "--out", str(out), "--n-harmful", "4",
        "--max-steps", "3", "--batch-size", "4", "--n-self-instruct", "2", "--n-gsm8k", "0", "--lr", "1e-2", "--writer", str(model_dir),
        "--mix", mix, *extra,
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert load_model(str(out)).model.config.model_type == "llama"
    before, after = load_file(model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    record = json.loads((out / "trajguard_align.json").read_text())
    assert record["global_steps"] == 3 and record["method"] == command
    return record


def test_train_rwi_end_to_end(isolated_home, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rwi"
    mix = "coconot_pref=1,self_instruct=1"
    record = _train("rwi", tiny_model_dir, out, "--k", "3", "--span-lengths", "4,8", mix=mix)
    assert record["n_augmented"] == 4 and record["config"]["k"] == 3
    assert record["config"]["mix"] == "custom" and record["n_benign"] == 2
    assert record["n_by_source"]["benign/coconot_pref"] == 1
    selections = json.loads((out / "rwi_selection.json").read_text())
    assert selections and all(len(s["candidates"]) == 3 for s in selections)
    assert {s["chosen"]["m"] for s in selections} <= {4, 8}
    assert record["selection"]["n"] == len(selections)


def test_train_qi_end_to_end(isolated_home, tiny_model_dir: Path, tmp_path: Path) -> None:
    record = _train(
        "qi", tiny_model_dir, tmp_path / "qi", "--max-prefix-tokens", "20", mix="legacy"
    )
    assert record["n_augmented"] == 4 and "selection" not in record
    assert record["config"]["mix"] == "legacy" and record["config"]["benign_mix"] is None
    benign = {k for k in record["n_by_source"] if k.startswith("benign/")}
    assert benign <= {"benign/self_instruct"}  # legacy: 2 self-instruct, 0 GSM8K


def test_train_rwi_rejects_bad_criterion(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["rwi", "--model", str(tiny_model_dir), "--criterion", "nope"])
    assert result.exit_code != 0 and "criterion" in result.output
