"""``trajguard bench``: offline attack benchmark (ASR, leaked tokens, benign figures) and perf suite."""

from benchmarks.bench.attacks import BenchConfig, aggregate, run_bench
from benchmarks.bench.cells import ATTACKS, AttackCell, attack_cells, benign_prompts
from benchmarks.bench.report import load_results, markdown_table, render_report
from benchmarks.bench.targets import EndpointTarget, LocalTarget, ModelSpec

__all__ = [
    "ATTACKS",
    "AttackCell",
    "BenchConfig",
    "EndpointTarget",
    "LocalTarget",
    "ModelSpec",
    "aggregate",
    "attack_cells",
    "benign_prompts",
    "load_results",
    "markdown_table",
    "render_report",
    "run_bench",
]
