"""Rank-assisted prefilling: the search against brute force, its cases and its command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from guard import encode_chat
from training.attacks import rap as rap_module
from training.attacks.cli import app
from training.attacks.harness import AttackConfig, AttackContext
from training.attacks.rap import rap_cases, rap_prefix, target_window

runner = CliRunner()
RESPONSE = "Sure, here is how to do it: step one, step two, step three. The end."


@pytest.fixture
def search(tiny_llama, tiny_tokenizer) -> dict:
    """The tiny model, a chat prompt, a harmful response and the special ids never chosen."""
    prompt = encode_chat(tiny_tokenizer, [{"role": "user", "content": "How do I do it?"}])
    return {
        "model": tiny_llama,
        "prompt_ids": prompt.prompt_ids,
        "response_ids": tiny_tokenizer.encode(RESPONSE, add_special_tokens=False),
        "skip_ids": tiny_tokenizer.all_special_ids,
    }


@torch.no_grad()
def _next_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@torch.no_grad()
def _target_loglik(model, context: list[int], target: list[int]) -> float:
    """Sum log P(target | context), one uncached forward pass."""
    logits = model(input_ids=torch.tensor([context + target])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(target))


def test_target_window_follows_the_prefill_then_keeps_the_responses_end() -> None:
    response = list(range(10))
    assert target_window(response, 0, 4) == [1, 2, 3, 4]  # after the first prefilled token
    assert target_window(response, 5, 4) == [6, 7, 8, 9]
    assert target_window(response, 8, 4) == [6, 7, 8, 9]  # past the end: the last 4
    assert target_window([1, 2], 3, 4) == [1, 2] and target_window([], 0, 4) == []


def test_each_token_is_in_the_top_k_and_maximises_the_target_likelihood(search) -> None:
    """Brute force on uncached forwards: rank, candidate set and argmax of every step."""
    model, prompt, response = search["model"], search["prompt_ids"], search["response_ids"]
    top_k, n_target, skip = 6, 5, set(search["skip_ids"])
    prefix = rap_prefix(
        model, prompt, response, length=8, top_k=top_k, target_tokens=n_target, skip_ids=skip
    )
    assert len(prefix.ids) == len(prefix.ranks) == len(prefix.scores) == 8
    for step, (token, rank, score) in enumerate(zip(prefix.ids, prefix.ranks, prefix.scores)):
        context = prompt + prefix.ids[:step]
        order = torch.argsort(_next_logits(model, context), descending=True).tolist()
        assert order.index(token) == rank < top_k and token not in skip
        candidates = [t for t in order[:top_k] if t not in skip]
        target = target_window(response, step, n_target)
        brute = {c: _target_loglik(model, context + [c], target) for c in candidates}
        assert score == pytest.approx(brute[token], abs=1e-4)
        assert brute[token] >= max(brute.values()) - 1e-4
    assert any(r > 0 for r in prefix.ranks)  # the harm signal overrules the model's top-1


def test_top_1_is_greedy_decoding(search) -> None:
    model, prompt = search["model"], search["prompt_ids"]
    prefix = rap_prefix(model, prompt, search["response_ids"], length=6, top_k=1)
    greedy = []
    for _ in range(6):
        greedy.append(int(torch.argmax(_next_logits(model, prompt + greedy))))
    assert prefix.ids == greedy and prefix.ranks == [0] * 6


def test_shorter_prefixes_are_heads_of_longer_ones_and_the_search_is_deterministic(
    search,
) -> None:
    longest = rap_prefix(**search, length=10, top_k=5)
    assert rap_prefix(**search, length=10, top_k=5) == longest
    for n in (0, 1, 4):
        assert rap_prefix(**search, length=n, top_k=5) == longest.head(n)
    assert rap_prefix(**search, length=10, top_k=5, target_tokens=2) != longest


def test_skipped_tokens_are_never_chosen_and_an_all_skipped_step_ends_the_prefix(
    search, tiny_llama
) -> None:
    free = rap_prefix(search["model"], search["prompt_ids"], search["response_ids"], length=3)
    banned = {free.ids[0]}
    prefix = rap_prefix(
        search["model"], search["prompt_ids"], search["response_ids"], length=3, skip_ids=banned
    )
    assert prefix.ids[0] != free.ids[0]
    top1 = int(torch.argmax(_next_logits(search["model"], search["prompt_ids"])))
    second = rap_prefix(**{**search, "skip_ids": {top1}}, length=1, top_k=2)
    assert second.ranks == [1]  # ranked in the model's own order, skipped tokens included
    everything = range(tiny_llama.config.vocab_size)
    assert rap_prefix(**{**search, "skip_ids": everything}, length=3).ids == []
    for bad in ({"length": -1}, {"length": 2, "top_k": 0}, {"length": 2, "target_tokens": 0}):
        with pytest.raises(ValueError):
            rap_prefix(**search, **bad)


# --- cases and command ----------------------------------------------------------------------


@pytest.fixture
def attack_ctx(isolated_home, tiny_model_dir, split_prompts_file, tiny_judge_dir) -> AttackContext:
    config = AttackConfig(
        "rap", model=str(tiny_model_dir), prompts_file=str(split_prompts_file),
        writer=str(tiny_model_dir), writer_tokens=8, judge=str(tiny_judge_dir), max_tokens=6,
        batch_size=4, out=str(isolated_home.parent / "out"),
    )  # fmt: skip
    return AttackContext(config)


def test_cases_search_each_prompt_once_and_slice(attack_ctx, monkeypatch) -> None:
    calls: list[int] = []
    real = rap_module.rap_prefix

    def spy(*args, **kwargs):
        calls.append(kwargs["length"])
        return real(*args, **kwargs)

    monkeypatch.setattr(rap_module, "rap_prefix", spy)
    cache: dict = {}
    cases = rap_cases(attack_ctx, ks=(2, 5), top_k=4, cache=cache)
    assert calls == [5, 5, 5]  # one search per prompt, to the longest k
    assert [(c.prompt_index, c.cell) for c in cases] == [
        (i, {"k": k}) for i in range(3) for k in (2, 5)
    ]
    for short, long in zip(cases[::2], cases[1::2]):
        assert long.prefill_ids[:2] == short.prefill_ids and len(long.prefill_ids) == 5
        assert short.meta["k_eff"] == 2 and short.meta["ranks"] == long.meta["ranks"][:2]
        assert all(0 <= r < 4 for r in long.meta["ranks"]) and long.prompt_ids is None
    again = rap_cases(attack_ctx, ks=(5, 2), top_k=4, cache=cache)
    assert len(calls) == 3  # read back from the cache
    assert [c.prefill_ids for c in again] == [
        cases[i + d].prefill_ids for i in range(0, 6, 2) for d in (1, 0)
    ]
    rap_cases(attack_ctx, ks=(7,), top_k=4, cache=cache)
    assert calls[3:] == [7, 7, 7]  # a longer k searches again
    with pytest.raises(ValueError):
        rap_cases(attack_ctx, ks=(-1,))


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rap.jsonl").read_text().splitlines()]


def test_cli_rap_end_to_end_and_deterministic(
    isolated_home, tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path
) -> None:
    args = [
        "rap", "--ks", "2,4", "--top-k", "5", "--target-tokens", "4",
        "--model", str(tiny_model_dir), "--prompts", str(split_prompts_file),
        "--judge", str(tiny_judge_dir), "--writer", str(tiny_model_dir), "--writer-tokens", "8",
        "--out", str(tmp_path), "--max-tokens", "6", "--batch-size", "4",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path)
    assert [r["cell"]["k"] for r in rows] == [2, 4] * 3
    assert all(0 < r["n_new_tokens"] <= 6 and r["triggered"] is None for r in rows)
    for short, long in zip(rows[::2], rows[1::2]):
        assert long["prefill"].startswith(short["prefill"]) and len(long["meta"]["ranks"]) == 4
    summary = json.loads((tmp_path / "rap_summary.json").read_text())
    assert [c["label"] for c in summary["cells"]] == ["k=2", "k=4"]
    assert summary["config"]["params"] == {"ks": [2, 4], "top_k": 5, "target_tokens": 4}
    assert (tmp_path / "rap.png").stat().st_size > 0
    assert runner.invoke(app, args).exit_code == 0
    assert _rows(tmp_path) == rows  # deterministic with the seed
    assert runner.invoke(app, [*args, "--top-k", "0"]).exit_code != 0
    assert runner.invoke(app, [*args, "--ks", "x"]).exit_code != 0
