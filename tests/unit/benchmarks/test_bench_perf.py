"""``trajguard bench perf`` on the tiny model: the library overhead script, machine description."""

from __future__ import annotations

import json
import math
import os
import statistics

import pytest
import torch
from typer.testing import CliRunner

from benchmarks.bench.cli import app
from benchmarks.bench.perf import headline
from benchmarks.common import PROMPTS
from guard import GuardedEngine

runner = CliRunner()


def test_headline_is_the_last_line() -> None:
    assert headline("table\nbatch 1: 3.2 tok/s\nguarded/unguarded ratio: 0.986\n") == (
        "guarded/unguarded ratio",
        0.986,
    )
    with pytest.raises(ValueError):
        headline("no headline here")


def test_perf_runs_the_overhead_script(
    tiny_model_dir, tiny_probe_dir, tmp_path, monkeypatch
) -> None:
    timed: dict[bool, list] = {False: [], True: []}  # guarded? -> the timed arms' results
    original = GuardedEngine.generate

    def spy(self, prompts, params=None, **kwargs):
        results = original(self, prompts, params, **kwargs)
        if params is not None and params.ignore_eos:  # a timed call, not the warm-up
            timed[self.probe is not None] += results
        return results

    monkeypatch.setattr(GuardedEngine, "generate", spy)
    out = tmp_path / "perf"
    result = runner.invoke(
        app,
        [
            "perf", "--benchmarks", "overhead", "--model", str(tiny_model_dir),
            "--probe", str(tiny_probe_dir), "--rounds", "2", "--max-tokens", "4",
            "--batch", "1,2", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads((out / "perf.json").read_text())
    machine = payload["machine"]
    assert machine["cpu_model"] and machine["cpu_cores"] == os.cpu_count()
    assert machine["cpu_cores_usable"] == len(os.sched_getaffinity(0))
    assert machine["torch"] == torch.__version__ and isinstance(machine["gpus"], list)

    # Both arms decode the same requests to exactly max_tokens (ignore_eos): 2 batch sizes x
    # 2 rounds x the prompts x 4 tokens; the guarded arm scores every token, never fires.
    n = 2 * 2 * len(PROMPTS)
    for guarded, results in timed.items():
        assert len(results) == n and all(len(r.token_ids) == 4 for r in results), guarded
        assert all((None not in r.scores) == guarded for r in results)
        assert not any(r.interventions for r in results)

    bench = payload["benchmarks"]["overhead"]
    details = bench["details"]  # the script's own JSON
    assert set(details["results"]) == {"batch_1", "batch_2", "hf_generate_tokens_per_s"}
    assert details["rounds"] == 2 and details["max_tokens"] == 4
    for b in ("batch_1", "batch_2"):
        ratios = details["results"][b]["ratios"]
        assert len(ratios) == 2 and all(math.isfinite(r) and r > 0 for r in ratios)
        assert details["results"][b]["ratio_median"] == pytest.approx(statistics.median(ratios))
    assert bench["ratio"] == pytest.approx(details["results"]["batch_1"]["ratio_median"], abs=5e-4)
    assert payload["ratio_geomean"] == pytest.approx(bench["ratio"])  # one benchmark
    last = result.output.strip().splitlines()[-1]
    assert last == f"perf guarded/unguarded ratio geomean: {payload['ratio_geomean']:.3f}"


def test_perf_rejects_unknown_or_unrunnable_benchmarks(tmp_path) -> None:
    assert runner.invoke(app, ["perf", "--benchmarks", "nope"]).exit_code != 0
    assert runner.invoke(app, ["perf", "--benchmarks", "serve_vllm"]).exit_code != 0
    no_venv = runner.invoke(
        app, ["perf", "--benchmarks", "vllm_plugin"], env={"TRAJGUARD_VLLM_PYTHON": None}
    )
    assert no_venv.exit_code != 0 and "vllm-python" in no_venv.output


@pytest.mark.parametrize("script", ["overhead", "serve_load", "vllm_overhead"])
def test_script_mains_are_callable_from_python(script: str) -> None:
    """``bench perf`` calls each script's ``main`` directly: every default must be a value.

    A ``typer.Option(...)`` default only works on the command line; called from Python it
    leaks an ``OptionInfo`` into the benchmark (as once happened to ``cycles``).
    """
    import importlib
    import inspect

    import typer.models

    main = importlib.import_module(f"benchmarks.{script}").main
    leaked = [
        name
        for name, p in inspect.signature(main).parameters.items()
        if isinstance(p.default, typer.models.ParameterInfo)
    ]
    assert not leaked, leaked


def test_vllm_comparison_table_prints_every_measured_arm(capsys: pytest.CaptureFixture) -> None:
    from benchmarks.serve_load import _print_comparison

    def arm(rate: float) -> dict:
        return {"tokens_per_s": rate, "ttft_p50_ms": 10.0}

    row = {
        "stock": arm(100.0),
        "proxy_shadow": arm(30.0),
        "proxy_shadow_bf16": arm(45.0),
        "proxy_fast": arm(90.0),
        "proxy_shadow_over_stock": 0.3,
        "proxy_shadow_bf16_over_stock": 0.45,
        "proxy_fast_over_stock": 0.9,
    }
    no_bf16 = {k: v for k, v in row.items() if "bf16" not in k}
    _print_comparison({"probe": "p", "table": {8: row, 32: no_bf16}}, "blocks.21.hook_resid_post")
    lines = capsys.readouterr().out.splitlines()
    assert "shadow_bf16/stock" in lines[1] and "fast/stock" in lines[1]
    assert lines[2].split()[-4:-1] == ["0.300", "0.450", "0.900"]
    assert lines[3].split()[-4:-1] == ["0.300", "nan", "0.900"]
