"""Learning dynamics: teacher forcing, KL per position, positional loss/grads, consistency, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import build_tiny_model
from training.common.insertion import END
from training.dynamics.cli import app
from training.dynamics.consistency import insertion_cases, prefix_cases, score_cases
from training.dynamics.kl import PositionStats, per_position_kl
from training.dynamics.positional import measure_positional
from training.dynamics.teacher import collate, encode_pairs, response_nll

runner = CliRunner()
PAIRS = [
    ("How do I do it?", "Sure, here is how to do it: step one, step two."),
    ("Hi", "I'm sorry."),
]


def test_response_nll_matches_unbatched(tiny_llama, tiny_tokenizer) -> None:
    encoded = encode_pairs(tiny_tokenizer, PAIRS)
    batch = collate(encoded, pad_id=4)
    nll = response_nll(
        tiny_llama(batch.input_ids, attention_mask=batch.attention_mask).logits, batch
    )
    for row, (prompt, response) in enumerate(encoded):
        logits = tiny_llama(torch.tensor([prompt + response])).logits[0]
        logp = torch.log_softmax(logits[len(prompt) - 1 : -1], -1)
        expected = -logp[torch.arange(len(response)), torch.tensor(response)]
        torch.testing.assert_close(nll[row, : len(response)], expected, atol=1e-4, rtol=1e-4)
        assert torch.all(nll[row, len(response) :] == 0)


def test_kl_is_zero_against_itself_and_positive_otherwise(tiny_llama, tiny_tokenizer) -> None:
    same = per_position_kl(tiny_llama, tiny_llama, tiny_tokenizer, PAIRS, progress=False)
    assert max(v for v in same.kl.mean if not math.isnan(v)) < 1e-5
    other = build_tiny_model("llama", len(tiny_tokenizer), seed=1)
    diff = per_position_kl(
        other, tiny_llama, tiny_tokenizer, PAIRS, max_response_tokens=8, progress=False
    )
    # KL(aligned || base) at each response position, pair by pair without padding
    per_pair = []
    for prompt, response in encode_pairs(tiny_tokenizer, PAIRS, max_response_tokens=8):
        ids = torch.tensor([prompt + response])
        at = slice(len(prompt) - 1, len(prompt) - 1 + len(response))
        log_a = torch.log_softmax(other(ids).logits[0, at].float(), -1)
        log_b = torch.log_softmax(tiny_llama(ids).logits[0, at].float(), -1)
        per_pair.append((log_a.exp() * (log_a - log_b)).sum(-1).tolist())
    expected = [
        sum(kl[t] for kl in per_pair if t < len(kl)) / sum(t < len(kl) for kl in per_pair)
        for t in range(max(map(len, per_pair)))
    ]
    assert len(diff.kl.mean) == 8 and diff.kl.mean[: len(expected)] == pytest.approx(
        expected, rel=1e-4, abs=1e-6
    )
    assert diff.kl.count[: len(expected)] == [
        sum(t < len(k) for k in per_pair) for t in range(len(expected))
    ]
    assert all(math.isnan(v) for v in diff.kl.mean[len(expected) :])
    assert diff.kl.count[0] == 2 and diff.n_pairs == 2


def test_position_stats_ignores_masked_entries() -> None:
    import numpy as np

    stats = PositionStats.of(np.array([[1.0, 5.0], [3.0, 99.0]]), np.array([[1, 1], [1, 0]]))
    assert stats.mean == [2.0, 5.0] and stats.count == [2, 1]


def test_measure_positional_leaves_grads_untouched(tiny_llama, tiny_tokenizer) -> None:
    encoded = encode_pairs(tiny_tokenizer, PAIRS)
    result = measure_positional(tiny_llama, encoded, 4, edges=(0, 1, 4, 64))
    assert len(result["loss"]) == 64 and len(result["grad_norm"]) == 3
    longest = max(len(r) for _, r in encoded)
    assert not any(math.isnan(v) for v in result["loss"][:longest]) and math.isnan(
        result["loss"][longest]
    )
    assert all(p.grad is None for p in tiny_llama.parameters())
    # each bucket's gradient norm, again pair by pair without padding
    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    for k, (a, b) in enumerate([(0, 1), (1, 4), (4, 64)]):
        losses = []
        for prompt, response in encoded:
            logits = tiny_llama(torch.tensor([prompt + response])).logits[0]
            logp = torch.log_softmax(logits[len(prompt) - 1 : -1].float(), -1)
            nll = -logp[torch.arange(len(response)), torch.tensor(response)]
            losses.append(nll[a:b])
        grads = torch.autograd.grad(torch.cat(losses).mean(), params, allow_unused=True)
        norm = torch.sqrt(sum((g**2).sum() for g in grads if g is not None))
        assert result["grad_norm"][k] == pytest.approx(norm.item(), rel=1e-4), (a, b)


def test_consistency_cases_and_scores(tiny_llama, tiny_tokenizer) -> None:
    prompt_ids = [ids for ids, _ in encode_pairs(tiny_tokenizer, PAIRS)]
    responses = ["Sure, here is how to do it: step one, step two, step three."] * 2
    cases = prefix_cases(tiny_tokenizer, prompt_ids, responses, [0, 4, 1000], continuation_tokens=3)
    assert [c.cell["k"] for c in cases] == [0, 4, 0, 4]  # k past the response is skipped
    assert all(len(c.harmful) == 3 for c in cases)
    refusals = ["I'm sorry, but I can't help with that. " * 3] * 2
    ins = insertion_cases(
        tiny_tokenizer, prompt_ids, refusals, responses, [0, END], [2], continuation_tokens=3
    )
    assert len(ins) == 4 and all(len(c.harmful) == 3 for c in ins)
    points = score_cases(tiny_llama, ins, 4, progress=False)
    assert [p.cell for p in points] == [{"p": 0, "m": 2}, {"p": END, "m": 2}]
    assert all(p.prefers_harm.n == 2 for p in points)


@pytest.fixture
def aligned_dir(tmp_path: Path, tiny_tokenizer) -> Path:
    directory = tmp_path / "aligned"
    build_tiny_model(
        "llama", len(tiny_tokenizer), seed=5, max_position_embeddings=4096
    ).save_pretrained(directory)
    tiny_tokenizer.save_pretrained(directory)
    return directory


def test_cli_kl_consistency_positional(
    isolated_home, tiny_model_dir, aligned_dir, split_prompts_file, tmp_path
) -> None:
    out = tmp_path / "dyn"
    src = ["--prompts", str(split_prompts_file), "--writer", str(tiny_model_dir), "--out", str(out)]
    result = runner.invoke(
        app,
        [
            "kl",
            "--aligned",
            str(aligned_dir),
            "--base",
            str(tiny_model_dir),
            "--max-tokens",
            "8",
            *src,
        ],
    )
    assert result.exit_code == 0, result.output
    kl = json.loads((out / "kl.json").read_text())
    assert kl["n_pairs"] == 3 and len(kl["kl"]["mean"]) == 8
    assert (out / "kl.png").is_file() and (out / "kl_logprob.png").is_file()

    args = [
        "consistency",
        "--model",
        str(aligned_dir),
        "--model",
        str(tiny_model_dir),
        "--ks",
        "0,4",
    ]
    result = runner.invoke(
        app, [*args, "--positions", "0,end", "--lengths", "2", "--continuation-tokens", "3", *src]
    )
    assert result.exit_code == 0, result.output
    data = json.loads((out / "consistency.json").read_text())
    assert set(data["models"]) == {str(aligned_dir), str(tiny_model_dir)}
    assert [p["cell"] for p in data["models"][str(aligned_dir)]["prefix"]] == [{"k": 0}, {"k": 4}]
    assert (out / "consistency_prefix.png").is_file() and (out / "consistency_insert.png").is_file()

    record = {"step": 0, "epoch": 0, "loss": [1.0, 0.5], "grad_norm": [2.0, 1.0]}
    payload = {
        "edges": [0, 1, 2],
        "buckets": ["[0,1)", "[1,2)"],
        "n_sequences": 1,
        "records": [record],
    }
    (tmp_path / "positional.json").write_text(json.dumps(payload))
    result = runner.invoke(
        app, ["positional", str(tmp_path / "positional.json"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "positional_grad.png").is_file()
    assert (tmp_path / "positional_loss.png").is_file()
