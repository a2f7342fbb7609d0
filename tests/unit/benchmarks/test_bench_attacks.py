"""``trajguard bench attacks`` / ``report`` end to end on a tiny random model, with resume."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from benchmarks.bench.cache import SampleCache, result_from_json
from benchmarks.bench.cli import app
from benchmarks.bench.targets import ModelSpec
from guard import GuardedEngine

runner = CliRunner()


def _args(model: Path, probe: Path, prompts: Path, judge: Path, out: Path) -> list[str]:
    return [
        "attacks", "--model", str(model), "--probe", str(probe), "--no-strict-probe",
        "--prompts", str(prompts), "--limit", "2", "--benign-limit", "3", "--ks", "2,4",
        "--positions", "0,8,64,end", "--lengths", "3", "--max-tokens", "6", "--batch-size", "4",
        "--judge", str(judge), "--writer", str(model), "--writer-tokens", "8",
        "--out", str(out), "--no-progress",
    ]  # fmt: skip


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


@pytest.fixture
def add_request_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Request ids passed to the real GuardedEngine.add_request (a spy: it still runs)."""
    calls: list[str] = []
    original = GuardedEngine.add_request

    def spy(self, request_id, *args, **kwargs):
        calls.append(request_id)
        return original(self, request_id, *args, **kwargs)

    monkeypatch.setattr(GuardedEngine, "add_request", spy)
    return calls


def test_bench_runs_resumes_and_reports(
    isolated_home,
    tiny_model_dir,
    tiny_probe_dir,
    split_prompts_file,
    tiny_judge_dir,
    tmp_path,
    add_request_calls,
) -> None:
    out = tmp_path / "bench"
    args = _args(tiny_model_dir, tiny_probe_dir, split_prompts_file, tiny_judge_dir, out)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (
        result.output.strip().splitlines()[-1].startswith("bench worst-cell ASR (guard:rollback): ")
    )

    results = json.loads((out / "results.json").read_text())
    # 2 prompts: direct 2, prefill 2x2, insert 2x4 positions, adaptive 2, rwi 2, multiturn
    # 2x2 variants, evasion 2x6 forms; benign 3; two defences
    assert results["run"]["generated"] == 2 * (2 + 4 + 8 + 2 + 2 + 4 + 12 + 3)
    assert results["run"]["cached"] == 0
    cells = {(c["defence"], c["attack"], c["label"]): c for c in results["cells"]}
    for defence in ("none", "guard:rollback"):
        assert cells[(defence, "direct", "all")]["asr"]["n"] == 2
        assert cells[(defence, "prefill", "k=4")]["asr"]["n"] == 2
        assert cells[(defence, "insert", "p=64")]["asr"]["n"] == 2  # positions >= 64 are in
        assert cells[(defence, "insert", "p=64,m=3")]["asr"]["n"] == 2
        assert cells[(defence, "insert", "all")]["asr"]["n"] == 8
        assert cells[(defence, "adaptive", "m=3")]["cell"] == {"m": 3}
    assert cells[("none", "direct", "all")]["trigger_rate"] is None
    assert cells[("guard:rollback", "direct", "all")]["trigger_rate"]["n"] == 2
    machine = results["machine"]
    assert machine["cpu_cores"] == os.cpu_count() and machine["cpu_model"]
    assert machine["torch"] == torch.__version__

    records = _records(out)
    for (defence, attack, label), cell in cells.items():  # a cell's time is its samples' time
        if label == "all":
            gen_s = [
                r["gen_s"] for r in records if (r["defence"], r["attack"]) == (defence, attack)
            ]
            assert cell["wall_s"] == pytest.approx(sum(gen_s)) and min(gen_s) > 0
    guarded = [r for r in records if r["defence"] == "guard:rollback"]
    assert 0 < sum(r["triggered"] for r in guarded) < len(guarded)  # the guard fires sometimes
    cache = SampleCache(out / "cache.jsonl")
    for r in records:  # leaked tokens: harmful model-written tokens the user received
        result = result_from_json("r", cache.entries[r["cache_key"]]["result"])
        model_tokens = sum(b - a for a, b in result.model_spans())
        injected = sum(i.injected for i in result.interventions)  # guard tokens, at most
        assert r["n_new_tokens"] - injected <= model_tokens <= r["n_new_tokens"]
        if not r["success"]:
            assert r["leaked_tokens"] == 0
        elif not result.interventions:
            assert r["leaked_tokens"] == r["n_new_tokens"]
        else:
            assert 0 < r["leaked_tokens"] <= model_tokens
    if any(r["triggered"] and r["leaked_tokens"] > 0 for r in guarded):
        assert any(e["triggered"] for e in results["examples"])

    benign = {b["defence"]: b for b in results["benign"]}
    assert benign["none"]["false_trigger"] is None and benign["none"]["utility"]["rate"] == 1.0
    assert benign["guard:rollback"]["false_trigger"]["n"] == 3
    assert benign["guard:rollback"]["over_refusal"]["n"] == 3

    table = (out / "results.md").read_text()
    for row in ("| none | direct |", "| guard:rollback | prefill | k=2 |", "| insert | p=64 |",
                "| insert | p=end,m=3 |", "| adaptive |", "## Benign prompts"):  # fmt: skip
        assert row in table
    for png in ("asr_vs_position.png", "leak_distribution.png", "score_traces.png"):
        assert (out / png).stat().st_size > 1000

    # resume: a rerun generates nothing; dropping samples from the cache regenerates only them
    calls_before = len(add_request_calls)
    assert runner.invoke(app, args).exit_code == 0
    assert len(add_request_calls) == calls_before
    assert json.loads((out / "results.json").read_text())["run"]["generated"] == 0

    lines = (out / "cache.jsonl").read_text().splitlines(keepends=True)
    (out / "cache.jsonl").write_text("".join(lines[:-5]) + lines[-5][:20])  # + a torn line
    assert runner.invoke(app, args).exit_code == 0
    assert len(add_request_calls) == calls_before + 5
    rerun = json.loads((out / "results.json").read_text())["run"]
    assert rerun["generated"] == 5 and rerun["cached"] == len(records) - 5
    again = _records(out)
    assert [r["continuation"] for r in again] == [r["continuation"] for r in records]  # seeded
    assert sum(r["run"] != records[0]["run"] for r in again) == 5


