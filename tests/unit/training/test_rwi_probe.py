"""RWI probe training end to end on a tiny model: trajectories, sweep, ablation, artefacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from guard import GuardedEngine, load_model
from guard.probe import LinearProbe
from training.attacks.judging import load_or_fit_judge
from training.cli import app
from training.common.prompts import load_attack_prompts
from training.probes.trajectories import (
    IGNORE,
    SAFE,
    UNSAFE,
    Trajectory,
    insertion_trajectories,
    labelled_tokens,
)

runner = CliRunner()
SPANS = [("Sure, here is how to do it: first gather the materials and then mix them.", "t")]


def test_insertion_trajectories_label_refusal_span_and_continuation(
    tiny_model_dir: Path, tiny_judge_dir: Path
) -> None:
    lm = load_model(str(tiny_model_dir))
    prompts = load_attack_prompts(split="train", limit=4, seed=0)
    judge = load_or_fit_judge(str(tiny_judge_dir))
    trajectories = insertion_trajectories(
        lm, prompts, [SPANS] * 4, judge, recipe="rwi", k=3, lengths=(4,), max_new_tokens=5
    )
    for t in trajectories:
        p, m = t.meta["p"], t.meta["m"]
        assert t.labels[:p] == [SAFE] * p and t.labels[p : p + m] == [UNSAFE] * m
        follow = set(t.labels[p + m :])
        assert len(follow) <= 1 and len(t.labels) == len(t.response_ids)
        expected = UNSAFE if t.meta["harmful"] else SAFE if t.meta["recovered"] else IGNORE
        assert follow <= {expected}
    prefill = insertion_trajectories(
        lm, prompts, [SPANS] * 4, judge, recipe="prefill", k=2, lengths=(4,), max_new_tokens=3
    )
    assert all(t.meta["p"] == 0 and t.labels[:4] == [UNSAFE] * 4 for t in prefill)
    with pytest.raises(ValueError):
        insertion_trajectories(lm, prompts, [SPANS] * 4, judge, recipe="nope")


def test_labelled_tokens_drops_ignored() -> None:
    t = Trajectory([1], [2, 3, 4], [SAFE, IGNORE, UNSAFE], "x")
    X, y = labelled_tokens([t], [np.arange(6.0).reshape(3, 2)])
    assert y.tolist() == [SAFE, UNSAFE] and X.tolist() == [[0.0, 1.0], [4.0, 5.0]]


def _attack_records(model_dir: Path, judge_dir: Path, out: Path) -> Path:
    from training.attacks.cli import app as attack_app

    args = [
        "insert", "--model", str(model_dir), "--split", "test", "--limit", "3", "--positions", "0,8,64",
        "--lengths", "4", "--max-tokens", "4", "--judge", str(judge_dir), "--writer", str(model_dir),
        "--writer-tokens", "4", "--out", str(out),
    ]  # fmt: skip
    result = runner.invoke(attack_app, args)
    assert result.exit_code == 0, result.output
    return out / "insert.jsonl"


def test_train_probe_end_to_end(
    isolated_home, tiny_model_dir: Path, tiny_judge_dir: Path, tmp_path: Path
) -> None:
    records = _attack_records(tiny_model_dir, tiny_judge_dir, tmp_path / "attack")
    out = tmp_path / "probe"
    args = [
        "probe", "--model", str(tiny_model_dir), "--out", str(out), "--layers", "0,-1",
        "--n-train-prompts", "6", "--n-dev-prompts", "4", "--k", "2", "--max-new-tokens", "4",
        "--n-calibration", "6", "--n-eval", "6", "--judge", str(tiny_judge_dir),
        "--writer", str(tiny_model_dir), "--attack-records", str(records),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "probe_report.json").read_text())
    assert [r["hook"] for r in report["layer_sweep"]] == [
        "blocks.0.hook_resid_post",
        "blocks.2.hook_resid_post",
    ]
    assert report["chosen_hook"] == max(report["layer_sweep"], key=lambda r: r["dev_auroc"])["hook"]
    assert set(report["ablation"]) == {"rwi", "prefill", "whole"}
    sizes = {(r["n_unsafe_tokens"], r["n_safe_tokens"]) for r in report["ablation"].values()}
    assert len(sizes) == 1  # equal size
    # What the setup fixes: 6 benign eval answers; the 9 held-out attack records (3 prompts x
    # 3 positions), their harmful ones and those deep (p >= 64). Rates are counts over those.
    attacks = [json.loads(line) for line in records.read_text().splitlines()]
    harmful = [r for r in attacks if r["success"]]
    sizes = {
        "fired_on_all_cases": 9,
        "all_harmful": len(harmful),
        "deep_p>=64_harmful": sum(r["cell"]["p"] >= 64 for r in harmful),
    }
    assert len(attacks) == 9
    for row in report["ablation"].values():
        assert row["n_benign_eval"] == 6
        fired = row["benign_eval_false_trigger_rate"] * 6
        assert fired == pytest.approx(round(fired), abs=1e-9)
        recall = row["held_out_insertion_recall"]
        assert {k: v["n"] for k, v in recall.items()} == sizes
        for name, n in sizes.items():
            if n == 0:
                assert recall[name]["recall"] is None
            else:
                hits = recall[name]["recall"] * n
                assert hits == pytest.approx(round(hits), abs=1e-9)
    lm = load_model(str(tiny_model_dir))
    probe = LinearProbe.load(out / "probe")
    assert probe.hook_name == report["chosen_hook"]
    assert probe.threshold_ == pytest.approx(report["probe"]["threshold"])
    assert probe.metadata_["training_data"]["recipe"].startswith("random worst-insertion")
    GuardedEngine(lm.model, lm.tokenizer, probe)  # matches the model it was fitted on
    assert (out / "layer_sweep.png").stat().st_size > 0
    assert (out / "ablation" / "whole" / "probe.json").is_file()
