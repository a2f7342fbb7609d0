"""``trajguard dynamics``: KL per position, consistency curves, SFT positional plots."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from guard import BASE_MODEL, DEFAULT_MODEL, LoadedModel, encode_chat, load_model
from training.common.insertion import parse_positions, pool_refusals
from training.common.plots import Curve, plot_curves
from training.common.prompts import AttackPrompt, load_attack_prompts
from training.common.responses import harmful_responses
from training.dynamics.consistency import (
    RECOVERY_TEXT,
    insertion_cases,
    position_label,
    prefix_cases,
    score_cases,
)
from training.dynamics.kl import per_position_kl
from training.dynamics.positional import plot_positional

app = typer.Typer(no_args_is_help=True, help="Learning-dynamics measurements (shallow alignment).")
logger = logging.getLogger(__name__)

Prompts = Annotated[
    Path | None, typer.Option("--prompts", help="CSV/JSONL with a prompt/goal column.")
]
Split = Annotated[str, typer.Option(help="Part of the default harmful split.")]
Limit = Annotated[int | None, typer.Option(min=1, help="Seeded sample of this many prompts.")]
Seed = Annotated[int, typer.Option(help="Prompt-sample seed.")]
Out = Annotated[Path, typer.Option(help="Output directory.")]
BatchSize = Annotated[int, typer.Option(min=1)]
Writer = Annotated[str, typer.Option(help="Model that continues targets into harmful responses.")]
DataDir = Annotated[str | None, typer.Option(envvar="TRAJGUARD_DATA")]


def _setup() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def _prompts_and_responses(
    prompts: Path | None,
    split: str,
    limit: int | None,
    seed: int,
    writer: LoadedModel,
    batch_size: int,
    data_dir: str | None,
) -> tuple[list[AttackPrompt], list[str]]:
    chosen = load_attack_prompts(
        prompts_file=prompts, split=split, limit=limit, seed=seed, data_dir=data_dir
    )
    responses = harmful_responses(chosen, writer, batch_size=batch_size, data_dir=data_dir)
    return chosen, [r.text for r in responses]


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2), encoding="utf-8")


@app.command()
def kl(
    aligned: Annotated[str, typer.Option(help="Aligned model (HF directory or alias).")],
    base: Annotated[str, typer.Option(help="Base model it was fine-tuned from.")] = BASE_MODEL,
    prompts: Prompts = None,
    split: Split = "test",
    limit: Limit = None,
    seed: Seed = 0,
    max_tokens: Annotated[int, typer.Option(min=1, help="Response positions measured.")] = 64,
    batch_size: BatchSize = 8,
    writer: Writer = BASE_MODEL,
    out: Out = Path("runs/dynamics"),
    data_dir: DataDir = None,
) -> None:
    """Per-position KL(aligned || base) on teacher-forced harmful responses."""
    _setup()
    start = time.perf_counter()
    base_lm, aligned_lm = load_model(base), load_model(aligned)
    writer_lm = base_lm if writer == base else load_model(writer)
    chosen, responses = _prompts_and_responses(
        prompts, split, limit, seed, writer_lm, batch_size, data_dir
    )
    result = per_position_kl(
        aligned_lm.model,
        base_lm.model,
        aligned_lm.tokenizer,
        [(p.prompt, r) for p, r in zip(chosen, responses)],
        max_response_tokens=max_tokens,
        batch_size=batch_size,
    )
    positions = list(range(len(result.kl.mean)))
    sem_band = lambda s: (
        [m - e for m, e in zip(s.mean, s.sem)],
        [m + e for m, e in zip(s.mean, s.sem)],
    )
    plot_curves(
        out / "kl.png",
        {"KL(aligned || base)": Curve(positions, result.kl.mean, *sem_band(result.kl))},
        xlabel="response token position",
        ylabel="per-token KL (nats), mean +- s.e.",
        title=f"KL per position on {result.n_pairs} harmful responses",
    )
    plot_curves(
        out / "kl_logprob.png",
        {
            "aligned": Curve(positions, result.logprob_aligned.mean),
            "base": Curve(positions, result.logprob_base.mean),
        },
        xlabel="response token position",
        ylabel="mean log P(harmful token)",
        title="Log-probability of the forced harmful tokens",
    )
    wall = time.perf_counter() - start
    _write_json(
        out / "kl.json",
        {
            "aligned": aligned,
            "base": base,
            "n_prompts": len(chosen),
            "wall_time_s": round(wall, 1),
            **result.to_dict(),
        },
    )
    head = ", ".join(f"{v:.3f}" for v in result.kl.mean[:8])
    typer.echo(
        f"KL at positions 0-7: {head}; wrote {out}/kl.json, kl.png, kl_logprob.png ({wall:.0f} s)"
    )


@app.command()
def consistency(
    model: Annotated[
        list[str] | None,
        typer.Option(help="Model(s) to score (repeatable; default: the embedded model)."),
    ] = None,
    prompts: Prompts = None,
    split: Split = "test",
    limit: Limit = None,
    seed: Seed = 0,
    ks: Annotated[str, typer.Option(help="Harmful prefix lengths k.")] = "0,5,10,20,40",
    positions: Annotated[
        str, typer.Option(help="Insertion positions p (tokens or 'end').")
    ] = "0,16,64,end",
    lengths: Annotated[str, typer.Option(help="Inserted span lengths m.")] = "8,16",
    continuation_tokens: Annotated[
        int, typer.Option(min=1, help="Tokens of the harmful continuation.")
    ] = 16,
    batch_size: BatchSize = 8,
    writer: Writer = BASE_MODEL,
    out: Out = Path("runs/dynamics"),
    data_dir: DataDir = None,
) -> None:
    """Likelihood-based consistency curves: harmful prefix k, and refusal[:p] + span[:m]."""
    _setup()
    start = time.perf_counter()
    models = model or [DEFAULT_MODEL]
    k_values = [int(k) for k in ks.split(",") if k.strip()]
    p_values, m_values = (
        parse_positions(positions),
        [int(m) for m in lengths.split(",") if m.strip()],
    )
    writer_lm = load_model(writer)
    chosen, responses = _prompts_and_responses(
        prompts, split, limit, seed, writer_lm, batch_size, data_dir
    )
    refusals = pool_refusals(len(chosen), seed)
    payload: dict = {
        "method": "likelihood forced choice",
        "recovery_text": RECOVERY_TEXT,
        "models": {},
    }
    prefix_curves, insert_curves = {}, {}
    for name in models:
        lm = writer_lm if name == writer else load_model(name)
        tok = lm.tokenizer
        prompt_ids = [
            encode_chat(tok, [{"role": "user", "content": p.prompt}]).prompt_ids for p in chosen
        ]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        pre = score_cases(
            lm.model,
            prefix_cases(
                tok, prompt_ids, responses, k_values, continuation_tokens=continuation_tokens
            ),
            pad,
            batch_size=batch_size,
        )
        ins = score_cases(
            lm.model,
            insertion_cases(
                tok,
                prompt_ids,
                refusals,
                responses,
                p_values,
                m_values,
                continuation_tokens=continuation_tokens,
            ),
            pad,
            batch_size=batch_size,
        )
        label = Path(name).name
        payload["models"][name] = {
            "prefix": [asdict(pt) | {"prefers_harm": pt.prefers_harm.to_dict()} for pt in pre],
            "insert": [asdict(pt) | {"prefers_harm": pt.prefers_harm.to_dict()} for pt in ins],
        }
        prefix_curves[label] = Curve(
            [pt.cell["k"] for pt in pre],
            [pt.prefers_harm.rate for pt in pre],
            [pt.prefers_harm.low for pt in pre],
            [pt.prefers_harm.high for pt in pre],
        )
        for m in m_values:
            row = [pt for pt in ins if pt.cell["m"] == m]
            insert_curves[f"{label}, m={m}"] = Curve(
                [p_values.index(pt.cell["p"]) for pt in row],
                [1 - pt.prefers_harm.rate for pt in row],
                [1 - pt.prefers_harm.high for pt in row],
                [1 - pt.prefers_harm.low for pt in row],
            )
    plot_curves(
        out / "consistency_prefix.png",
        prefix_curves,
        xlabel="harmful prefix length k (tokens)",
        ylabel="P(harmful continuation preferred)",
        title="Consistency after a harmful prefix (likelihood, 95 % CI)",
        ylim=(0.0, 1.0),
    )
    plot_curves(
        out / "consistency_insert.png",
        insert_curves,
        xlabel="insertion position p in the refusal",
        ylabel="P(returns to refusal)",
        title="Recovery after an inserted harmful span (likelihood, 95 % CI)",
        xticks=list(range(len(p_values))),
        xticklabels=[position_label(p) for p in p_values],
        ylim=(0.0, 1.0),
    )
    payload["wall_time_s"] = round(time.perf_counter() - start, 1)
    payload["n_prompts"] = len(chosen)
    _write_json(out / "consistency.json", payload)
    typer.echo(f"wrote {out}/consistency.json, consistency_prefix.png, consistency_insert.png")


@app.command()
def positional(
    json_path: Annotated[Path, typer.Argument(help="positional.json written by `train align`.")],
    out: Out = Path("."),
) -> None:
    """Plot the per-position loss and gradient norms recorded during SFT."""
    _setup()
    for path in plot_positional(json_path, out):
        typer.echo(f"wrote {path}")


if __name__ == "__main__":
    app()
