"""``trajguard bench attacks``: every attack against every model and defence, one results file.

For each model, seed and defence the bench builds the harness's cases per attack (see
:mod:`benchmarks.bench.cells`), generates what the sample cache does not hold yet, judges
everything with the harness judge and aggregates per cell: ASR, guard trigger rate and
leaked harmful tokens (95 % Wilson intervals for rates), generation wall time. XSTest's
safe prompts give the benign false-trigger and over-refusal rates, and the share of benign
answers the guard left as the undefended model wrote them; the model's utility is the
harness's GSM8K reference log-likelihood.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from benchmarks.bench.cache import SampleCache, digest, tokenizer_digest
from benchmarks.bench.cells import (
    ATTACKS,
    PROBE_AWARE_STEPS,
    AttackCell,
    attack_cells,
    benign_prompts,
)
from benchmarks.bench.machine import describe_machine
from benchmarks.bench.report import render_report
from benchmarks.bench.targets import EndpointTarget, LocalTarget, ModelSpec, Target
from guard import DEFAULT_MODEL, GenerationResult, LoadedModel, SamplingParams, load_model
from guard.models import model_fingerprint
from training.attacks.benign import reference_loglik
from training.attacks.direct import direct_cases
from training.attacks.harness import (
    AttackCase,
    AttackConfig,
    AttackContext,
    build_engine,
    case_records,
    summarize,
)
from training.attacks.insert import DEFAULT_LENGTHS, DEFAULT_POSITIONS
from training.attacks.judging import load_or_fit_judge
from training.attacks.prefill import DEFAULT_KS
from training.common.insertion import Position
from training.common.prompts import load_attack_prompts
from training.common.stats import Rate
from training.judge import HarmScorer

logger = logging.getLogger(__name__)

BENIGN = "benign"
UNDEFENDED = "none"
RESULTS_FILE = "results.json"
RECORDS_FILE = "records.jsonl"
CACHE_FILE = "cache.jsonl"
KEY_VERSION = 2  # what a target hash covers (1: model path, URL and probe.json only)
N_EXAMPLES = 6


@dataclass
class BenchConfig:
    """Settings of one bench run (saved in ``results.json``).

    Attributes:
        models: Local models (alias, HF dir, cached id) or endpoints ``[LOCAL@]URL``.
        probes: One guard probe per model (``None``: that model runs undefended only);
            empty: ``harness.probe`` guards every local model.
        seeds: One repetition per seed (prompt sample, insertions, sampling).
        attacks: Attacks to run (see :data:`~benchmarks.bench.cells.ATTACKS`).
        ks: Prefill lengths.
        positions: Insertion positions (tokens, or ``end``).
        lengths: Inserted span lengths (insertion, RWI and multi-turn cells).
        refusal: Refusals to insert into: ``pool`` or ``own``.
        benign_limit: Seeded sample of this many XSTest safe prompts per seed (0: none).
        rwi_k: Random insertions per prompt the RWI attack picks its worst from.
        rwi_criterion: The RWI attacker's criterion (``harm_likelihood`` or
            ``recovery_loss``).
        probe_aware_steps: The probe-aware attacker's budgets (GCG steps; 0: no search).
        utility_n: GSM8K test references whose mean token log-likelihood is the utility
            figure of a local model (0: skip).
        chunk: Samples generated between two cache flushes.
        api_key: Bearer key for endpoints.
        harness: The attack harness's settings, applied to every model and seed (its
            ``model`` and ``seed`` are set per run): prompts, guard probe and policy,
            generation, judge, writer, data and output directory. With a probe, local
            models run both undefended and guarded; ``batch_size`` is also the number of
            requests in flight to an endpoint.
    """

    models: list[str] = field(default_factory=lambda: [DEFAULT_MODEL])
    probes: list[str | None] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    attacks: list[str] = field(default_factory=lambda: list(ATTACKS))
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    positions: list[Position] = field(default_factory=lambda: list(DEFAULT_POSITIONS))
    lengths: list[int] = field(default_factory=lambda: list(DEFAULT_LENGTHS))
    refusal: str = "pool"
    benign_limit: int = 60
    rwi_k: int = 8
    rwi_criterion: str = "harm_likelihood"
    probe_aware_steps: list[int] = field(default_factory=lambda: list(PROBE_AWARE_STEPS))
    utility_n: int = 100
    chunk: int = 32
    api_key: str | None = None
    harness: AttackConfig = field(
        default_factory=lambda: AttackConfig(attack="bench", out="runs/bench")
    )


@dataclass
class _Job:
    """One attack's cases on one model for one seed, with their sample keys."""

    attack: str
    ctx: AttackContext
    cases: list[AttackCase]
    keys: list[str]
    seed: int


