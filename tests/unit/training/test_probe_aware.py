"""Probe-aware (white-box) span optimisation on tiny random models."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.helpers import fitted_probe
from training.attacks.cli import app
from training.attacks.harness import AttackConfig, AttackContext
from training.attacks.probe_aware import (
    DEFAULT_STEPS,
    allowed_tokens,
    hook_states,
    optimise_span,
    probe_aware_cases,
)
from training.common.insertion import span_ids
from training.probes.states import token_states

runner = CliRunner()

PREFIX = [1, 7, 8, 9, 10, 2, 11, 12]  # <|user|> ... <|end|>-like ids, then a refusal start
SPAN = [20, 21, 22, 23, 24, 25]
TARGET = [30, 31, 32, 33, 34]


def _search(model, probe, **kw):
    kw = {"steps": 6, "candidates": 8, "top_k": 16, "lam": 1.0, "seed": 0} | kw
    return optimise_span(model, probe, PREFIX, SPAN, TARGET, **kw)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.-1.hook_resid_post"])
def test_hook_states_are_the_states_the_probe_reads(tiny_llama, hook: str) -> None:
    ids = PREFIX + SPAN + TARGET
    _, states = hook_states(tiny_llama, hook, input_ids=torch.tensor([ids]))
    (expected,) = token_states(tiny_llama, [(PREFIX, SPAN + TARGET)], [hook], progress=False)[hook]
    np.testing.assert_allclose(
        states[0, len(PREFIX) :].detach().numpy(), expected, rtol=1e-5, atol=1e-5
    )
    if hook.startswith("blocks.-1"):  # why not HF hidden_states[-1]: it is after the final norm
        hf = tiny_llama(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
        assert not np.allclose(hf[0, len(PREFIX) :].detach().numpy(), expected, atol=1e-3)


def test_traced_terms_are_the_probes_own_scores(tiny_llama) -> None:
    probe = fitted_probe(32)
    search = _search(tiny_llama, probe)
    for snap in (search.trace[0], search.trace[-1]):
        response = list(snap.span_ids) + TARGET
        (states,) = token_states(
            tiny_llama, [(PREFIX, response)], [probe.hook_name], progress=False
        )[probe.hook_name]
        assert snap.probe_logit == pytest.approx(probe.decision_function(states).mean(), abs=1e-4)
        logits = tiny_llama(torch.tensor([PREFIX + response])).logits[0].detach()
        logp = torch.log_softmax(logits, -1)
        start = len(PREFIX) + len(SPAN) - 1
        nll = -logp[torch.arange(start, start + len(TARGET)), torch.tensor(TARGET)].mean()
        assert snap.nll == pytest.approx(nll.item(), abs=1e-4)
        assert snap.loss == pytest.approx(snap.nll + snap.probe_logit, abs=1e-4)


def test_loss_never_rises_and_spans_keep_their_length(tiny_llama, tiny_tokenizer) -> None:
    allowed = allowed_tokens(tiny_tokenizer, tiny_llama.get_input_embeddings().weight.shape[0])
    search = _search(tiny_llama, fitted_probe(32), steps=8, allowed=allowed)
    losses = [s.loss for s in search.trace]
    assert len(search.trace) == 9 and search.evaluations == 8 * 8
    assert all(b <= a for a, b in itertools.pairwise(losses))
    assert losses[-1] < losses[0]  # 64 gradient-guided swaps find something better
    assert search.trace[0].span_ids == tuple(SPAN)
    assert all(len(s.span_ids) == len(SPAN) for s in search.trace)
    special = set(tiny_tokenizer.all_special_ids)
    assert all(allowed[t] and t not in special for s in search.trace for t in s.span_ids)
    walls = [s.wall_s for s in search.trace]
    assert walls == sorted(walls)
    # one random swap a step is often worse: the search must keep its best-so-far
    single = _search(tiny_llama, fitted_probe(32), steps=12, candidates=1, top_k=64)
    losses = [s.loss for s in single.trace]
    assert all(b <= a for a, b in itertools.pairwise(losses))


def test_a_large_lambda_drives_the_probe_logit_down(tiny_llama) -> None:
    probe = fitted_probe(32)
    search = _search(tiny_llama, probe, lam=100.0, steps=10)
    logits = [s.probe_logit for s in search.trace]
    assert logits[-1] < logits[0]
    no_probe = _search(tiny_llama, probe, lam=0.0, steps=10)
    assert logits[-1] < no_probe.trace[-1].probe_logit  # the probe term is what moved it


def test_the_search_is_deterministic_with_a_seed(tiny_llama) -> None:
    probe = fitted_probe(32)
    a, b = _search(tiny_llama, probe), _search(tiny_llama, probe)
    assert [(s.span_ids, s.loss) for s in a.trace] == [(s.span_ids, s.loss) for s in b.trace]
    others = [_search(tiny_llama, probe, seed=k).trace for k in (1, 2, 3)]
    assert any([s.span_ids for s in t] != [s.span_ids for s in a.trace] for t in others)


def test_bad_settings_are_rejected(tiny_llama) -> None:
    probe = fitted_probe(32)
    with pytest.raises(ValueError):
        optimise_span(tiny_llama, probe, PREFIX, [], TARGET, steps=1)
    with pytest.raises(ValueError):
        optimise_span(tiny_llama, probe, PREFIX, SPAN, TARGET, steps=1, candidates=0)


# --- cases and CLI end to end ---------------------------------------------------------------


@pytest.fixture
def attack_ctx(isolated_home, tiny_model_dir, split_prompts_file, tiny_judge_dir) -> AttackContext:
    config = AttackConfig(
        "probe_aware", model=str(tiny_model_dir), prompts_file=str(split_prompts_file),
        writer=str(tiny_model_dir), writer_tokens=12, judge=str(tiny_judge_dir), max_tokens=6,
        batch_size=4, out=str(isolated_home.parent / "out"),
    )  # fmt: skip
    return AttackContext(config)


def test_cases_snapshot_one_search_per_prompt_at_each_budget(attack_ctx) -> None:
    tok, probe = attack_ctx.lm.tokenizer, fitted_probe(32)
    kw = {"candidates": 4, "top_k": 8, "length": 4, "target_tokens": 4, "position": 4}
    cases = probe_aware_cases(attack_ctx, probe, (0, 2, 3), **kw)
    assert [c.cell["steps"] for c in cases] == [0, 2, 3] * 3
    for k in range(0, len(cases), 3):
        base, *later = cases[k : k + 3]
        at = base.meta["p_eff"]
        refusal = base.prefill_ids[:at]
        span = span_ids(tok, attack_ctx.responses[base.prompt_index].text, 4, after_text=at > 0)
        assert base.prefill_ids == refusal + span  # budget 0: the insertion attack's span
        assert at >= 4  # the first word start at or after p = 4
        for c in [base, *later]:
            assert c.prefill_ids[:at] == refusal and len(c.prefill_ids) == at + 4
            assert c.meta["evaluations"] == c.cell["steps"] * 4 and c.meta["candidates"] == 4
            assert isinstance(c.meta["probe_logit"], float) and c.meta["wall_time_s"] >= 0
        losses = [c.meta["loss"] for c in (base, *later)]
        assert losses == sorted(losses, reverse=True)
    curve = attack_ctx.config.params["budget_curve"]
    assert [p["steps"] for p in curve] == [0, 2, 3] and all(p["n"] == 3 for p in curve)
    again = probe_aware_cases(attack_ctx, probe, (0, 2, 3), **kw)
    assert [c.prefill_ids for c in again] == [c.prefill_ids for c in cases]
    with pytest.raises(ValueError):
        probe_aware_cases(attack_ctx, probe, (), **kw)
    with pytest.raises(ValueError):
        probe_aware_cases(attack_ctx, probe, (0,), init="zeros")


def _common(model: Path, prompts: Path, judge: Path, out: Path) -> list[str]:
    return [
        "--model", str(model), "--writer", str(model), "--prompts", str(prompts),
        "--judge", str(judge), "--out", str(out), "--max-tokens", "4", "--batch-size", "4",
        "--writer-tokens", "10",
    ]  # fmt: skip


def test_cli_probe_aware_end_to_end(
    isolated_home, tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path
) -> None:
    probe_dir = fitted_probe(32).save(tmp_path / "probe")
    common = _common(tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path / "out")
    budget = ["--steps", "0,2", "--candidates", "4", "--top-k", "8", "--length", "4"]
    args = ["probe-aware", "--probe", str(probe_dir), *budget, "--no-strict-probe", *common]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    summary = json.loads((out / "probe_aware_summary.json").read_text())
    assert (out / "probe_aware.png").stat().st_size > 0
    assert [c["label"] for c in summary["cells"]] == ["steps=0", "steps=2"]
    assert all(c["trigger_rate"] is not None for c in summary["cells"])  # guarded by --probe
    assert summary["config"]["probe"] == str(probe_dir)
    assert [p["steps"] for p in summary["config"]["params"]["budget_curve"]] == [0, 2]
    rows = [json.loads(line) for line in (out / "probe_aware.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 2
    assert all(r["meta"]["evaluations"] == r["cell"]["steps"] * 4 for r in rows)

    result = runner.invoke(app, [*args, "--no-guard"])
    assert result.exit_code == 0, result.output
    unguarded = json.loads((out / "probe_aware_summary.json").read_text())
    assert unguarded["config"]["probe"] is None
    assert unguarded["config"]["params"]["attacker_probe"] == str(probe_dir)
    assert all(c["trigger_rate"] is None for c in unguarded["cells"])
    again = [json.loads(line) for line in (out / "probe_aware.jsonl").read_text().splitlines()]
    assert [r["prefill"] for r in again] == [r["prefill"] for r in rows]  # same seeded attack

    assert runner.invoke(app, ["probe-aware", *budget, *common]).exit_code != 0  # --probe needed


def test_bench_family_is_opt_in_and_needs_the_guard_probe(attack_ctx) -> None:
    from benchmarks.bench.cells import ATTACKS, attack_cells

    assert "probe_aware" not in ATTACKS
    (cell,) = attack_cells(["probe_aware"], ks=[1], positions=[0], lengths=[4])
    assert cell.name == "probe_aware" and cell.group_by == (("steps",),)
    assert attack_ctx.config.probe is None
    with pytest.raises(ValueError, match="probe"):
        cell.build(attack_ctx)


def test_bench_family_runs_the_budgets_it_is_given(attack_ctx, tmp_path, monkeypatch) -> None:
    from benchmarks.bench import cells

    searched = []
    monkeypatch.setattr(
        cells, "probe_aware_cases", lambda ctx, probe, steps: searched.append(list(steps)) or []
    )
    attack_ctx.config.probe = str(fitted_probe(32).save(tmp_path / "probe"))
    for given, expected in (({}, list(DEFAULT_STEPS)), ({"probe_aware_steps": [0, 5]}, [0, 5])):
        (cell,) = cells.attack_cells(["probe_aware"], ks=[1], positions=[0], lengths=[4], **given)
        cell.build(attack_ctx)
        assert searched.pop() == expected
