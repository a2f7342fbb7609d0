"""``trajguard bench perf`` on the tiny model: the library overhead script, machine description."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from benchmarks.bench.cli import app
from benchmarks.bench.perf import headline

runner = CliRunner()


def test_headline_is_the_last_line() -> None:
    assert headline("table\nbatch 1: 3.2 tok/s\nguarded/unguarded ratio: 0.986\n") == (
        "guarded/unguarded ratio",
        0.986,
    )
    with pytest.raises(ValueError):
        headline("no headline here")


def test_perf_runs_the_overhead_script(tiny_model_dir, tiny_probe_dir, tmp_path) -> None:
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
    assert machine["cpu_model"] and machine["cpu_cores"] >= machine["cpu_cores_usable"] >= 1
    assert machine["torch"] and isinstance(machine["gpus"], list)
    bench = payload["benchmarks"]["overhead"]
    details = bench["details"]  # the script's own JSON
    assert set(details["results"]) >= {"batch_1", "batch_2"} and details["rounds"] == 2
    assert bench["ratio"] == pytest.approx(details["results"]["batch_1"]["ratio_median"], abs=5e-4)
    assert 0 < bench["ratio"] < 10 and payload["ratio_geomean"] == pytest.approx(bench["ratio"])
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
