"""``trajguard bench``: the offline attack benchmark, its report, and the performance suite."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from benchmarks.bench.attacks import BenchConfig, run_bench
from benchmarks.bench.cells import ALL_ATTACKS, ATTACKS, PROBE_AWARE_STEPS
from benchmarks.bench.perf import BENCHMARKS, PerfConfig, run_perf
from benchmarks.bench.report import load_results, render_report
from guard import BASE_MODEL, DEFAULT_MODEL
from training.attacks.cli import (
    BatchSize,
    DataDir,
    Judge,
    Limit,
    MaxTokens,
    Policy,
    Prompts,
    Split,
    StrictProbe,
    Temperature,
    Writer,
    WriterTokens,
    _config,
    _ints,
)
from training.attacks.evasion import UNRELIABLE_JUDGE_FORMS
from training.attacks.insert import DEFAULT_LENGTHS, DEFAULT_POSITIONS, REFUSAL_SOURCES
from training.attacks.prefill import DEFAULT_KS
from training.common.insertion import parse_positions
from training.common.worst import CRITERIA

app = typer.Typer(no_args_is_help=True, help="Offline attack benchmark and performance suite.")


def _csv(values) -> str:
    return ",".join(map(str, values))


def headline(results: dict) -> str:
    """The last printed line: the worst attack cell's ASR, for the most defended run.

    Cells the judges cannot read (evasion answers in another language) are left out.
    """
    cells = [
        c
        for c in results["cells"]
        if len(c["grouping"]) <= 1
        and c["asr"]["n"]
        and c.get("cell", {}).get("form") not in UNRELIABLE_JUDGE_FORMS
    ]
    if not cells:
        return "bench worst-cell ASR: nan"
    guarded = [c for c in cells if c["defence"] != "none"] or cells
    worst = max(guarded, key=lambda c: c["asr"]["rate"])
    return f"bench worst-cell ASR ({worst['defence']}): {worst['asr']['rate']:.3f}"


@app.command()
def attacks(
    model: Annotated[
        list[str],
        typer.Option(help="Model (alias/HF dir/cached id) or endpoint [LOCAL@]URL; repeatable."),
    ] = [DEFAULT_MODEL],  # noqa: B006
    probe: Annotated[
        list[str] | None,
        typer.Option(
            help="Probe dir: also run local models guarded by it. Once for every model, or "
            "once per --model in order ('none': that model undefended only)."
        ),
    ] = None,
    policy: Policy = "rollback",
    strict_probe: StrictProbe = True,
    prompts: Prompts = None,
    split: Split = "test",
    limit: Limit = None,
    benign_limit: Annotated[
        int, typer.Option(min=0, help="Held-out XSTest safe prompts per seed (0: none).")
    ] = 60,
    rwi_k: Annotated[int, typer.Option(min=1, help="RWI: random insertions per prompt.")] = 8,
    rwi_criterion: Annotated[
        str, typer.Option(help=f"RWI attacker's criterion: {'|'.join(CRITERIA)}.")
    ] = "harm_likelihood",
    probe_aware_steps: Annotated[
        str, typer.Option(help="probe_aware: attacker budgets, comma-separated GCG steps.")
    ] = ",".join(map(str, PROBE_AWARE_STEPS)),
    utility_n: Annotated[
        int, typer.Option(min=0, help="GSM8K references for the utility log-likelihood.")
    ] = 100,
    seed: Annotated[list[int], typer.Option(help="Seed; repeat for repetitions.")] = [0],  # noqa: B006
    attack: Annotated[str, typer.Option("--attacks", help="Attacks to run.")] = _csv(ATTACKS),
    ks: Annotated[str, typer.Option(help="Prefill lengths k.")] = _csv(DEFAULT_KS),
    positions: Annotated[str, typer.Option(help="Insertion positions (tokens, 'end').")] = _csv(
        DEFAULT_POSITIONS
    ),
    lengths: Annotated[str, typer.Option(help="Inserted span lengths m.")] = _csv(DEFAULT_LENGTHS),
    refusal: Annotated[str, typer.Option(help="Refusals to insert into: pool | own.")] = "pool",
    max_tokens: MaxTokens = 48,
    batch_size: BatchSize = 8,
    temperature: Temperature = 0.0,
    judge: Judge = None,
    writer: Writer = BASE_MODEL,
    writer_tokens: WriterTokens = 64,
    data_dir: DataDir = None,
    out: Annotated[Path, typer.Option(help="Output directory (also the resume cache).")] = Path(
        "runs/bench"
    ),
    api_key: Annotated[
        str | None, typer.Option(envvar="TRAJGUARD_BENCH_API_KEY", help="Endpoint bearer key.")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars.")] = True,
) -> None:
    """Attack every model and defence; write results.json, results.md and figures to OUT."""
    probes = [None if p.lower() == "none" else p for p in probe or []]
    if len(probes) not in (0, 1, len(model)):
        raise typer.BadParameter(
            f"{len(probes)} probes for {len(model)} models: give one, or one per model",
            param_hint="--probe",
        )
    options = dict(locals())
    options["probe"] = None if len(probes) != 1 else probes[0]
    harness = _config(
        "bench", {k: v for k, v in options.items() if k not in ("model", "seed", "probes")}
    )
    if rwi_criterion not in CRITERIA:
        raise typer.BadParameter(f"must be one of {CRITERIA}", param_hint="--rwi-criterion")
    if refusal not in REFUSAL_SOURCES:
        raise typer.BadParameter(f"must be one of {REFUSAL_SOURCES}", param_hint="--refusal")
    names = [a.strip() for a in attack.split(",") if a.strip()]
    if not names or set(names) - set(ALL_ATTACKS):
        raise typer.BadParameter(f"choose from {', '.join(ALL_ATTACKS)}", param_hint="--attacks")
    try:
        p_values = parse_positions(positions)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--positions") from exc
    config = BenchConfig(
        models=list(model),
        probes=probes if len(probes) > 1 else [],
        seeds=list(seed),
        attacks=names,
        ks=_ints(ks, "--ks"),
        positions=p_values,
        lengths=_ints(lengths, "--lengths"),
        refusal=refusal,
        benign_limit=benign_limit,
        rwi_k=rwi_k,
        rwi_criterion=rwi_criterion,
        probe_aware_steps=_ints(probe_aware_steps, "--probe-aware-steps"),
        utility_n=utility_n,
        api_key=api_key,
        harness=harness,
    )
    results = run_bench(config, progress=progress)
    typer.echo((out / "results.md").read_text(encoding="utf-8"))
    run = results["run"]
    typer.echo(
        f"wall time {run['wall_time_s']:.1f} s ({run['generated']} generated, {run['cached']} cached)"
    )
    typer.echo(headline(results))


@app.command()
def report(directory: Annotated[Path, typer.Argument(help="A bench output directory.")]) -> None:
    """Re-render results.md and the figures from DIRECTORY/results.json."""
    results = load_results(directory)
    for name, path in render_report(results, directory).items():
        typer.echo(f"{name}: {path}")
    typer.echo(headline(results))


@app.command()
def perf(
    benchmarks: Annotated[
        str, typer.Option(help=f"Benchmarks to run: {', '.join(BENCHMARKS)}.")
    ] = "overhead,serve_local",
    model: Annotated[str, typer.Option(help="Model of the library benchmark.")] = DEFAULT_MODEL,
    probe: Annotated[
        Path | None, typer.Option(help="Probe of the library benchmark (default: shipped).")
    ] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Alternating rounds per arm.")] = 2,
    max_tokens: MaxTokens = 32,
    batch: Annotated[str, typer.Option(help="Library batch sizes.")] = "1,4",
    concurrency: Annotated[str, typer.Option(help="Proxy concurrent streams.")] = "1,4",
    requests_per_level: Annotated[int, typer.Option(min=1, help="Proxy requests per arm.")] = 4,
    threads: Annotated[int, typer.Option(min=1, help="torch threads (proxy benchmarks).")] = 1,
    upstream: Annotated[
        str | None, typer.Option(help="vLLM server URL (needed by serve_vllm).")
    ] = None,
    vllm_python: Annotated[
        str | None,
        typer.Option(
            envvar="TRAJGUARD_VLLM_PYTHON",
            help="Python of a vLLM venv with trajguard (needed by vllm_plugin).",
        ),
    ] = None,
    vllm_batch: Annotated[str, typer.Option(help="vllm_plugin batch sizes.")] = "1,8,32",
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("runs/perf"),
) -> None:
    """Guarded/unguarded overhead of the library and the proxy, with the machine, in perf.json."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = [b.strip() for b in benchmarks.split(",") if b.strip()]
    if not names or set(names) - set(BENCHMARKS):
        raise typer.BadParameter(f"choose from {', '.join(BENCHMARKS)}", param_hint="--benchmarks")
    if "serve_vllm" in names and upstream is None:
        raise typer.BadParameter("serve_vllm needs a vLLM server URL", param_hint="--upstream")
    if "vllm_plugin" in names and vllm_python is None:
        raise typer.BadParameter(
            "vllm_plugin needs a vLLM venv's python", param_hint="--vllm-python"
        )
    config = PerfConfig(
        benchmarks=names,
        out=str(out),
        model=model,
        probe=None if probe is None else str(probe),
        rounds=rounds,
        max_tokens=max_tokens,
        batch=_ints(batch, "--batch"),
        concurrency=_ints(concurrency, "--concurrency"),
        requests_per_level=requests_per_level,
        threads=threads,
        upstream=upstream,
        vllm_python=vllm_python,
        vllm_batch=_ints(vllm_batch, "--vllm-batch"),
    )
    payload = run_perf(config)
    m = payload["machine"]
    typer.echo(
        f"machine: {m['cpu_model']}, {m['cpu_cores_usable']}/{m['cpu_cores']} cores, "
        f"torch {m['torch']}, GPU {', '.join(m['gpus']) or 'none'}"
    )
    for name, r in payload["benchmarks"].items():
        typer.echo(f"{name:>12}: {r['headline']} = {r['ratio']:.3f} ({r['wall_s']:.0f} s)")
    typer.echo(f"{out / 'perf.json'}")
    typer.echo(f"perf guarded/unguarded ratio geomean: {payload['ratio_geomean']:.3f}")


if __name__ == "__main__":
    app()