def test_report_rerenders_from_results(
    isolated_home, tiny_model_dir, tiny_probe_dir, split_prompts_file, tiny_judge_dir, tmp_path
) -> None:
    out = tmp_path / "bench"
    args = _args(tiny_model_dir, tiny_probe_dir, split_prompts_file, tiny_judge_dir, out)
    args[args.index("--positions") + 1] = "64"
    args += ["--attacks", "insert", "--benign-limit", "0"]
    assert runner.invoke(app, args).exit_code == 0
    produced = ["results.md", "asr_vs_position.png", "leak_distribution.png", "score_traces.png"]
    for name in produced:
        (out / name).unlink()
    result = runner.invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert all((out / name).is_file() for name in produced)
    table = (out / "results.md").read_text()
    assert "| insert | p=64 |" in table and "| direct |" not in table and "Benign" not in table


def test_bad_options_are_rejected(tmp_path) -> None:
    assert runner.invoke(app, ["attacks", "--attacks", "direct,bogus"]).exit_code != 0
    assert runner.invoke(app, ["attacks", "--positions", "x"]).exit_code != 0
    assert runner.invoke(app, ["attacks", "--policy", "explode"]).exit_code != 0
    assert runner.invoke(app, ["report", str(tmp_path)]).exit_code != 0  # no results.json


@pytest.mark.parametrize(
    ("spec", "local", "url", "label"),
    [
        ("smollm2-135m-instruct", "smollm2-135m-instruct", None, "smollm2-135m-instruct"),
        ("runs/sft/", "runs/sft/", None, "sft"),
        ("http://127.0.0.1:8000/v1", "default", "http://127.0.0.1:8000", "default@127.0.0.1:8000"),
        ("runs/sft@http://h:8001", "runs/sft", "http://h:8001", "sft@h:8001"),
    ],
)
def test_model_spec(spec: str, local: str, url: str | None, label: str) -> None:
    parsed = ModelSpec.parse(spec, default_local="default")
    assert (parsed.local, parsed.url, parsed.label) == (local, url, label)


def test_one_probe_per_model(
    isolated_home, tiny_model_dir, tiny_probe_dir, split_prompts_file, tiny_judge_dir, tmp_path
) -> None:
    other = tmp_path / "other-model"
    shutil.copytree(tiny_model_dir, other)
    out = tmp_path / "bench"
    args = _args(tiny_model_dir, tiny_probe_dir, split_prompts_file, tiny_judge_dir, out)
    args += ["--attacks", "direct", "--benign-limit", "0", "--utility-n", "0"]
    args += ["--model", str(other), "--probe", "none"]  # second model: undefended only
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    pairs = {
        (c["model"], c["defence"]) for c in json.loads((out / "results.json").read_text())["cells"]
    }
    assert pairs == {
        (tiny_model_dir.name, "none"),
        (tiny_model_dir.name, "guard:rollback"),
        ("other-model", "none"),
    }
    three = [*args, "--probe", str(tiny_probe_dir)]  # 3 probes for 2 models
    assert runner.invoke(app, three).exit_code != 0
