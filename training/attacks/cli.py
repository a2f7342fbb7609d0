"""``trajguard attack``: direct, prefilling (plain and rank-assisted), insertion, multi-turn and evasion attacks, optionally guarded."""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from guard import BASE_MODEL, DEFAULT_MODEL, load_model
from training.attacks import probe_aware as pa
from training.attacks.benign import UTILITY_SOURCES, reference_loglik, run_benign
from training.attacks.direct import run_direct
from training.attacks.evasion import FORMS, run_evasion
from training.attacks.harness import AttackConfig, AttackReport
from training.attacks.insert import DEFAULT_LENGTHS, DEFAULT_POSITIONS, REFUSAL_SOURCES, run_insert
from training.attacks.multiturn import DEFAULT_TURN_LENGTHS, VARIANTS, run_multiturn
from training.attacks.prefill import DEFAULT_KS, run_prefill
from training.attacks.probe_aware import INITS, run_probe_aware
from training.attacks.rap import DEFAULT_RAP_KS, DEFAULT_TARGET_TOKENS, DEFAULT_TOP_K, run_rap
from training.attacks.traffic import DEFAULT_SOURCES, run_traffic
from training.attacks.worst_insert import run_worst_insert
from training.common.candidates import DEFAULT_SPAN_LENGTHS
from training.common.insertion import parse_positions
from training.common.worst import CRITERIA

app = typer.Typer(
    no_args_is_help=True, help="Attack a model (optionally guarded) and judge the outputs."
)
console = Console()

Model = Annotated[
    str, typer.Option(help="Attacked model: embedded alias, HF directory or cached id.")
]
Prompts = Annotated[
    Path | None, typer.Option("--prompts", help="CSV/JSONL with a prompt/goal column.")
]
Split = Annotated[
    str,
    typer.Option(
        help="Part of the default harmful split (train/dev/test), or heldout (test + CoCoNot safety concerns)."
    ),
]
Limit = Annotated[int | None, typer.Option(min=1, help="Seeded sample of this many prompts.")]
Out = Annotated[Path, typer.Option(help="Output directory.")]
Probe = Annotated[Path | None, typer.Option(help="Probe directory: guard the decoding.")]
Policy = Annotated[
    str, typer.Option(help="Recovery policy with --probe: rollback | stop | resample.")
]
StrictProbe = Annotated[bool, typer.Option(help="Require the probe to match the model's weights.")]
MaxTokens = Annotated[
    int, typer.Option(min=1, help="New tokens per case (the judged continuation).")
]
BatchSize = Annotated[int, typer.Option(min=1, help="Live requests in the engine.")]
Seed = Annotated[int, typer.Option(help="Prompt-sample / randomness / sampling seed.")]
Temperature = Annotated[float, typer.Option(min=0.0, max=2.0, help="0 = greedy.")]
Judge = Annotated[
    Path | None, typer.Option(help="Saved harm judge dir (default: fit once, cached).")
]
Writer = Annotated[str, typer.Option(help="Model that continues targets into harmful responses.")]
WriterTokens = Annotated[int, typer.Option(min=1, help="Tokens the writer adds after a target.")]
DataDir = Annotated[
    str | None, typer.Option(envvar="TRAJGUARD_DATA", help="Offline data directory.")
]


