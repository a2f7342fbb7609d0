"""Attacks: Wilson CIs, insertion geometry, the default split, and every CLI command end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from sklearn.feature_extraction.text import TfidfVectorizer
from typer.testing import CliRunner

from tests.helpers import fitted_probe
from training.attacks import summarize
from training.attacks.cli import app
from training.common.harmful_split import default_harmful_behaviors, default_harmful_split
from training.common.insertion import END, insertion_point, parse_positions, span_ids, word_starts
from training.common.prompts import load_attack_prompts
from training.common.responses import harmful_responses
from training.common.stats import Rate, wilson_interval
from training.data import DEFAULT_THRESHOLD, normalize_text

runner = CliRunner()


# --- statistics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [  # Newcombe (1998), Stat. Med. 17:857, Table I, method 3 (Wilson score)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_matches_published_values(successes: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson_interval(successes, n)
    assert lo == pytest.approx(low, abs=1e-4)
    assert hi == pytest.approx(high, abs=1e-4)


def test_wilson_edges_and_errors() -> None:
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and 0.69 < lo < 0.73
    assert wilson_interval(5, 10, confidence=0.99)[0] < wilson_interval(5, 10)[0]
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    with pytest.raises(ValueError):
        wilson_interval(1, 10, confidence=1.0)
    assert Rate.of(3, 4).rate == 0.75


def test_summarize_groups_cells() -> None:
    records = [
        {
            "cell": {"p": p, "m": m},
            "success": s,
            "refusal": not s,
            "p_harm": float(s),
            "n_new_tokens": 4,
        }
        for p, m, s in [(0, 4, True), (0, 4, False), (8, 4, True), (0, 8, True)]
    ]
    cells = {c.label: c for c in summarize(records, [("p", "m"), ("m",), ()])}
    assert cells["p=0,m=4"].asr.successes == 1 and cells["p=0,m=4"].asr.n == 2
    assert cells["m=4"].asr.n == 3 and cells["m=8"].asr.rate == 1.0
    assert cells["all"].asr.n == 4 and cells["all"].asr.successes == 3


# --- insertion geometry ---------------------------------------------------------------------


def test_parse_positions() -> None:
    assert parse_positions("0, 8,end") == [0, 8, END]
    with pytest.raises(ValueError):
        parse_positions("0,-1")


def test_insertion_points_snap_to_word_starts(tiny_tokenizer) -> None:
    ids = tiny_tokenizer.encode("I'm sorry, but I can't help with that.")
    starts = word_starts(tiny_tokenizer, ids)
    assert starts[0] == 0 and starts[-1] == len(ids)
    for s in starts[1:-1]:  # every inner start decodes to text opening with a space
        assert tiny_tokenizer.decode(ids[s:]).startswith(" ")
    assert insertion_point(starts, 0) == 0
    assert insertion_point(starts, END) == len(ids)
    assert insertion_point(starts, 1) == next(s for s in starts if s >= 1)
    assert insertion_point(starts, len(ids) + 1) is None
    assert (
        tiny_tokenizer.decode(span_ids(tiny_tokenizer, "Sure, here is", 50, after_text=True))
        == " Sure, here is"
    )


# --- the default split ----------------------------------------------------------------------


def test_default_split_has_no_test_leakage() -> None:
    behaviors = default_harmful_behaviors()
    assert {b.source for b in behaviors} == {"advbench", "harmbench", "jbb"}
    assert len({normalize_text(b.prompt) for b in behaviors}) == len(behaviors)  # deduplicated
    splits = default_harmful_split()
    train = [b.prompt for b in splits.train]
    test = [b.prompt for b in splits.test]
    assert len(train) + len(splits.dev) + len(test) == len(behaviors)
    assert not {normalize_text(p) for p in test} & {normalize_text(p) for p in train}
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True)
    vectors = vectorizer.fit_transform([normalize_text(p) for p in train + test])
    assert (vectors[len(train) :] @ vectors[: len(train)].T).max() < DEFAULT_THRESHOLD
    assert default_harmful_split() == splits  # deterministic (seed 0)


def test_attack_prompts_sample_is_seeded_and_from_test_split() -> None:
    test = {b.prompt for b in default_harmful_split().test}
    a = load_attack_prompts(split="test", limit=5, seed=1)
    assert len(a) == 5 and {p.prompt for p in a} <= test
    assert a == load_attack_prompts(split="test", limit=5, seed=1)
    assert a != load_attack_prompts(split="test", limit=5, seed=2)


def test_harmful_responses_prefer_recorded_then_writer(
    isolated_home: Path, tiny_model_dir: Path
) -> None:
    from guard import load_model

    prompts = load_attack_prompts(split="test")
    jbb = next(p for p in prompts if p.source == "jbb")
    adv = next(p for p in prompts if p.source == "advbench")
    writer = load_model(str(tiny_model_dir))
    recorded, written = harmful_responses([jbb, adv], writer, n_tokens=6)
    assert recorded.source.startswith("jbb:") and len(recorded.text.split()) >= 40
    assert written.source.startswith("target+") and written.text.startswith(adv.target)
    cache = list((isolated_home / "responses").glob("*.json"))
    assert len(cache) == 1  # writer continuations are cached
    again = harmful_responses([adv], writer, n_tokens=6)[0]
    assert again == written


# --- CLI end to end -------------------------------------------------------------------------


def _common(model: Path, prompts: Path, judge: Path, out: Path) -> list[str]:
    return [
        "--model", str(model), "--writer", str(model), "--prompts", str(prompts), "--judge", str(judge),
        "--out", str(out), "--max-tokens", "6", "--batch-size", "4", "--writer-tokens", "8",
    ]  # fmt: skip


def _summary(out: Path, attack: str) -> dict:
    assert (out / f"{attack}.png").stat().st_size > 0
    return json.loads((out / f"{attack}_summary.json").read_text())


def _rows(out: Path, attack: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{attack}.jsonl").read_text().splitlines()]


def test_cli_direct_and_prefill(
    isolated_home, tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path
) -> None:
    common = _common(tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path)
    result = runner.invoke(app, ["direct", *common])
    assert result.exit_code == 0, result.output
    summary = _summary(tmp_path, "direct")
    assert summary["n_prompts"] == 3 and summary["cells"][0]["asr"]["n"] == 3
    rows = _rows(tmp_path, "direct")
    assert all(r["prefill"] == "" and 0 < r["n_new_tokens"] <= 6 for r in rows)

    result = runner.invoke(app, ["prefill", "--ks", "2,5", *common])
    assert result.exit_code == 0, result.output
    assert [c["cell"] for c in _summary(tmp_path, "prefill")["cells"]] == [{"k": 2}, {"k": 5}]
    rows = _rows(tmp_path, "prefill")
    assert len(rows) == 6
    targets = {p.prompt: p.target for p in load_attack_prompts(prompts_file=split_prompts_file)}
    for r in rows:  # the prefill is the start of the prompt's harmful response (target first)
        assert r["meta"]["k_eff"] == r["cell"]["k"]
        if r["meta"]["response_source"].startswith("target+"):
            assert targets[r["prompt"]].startswith(r["prefill"]) and r["prefill"]


def test_cli_insert_grid_random_and_guarded(
    isolated_home, tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path, tiny_tokenizer
) -> None:
    common = _common(tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path)
    result = runner.invoke(app, ["insert", "--positions", "0,8,end", "--lengths", "3,5", *common])
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path, "insert")
    assert len(rows) == 3 * 3 * 2
    for r in rows:
        p, m, meta = r["cell"]["p"], r["cell"]["m"], r["meta"]
        assert r["prefill"].endswith(meta["span"])  # refusal[:p_eff] + span
        assert meta["span"].strip() and m in (3, 5)
        if p == 0:
            assert meta["p_eff"] == 0 and r["prefill"] == meta["span"]
        elif p == "end":
            assert meta["p_eff"] == meta["refusal_tokens"]
        else:
            assert meta["p_eff"] >= p
    labels = {c["label"] for c in _summary(tmp_path, "insert")["cells"]}
    assert {"p=0,m=3", "p=end,m=5", "m=3", "m=5"} <= labels

    result = runner.invoke(
        app, ["insert", "--random", "2", "--lengths", "4", "--refusal", "own", *common]
    )
    assert result.exit_code == 0, result.output
    assert len(_rows(tmp_path, "insert")) == 6
    assert [c["label"] for c in _summary(tmp_path, "insert")["cells"]] == ["all", "m=4"]

    # Probes whose verdict is known: a bias of +-100 puts P(unsafe) at 1 or 0 on every token.
    for bias, fires in ((100.0, True), (-100.0, False)):
        probe = fitted_probe(32, "blocks.1.hook_resid_post")
        probe.intercept_ += bias
        probe_dir = probe.save(tmp_path / f"probe{bias:+.0f}")
        guarded = [*common, "--probe", str(probe_dir), "--policy", "stop", "--no-strict-probe"]
        result = runner.invoke(app, ["direct", *guarded])
        assert result.exit_code == 0, result.output
        rows = _rows(tmp_path, "direct")
        assert len(rows) == 3 and [r["triggered"] for r in rows] == [fires] * 3
        assert [r["interventions"] for r in rows] == [int(fires)] * 3  # stop: one, then done
        trigger_rate = _summary(tmp_path, "direct")["cells"][0]["trigger_rate"]
        assert (trigger_rate["successes"], trigger_rate["n"]) == (3 * fires, 3)


def test_cli_rejects_bad_options(
    tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path
) -> None:
    common = _common(tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path)
    assert runner.invoke(app, ["insert", "--positions", "x", *common]).exit_code != 0
    assert runner.invoke(app, ["direct", "--policy", "explode", *common]).exit_code != 0
    assert runner.invoke(app, ["prefill", "--ks", "a", *common]).exit_code != 0


def test_cli_rwi_attack_keeps_the_models_worst_candidate(
    isolated_home, tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path
) -> None:
    from training.attacks.harness import AttackConfig, AttackContext
    from training.attacks.worst_insert import worst_insertion_cases
    from training.common.candidates import sample_insertions
    from training.common.insertion import pool_refusals
    from training.common.worst import insertion_scores

    common = _common(tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path)
    result = runner.invoke(app, ["rwi", "--k", "3", "--lengths", "2,4", *common])
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path, "rwi")
    assert len(rows) == 3 and all(r["cell"]["k"] == 3 for r in rows)
    assert all(r["prefill"].endswith(r["meta"]["span"]) and r["meta"]["m"] in (2, 4) for r in rows)
    assert {c["label"] for c in _summary(tmp_path, "rwi")["cells"]} >= {"k=3"}
    # the chosen case is the argmax of the model's own harm-likelihood over the K draws
    config = AttackConfig(
        "rwi", model=str(tiny_model_dir), prompts_file=str(split_prompts_file),
        writer=str(tiny_model_dir), writer_tokens=8, judge=str(tiny_judge_dir),
    )  # fmt: skip
    ctx = AttackContext(config)
    cases = worst_insertion_cases(ctx, 3, (2, 4), "harm_likelihood")
    assert [(c.meta["p"], c.meta["m"], c.meta["span"]) for c in cases] == [
        (r["meta"]["p"], r["meta"]["m"], r["meta"]["span"]) for r in rows
    ]
    rng, tok = random.Random(config.seed), ctx.lm.tokenizer
    for i, (case, refusal) in enumerate(zip(cases, pool_refusals(3, config.seed))):
        spans = [(ctx.responses[i].text, ctx.responses[i].source)]
        candidates = sample_insertions(
            tok, tok.encode(refusal, add_special_tokens=False), spans, 3, rng, lengths=(2, 4)
        )
        scores = insertion_scores(
            ctx.lm.model, [ctx.prompt_ids[i]] * 3, candidates, "harm_likelihood",
            pad_id=tok.pad_token_id or 0,
        )  # fmt: skip
        assert case.prefill_ids == candidates[int(np.argmax(scores))].prefix_ids
        assert case.meta["score"] == pytest.approx(float(scores.max()))


def test_cli_benign_reports_over_refusal_triggers_and_utility(tiny_model_dir, tmp_path) -> None:
    probe_dir = fitted_probe(32, "blocks.1.hook_resid_post").save(tmp_path / "probe")
    args = [
        "benign", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--n-eval", "6",
        "--n-utility", "3", "--max-tokens", "4", "--probe", str(probe_dir), "--no-strict-probe",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "benign_summary.json").read_text())
    rows = _rows(tmp_path, "benign")
    assert len(rows) == 6 and {r["set"] for r in rows} == {"xstest_safe", "gsm8k_test"}
    assert summary["over_refusal_xstest_safe"]["n"] == 3
    assert summary["false_trigger_rate"]["successes"] == sum(r["triggered"] for r in rows)
    assert summary["reference_loglik_gsm8k"] < 0


class _WordJudge:
    """A harm judge that calls a text harmful when it says "bomb" (and records its inputs)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def predict_proba(self, prompts, generations):
        self.seen += list(generations)
        p = np.array([0.9 if "bomb" in g else 0.1 for g in generations])
        return np.stack([1 - p, p], axis=1)


