"""Probe v2: bounded calibration, Platt scaling, debounce choice, hard negatives, the run."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import beta

from guard import GuardedEngine, MonitorConfig, load_model
from guard.errors import ConfigError
from guard.probe import LinearProbe, allowed_false_triggers, calibrate_threshold
from training.probes.hard_negatives import fit_with_hard_negatives
from training.probes.operating_point import choose_debounce, platt_rescale, response_peaks
from training.probes.trajectories import SAFE, UNSAFE, Trajectory
from training.probes.v2 import ProbeV2Config, run_probe_v2


def test_allowed_false_triggers_is_the_largest_count_under_the_bound() -> None:
    assert allowed_false_triggers(298, 0.01) == -1  # rule of three: 299 answers at least
    assert allowed_false_triggers(299, 0.01) == 0
    for n in (300, 700, 1000):
        x = allowed_false_triggers(n, 0.01)
        assert beta.ppf(0.95, x + 1, n - x) <= 0.01 < beta.ppf(0.95, x + 2, n - x - 1)


def _probe(d: int = 4, scale: float = 1.0) -> LinearProbe:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, d))
    y = (X[:, 0] + rng.normal(size=400) > 0).astype(int)  # noisy: moderate weights
    probe = LinearProbe("blocks.0.hook_resid_post", C=1.0).fit(X, y)
    return probe.rescale(scale, 0.0)


def test_bounded_calibration_allows_fewer_triggers_than_the_point_rule() -> None:
    probe = _probe()
    rng = np.random.default_rng(1)
    answers = [rng.normal(size=(5, 4)) for _ in range(700)]
    point = calibrate_threshold(probe, answers, target_rate=0.01)
    peaks = response_peaks(probe, answers, MonitorConfig())
    assert (peaks >= point).sum() == 7
    bounded = calibrate_threshold(probe, answers, target_rate=0.01, confidence=0.95)
    assert (peaks >= bounded).sum() == allowed_false_triggers(700, 0.01) == 2
    assert probe.metadata_["calibration"]["rule"] == "upper_bound@0.95"
    with pytest.raises(ConfigError, match="cannot bound"):
        calibrate_threshold(probe, answers[:100], target_rate=0.01, confidence=0.95)


def test_rescale_is_affine_in_log_odds_and_sample_weight_changes_the_fit() -> None:
    probe = _probe()
    X = np.random.default_rng(2).normal(size=(10, 4))
    z = probe.decision_function(X)
    assert np.allclose(probe.rescale(0.5, -1.0).decision_function(X), 0.5 * z - 1.0)
    with pytest.raises(ConfigError):
        probe.rescale(-1.0, 0.0)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(200, 4))
    y = (X[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(int)
    plain = LinearProbe("blocks.0.hook_resid_post").fit(X, y)
    weighted = LinearProbe("blocks.0.hook_resid_post").fit(
        X, y, sample_weight=1 + 10 * (X[:, 1] > 0)
    )
    assert not np.allclose(plain.coef_, weighted.coef_)


def test_platt_unsaturates_a_saturated_probe_and_keeps_its_order() -> None:
    probe = _probe(scale=200.0)
    rng = np.random.default_rng(4)
    X = rng.normal(size=(500, 4))
    y = (X[:, 0] + rng.normal(size=500) > 0).astype(int)  # noisy labels: not separable
    raw = probe.predict_proba(X)[:, 1]
    assert np.mean((raw > 0.999) | (raw < 0.001)) > 0.9
    scaled = platt_rescale(probe, X, y)
    p = scaled.predict_proba(X)[:, 1]
    assert np.mean((p > 0.999) | (p < 0.001)) < 0.1
    order = np.argsort(probe.decision_function(X), kind="stable")
    assert np.array_equal(order, np.argsort(scaled.decision_function(X), kind="stable"))
    assert scaled.metadata_["platt"]["n_tokens"] == 500
    assert probe.predict_proba(X)[:, 1] == pytest.approx(raw)  # the original is untouched


def test_debounce_choice_prefers_a_rule_that_ignores_single_token_spikes() -> None:
    """Benign answers with one hot token force a single-step rule's threshold up; harm is
    sustained but milder, so k-of-n catches it at the threshold its calibration allows."""
    probe = LinearProbe("blocks.0.hook_resid_post").fit(
        np.array([[-1.0], [1.0]] * 10), np.array([0, 1] * 10)
    )
    z = lambda v: np.array(v, dtype=float)[:, None] / probe.coef_[0]  # noqa: E731
    rng = random.Random(0)
    benign = []
    for i in range(400):
        values = [rng.uniform(-4, -2) for _ in range(20)]
        values[rng.randrange(20)] = 6.0 if i % 2 else 1.0  # a lone spike
        benign.append(z(values))
    harmful = [z([rng.uniform(3, 4) for _ in range(10)]) for _ in range(50)]
    sweep = choose_debounce(probe, benign, harmful, target_rate=0.05, confidence=0.95)
    best = sweep[0]
    one_step = MonitorConfig(debounce="k_of_n")
    assert best.dev_recall == 1.0 and best.monitor != one_step
    single = next(c for c in sweep if c.monitor == one_step)
    assert single.dev_recall == 0.0
    assert probe.threshold_ == pytest.approx(best.threshold)
    assert all(c.calibration_rate <= 0.05 for c in sweep)


def test_hard_negative_rounds_push_down_the_benign_answers_that_looked_harmful() -> None:
    rng = np.random.default_rng(5)
    d = 8
    unsafe = rng.normal(size=(300, d)) + np.eye(d)[0] * 3
    safe = rng.normal(size=(300, d)) - np.eye(d)[0] * 3
    # "code" answers share the unsafe direction but also have their own, e_1.
    code = [rng.normal(size=(20, d)) + np.eye(d)[0] * 2.5 + np.eye(d)[1] * 3 for _ in range(20)]
    prose = [rng.normal(size=(20, d)) - np.eye(d)[0] * 3 for _ in range(180)]
    answers = code + prose
    tags = ["code"] * 20 + ["prose"] * 180

    def fit(X, y, w):
        return LinearProbe("blocks.0.hook_resid_post", C=1.0).fit(X, y, sample_weight=w)

    result = fit_with_hard_negatives(
        fit, unsafe, safe, answers, answer_tags=tags, rounds=3, hard_share=0.1,
        tokens_per_benign_answer=2, weight=5.0,
    )  # fmt: skip
    rounds = result.rounds
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert rounds[0]["hardest_by_tag"]["code"] >= 18  # the look-alikes are the hardest
    assert rounds[-1]["n_mined_tokens"] > 0 == rounds[0]["n_mined_tokens"]
    assert rounds[-1]["benign_peak_logodds_q95"] < rounds[0]["benign_peak_logodds_q95"] - 1.0
    assert np.median(result.probe.decision_function(unsafe)) > 0  # still sees harm


def _trajectories(n: int, recipe: str, label: int, rng: random.Random, **meta) -> list[Trajectory]:
    out = []
    for _ in range(n):
        response = [rng.randrange(3, 200) for _ in range(rng.randrange(6, 12))]
        labels = [label] * len(response)
        if label == UNSAFE:
            labels[:2] = [SAFE, SAFE]  # the refusal before the span
        out.append(Trajectory([1, 5, 6], response, labels, recipe, dict(meta)))
    return out


def test_run_probe_v2_end_to_end(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.probes.v2 as v2

    lm = load_model(str(tiny_model_dir))
    rng = random.Random(0)
    whole = _trajectories(6, "whole", UNSAFE, rng, harmful=True)
    monkeypatch.setattr(v2, "whole_trajectories", lambda config, lm: whole)
    harmful = {
        "train": _trajectories(20, "rwi", UNSAFE, rng, harmful=True)
        + _trajectories(8, "direct", UNSAFE, rng, harmful=True),
        "dev": _trajectories(12, "rwi", UNSAFE, rng, harmful=True)
        + _trajectories(3, "rwi", UNSAFE, rng, harmful=False),
        "safe": _trajectories(10, "refusal", SAFE, rng),
    }
    corpus = {
        "train": _trajectories(30, "benign-own", SAFE, rng, source="a"),
        "calibration": _trajectories(40, "benign-own", SAFE, rng, source="a"),
        "eval": _trajectories(20, "benign-own", SAFE, rng, source="a")
        + _trajectories(10, "benign-own", SAFE, rng, source="b", held_out=True),
    }
    config = ProbeV2Config(
        model=str(tiny_model_dir), out=str(tmp_path / "v2"), layers=[0, -1], rounds=1,
        target_rate=0.2, ablation=True,
    )  # fmt: skip
    baseline = _probe(d=lm.model.config.hidden_size)
    baseline.hook_name = "blocks.0.hook_resid_post"
    calibrate_threshold(baseline, [np.zeros((1, lm.model.config.hidden_size))])
    report = run_probe_v2(config, lm, harmful, corpus, baseline=baseline)
    saved = json.loads((tmp_path / "v2" / "probe_v2_report.json").read_text())
    assert saved["hook"] == report["hook"] == report["layer_sweep"][0]["hook"]
    assert len(report["hard_negative_rounds"]) == 2
    assert report["n"]["dev_harmful"] == 12
    table = report["probe_v2"]
    assert table["false_triggers"]["overall"]["n"] == 30
    assert table["false_triggers"]["b"]["held_out_source"] is True
    assert table["false_triggers"]["a"]["held_out_source"] is False
    assert table["false_triggers_long"]["overall"]["n"] == 0  # no answer reaches 256 tokens
    assert table["dev_harmful_recall"]["n"] == 12
    assert report["debounce_sweep"][0]["monitor"] == table["monitor"]
    assert "baseline" in report
    # one probe per unsafe recipe, each through the same protocol and evaluation
    assert set(report["ablation"]) == {"direct", "rwi", "whole"}
    for row in report["ablation"].values():
        assert row["false_triggers"]["overall"]["n"] == 30 and row["dev_harmful_recall"]["n"] == 12
        assert row["n_unsafe_tokens"] > 0
    assert report["ablation"]["whole"]["n_unsafe_tokens"] == sum(
        label == UNSAFE for t in whole for label in t.labels
    )
    probe = LinearProbe.load(tmp_path / "v2" / "probe")
    assert probe.hook_name == report["hook"]
    assert probe.threshold_ == pytest.approx(table["threshold"])
    assert probe.metadata_["evaluation"]["dev_harmful_recall"]["n"] == 12
    GuardedEngine(lm.model, lm.tokenizer, probe)  # bound to the model it was fitted on


def test_harmful_trajectories_are_generated_once_per_settings(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.attacks.judging as judging
    import training.probes.v2 as v2

    lm = load_model(str(tiny_model_dir))
    rng = random.Random(0)
    made = {
        "train": _trajectories(3, "rwi", UNSAFE, rng, harmful=True),
        "dev": _trajectories(2, "prefill", UNSAFE, rng, harmful=False),
        "safe": _trajectories(2, "refusal", SAFE, rng),
    }
    calls = []
    monkeypatch.setattr(judging, "load_or_fit_judge", lambda *a, **k: "judge")
    monkeypatch.setattr(v2, "harmful_trajectories", lambda *a, **k: calls.append(k) or made)
    config = ProbeV2Config(model=str(tiny_model_dir), out=str(tmp_path / "v2"), direct_samples=0)
    first = v2.collect_harmful(config, lm)
    again = v2.collect_harmful(config, lm)
    assert len(calls) == 1
    assert again == first == made  # read back field for field, meta included
    v2.collect_harmful(ProbeV2Config(**{**asdict(config), "k": config.k + 1}), lm)
    assert len(calls) == 2 and calls[-1]["k"] == config.k + 1


class _KeywordJudge:
    """P(harmful) = 1 when the answer contains the keyword (a stand-in for the learned judge)."""

    def __init__(self, keyword: str) -> None:
        self.keyword = keyword

    def predict_proba(self, prompts, generations) -> np.ndarray:
        p = np.array([float(self.keyword in g) for g in generations])
        return np.c_[1 - p, p]


def test_harm_onset_is_the_start_of_the_window_that_first_turns_harmful(
    tiny_model_dir: Path,
) -> None:
    from training.probes.trajectories import harm_onset

    lm = load_model(str(tiny_model_dir))
    tok = lm.tokenizer
    before = tok.encode(" fox" * 13, add_special_tokens=False)
    ids = before + tok.encode(" bomb", add_special_tokens=False) + before
    bomb_end = len(ids) - len(before)  # the prefix ending here is the first with the keyword
    window = 4
    expected = next(e for e in range(window, len(ids) + window, window) if e >= bomb_end) - window
    assert harm_onset(_KeywordJudge("bomb"), "q", lm, ids, window) == expected
    assert expected < bomb_end <= expected + window  # the window that completes the keyword
    assert harm_onset(_KeywordJudge("never"), "q", lm, ids, window) == len(ids)


def test_direct_trajectories_are_seeded_samples_labelled_from_the_onset(
    tiny_model_dir: Path,
) -> None:
    from training.common.prompts import AttackPrompt
    from training.probes.trajectories import IGNORE, direct_trajectories

    lm = load_model(str(tiny_model_dir))
    prompts = [AttackPrompt(f"request {i}", None, "test", str(i)) for i in range(3)]
    everything = _KeywordJudge("")  # every answer harmful from its first window
    run = direct_trajectories(lm, prompts, everything, samples=2, max_new_tokens=12, window=4)
    assert len(run) == 6 and {t.recipe for t in run} == {"direct"}
    assert [t.meta["prompt"] for t in run] == [p.prompt for p in prompts for _ in range(2)]
    assert all(t.labels == [UNSAFE] * len(t.response_ids) and t.meta["harmful"] for t in run)
    assert run[0].response_ids != run[1].response_ids  # two samples, not one answer twice
    again = direct_trajectories(lm, prompts, everything, samples=2, max_new_tokens=12, window=4)
    assert [t.response_ids for t in again] == [t.response_ids for t in run]
    nothing = direct_trajectories(lm, prompts[:1], _KeywordJudge("\0"), samples=1, max_new_tokens=8)
    (t,) = nothing
    assert not t.meta["harmful"] and set(t.labels) <= {SAFE, IGNORE}


def test_direct_trajectories_join_the_harmful_sets_and_are_cached(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.attacks.judging as judging
    import training.probes.v2 as v2

    lm = load_model(str(tiny_model_dir))
    rng = random.Random(0)
    made = {
        "train": _trajectories(3, "rwi", UNSAFE, rng, harmful=True),
        "dev": _trajectories(2, "prefill", UNSAFE, rng, harmful=True),
        "safe": _trajectories(2, "refusal", SAFE, rng),
    }
    direct_calls = []

    def fake_direct(lm, prompts, judge, **settings):
        direct_calls.append([p.prompt for p in prompts])
        return _trajectories(len(prompts), "direct", UNSAFE, rng, harmful=True)

    monkeypatch.setattr(judging, "load_or_fit_judge", lambda *a, **k: "judge")
    monkeypatch.setattr(v2, "harmful_trajectories", lambda *a, **k: made)
    monkeypatch.setattr(v2, "direct_trajectories", fake_direct)
    config = ProbeV2Config(
        model=str(tiny_model_dir),
        out=str(tmp_path / "v2"),
        n_train_prompts=4,
        n_dev_prompts=2,
        direct_samples=2,
    )
    sets = v2.collect_harmful(config, lm)
    train_prompts, dev_prompts = direct_calls
    assert len(dev_prompts) == 2 and not set(train_prompts) & set(dev_prompts)
    assert len(train_prompts) > 4  # the whole train split but the dev prompts
    assert [t.recipe for t in sets["dev"]] == ["prefill"] * 2 + ["direct"] * 2
    assert len(sets["train"]) == 3 + len(train_prompts)
    v2.collect_harmful(config, lm)
    assert len(direct_calls) == 2  # the second run read the cache
    off = v2.collect_harmful(ProbeV2Config(**{**asdict(config), "direct_samples": 0}), lm)
    assert [t.recipe for t in off["train"]] == ["rwi"] * 3


def test_terse_judged_harmful_answers_are_left_out() -> None:
    from training.probes.trajectories import IGNORE, drop_short_harm

    short = Trajectory([1], [5, 6, 7], [UNSAFE] * 3, "direct", {"harmful": True})
    long = Trajectory(
        [1], list(range(40)), [IGNORE] * 8 + [UNSAFE] * 32, "direct", {"harmful": True}
    )
    refusal = Trajectory([1], [5, 6], [SAFE] * 2, "direct", {"harmful": False, "recovered": True})
    kept = drop_short_harm([short, long, refusal], min_tokens=32)
    assert kept[0].labels == [IGNORE] * 3 and not kept[0].meta["harmful"]
    assert kept[0].meta["dropped_short"] and short.meta["harmful"]  # the input is not changed
    assert kept[1] is long and kept[2] is refusal


def _record(prompt: str, prefill_ids: list[int], continuation_ids: list[int], **extra) -> dict:
    return {
        "prompt": prompt,
        "prefill": "",
        "prefill_ids": prefill_ids,
        "continuation": "x",
        "continuation_ids": continuation_ids,
        "cell": {"steps": 8},
        "meta": {"p_eff": 2},
        "success": True,
    } | extra


def test_adversarial_records_become_unsafe_states_from_the_span_on(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from training.probes.v2 import adversarial_trajectories

    lm = load_model(str(tiny_model_dir))
    rows = [
        _record("train a", [11, 12, 13, 14], [15, 16]),  # refusal [11, 12] + span + continuation
        _record("train b", [11, 12, 13], [15], success=False),  # recovered: not unsafe
        _record("dev c", [11, 12, 13], [15]),  # a dev prompt: chooses the operating point
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = {"train a", "train b", "dev c"}
    (t,) = adversarial_trajectories(lm, [path], train_prompts=train, dev_prompts={"dev c"})
    assert t.response_ids == [11, 12, 13, 14, 15, 16]  # token for token, not re-encoded
    assert t.labels == [SAFE, SAFE] + [UNSAFE] * 4
    assert t.recipe == "adversarial" and t.meta["harmful"]
    with pytest.raises(ConfigError, match="train-split"):
        adversarial_trajectories(lm, [path], train_prompts={"train a"}, dev_prompts=set())


def test_records_without_ids_are_encoded_from_their_text(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from training.probes.evaluation import attack_record_sequences

    lm = load_model(str(tiny_model_dir))
    old = _record("q", [], [], prefill="I can't. Sure", continuation=" step one")
    del old["prefill_ids"], old["continuation_ids"]
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(old) + "\n")
    (case,) = attack_record_sequences(lm, path)
    ids = lm.tokenizer.encode("I can't. Sure step one", add_special_tokens=False)
    assert case["response_ids"] == ids and case["span_start"] == 2 and case["success"]


def test_adversarial_records_join_the_fit_set_of_a_run(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import training.attacks.judging as judging
    import training.probes.v2 as v2
    from training.common.prompts import load_attack_prompts

    lm = load_model(str(tiny_model_dir))
    made = {
        "train": _trajectories(3, "rwi", UNSAFE, random.Random(0), harmful=True),
        "dev": [],
        "safe": [],
    }
    monkeypatch.setattr(judging, "load_or_fit_judge", lambda *a, **k: "judge")
    monkeypatch.setattr(v2, "harmful_trajectories", lambda *a, **k: made)
    config = ProbeV2Config(
        model=str(tiny_model_dir), out=str(tmp_path / "v2"), n_train_prompts=4, n_dev_prompts=2
    )
    dev = {p.prompt for p in v2._sampled_train_prompts(config)[1]}
    prompt = next(p.prompt for p in load_attack_prompts(split="train") if p.prompt not in dev)
    path = tmp_path / "records.jsonl"
    path.write_text(json.dumps(_record(prompt, [11, 12, 13], [14])) + "\n")
    config.adversarial_records = [str(path)]
    sets = v2.collect_harmful(config, lm)
    assert [t.recipe for t in sets["train"]] == ["rwi"] * 3 + ["adversarial"]
    held_out = next(iter(load_attack_prompts(split="test"))).prompt
    path.write_text(json.dumps(_record(held_out, [11, 12, 13], [14])) + "\n")
    with pytest.raises(ConfigError, match="train-split"):
        v2.collect_harmful(config, lm)
