"""``trajguard train``: the training commands of several features under one Typer app.

It mounts ``align`` (:mod:`training.finetune.cli`), ``rwi`` and ``qi``
(:mod:`training.rwi.cli`) and ``probe`` (:mod:`training.probes.cli`), and adds ``ship`` (put a
run's adapter / probe into the package), ``replay`` (rerun a recorded training config) and
``benign-corpus`` (the model's own benign answers for probe v2, :mod:`training.probes.corpus`).
It sits above every feature package, so none of them imports another one just to mount its
command.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from guard.errors import TrajguardError
from guard.models import DEFAULT_MODEL
from training.finetune.align import AlignConfig, run_align
from training.finetune.cli import align
from training.probes.cli import rwi as rwi_probe
from training.probes.cli import v2 as probe_v2
from training.probes.corpus import SPLITS, BenignCorpusConfig, Sampling, build_corpus
from training.rwi.cli import qi, rwi
from training.rwi.run import AugmentedConfig, run_augmented
from training.ship import ship_adapter, ship_probe

app = typer.Typer(no_args_is_help=True, help="Safety fine-tuning.")


@app.callback()
def _main() -> None:
    """Safety fine-tuning."""


app.command()(align)
app.command()(rwi)
app.command()(qi)
app.command("probe", help="Fit the RWI probe (same as `trajguard probe rwi`).")(rwi_probe)
app.command("probe-v2", help="Fit probe v2 (same as `trajguard probe v2`).")(probe_v2)


@app.command()
def ship(
    alias: Annotated[str, typer.Option(help="Aligned alias the artefacts belong to.")] = (
        DEFAULT_MODEL
    ),
    adapter_run: Annotated[
        Path | None, typer.Option(help="A LoRA training run (holds adapter/ + its record).")
    ] = None,
    probe: Annotated[
        Path | None, typer.Option(help="A fitted probe directory (probe.json + weights).")
    ] = None,
) -> None:
    """Put a run's adapter and/or probe into the package (guard/assets), checked."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if adapter_run is None and probe is None:
        raise typer.BadParameter("give --adapter-run and/or --probe")
    try:
        if adapter_run is not None:  # first: the probe check loads the alias with it
            typer.echo(f"adapter: {ship_adapter(adapter_run, alias)}")
        if probe is not None:
            typer.echo(f"probe: {ship_probe(probe, alias)}")
    except TrajguardError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def replay(
    record: Annotated[
        Path, typer.Argument(help="trajguard_align.json of a run, or a shipped training.json.")
    ],
    out: Annotated[Path, typer.Option(help="Output directory of the rerun.")],
) -> None:
    """Rerun a recorded training run (same recipe, data mix, schedule and seeds)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    saved = json.loads(record.read_text(encoding="utf-8"))
    config = {**saved["config"], "out": str(out)}
    if saved.get("method", "align") == "align":
        result = run_align(AlignConfig(**config))
    else:
        result = run_augmented(AugmentedConfig(**config))
    typer.echo(f"{result.out}: {result.global_steps} steps, {result.wall_time_s:.0f} s")


_C = BenignCorpusConfig()


@app.command("benign-corpus")
def benign_corpus(
    model: Annotated[str, typer.Option(help="Guarded model: alias or HF directory.")] = _C.model,
    url: Annotated[
        str | None,
        typer.Option(help="Endpoint serving the same weights (vLLM), e.g. http://127.0.0.1:8011."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Output directory (also the resume cache).")] = Path(
        _C.out
    ),
    n_per_source: Annotated[int, typer.Option(min=1, help="Prompts per source.")] = (
        _C.n_per_source
    ),
    max_tokens: Annotated[int, typer.Option(min=1)] = _C.max_tokens,
    held_out_source: Annotated[
        str, typer.Option(help="Source for eval only (leave-one-source-out); 'none': none.")
    ] = str(_C.held_out_source),
    sampled_fraction: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Prompts also answered by sampling.")
    ] = _C.samplings[1].fraction,
    temperature: Annotated[
        float, typer.Option(min=0.0, max=2.0, help="Temperature of the sampled answers.")
    ] = _C.samplings[1].temperature,
    seed: Annotated[int, typer.Option()] = _C.seed,
    concurrency: Annotated[int, typer.Option(min=1, help="Endpoint requests in flight.")] = (
        _C.concurrency
    ),
    batch_size: Annotated[int, typer.Option(min=1, help="Local engine batch.")] = _C.batch_size,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Generate at most this many answers (smoke runs).")
    ] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="TRAJGUARD_BENCH_API_KEY", help="Endpoint bearer key.")
    ] = None,
    data_dir: Annotated[str | None, typer.Option(envvar="TRAJGUARD_DATA")] = None,
    progress: Annotated[bool, typer.Option(help="Progress bar.")] = True,
) -> None:
    """Generate (or resume) the model's own answers to benign prompts, split for probe v2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        config = BenignCorpusConfig(
            model=model,
            out=str(out),
            url=url,
            n_per_source=n_per_source,
            max_tokens=max_tokens,
            samplings=(Sampling("greedy"), Sampling("sampled", temperature, sampled_fraction)),
            held_out_source=None if held_out_source.lower() == "none" else held_out_source,
            seed=seed,
            concurrency=concurrency,
            batch_size=batch_size,
            data_dir=data_dir,
        )
        summary = build_corpus(config, limit=limit, api_key=api_key, progress=progress)
    except TrajguardError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    for split in SPLITS:
        lengths = summary["by_split"][split]
        if lengths["n"]:
            typer.echo(
                f"{split}: {lengths['n']} answers, median {lengths['quantiles']['q50']:.0f} "
                f"tokens, {lengths['reached_max_tokens']:.1%} reach max_tokens"
            )
    typer.echo(f"held out: {', '.join(summary['held_out']) or 'none'}")
    typer.echo(f"missing: {summary['missing']} of {summary['planned']}")
    typer.echo(f"benign corpus answers: {summary['answers']}")


if __name__ == "__main__":
    app()