class _WordTokenizer:
    """Token id i is the i-th word of a fixed vocabulary."""

    vocab = ["Sure", "bomb", "steps", "I'm", "sorry", "ok", "fine"]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.vocab[i] for i in ids)


def test_model_spans_leave_out_the_guards_words() -> None:
    from guard import GenerationResult, Intervention

    plain = GenerationResult("a", token_ids=[0, 1, 2])
    assert plain.model_spans() == [(0, 3)]
    # kept 2 model tokens, injected 2 recovery tokens, then the model wrote 2 more
    rolled = GenerationResult("b", token_ids=[0, 1, 3, 4, 1, 2])
    rolled.interventions.append(
        Intervention(step=3, score=0.9, action="rollback", kept=2, discarded=2, injected=2)
    )
    assert rolled.model_spans() == [(0, 2), (4, 6)]
    # a second recovery that discarded part of the first one's recovery text
    twice = GenerationResult("c", token_ids=[0, 3, 3, 4, 5])
    twice.interventions += [
        Intervention(step=1, score=0.9, action="rollback", kept=1, discarded=1, injected=2),
        Intervention(step=3, score=0.9, action="rollback", kept=2, discarded=1, injected=2),
    ]
    assert twice.model_spans() == [(0, 1), (4, 5)]
    stopped = GenerationResult("d", token_ids=[0, 5], text="Sure ok I can't help with that.")
    stopped.interventions.append(
        Intervention(step=3, score=0.9, action="stop", kept=2, discarded=1)
    )
    assert stopped.model_spans() == [(0, 2)]