def _config(attack: str, options: dict[str, Any]) -> AttackConfig:
    """Build the shared config from a command's options (attack-specific ones are ignored)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if options["policy"] not in ("rollback", "stop", "resample"):
        raise typer.BadParameter("must be rollback, stop or resample", param_hint="--policy")
    options = {**options, "prompts_file": options.get("prompts")}
    names = {f.name for f in fields(AttackConfig)} - {"attack", "params"}
    kw = {k: str(v) if isinstance(v, Path) else v for k, v in options.items() if k in names}
    return AttackConfig(attack=attack, **kw)


def _print(report: AttackReport) -> None:
    table = Table(title=f"{report.config.attack}: {report.config.model}")
    for column in ("cell", "n", "ASR", "95% CI", "refusal", "mean P(harm)"):
        table.add_column(column, justify="left" if column == "cell" else "right")
    for c in report.cells:
        table.add_row(
            c.label,
            str(c.asr.n),
            f"{c.asr.rate:.3f}",
            f"[{c.asr.low:.3f}, {c.asr.high:.3f}]",
            f"{c.refusal_rate.rate:.3f}",
            f"{c.mean_p_harm:.3f}",
        )
    console.print(table)
    console.print(f"wall time {report.wall_time_s:.1f} s; outputs: {report.paths}")


@app.command()
def direct(
    model: Model = DEFAULT_MODEL,
    prompts: Prompts = None,
    split: Split = "test",
    limit: Limit = None,
    out: Out = Path("runs/attack"),
    probe: Probe = None,
    policy: Policy = "rollback",
    strict_probe: StrictProbe = True,
    max_tokens: MaxTokens = 48,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    judge: Judge = None,
    writer: Writer = BASE_MODEL,
    writer_tokens: WriterTokens = 64,
    data_dir: DataDir = None,
) -> None:
    """Direct request: does the model comply with no attack at all?"""
    _print(run_direct(_config("direct", locals())))


@app.command()
def prefill(
    ks: Annotated[str, typer.Option(help="Comma-separated prefill lengths k (tokens).")] = ",".join(
        map(str, DEFAULT_KS)
    ),
    model: Model = DEFAULT_MODEL,
    prompts: Prompts = None,
    split: Split = "test",
    limit: Limit = None,
    out: Out = Path("runs/attack"),
    probe: Probe = None,
    policy: Policy = "rollback",
    strict_probe: StrictProbe = True,
    max_tokens: MaxTokens = 48,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    judge: Judge = None,
    writer: Writer = BASE_MODEL,
    writer_tokens: WriterTokens = 64,
    data_dir: DataDir = None,
) -> None:
    """Prefilling attack: the answer starts with k tokens of a harmful response."""
    k_values = _ints(ks, "--ks")
    _print(run_prefill(_config("prefill", locals()), k_values))


@app.command()
def rap(
    ks: Annotated[str, typer.Option(help="Comma-separated prefill lengths k (tokens).")] = ",".join(
        map(str, DEFAULT_RAP_KS)
    ),
    top_k: Annotated[
        int, typer.Option(min=1, help="Candidates per step: the model's top-k next tokens.")
    ] = DEFAULT_TOP_K,
    target_tokens: Annotated[
        int, typer.Option(min=1, help="Harmful-response tokens whose likelihood ranks them.")
    ] = DEFAULT_TARGET_TOKENS,
    model: Model = DEFAULT_MODEL,
    prompts: Prompts = None,
    split: Split = "test",
    limit: Limit = None,
    out: Out = Path("runs/attack"),
    probe: Probe = None,
    policy: Policy = "rollback",
    strict_probe: StrictProbe = True,
    max_tokens: MaxTokens = 48,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    judge: Judge = None,
    writer: Writer = BASE_MODEL,
    writer_tokens: WriterTokens = 64,
    data_dir: DataDir = None,
) -> None:
    """Rank-assisted prefilling: each prefilled token is the most harmful of the model's top-k."""
    k_values = _ints(ks, "--ks")
    config = _config("rap", locals())
    _print_with_recall(run_rap(config, k_values, top_k=top_k, target_tokens=target_tokens))


@app.command()
def insert(
    positions: Annotated[
        str, typer.Option(help="Insertion positions p: tokens and/or 'end'.")
    ] = ",".join(map(str, DEFAULT_POSITIONS)),
    lengths: Annotated[str, typer.Option(help="Span lengths m (tokens).")] = ",".join(
        map(str, DEFAULT_LENGTHS)
    ),
    refusal: Annotated[
        str, typer.Option(help="Refusal to insert into: pool (long) | own (greedy).")
    ] = "pool",
    random: Annotated[
        int,
        typer.Option(
            "--random", min=0, help="Random mode: this many random (p, m) draws per prompt."
        ),
    ] = 0,
    model: Model = DEFAULT_MODEL,
    prompts: Prompts = None,
    split: Split = "test",
    limit: Limit = None,
    out: Out = Path("runs/attack"),
    probe: Probe = None,
    policy: Policy = "rollback",
    strict_probe: StrictProbe = True,
    max_tokens: MaxTokens = 48,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    judge: Judge = None,
    writer: Writer = BASE_MODEL,
    writer_tokens: WriterTokens = 64,
    data_dir: DataDir = None,
) -> None:
    """Random insertion attack: refusal[:p] + harmful span[:m], then the model continues."""
    try:
        p_values = parse_positions(positions)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--positions") from exc
    m_values = _ints(lengths, "--lengths")
    if refusal not in REFUSAL_SOURCES:
        raise typer.BadParameter(f"must be one of {REFUSAL_SOURCES}", param_hint="--refusal")
    config = _config("insert", locals())
    _print(run_insert(config, p_values, m_values, refusal=refusal, random_per_prompt=random))


