"""``trajguard probe rwi`` (also ``trajguard train probe``): fit the guard's RWI probe;
``trajguard probe v2`` (also ``trajguard train probe-v2``): probe v2 (:mod:`training.probes.v2`)."""

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
from training.probes.v2 import ProbeV2Config

app = typer.Typer(no_args_is_help=True, help="Fit and calibrate probes.")
_P = ProbeTrainingConfig()
_V2 = ProbeV2Config()

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


def v2(
    corpus: Annotated[
        Path, typer.Option(help="Benign corpus directory (`trajguard train benign-corpus`).")
    ],
    model: Model = DEFAULT_MODEL,
    out: Annotated[Path, typer.Option(help="Output directory (probe/, report).")] = Path(_V2.out),
    layers: Annotated[
        str, typer.Option(help="Candidate resid_post layers, comma-separated.")
    ] = ",".join(str(layer) for layer in _V2.layers),
    n_train_prompts: Annotated[int, typer.Option(min=2)] = _V2.n_train_prompts,
    n_dev_prompts: Annotated[int, typer.Option(min=2)] = _V2.n_dev_prompts,
    k: Annotated[int, typer.Option(min=1, help="Candidate insertions per prompt.")] = _V2.k,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = _V2.max_new_tokens,
    rounds: Annotated[int, typer.Option(min=0, help="Hard-negative rounds.")] = _V2.rounds,
    target_rate: Annotated[float, typer.Option(min=0.0, max=0.5)] = _V2.target_rate,
    confidence: Annotated[float, typer.Option(min=0.5, max=0.999)] = _V2.confidence,
    c: Annotated[float, typer.Option("--C", min=1e-6, help="Inverse L2 strength.")] = _V2.C,
    attack_records: Annotated[
        list[str] | None,
        typer.Option(help="family=path of a held-out attack JSONL (recall); repeatable."),
    ] = None,
    baseline: Annotated[
        Path | None, typer.Option(help="Probe to evaluate under the same protocol.")
    ] = None,
    direct_samples: Annotated[
        int,
        typer.Option(
            min=0, help="Sampled answers per train prompt to the plain request (0: none)."
        ),
    ] = _V2.direct_samples,
    direct_tokens: Annotated[int, typer.Option(min=1)] = _V2.direct_tokens,
    direct_min_tokens: Annotated[
        int, typer.Option(min=0, help="Shorter judged-harmful direct answers are left out.")
    ] = _V2.direct_min_tokens,
    adversarial_records: Annotated[
        list[Path] | None,
        typer.Option(
            exists=True,
            dir_okay=False,
            help="records.jsonl of a probe-aware attack on train-split prompts: its harmful "
            "cases join the fit (adversarial probe training); repeatable.",
        ),
    ] = None,
    ablation: Annotated[
        bool, typer.Option(help="Also fit one probe per unsafe recipe under the same protocol.")
    ] = _V2.ablation,
    writer: Annotated[str | None, typer.Option(help="Writer of harmful responses.")] = None,
    judge: Annotated[Path | None, typer.Option(help="Saved harm judge directory.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = _V2.batch_size,
    seed: Seed = _V2.seed,
    data_dir: DataDir = None,
) -> None:
    """Probe v2: own benign answers at scale, hard negatives, a bounded operating point."""
    from guard import load_model
    from guard.probe import LinearProbe
    from training.probes.corpus import load_corpus_trajectories
    from training.probes.v2 import collect_harmful, run_probe_v2

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        parsed_layers = [int(x) for x in layers.split(",") if x.strip()]
    except ValueError as exc:
        raise typer.BadParameter("layers must be integers", param_hint="--layers") from exc
    for item in attack_records or []:
        if "=" not in item or not Path(item.partition("=")[2]).is_file():
            raise typer.BadParameter(
                f"{item!r} is not family=existing-file", param_hint="--attack-records"
            )
    config = ProbeV2Config(
        model=model,
        out=str(out),
        layers=parsed_layers,
        n_train_prompts=n_train_prompts,
        n_dev_prompts=n_dev_prompts,
        k=k,
        max_new_tokens=max_new_tokens,
        C=c,
        rounds=rounds,
        target_rate=target_rate,
        confidence=confidence,
        attack_records=list(attack_records or []),
        direct_samples=direct_samples,
        direct_tokens=direct_tokens,
        direct_min_tokens=direct_min_tokens,
        adversarial_records=[str(p) for p in adversarial_records or []],
        ablation=ablation,
        writer=writer,
        judge=str(judge) if judge else None,
        batch_size=batch_size,
        seed=seed,
        data_dir=data_dir,
    )
    lm = load_model(model)
    answers = load_corpus_trajectories(corpus, lm, require_complete=True)
    report = run_probe_v2(
        config,
        lm,
        collect_harmful(config, lm),
        answers,
        baseline=LinearProbe.load(baseline) if baseline else None,
    )
    table = report["probe_v2"]
    typer.echo(
        json.dumps({k: table[k] for k in ("threshold", "monitor", "dev_harmful_recall")}, indent=2)
    )
    overall = table["false_triggers"]["overall"]
    typer.echo(f"probe v2 eval false-trigger rate: {overall['rate']:.4f} (n={overall['n']})")


app.command("v2")(v2)
