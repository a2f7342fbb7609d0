"""``trajguard bench perf``: the overhead benchmarks in one run, with a machine description.

Each benchmark is one of the repository's scripts, run through its own ``main`` (the
library decode loop in :mod:`benchmarks.overhead`, the proxy's local and vLLM backends in
:mod:`benchmarks.serve_load`, the in-engine vLLM plugin in :mod:`benchmarks.vllm_overhead`). Every script prints its headline as its last line,
``name: value``, and writes its full JSON; both are collected into ``perf.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import overhead, serve_load, vllm_overhead
from benchmarks.bench.machine import describe_machine
from guard import DEFAULT_MODEL

logger = logging.getLogger(__name__)

PERF_FILE = "perf.json"


@dataclass
class PerfConfig:
    """Settings of one perf run (saved in ``perf.json``).

    Attributes:
        benchmarks: Which to run (see :data:`BENCHMARKS`); ``serve_vllm`` needs ``upstream``.
        out: Output directory.
        model: Model of the library benchmark (the proxy benchmarks use the default model).
        probe: Probe of the library benchmark (default: the probe shipped for the default model).
        rounds: Alternating guarded/unguarded rounds.
        max_tokens: Tokens per request.
        batch: Batch sizes of the library benchmark.
        concurrency: Concurrent streams of the proxy benchmarks.
        requests_per_level: Requests per arm and round (proxy).
        threads: torch threads of the proxy benchmarks.
        upstream: vLLM base URL for ``serve_vllm``.
        vllm_python: Python of a venv with vLLM and trajguard (``vllm_plugin``).
        vllm_batch: Batch sizes of ``vllm_plugin``.
    """

    benchmarks: list[str] = field(default_factory=lambda: ["overhead", "serve_local"])
    out: str = "runs/perf"
    model: str = DEFAULT_MODEL
    probe: str | None = None
    rounds: int = 2
    max_tokens: int = 32
    batch: list[int] = field(default_factory=lambda: [1, 4])
    concurrency: list[int] = field(default_factory=lambda: [1, 4])
    requests_per_level: int = 4
    threads: int = 1
    upstream: str | None = None
    vllm_python: str | None = None
    vllm_batch: list[int] = field(default_factory=lambda: [1, 8, 32])


def _overhead(config: PerfConfig, json_out: Path) -> None:
    overhead.main(
        model=config.model,
        probe=None if config.probe is None else Path(config.probe),
        rounds=config.rounds,
        max_tokens=config.max_tokens,
        batch=config.batch,
        json_out=json_out,
    )


def _serve(upstream: str | None) -> Callable[[PerfConfig, Path], None]:
    def run(config: PerfConfig, json_out: Path) -> None:
        serve_load.main(
            concurrency=config.concurrency,
            requests_per_level=config.requests_per_level,
            max_tokens=config.max_tokens,
            rounds=config.rounds,
            holdback=4,
            threads=config.threads,
            upstream=upstream,
            json_out=json_out,
        )

    return run


def _vllm_plugin(config: PerfConfig, json_out: Path) -> None:
    vllm_overhead.main(
        vllm_python=config.vllm_python,
        batch=config.vllm_batch,
        max_tokens=config.max_tokens,
        rounds=config.rounds,
        proxy=True,
        json_out=json_out,
    )


BENCHMARKS: dict[str, str] = {
    "overhead": "library: guarded vs unguarded decode tokens/s (GuardedEngine)",
    "serve_local": "proxy, local backend: guarded vs unguarded stream throughput",
    "serve_vllm": "proxy, vLLM backend (shadow scorer): guarded vs unguarded throughput",
    "vllm_plugin": "vLLM with the in-engine trajguard plugin vs stock vLLM tokens/s",
}


def _runner(name: str, config: PerfConfig) -> Callable[[PerfConfig, Path], None]:
    if name == "overhead":
        return _overhead
    if name == "serve_local":
        return _serve(None)
    if name == "serve_vllm":
        if config.upstream is None:
            raise ValueError("serve_vllm needs --upstream (a running vLLM server)")
        return _serve(config.upstream)
    if name == "vllm_plugin":
        if config.vllm_python is None:
            raise ValueError("vllm_plugin needs --vllm-python (a venv with vLLM and trajguard)")
        return _vllm_plugin
    raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")


def headline(output: str) -> tuple[str, float]:
    """The ``name: value`` of a script's last printed line."""
    last = [line for line in output.splitlines() if line.strip()][-1]
    name, _, value = last.rpartition(": ")
    return name, float(value)


def run_perf(config: PerfConfig) -> dict[str, Any]:
    """Run the selected benchmarks; write and return ``perf.json``'s content."""
    runners = {name: _runner(name, config) for name in config.benchmarks}
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for name, run in runners.items():
        json_out = out / f"{name}.json"
        printed = io.StringIO()
        start = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            run(config, json_out)
        wall = time.perf_counter() - start
        sys.stdout.write(printed.getvalue())
        metric, ratio = headline(printed.getvalue())
        results[name] = {
            "what": BENCHMARKS[name],
            "headline": metric,
            "ratio": ratio,
            "wall_s": round(wall, 2),
            "details": json.loads(json_out.read_text(encoding="utf-8")),
        }
        logger.info("perf %s: %s = %.3f (%.1f s)", name, metric, ratio, wall)
    ratios = [r["ratio"] for r in results.values()]
    payload = {
        "machine": describe_machine(),
        "config": asdict(config),
        "benchmarks": results,
        "ratio_geomean": math.exp(statistics.fmean(math.log(r) for r in ratios)),
    }
    (out / PERF_FILE).write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return payload