@app.command()
def rwi(
    k: Annotated[int, typer.Option(min=1, help="Random insertions drawn per prompt.")] = 8,
    lengths: Annotated[str, typer.Option(help="Span lengths m (tokens).")] = ",".join(
        map(str, DEFAULT_SPAN_LENGTHS)
    ),
    criterion: Annotated[
        str, typer.Option(help=f"Attacker's worst-of-K criterion: {'|'.join(CRITERIA)}.")
    ] = "harm_likelihood",
    model: Model = DEFAULT_MODEL,
    prompts: Prompts = None,
    split: Split = "test",
    limit: Limit = None,
    out: Out = Path("runs/attack"),
    probe: Probe = None,
    policy: Policy = "rollback",
    strict_probe: StrictProbe = True,
    max_tokens: MaxTokens = 48,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    judge: Judge = None,
    writer: Writer = BASE_MODEL,
    writer_tokens: WriterTokens = 64,
    data_dir: DataDir = None,
) -> None:
    """RWI attack: per prompt, the worst of K random insertions, chosen by the model itself."""
    if criterion not in CRITERIA:
        raise typer.BadParameter(f"must be one of {CRITERIA}", param_hint="--criterion")
    m_values = _ints(lengths, "--lengths")
    if min(m_values) < 1:
        raise typer.BadParameter("span lengths must be >= 1", param_hint="--lengths")
    _print(run_worst_insert(_config("rwi", locals()), k, m_values, criterion))


@app.command()
def multiturn(
    lengths: Annotated[
        str, typer.Option(help="Harmful span lengths m (tokens over all assistant turns).")
    ] = ",".join(map(str, DEFAULT_TURN_LENGTHS)),
    variants: Annotated[
        str,
        typer.Option(help="one_turn (span in one assistant turn) | split_turns (over two)."),
    ] = ",".join(VARIANTS),
    model: Model = DEFAULT_MODEL,
    prompts: Prompts = None,
    split: Split = "test",
    limit: Limit = None,
    out: Out = Path("runs/attack"),
    probe: Probe = None,
    policy: Policy = "rollback",
    strict_probe: StrictProbe = True,
    max_tokens: MaxTokens = 48,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    judge: Judge = None,
    writer: Writer = BASE_MODEL,
    writer_tokens: WriterTokens = 64,
    data_dir: DataDir = None,
) -> None:
    """Multi-turn insertion: a harmful span in earlier assistant turns, then "continue"."""
    m_values = _ints(lengths, "--lengths")
    if min(m_values) < 1:
        raise typer.BadParameter("span lengths must be >= 1", param_hint="--lengths")
    names = _names(variants, VARIANTS, "--variants")
    config = _config("multiturn", locals())
    _print_with_recall(run_multiturn(config, m_values, names))


@app.command()
def evasion(
    forms: Annotated[str, typer.Option(help=f"Answer forms: {', '.join(FORMS)}.")] = ",".join(
        FORMS
    ),
    model: Model = DEFAULT_MODEL,
    prompts: Prompts = None,
    split: Split = "test",
    limit: Limit = None,
    out: Out = Path("runs/attack"),
    probe: Probe = None,
    policy: Policy = "rollback",
    strict_probe: StrictProbe = True,
    max_tokens: MaxTokens = 48,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    judge: Judge = None,
    data_dir: DataDir = None,
) -> None:
    """Token-level evasion: the request asks for base64, leetspeak, another language or code."""
    names = _names(forms, tuple(FORMS), "--forms")
    _print_with_recall(run_evasion(_config("evasion", locals()), names))