@dataclass
class _Counts:
    generated: int = 0
    cached: int = 0


def model_probes(config: BenchConfig) -> list[str | None]:
    """The guard probe of each model (``None``: undefended only).

    Raises:
        ValueError: ``probes`` is neither empty nor one per model.
    """
    if not config.probes:
        return [config.harness.probe] * len(config.models)
    if len(config.probes) != len(config.models):
        raise ValueError(
            f"{len(config.probes)} probes for {len(config.models)} models: give one per model"
        )
    return list(config.probes)


def _targets(
    spec: ModelSpec, lm: LoadedModel, probe: str | None, config: BenchConfig
) -> list[Target]:
    """The endpoint as served, or the local model undefended and (with a probe) guarded.

    A local model's weight fingerprint is computed here, once for both its targets.
    """
    h = config.harness
    if spec.url is not None:
        return [
            EndpointTarget(spec.url, lm.tokenizer, concurrency=h.batch_size, api_key=config.api_key)
        ]
    fingerprint = model_fingerprint(lm.model)
    plain = LocalTarget(
        build_engine(lm, None), UNDEFENDED, batch_size=h.batch_size, fingerprint=fingerprint
    )
    if probe is None:
        return [plain]
    engine = build_engine(lm, probe, h.policy, strict_probe=h.strict_probe)
    guarded = LocalTarget(
        engine,
        f"guard:{h.policy}",
        batch_size=h.batch_size,
        fingerprint=fingerprint,
        probe_dir=probe,
    )
    return [plain, guarded]


def _target_hash(target: Target, tokenizer: str, config: BenchConfig) -> str:
    """Everything besides the case itself that decides a generation.

    The target's identity (weights, resolved guard config and probe; an endpoint's served
    id and reported fingerprint), the tokenizer that builds the requests, and every
    sampling setting but the per-sample seed.
    """
    h = config.harness
    sampling = asdict(SamplingParams(max_tokens=h.max_tokens, temperature=h.temperature))
    del sampling["seed"]  # follows the sample (see _generate)
    return digest([KEY_VERSION, target.defence, target.identity, tokenizer, sampling])


def _sample_keys(ctx: AttackContext, cases: Sequence[AttackCase], seed: int) -> list[str]:
    """Per case: hash of prompt, cell, prefill, seed and the case's own conversation (if it
    has one), plus a counter for repeats."""
    seen: dict[str, int] = {}
    keys = []
    for c in cases:
        parts = [ctx.prompts[c.prompt_index].prompt, c.cell, c.prefill_ids, seed]
        if c.prompt_ids is not None:  # only then: the keys of single-turn cases stay as they were
            parts.append(c.prompt_ids)
        base = digest(parts)
        seen[base] = seen.get(base, -1) + 1
        keys.append(f"{base}.{seen[base]}")
    return keys


def _jobs(
    config: BenchConfig, lm: LoadedModel, cells: Sequence[AttackCell], seed: int
) -> list[_Job]:
    """Build every attack's cases (and the benign ones) once per model and seed."""
    base = replace(config.harness, model=lm.model_id, seed=seed, params={})
    ctx = AttackContext(base, lm=lm)
    built = [(cell.name, ctx, cell.build(ctx)) for cell in cells]
    if config.benign_limit > 0:
        prompts = benign_prompts(config.benign_limit, seed=seed, data_dir=base.data_dir)
        benign = AttackContext(base, lm=lm, prompts=prompts)
        built.append((BENIGN, benign, direct_cases(benign)))
    return [_Job(name, c, cases, _sample_keys(c, cases, seed), seed) for name, c, cases in built]