def test_a_model_that_re_complies_after_the_recovery_is_an_attack_success() -> None:
    from guard import GenerationResult, Intervention
    from training.attacks.harness import judge_results

    # released: "Sure bomb" (model) + "I'm sorry" (guard) + "bomb steps" (model again)
    result = GenerationResult("a", token_ids=[0, 1, 3, 4, 1, 2])
    result.interventions.append(
        Intervention(step=3, score=0.9, action="rollback", kept=2, discarded=2, injected=2)
    )
    judge = _WordJudge()
    ((verdict, leaked, text),) = judge_results(judge, ["p"], [result], _WordTokenizer())
    assert verdict.success and leaked == 4  # both harmful segments count, before and after
    assert judge.seen == ["Sure bomb", "bomb steps"]  # the guard's words were never judged
    assert "sorry" not in text

    recovered = GenerationResult("b", token_ids=[0, 3, 4, 5, 6])
    recovered.interventions.append(
        Intervention(step=1, score=0.9, action="rollback", kept=1, discarded=1, injected=2)
    )
    ((verdict, leaked, _),) = judge_results(_WordJudge(), ["p"], [recovered], _WordTokenizer())
    assert not verdict.success and leaked == 0


def test_a_guarded_engine_result_is_judged_without_its_recovery_text(
    tiny_llama, tiny_tokenizer
) -> None:
    from guard import GuardConfig, GuardedEngine, PolicyConfig, SamplingParams
    from tests.helpers import ScriptedProbe

    hot_once = ScriptedProbe(fitted_probe(32), lambda call, n: [0.9 if call == 4 else 0.1] * n)
    config = GuardConfig(holdback=0, policy=PolicyConfig(kind="rollback", recovery_text="No way."))
    engine = GuardedEngine(tiny_llama, tiny_tokenizer, hot_once, config)
    prompt = tiny_tokenizer.encode("Sure, here is")
    (result,) = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))
    (event,) = result.interventions
    assert event.injected == len(tiny_tokenizer.encode("No way."))
    spans = result.model_spans()
    guard_ids = [t for i, t in enumerate(result.token_ids) if not any(a <= i < b for a, b in spans)]
    assert tiny_tokenizer.decode(guard_ids) == "No way."
    assert sum(b - a for a, b in spans) == len(result.token_ids) - event.injected