@app.command("probe-aware")
def probe_aware(
    probe: Annotated[
        Path, typer.Option(help="The probe the attacker optimises against (a probe directory).")
    ],
    steps: Annotated[
        str, typer.Option(help="Attacker budgets: comma-separated GCG steps (0: no search).")
    ] = ",".join(map(str, pa.DEFAULT_STEPS)),
    candidates: Annotated[
        int, typer.Option(min=1, help="Single-token swaps scored by forward pass per step.")
    ] = pa.DEFAULT_CANDIDATES,
    top_k: Annotated[
        int, typer.Option(min=1, help="Gradient top-k substitutions kept per span position.")
    ] = pa.DEFAULT_TOP_K,
    lam: Annotated[
        float, typer.Option(help="Weight of the mean probe logit in the attacker's loss.")
    ] = pa.DEFAULT_LAMBDA,
    length: Annotated[int, typer.Option(min=1, help="Span length m (tokens).")] = pa.DEFAULT_SPAN,
    target_tokens: Annotated[
        int, typer.Option(min=1, help="Harmful-response tokens after the span (NLL target).")
    ] = pa.DEFAULT_TARGET_TOKENS,
    position: Annotated[
        str, typer.Option(help="Insertion position p in the refusal (tokens or 'end').")
    ] = str(pa.DEFAULT_POSITION),
    init: Annotated[
        str, typer.Option(help="Step-0 span: response (the insertion span) | random.")
    ] = "response",
    guard: Annotated[
        bool, typer.Option(help="Guard the decoding (with --guard-probe, else --probe).")
    ] = True,
    guard_probe: Annotated[
        Path | None,
        typer.Option(help="Guard with this probe instead (e.g. one retrained on the attack)."),
    ] = None,
    refusal: Annotated[
        str, typer.Option(help="Refusal to insert into: pool (long) | own (greedy).")
    ] = "pool",
    model: Model = DEFAULT_MODEL,
    prompts: Prompts = None,
    split: Split = "test",
    limit: Limit = None,
    out: Out = Path("runs/attack"),
    policy: Policy = "rollback",
    strict_probe: StrictProbe = True,
    max_tokens: MaxTokens = 48,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    judge: Judge = None,
    writer: Writer = BASE_MODEL,
    writer_tokens: WriterTokens = 64,
    data_dir: DataDir = None,
) -> None:
    """Probe-aware insertion: a GCG search over the span against the known probe."""
    budgets = _ints(steps, "--steps")
    try:
        (at,) = parse_positions(position)
    except ValueError as exc:
        raise typer.BadParameter("expected one position", param_hint="--position") from exc
    if init not in INITS:
        raise typer.BadParameter(f"must be one of {INITS}", param_hint="--init")
    if refusal not in REFUSAL_SOURCES:
        raise typer.BadParameter(f"must be one of {REFUSAL_SOURCES}", param_hint="--refusal")
    guarded_by = (guard_probe or probe) if guard else None
    config = _config("probe_aware", {**locals(), "probe": guarded_by})
    options = dict(top_k=top_k, lam=lam, length=length, target_tokens=target_tokens)
    options |= dict(position=at, refusal=refusal, init=init)
    report = run_probe_aware(config, str(probe), budgets, candidates, **options)
    _print_with_recall(report)