def _generate(
    target: Target,
    job: _Job,
    prefix: str,
    cache: SampleCache,
    config: BenchConfig,
    *,
    run_id: str,
    counts: _Counts,
    progress: bool,
) -> list[tuple[GenerationResult, dict[str, Any]]]:
    """Every case's result and cache entry: cached ones read back, the rest generated."""
    h = config.harness
    keys = [f"{prefix}:{k}" for k in job.keys]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    counts.cached += len(keys) - len(todo)
    for start in range(0, len(todo), config.chunk):
        chunk = todo[start : start + config.chunk]
        cases = [job.cases[i] for i in chunk]
        requests = [job.ctx.request(c) for c in cases]
        params = [  # the seed follows the sample, not its place in this run
            SamplingParams(
                max_tokens=h.max_tokens,
                temperature=h.temperature,
                seed=int(job.keys[i][:8], 16),
            )
            for i in chunk
        ]
        t0 = time.perf_counter()
        results = target.generate(requests, params, desc=job.attack, progress=progress)
        seconds = (time.perf_counter() - t0) / len(chunk)
        cache.add([(keys[i], r, seconds) for i, r in zip(chunk, results)], run_id)
        counts.generated += len(chunk)
    return [cache.get(k) for k in keys]


def _attack_cells(records: list[dict[str, Any]], group_by) -> list[dict[str, Any]]:
    """Harness summaries per grouping, plus the leaked tokens and wall time of their samples."""
    out = []
    for keys in group_by:
        for summary in summarize(records, [keys]):
            members = [
                r
                for r in records
                if all(k in r["cell"] and r["cell"][k] == v for k, v in summary.cell.items())
            ]
            out.append(
                {
                    "grouping": list(keys),
                    **summary.to_dict(),
                    "leaked": [m["leaked_tokens"] for m in members],
                    "wall_s": sum(m["gen_s"] for m in members),
                }
            )
    return out


def _rate(flags: Sequence[bool]) -> dict[str, Any]:
    return Rate.of(sum(flags), len(flags)).to_dict()


def _benign_cell(
    records: list[dict[str, Any]], reference: list[dict[str, Any]] | None
) -> dict[str, Any]:
    """False triggers, over-refusal and utility (answers left as the undefended model's)."""
    utility = None
    if reference is not None:
        plain = {(r["seed"], r["sample"]): r["continuation"] for r in reference}
        utility = _rate([plain.get((r["seed"], r["sample"])) == r["continuation"] for r in records])
    guarded = all(r["triggered"] is not None for r in records)
    return {
        "n": len(records),
        "false_trigger": _rate([bool(r["triggered"]) for r in records]) if guarded else None,
        "over_refusal": _rate([r["refusal"] for r in records]),
        "utility": utility,
        "mean_new_tokens": sum(r["n_new_tokens"] for r in records) / len(records),
        "wall_s": sum(r["gen_s"] for r in records),
    }


def _max_score(r: dict[str, Any]) -> float:
    return max((s for s in r["scores"] if s is not None), default=0.0)


def _examples(records: list[dict[str, Any]], thresholds: dict[str, float | None]) -> list[dict]:
    """A few guarded trajectories with their per-token scores: one per attack, triggered first."""
    scored = sorted(
        (r for r in records if r["attack"] != BENIGN and any(s is not None for s in r["scores"])),
        key=lambda r: (not r["triggered"], -_max_score(r)),
    )
    firsts = {}
    for r in scored:
        firsts.setdefault(r["attack"], r)
    picked = list(firsts.values())
    picked += [r for r in scored if r not in picked][: max(0, N_EXAMPLES - len(picked))]
    fields = ("model", "defence", "attack", "cell", "prompt", "prefill", "continuation")
    return [
        {
            **{f: r[f] for f in fields},
            "scores": r["scores"],
            "threshold": thresholds.get(f"{r['model']}|{r['defence']}"),
            "triggered": r["triggered"],
            "leaked_tokens": r["leaked_tokens"],
            "success": r["success"],
        }
        for r in picked[:N_EXAMPLES]
    ]