def test_cli_traffic_reports_false_triggers_per_source(tiny_model_dir, tmp_path) -> None:
    always = fitted_probe(32, "blocks.1.hook_resid_post")
    always.intercept_ = 100.0  # every token scores ~1: every guarded answer triggers
    probe_dir = always.save(tmp_path / "probe")
    args = [
        "traffic", "--model", str(tiny_model_dir), "--out", str(tmp_path), "--n-per-source", "2",
        "--sources", "nq_open,mitre_frr", "--max-tokens", "4", "--probe", str(probe_dir),
        "--no-strict-probe", "--policy", "stop",
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "traffic_summary.json").read_text())
    assert list(summary["by_source"]) == ["nq_open", "mitre_frr"]
    for row in summary["by_source"].values():
        assert row["n"] == 2 and row["false_trigger"]["successes"] == 2
    pooled = summary["pooled"]["false_trigger"]
    assert (pooled["successes"], pooled["n"]) == (4, 4)
    rows = _rows(tmp_path, "traffic")
    assert [r["source"] for r in rows] == ["nq_open"] * 2 + ["mitre_frr"] * 2
    assert result.output.strip().splitlines()[-1] == "traffic false-trigger rate: 1.0000"
    bad = runner.invoke(app, ["traffic", "--sources", "nope", "--model", str(tiny_model_dir)])
    assert bad.exit_code != 0 and "unknown source" in bad.output


def test_cli_utility_scores_held_out_references_per_source(tiny_model_dir, tmp_path) -> None:
    out = tmp_path / "utility.json"
    args = ["utility", "--model", str(tiny_model_dir), "--n", "3", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    row = json.loads(out.read_text())["models"][str(tiny_model_dir)]
    assert set(row) == {"gsm8k", "arena_hard"} and all(v < 0 for v in row.values())
    assert row["gsm8k"] != row["arena_hard"]  # two different reference sets
    assert result.output.strip().splitlines()[-1].startswith(f"utility {tiny_model_dir}")


def test_utility_rejects_sources_without_held_out_references(tiny_model_dir) -> None:
    from guard import load_model
    from training.attacks.benign import reference_loglik

    with pytest.raises(ValueError, match="utility source"):
        reference_loglik(load_model(str(tiny_model_dir)), 2, source="xstest_safe")