def _names(text: str, allowed: tuple[str, ...], hint: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or set(names) - set(allowed):
        raise typer.BadParameter(f"choose from {', '.join(allowed)}", param_hint=hint)
    return names


def _print_with_recall(report: AttackReport) -> None:
    """The ASR table, then per cell how often the guard fired (its recall on these requests)."""
    _print(report)
    for c in report.cells:
        if c.trigger_rate is not None:
            r = c.trigger_rate
            console.print(
                f"guard recall {c.label}: {r.rate:.3f} [{r.low:.3f}, {r.high:.3f}], n = {r.n}"
            )


@app.command()
def benign(
    n_eval: Annotated[int, typer.Option(min=2, help="Held-out benign prompts.")] = 120,
    n_utility: Annotated[int, typer.Option(min=1, help="GSM8K references for utility.")] = 100,
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/attack"),
    probe: Probe = None,
    policy: Policy = "rollback",
    strict_probe: StrictProbe = True,
    max_tokens: MaxTokens = 64,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    data_dir: DataDir = None,
) -> None:
    """Benign side: over-refusal on XSTest safe prompts, false triggers, utility log-likelihood."""
    summary = run_benign(_config("benign", locals()), n_eval=n_eval, n_utility=n_utility)
    console.print({k: v for k, v in summary.items() if k != "config"})


@app.command()
def utility(
    model: Annotated[
        list[str], typer.Option(help="Model to score (repeatable): alias, HF dir or cached id.")
    ] = [BASE_MODEL, DEFAULT_MODEL],  # noqa: B006
    n: Annotated[int, typer.Option(min=1, help="Reference answers per source.")] = 100,
    out: Annotated[Path | None, typer.Option(help="Write the figures as JSON here.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Utility: mean token log-likelihood of held-out reference answers (GSM8K, Arena-Hard)."""
    logging.basicConfig(level=logging.WARNING)
    rows = {}
    for name in model:
        lm = load_model(name)  # once per model, for every source
        rows[name] = {s: reference_loglik(lm, n, data_dir, source=s) for s in UTILITY_SOURCES}
    table = Table(title=f"reference log-likelihood per token (n = {n} per source)")
    for column in ("model", *UTILITY_SOURCES):
        table.add_column(column)
    for name, row in rows.items():
        table.add_row(name, *(f"{row[s]:.4f}" for s in UTILITY_SOURCES))
    console.print(table)
    if out is not None:
        out.write_text(json.dumps({"n": n, "models": rows}, indent=2), encoding="utf-8")
    last = rows[model[-1]]
    print(
        f"utility {model[-1]} gsm8k/arena_hard loglik: {last['gsm8k']:.4f}/{last['arena_hard']:.4f}"
    )


@app.command()
def traffic(
    n_per_source: Annotated[int, typer.Option(min=1, help="Prompts sampled per source.")] = 25,
    sources: Annotated[
        str, typer.Option(help="Comma-separated benign sources with an evaluation part.")
    ] = ",".join(DEFAULT_SOURCES),
    model: Model = DEFAULT_MODEL,
    out: Out = Path("runs/attack"),
    probe: Probe = None,
    policy: Policy = "rollback",
    strict_probe: StrictProbe = True,
    max_tokens: MaxTokens = 128,
    batch_size: BatchSize = 8,
    seed: Seed = 0,
    temperature: Temperature = 0.0,
    data_dir: DataDir = None,
) -> None:
    """Ordinary traffic: false triggers and over-refusal per benign source (95 % CIs)."""
    names = [s.strip() for s in sources.split(",") if s.strip()]
    unknown = sorted(set(names) - set(DEFAULT_SOURCES))
    if unknown or not names:
        raise typer.BadParameter(
            f"unknown source(s) {unknown}; choose from {', '.join(DEFAULT_SOURCES)}",
            param_hint="--sources",
        )
    config = _config("traffic", locals())
    summary = run_traffic(config, sources=names, n_per_source=n_per_source)
    table = Table(title=f"traffic: {model}")
    for column in ("source", "n", "false trigger", "over-refusal", "median peak"):
        table.add_column(column)
    for name, row in [*summary["by_source"].items(), ("pooled", summary["pooled"])]:
        ft, orf = row["false_trigger"], row["over_refusal"]
        peak = row["median_peak_score"]
        table.add_row(
            name,
            str(row["n"]),
            "-" if ft is None else f"{ft['rate']:.3f} [{ft['low']:.3f}, {ft['high']:.3f}]",
            f"{orf['rate']:.3f} [{orf['low']:.3f}, {orf['high']:.3f}]",
            "-" if peak is None else f"{peak:.4f}",
        )
    console.print(table)
    pooled = summary["pooled"]["false_trigger"]
    if pooled is not None:
        print(f"traffic false-trigger rate: {pooled['rate']:.4f}")


def _ints(text: str, hint: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise typer.BadParameter("expected comma-separated integers", param_hint=hint) from exc
    if not values or min(values) < 0:
        raise typer.BadParameter("expected non-negative integers", param_hint=hint)
    return values


if __name__ == "__main__":
    app()
