"""Safety SFT: the SFT set (format, leakage, cleaning) and the ``align`` command end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from guard import load_model
from training.cli import app
from training.common.benign import clean_gsm8k_answer
from training.common.harmful_split import default_harmful_split
from training.data import normalize_text
from training.dynamics.positional import DEFAULT_EDGES, measure_positional
from training.dynamics.teacher import encode_pairs
from training.finetune import build_sft_examples, drop_long
from training.finetune.align import (
    AlignConfig,
    _positional_examples,
    alignment_examples,
    load_trainable,
)

runner = CliRunner()


def test_clean_gsm8k_answer() -> None:
    raw = "She sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72.\n#### 72"
    assert (
        clean_gsm8k_answer(raw)
        == "She sold 48/2 = 24 clips.\nIn total 48+24 = 72.\nThe answer is 72."
    )


def test_sft_set_format_counts_and_no_test_prompts() -> None:
    examples = build_sft_examples(n_harmful=40, n_self_instruct=10, n_gsm8k=5, seed=3)
    refusals = [e for e in examples if e.kind == "refusal"]
    benign = [e for e in examples if e.kind == "benign"]
    assert len(refusals) == 40 and len(benign) == 15
    assert len({e.completion for e in refusals}) > 5  # varied refusals
    assert all("<<" not in e.completion and "####" not in e.completion for e in benign)
    splits = default_harmful_split()
    train = {normalize_text(b.prompt) for b in splits.train}
    held_out = {normalize_text(b.prompt) for b in splits.test + splits.dev}
    assert all(normalize_text(e.prompt) in train for e in refusals)
    assert not held_out & {normalize_text(e.prompt) for e in examples}
    row = examples[0].to_row()
    assert row["prompt"][0]["role"] == "user" and row["completion"][0]["role"] == "assistant"
    assert build_sft_examples(n_harmful=40, n_self_instruct=10, n_gsm8k=5, seed=3) == examples


def test_drop_long(tiny_tokenizer) -> None:
    examples = build_sft_examples(n_harmful=5, n_self_instruct=5, n_gsm8k=0)
    kept = drop_long(examples, tiny_tokenizer, 200)
    assert 0 < len(kept) < len(examples)
    assert all(len(tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.completion}], tokenize=True
    )["input_ids"]) <= 200 for e in kept)  # fmt: skip


# A small benign mix (the default one is 600 examples): 5 benign of four sources.
SMALL_MIX = "coconot_pref=2,arena_hard=1,gpteacher_roleplay=1,gsm8k=1"


def _align(model_dir: Path, out: Path, *extra: str, mix: str = SMALL_MIX) -> None:
    args = [
        "align", "--model", str(model_dir), "--out", str(out), "--n-harmful", "6", "--n-self-instruct", "3",
        "--n-gsm8k", "2", "--epochs", "1", "--batch-size", "4", "--max-length", "400", "--lr", "1e-2",
        "--positional-every", "1", "--positional-n", "2", "--mix", mix, *extra,
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output


def _changed(base_dir: Path, out: Path) -> bool:
    before, after = load_file(base_dir / "model.safetensors"), load_file(out / "model.safetensors")
    return any(not torch.equal(before[k], after[k]) for k in before)


def test_align_full_finetune_end_to_end(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "aligned"
    _align(tiny_model_dir, out)
    lm = load_model(str(out))  # loadable by the guard (and plain HF)
    assert lm.model.config.vocab_size == load_model(str(tiny_model_dir)).model.config.vocab_size
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert not (out / "training_args.bin").exists()
    assert _changed(tiny_model_dir, out)
    record = json.loads((out / "trajguard_align.json").read_text())
    assert record["config"]["learning_rate"] == 1e-2 and record["config"]["lora"] is False
    assert record["config"]["mix"] == "custom"
    assert record["config"]["benign_mix"]["coconot_pref"] == 2
    # The run's own SFT set (6 refusals minus those over 400 tokens + exactly 5 benign),
    # rebuilt from the recorded config, one epoch of batches of 4, measured before the first
    # and after every step.
    config = AlignConfig(**record["config"])
    _, tokenizer, base = load_trainable(config)
    examples = alignment_examples(config, tokenizer)
    n_refusal = sum(e.kind == "refusal" for e in examples)
    assert (record["n_refusal"], record["n_benign"]) == (n_refusal, 5)
    assert len(examples) - n_refusal == 5
    assert {k: v for k, v in record["n_by_source"].items() if k.startswith("benign/")} == {
        "benign/coconot_pref": 2,
        "benign/arena_hard": 1,
        "benign/gpteacher_roleplay": 1,
        "benign/gsm8k": 1,
    }
    assert record["global_steps"] == math.ceil(len(examples) / 4)
    assert record["wall_time_s"] >= record["train_runtime_s"] - 0.05  # training is part of it
    positional = json.loads((out / "positional.json").read_text())
    steps = [r["step"] for r in positional["records"]]
    assert steps == list(range(record["global_steps"] + 1))
    first = positional["records"][0]  # step 0: the base model, measured again here
    pairs = [(e.prompt, e.completion) for e in _positional_examples(examples, 2)]
    encoded = encode_pairs(tokenizer, pairs, max_response_tokens=DEFAULT_EDGES[-1])
    again = measure_positional(base, encoded, tokenizer.pad_token_id)
    assert first["grad_norm"] == pytest.approx(again["grad_norm"], rel=1e-4, nan_ok=True)
    assert first["loss"] == pytest.approx(again["loss"], rel=1e-5, nan_ok=True)
    assert len(first["grad_norm"]) == len(positional["buckets"]) and first["grad_norm"][0] > 0
    assert (out / "positional_loss.png").stat().st_size > 0 and (
        out / "positional_grad.png"
    ).is_file()


def test_align_lora_is_merged(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    _align(tiny_model_dir, out, "--lora", "--lora-r", "4", "--positional-every", "0", mix="legacy")
    record = json.loads((out / "trajguard_align.json").read_text())
    assert record["config"]["mix"] == "legacy" and record["config"]["benign_mix"] is None
    assert record["n_benign"] == 5  # 3 self-instruct + 2 GSM8K, none over 400 tokens
    assert not (out / "adapter_config.json").exists()
    assert not (out / "positional.json").exists()
    assert _changed(tiny_model_dir, out)
    assert load_model(str(out)).model.config.model_type == "llama"
