"""``trajguard train``: the training commands of several features under one Typer app.

It mounts ``align`` (:mod:`training.finetune.cli`), ``rwi`` and ``qi``
(:mod:`training.rwi.cli`) and ``probe`` (:mod:`training.probes.cli`), and adds ``ship`` (put a
run's adapter / probe into the package) and ``replay`` (rerun a recorded training config).
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


if __name__ == "__main__":
    app()
