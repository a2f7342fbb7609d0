"""``trajguard probe rwi`` (also ``trajguard train probe``): fit the guard's RWI probe."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from guard.models import BASE_MODEL, DEFAULT_MODEL
from training.common.worst import CRITERIA
from training.probes.config import ProbeTrainingConfig
from training.probes.rwi import run_probe_training

app = typer.Typer(no_args_is_help=True, help="Fit and calibrate probes.")
_P = ProbeTrainingConfig()

Model = Annotated[str, typer.Option(help="Model the probe guards: alias or HF directory.")]
DataDir = Annotated[str | None, typer.Option(envvar="TRAJGUARD_DATA")]
Seed = Annotated[int, typer.Option()]


def rwi(
    model: Model = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Output directory (probe/, ablation/, report).")] = Path(
        _P.out
    ),
    layers: Annotated[
        str, typer.Option(help="resid_post layers to sweep, comma-separated.")
    ] = ",".join(str(layer) for layer in _P.layers),
    n_train_prompts: Annotated[int, typer.Option(min=2)] = _P.n_train_prompts,
    n_dev_prompts: Annotated[int, typer.Option(min=2)] = _P.n_dev_prompts,
    k: Annotated[int, typer.Option(min=1, help="Candidate insertions per prompt.")] = _P.k,
    criterion: Annotated[str, typer.Option(help=f"{'|'.join(CRITERIA)}")] = _P.criterion,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = _P.max_new_tokens,
    n_calibration: Annotated[int, typer.Option(min=2)] = _P.n_calibration,
    n_eval: Annotated[int, typer.Option(min=2)] = _P.n_eval,
    target_rate: Annotated[float, typer.Option(min=0.0, max=0.5)] = _P.target_rate,
    c: Annotated[float, typer.Option("--C", min=1e-6, help="Inverse L2 strength.")] = _P.C,
    ablation: Annotated[
        bool, typer.Option(help="Fit prefill-only / whole-response probes too.")
    ] = _P.ablation,
    attack_records: Annotated[
        Path | None, typer.Option(help="insert.jsonl of held-out insertion attacks (recall).")
    ] = None,
    writer: Annotated[str, typer.Option(help="Writer of harmful responses.")] = BASE_MODEL,
    judge: Annotated[Path | None, typer.Option(help="Saved harm judge directory.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = _P.batch_size,
    seed: Seed = _P.seed,
    data_dir: DataDir = None,
) -> None:
    """Fit the RWI probe: layer sweep, calibration, equal-size recipe ablation."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if criterion not in CRITERIA:
        raise typer.BadParameter(f"must be one of {CRITERIA}", param_hint="--criterion")
    try:
        parsed_layers = [int(x) for x in layers.split(",") if x.strip()]
    except ValueError as exc:
        raise typer.BadParameter("layers must be integers", param_hint="--layers") from exc
    config = ProbeTrainingConfig(
        model=model,
        out=str(out),
        layers=parsed_layers,
        n_train_prompts=n_train_prompts,
        n_dev_prompts=n_dev_prompts,
        k=k,
        criterion=criterion,
        max_new_tokens=max_new_tokens,
        n_calibration=n_calibration,
        n_eval=n_eval,
        target_rate=target_rate,
        C=c,
        ablation=ablation,
        attack_records=str(attack_records) if attack_records else None,
        writer=writer,
        judge=str(judge) if judge else None,
        batch_size=batch_size,
        seed=seed,
        data_dir=data_dir,
    )
    report = run_probe_training(config)
    typer.echo(json.dumps({k: report[k] for k in ("chosen_hook", "probe")}, indent=2))
    typer.echo(f"RWI probe {report['chosen_hook']}: {out / 'probe'}")


app.command("rwi")(rwi)