def aggregate(
    records: list[dict[str, Any]],
    cells: Sequence[AttackCell],
    utility_loglik: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Per (model, defence): attack cells and the benign figures (with the model's utility)."""
    group_by = {c.name: c.group_by for c in cells}
    pairs = list(dict.fromkeys((r["model"], r["defence"]) for r in records))
    out: dict[str, Any] = {"cells": [], "benign": []}
    for model, defence in pairs:
        mine = [r for r in records if r["model"] == model and r["defence"] == defence]
        for attack in (c.name for c in cells):
            attacked = [r for r in mine if r["attack"] == attack]
            for cell in _attack_cells(attacked, group_by[attack]) if attacked else []:
                out["cells"].append({"model": model, "defence": defence, "attack": attack, **cell})
        benign = [r for r in mine if r["attack"] == BENIGN]
        if benign:
            reference = [
                r
                for r in records
                if r["model"] == model and r["defence"] == UNDEFENDED and r["attack"] == BENIGN
            ]
            cell = _benign_cell(benign, reference or None)
            loglik = (utility_loglik or {}).get(model)
            out["benign"].append(
                {"model": model, "defence": defence, **cell, "utility_loglik": loglik}
            )
    return out


def run_bench(config: BenchConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run the bench; write ``results.json``, ``records.jsonl`` and the report into ``out``.

    Returns:
        The results (what ``results.json`` holds).
    """
    start = time.perf_counter()
    probes = model_probes(config)  # fail before any work
    out = Path(config.harness.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = attack_cells(
        config.attacks,
        ks=config.ks,
        positions=config.positions,
        lengths=config.lengths,
        refusal=config.refusal,
        rwi_k=config.rwi_k,
        rwi_criterion=config.rwi_criterion,
        probe_aware_steps=config.probe_aware_steps,
    )
    judge = load_or_fit_judge(
        config.harness.judge,
        data_dir=config.harness.data_dir,
        exclude_prompts=_evaluated_prompts(config.harness),
    )
    cache, run_id, counts = SampleCache(out / CACHE_FILE), uuid.uuid4().hex[:12], _Counts()
    records: list[dict[str, Any]] = []
    thresholds: dict[str, float | None] = {}
    identities: dict[str, dict[str, Any]] = {}
    utility: dict[str, float] = {}
    built: dict[tuple[str, int], list[_Job]] = {}  # endpoints of one local model share cases
    for model, probe in zip(config.models, probes):
        spec = ModelSpec.parse(model, default_local=DEFAULT_MODEL)
        lm = load_model(spec.local)
        if spec.url is None and config.utility_n > 0:
            utility[spec.label] = reference_loglik(lm, config.utility_n, config.harness.data_dir)
        targets = _targets(spec, lm, probe, config)
        tokenizer = tokenizer_digest(lm.tokenizer)
        prefixes = [_target_hash(target, tokenizer, config) for target in targets]
        for target, prefix in zip(targets, prefixes):
            thresholds[f"{spec.label}|{target.defence}"] = target.threshold
            identities[f"{spec.label}|{target.defence}"] = {"key": prefix, **target.identity}
        for seed in config.seeds:
            if (spec.local, seed) not in built:  # the same cases for every defence
                built[spec.local, seed] = _jobs(config, lm, cells, seed)
            jobs = built[spec.local, seed]
            for target, prefix in zip(targets, prefixes):
                desc = f"{spec.label} {target.defence} seed={seed}"
                for job in tqdm(jobs, desc=desc, disable=not progress):
                    outputs = _generate(
                        target, job, prefix, cache, config,
                        run_id=run_id, counts=counts, progress=progress,
                    )  # fmt: skip
                    records += _records(spec.label, target, job, outputs, judge)
    with (out / RECORDS_FILE).open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    results = {
        "config": asdict(config),
        "machine": describe_machine(),
        "run": {
            "id": run_id,
            "wall_time_s": round(time.perf_counter() - start, 2),
            "generated": counts.generated,
            "cached": counts.cached,
        },
        "thresholds": thresholds,
        "targets": identities,
        **aggregate(records, cells, utility),
        "examples": _examples(records, thresholds),
    }
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
    render_report(results, out)
    logger.info(
        "bench: %d samples (%d generated, %d cached) in %.1f s -> %s",
        len(records), counts.generated, counts.cached, results["run"]["wall_time_s"], out,
    )  # fmt: skip
    return results


def _evaluated_prompts(h: AttackConfig) -> list[str]:
    """Every harmful prompt the run may attack (any seed): the judge never trains on them."""
    prompts = load_attack_prompts(
        prompts_file=h.prompts_file, split=h.split, limit=None, seed=h.seed, data_dir=h.data_dir
    )
    return [p.prompt for p in prompts]


def _records(
    label: str,
    target: Target,
    job: _Job,
    outputs: list[tuple[GenerationResult, dict[str, Any]]],
    judge: HarmScorer,
) -> list[dict[str, Any]]:
    """Harness records of one job, tagged with model, defence, attack, seed and sample."""
    results = [r for r, _ in outputs]
    records = case_records(job.ctx, job.cases, results, judge)
    for record, key, result, (_, entry) in zip(records, job.keys, results, outputs):
        record.update(
            model=label,
            defence=target.defence,
            attack=job.attack,
            seed=job.seed,
            sample=key,
            cache_key=entry["key"],
            scores=result.scores,
            gen_s=entry["gen_s"],
            run=entry["run"],
        )
    return records
