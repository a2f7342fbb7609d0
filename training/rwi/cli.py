"""``trajguard train rwi`` and ``train qi``: safety SFT plus an insertion augmentation."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from guard import BASE_MODEL
from training.common.worst import CRITERIA
from training.finetune.cli import (
    BatchSize,
    Bf16,
    DataDir,
    Epochs,
    LearningRate,
    Lora,
    MaxSteps,
    Mix,
    Model,
    NGsm8k,
    NHarmful,
    NSelfInstruct,
    Out,
    Seed,
    mix_options,
)
from training.rwi.run import AugmentedConfig, run_augmented

_A = AugmentedConfig()

Writer = Annotated[str, typer.Option(help="Model that continues targets into harmful responses.")]


def _augmented(method: str, options: dict) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    options = {**options, "method": method, "out": str(options["out"])}
    for name in ("n_harmful", "n_self_instruct"):
        options[name] = None if options[name] < 0 else options[name]
    options.update(mix_options(options["mix"]))
    if "span_lengths" in options:
        options["span_lengths"] = [int(m) for m in options["span_lengths"].split(",") if m.strip()]
    result = run_augmented(AugmentedConfig(**options))
    typer.echo(
        f"{method} model: {result.out} ({result.n_refusal} refusals + {result.n_benign} benign "
        f"+ augmentation, {result.global_steps} steps, loss {result.train_loss}, "
        f"{result.wall_time_s:.0f} s)"
    )


def rwi(
    model: Model = BASE_MODEL,
    out: Out = Path(_A.out),
    k: Annotated[int, typer.Option(min=1, help="Candidate insertions per prompt.")] = _A.k,
    criterion: Annotated[
        str, typer.Option(help=f"Worst-of-K criterion: {'|'.join(CRITERIA)}.")
    ] = _A.criterion,
    span_lengths: Annotated[
        str, typer.Option(help="Span lengths m, comma-separated.")
    ] = "4,8,16,32",
    long_refusal_share: Annotated[float, typer.Option(min=0.0, max=1.0)] = _A.long_refusal_share,
    epochs: Epochs = _A.epochs,
    max_steps: MaxSteps = _A.max_steps,
    learning_rate: LearningRate = _A.learning_rate,
    batch_size: BatchSize = _A.batch_size,
    bf16: Bf16 = _A.bf16,
    lora: Lora = _A.lora,
    seed: Seed = _A.seed,
    n_harmful: NHarmful = 200,
    n_self_instruct: NSelfInstruct = -1,
    n_gsm8k: NGsm8k = _A.n_gsm8k,
    mix: Mix = _A.mix,
    writer: Writer = BASE_MODEL,
    data_dir: DataDir = None,
) -> None:
    """Random worst-insertion adversarial alignment: recover after the worst of K insertions."""
    if criterion not in CRITERIA:
        raise typer.BadParameter(f"must be one of {CRITERIA}", param_hint="--criterion")
    _augmented("rwi", dict(locals()))


def qi(
    model: Model = BASE_MODEL,
    out: Out = Path("runs/aligned-qi"),
    max_prefix_tokens: Annotated[
        int, typer.Option(min=0, help="k ~ U[0, this].")
    ] = _A.max_prefix_tokens,
    epochs: Epochs = _A.epochs,
    max_steps: MaxSteps = _A.max_steps,
    learning_rate: LearningRate = _A.learning_rate,
    batch_size: BatchSize = _A.batch_size,
    bf16: Bf16 = _A.bf16,
    lora: Lora = _A.lora,
    seed: Seed = _A.seed,
    n_harmful: NHarmful = 200,
    n_self_instruct: NSelfInstruct = -1,
    n_gsm8k: NGsm8k = _A.n_gsm8k,
    mix: Mix = _A.mix,
    writer: Writer = BASE_MODEL,
    data_dir: DataDir = None,
) -> None:
    """Baseline: Qi et al.'s safety-recovery augmentation (harmful prefix, then refusal)."""
    _augmented("qi", dict(locals()))
