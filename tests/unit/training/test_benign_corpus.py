"""The benign answer corpus of probe v2: plan (splits, held-out source, samplings), resumable
cache, model-change refusal, endpoint generation, trajectories and the CLI."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from guard import GuardedEngine, SamplingParams, encode_chat, load_model
from guard.errors import ConfigError
from guard.hooks import hook_name
from tests.conftest import build_tiny_model
from training.cli import app
from training.common.benign import benign_train_prompts
from training.data.splits import similar_pairs
from training.probes.corpus import (
    ANSWERS_FILE,
    SPLITS,
    SUMMARY_FILE,
    BenignCorpusConfig,
    Sampling,
    build_corpus,
    corpus_trajectories,
    load_corpus,
    load_corpus_trajectories,
    plan_corpus,
)
from training.probes.states import token_states
from training.probes.trajectories import SAFE

# small registry sources (their whole-source splits take well under a second)
SOURCES = ("self_instruct", "xstest_safe", "coconot_contrast")
_HTTP_CLIENT = httpx.Client
PLAN = BenignCorpusConfig(sources=SOURCES, n_per_source=60, held_out_source="self_instruct")


def _prompt_splits(config: BenignCorpusConfig) -> dict[tuple[str, str], tuple[str, bool]]:
    return {(a.source, a.prompt): (a.split, a.held_out) for a in plan_corpus(config).answers}


def _tiny(tmp_path: Path, model_dir: Path, **overrides) -> BenignCorpusConfig:
    values = dict(
        model=str(model_dir),
        out=str(tmp_path / "corpus"),
        sources=("xstest_safe", "coconot_contrast"),
        n_per_source=3,
        max_tokens=4,
        held_out_source="coconot_contrast",
        samplings=(Sampling("greedy"), Sampling("sampled", 0.7, 0.5)),
        batch_size=4,
    )
    return BenignCorpusConfig(**values | overrides)


def _lines(config: BenignCorpusConfig) -> list[str]:
    return (Path(config.out) / ANSWERS_FILE).read_text(encoding="utf-8").splitlines()


def test_plan_is_deterministic_and_independent_of_model_and_max_tokens() -> None:
    first = _prompt_splits(PLAN)
    assert first == _prompt_splits(PLAN)
    assert first == _prompt_splits(replace(PLAN, model="another-model", max_tokens=7))
    # the seed decides: another seed gives other prompts or splits
    assert first != _prompt_splits(replace(PLAN, seed=1))


def test_splits_are_disjoint_and_the_held_out_source_is_eval_only() -> None:
    plan = plan_corpus(replace(PLAN, n_per_source=1000))  # every prompt of the three sources
    sides = defaultdict(set)
    for a in plan.answers:
        sides[a.prompt].add((a.split, a.held_out))
        assert a.held_out == (a.source == "self_instruct")
        assert not a.held_out or a.split == "eval"
    assert all(len(s) == 1 for s in sides.values())  # greedy and sampled on one side
    greedy = [a for a in plan.answers if a.sampling == "greedy"]
    others = Counter(a.split for a in greedy if not a.held_out)
    n = sum(others.values())
    for split, fraction in zip(SPLITS, PLAN.fractions):
        assert abs(others[split] / n - fraction) < 0.05
    # no near-duplicate pair across sides, whichever source each prompt comes from
    prompts = [a.prompt for a in greedy]
    side = [(a.split, a.held_out) for a in greedy]
    assert all(side[i] == side[j] for i, j in similar_pairs(prompts))
    assert plan.dropped_near_duplicates > 0  # e.g. CoCoNot vs XSTest "break into ..."
    assert len(greedy) == sum(plan.prompts_per_source.values())


def test_counts_grow_by_adding_prompts_and_sources_are_independent() -> None:
    small, large = _prompt_splits(replace(PLAN, n_per_source=20)), _prompt_splits(PLAN)
    assert small.items() <= large.items()  # same prompts, same splits, more of them
    assert len(large) > len(small)
    alone = _prompt_splits(replace(PLAN, sources=("xstest_safe",), held_out_source=None))
    with_others = {k: v for k, v in large.items() if k[0] == "xstest_safe"}
    assert with_others.items() <= alone.items()  # other sources change nothing (bar drops)
    assert len(alone) - len(with_others) <= 2


def test_samplings_fraction_and_seeds() -> None:
    answers = plan_corpus(replace(PLAN, n_per_source=1000)).answers
    greedy = [a for a in answers if a.sampling == "greedy"]
    sampled = [a for a in answers if a.sampling == "sampled"]
    assert all(a.seed is None and a.temperature == 0 for a in greedy)
    assert all(a.seed is not None and a.temperature == 0.7 for a in sampled)
    assert 0.15 < len(sampled) / len(greedy) < 0.25
    assert len({a.seed for a in sampled}) == len(sampled)
    assert {a.prompt for a in sampled} <= {a.prompt for a in greedy}
    none = replace(PLAN, samplings=(Sampling("greedy"), Sampling("sampled", 0.7, 0.0)))
    assert {a.sampling for a in plan_corpus(none).answers} == {"greedy"}


def test_invalid_configs_are_refused() -> None:
    with pytest.raises(ConfigError):
        BenignCorpusConfig(sources=("nope",))
    with pytest.raises(ConfigError):
        BenignCorpusConfig(sources=SOURCES, held_out_source="gsm8k")
    with pytest.raises(ConfigError):
        BenignCorpusConfig(fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError):
        BenignCorpusConfig(samplings=(Sampling("greedy"), Sampling("greedy", 0.7)))


def test_build_resumes_and_converts_to_trajectories(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _tiny(tmp_path, tiny_model_dir)
    planned = len(plan_corpus(config).answers)
    assert build_corpus(config, limit=2, progress=False)["generated"] == 2
    assert len(_lines(config)) == 2
    with (Path(config.out) / ANSWERS_FILE).open("a", encoding="utf-8") as f:
        f.write('{"key": "cut short by a kill')  # a torn last line is skipped, then repaired
    summary = build_corpus(config, progress=False)
    assert summary["generated"] == planned - 2 and summary["answers"] == planned
    assert summary["missing"] == 0 and summary["all"]["reached_max_tokens"] > 0
    again = build_corpus(config, progress=False)
    assert again["generated"] == 0 and len(_lines(config)) == planned + 1  # + the torn line
    assert json.loads((Path(config.out) / SUMMARY_FILE).read_text())["answers"] == planned

    grouped = load_corpus(config.out)  # re-planned from OUT/config.json
    assert set(grouped) == set(SPLITS)
    answers = [a for by_source in grouped.values() for v in by_source.values() for a in v]
    assert len(answers) == planned
    assert all(a.held_out for a in grouped["eval"]["coconot_contrast"])
    assert not any(grouped[s]["coconot_contrast"] for s in ("train", "calibration"))
    assert all(0 < a.n_tokens == len(a.response_ids) <= 4 for a in answers)

    lm = load_model(str(tiny_model_dir))
    trajectories = corpus_trajectories(answers, lm)
    assert len(trajectories) == len(answers)
    for a, t in zip(answers, trajectories):
        prompt = encode_chat(lm.tokenizer, [{"role": "user", "content": a.prompt}])
        assert t.prompt_ids == prompt.prompt_ids and t.response_ids == list(a.response_ids)
        assert t.labels == [SAFE] * len(a.response_ids) and t.recipe == "benign-own"
        assert t.meta["split"] == a.split and t.meta["source"] == a.source
        assert t.meta["held_out"] == a.held_out and t.meta["sampling"] == a.sampling
        assert t.meta["alignment_pool"] is False  # evaluation-only sources: never trained on
    trained_on = benign_train_prompts("self_instruct")[0].prompt  # what an SFT mix may use
    (pooled,) = corpus_trajectories(
        [dataclasses.replace(answers[0], source="self_instruct", prompt=trained_on)], lm
    )
    assert pooled.meta["alignment_pool"] is True
    by_split = load_corpus_trajectories(config.out, lm)
    assert {k: len(v) for k, v in by_split.items()} == {
        k: sum(len(v) for v in grouped[k].values()) for k in SPLITS
    }
    assert [t.meta["source"] for t in by_split["eval"][:2]] == ["xstest_safe", "coconot_contrast"]
    assert all(
        t.meta["held_out"] == (t.meta["source"] == "coconot_contrast") for t in by_split["eval"]
    )
    name = hook_name("resid_post", layer=1)
    states = token_states(lm.model, [(t.prompt_ids, t.response_ids) for t in trajectories], [name])
    assert [s.shape[0] for s in states[name]] == [len(t.response_ids) for t in trajectories]


def test_greedy_rows_are_the_engines_answers(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = _tiny(tmp_path, tiny_model_dir, samplings=(Sampling("greedy"),))
    build_corpus(config, progress=False)
    lm = load_model(str(tiny_model_dir))
    engine = GuardedEngine(lm.model, lm.tokenizer)
    for line in _lines(config):
        row = json.loads(line)
        prompt = encode_chat(lm.tokenizer, [{"role": "user", "content": row["prompt"]}])
        (result,) = engine.generate([prompt.prompt_ids], SamplingParams(max_tokens=4))
        assert row["response_ids"] == list(result.token_ids) and row["text"] == result.text
        assert row["finish_reason"] == result.finish_reason


def test_a_changed_model_is_refused(tmp_path: Path, tiny_model_dir: Path, tiny_tokenizer) -> None:
    config = _tiny(tmp_path, tiny_model_dir)
    build_corpus(config, limit=2, progress=False)
    other = tmp_path / "retrained"
    build_tiny_model(
        "llama", len(tiny_tokenizer), seed=1, max_position_embeddings=4096
    ).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match="another generator"):
        build_corpus(replace(config, model=str(other)), progress=False)
    assert len(_lines(config)) == 2


def _fake_vllm(
    monkeypatch: pytest.MonkeyPatch, eos: int, owner: str = "vllm", fail_at: int | None = None
) -> list[dict]:
    """Route the endpoint's HTTP client to a vLLM look-alike; returns the bodies it got.

    With ``fail_at``, the completion request of that number (1-based) gets a 500."""
    bodies: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "served", "owned_by": owner}]})
        body = json.loads(request.content)
        bodies.append(body)
        if len(bodies) == fail_at:
            return httpx.Response(500, text="engine died")
        ids = [7, 8, eos][: body["max_tokens"]]
        choice = {"text": "ab", "token_ids": ids, "finish_reason": "stop"}
        return httpx.Response(200, json={"choices": [choice]})

    monkeypatch.setattr(
        httpx, "Client", lambda **kw: _HTTP_CLIENT(transport=httpx.MockTransport(handler), **kw)
    )
    return bodies


def test_endpoint_answers_are_cached_with_its_identity(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = load_model(str(tiny_model_dir))
    bodies = _fake_vllm(monkeypatch, lm.tokenizer.eos_token_id)
    config = _tiny(tmp_path, tiny_model_dir, url="http://fake:8011/v1", concurrency=3)
    summary = build_corpus(config, progress=False)
    planned = plan_corpus(config).answers
    assert summary["answers"] == len(planned) == len(bodies)
    assert all(b["return_token_ids"] and b["max_tokens"] == 4 for b in bodies)
    assert sorted(str(b["seed"]) for b in bodies) == sorted(str(a.seed) for a in planned)
    rows = [json.loads(line) for line in _lines(config)]
    assert all(r["response_ids"] == [7, 8] and r["n_tokens"] == 2 for r in rows)  # EOS dropped
    assert {r["generator"]["kind"] for r in rows} == {"endpoint"}
    assert {r["generator"]["model_id"] for r in rows} == {"served"}
    # the same server on another port is the same generator; a local run is not
    assert build_corpus(replace(config, url="http://fake:9000"), progress=False)["generated"] == 0
    with pytest.raises(ConfigError, match="another generator"):
        build_corpus(replace(config, url=None), progress=False)


def test_a_failed_run_keeps_what_arrived(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_vllm(monkeypatch, 0, fail_at=4)
    config = _tiny(tmp_path, tiny_model_dir, url="http://fake:8011", concurrency=1)
    with pytest.raises(RuntimeError, match="500"):
        build_corpus(config, progress=False)
    assert len(_lines(config)) == 3  # fewer than a flush: written on the way out
    _fake_vllm(monkeypatch, 0)
    summary = build_corpus(config, progress=False)
    assert summary["generated"] == summary["planned"] - 3 and summary["missing"] == 0


def test_a_trajguard_proxy_is_refused(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bodies = _fake_vllm(monkeypatch, 0, owner="trajguard")
    config = _tiny(tmp_path, tiny_model_dir, url="http://proxy:8000")
    with pytest.raises(ConfigError, match="trajguard proxy"):
        build_corpus(config, progress=False)
    assert not bodies


def test_cli_smoke_run(tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "cli"
    args = ["benign-corpus", "--model", str(tiny_model_dir), "--out", str(out)]
    args += ["--n-per-source", "2", "--max-tokens", "3", "--limit", "3", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "benign corpus answers: 3"
    config = json.loads((out / "config.json").read_text())
    assert config["held_out_source"] == "gpteacher_code" and config["max_tokens"] == 3
    bad = CliRunner().invoke(app, [*args[:5], "--held-out-source", "nope"])
    assert bad.exit_code == 2 and "held-out source" in bad.output


def test_default_corpus_meets_the_issue_sizes() -> None:
    """>= 2,500 prompts, >= 1,000 eval answers, every source present, one held out."""
    plan = plan_corpus(BenignCorpusConfig())
    assert sum(plan.prompts_per_source.values()) >= 2500
    assert sum(a.split == "eval" for a in plan.answers) >= 1000
    assert all(n > 0 for n in plan.prompts_per_source.values())
    held = {a.source for a in plan.answers if a.held_out}
    assert held == {"gpteacher_code"}
    assert np.mean([a.sampling == "greedy" for a in plan.answers]) > 0.8
