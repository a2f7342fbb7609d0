"""``trajguard train align``: safety-alignment SFT, and the training options it shares.

The ``trajguard train`` app itself is composed in :mod:`training.cli`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from guard import BASE_MODEL
from training.dynamics.positional import plot_positional
from training.finetune.align import POSITIONAL_FILE, AlignConfig, run_align
from training.finetune.mix import MIX_NAMES, BenignMix

_D = AlignConfig()

Model = Annotated[str, typer.Option(help="Base model: alias, HF directory or cached id.")]
Out = Annotated[Path, typer.Option(help="Output directory (HF checkpoint).")]
Epochs = Annotated[float, typer.Option(min=0.0)]
LearningRate = Annotated[float, typer.Option("--lr", min=0.0)]
BatchSize = Annotated[int, typer.Option(min=1, help="Per-device batch size.")]
Bf16 = Annotated[bool, typer.Option(help="bfloat16 mixed precision (GPU).")]
Seed = Annotated[int, typer.Option()]
Lora = Annotated[bool, typer.Option(help="Train a LoRA adapter (merged on save).")]
NHarmful = Annotated[int, typer.Option(help="Harmful train prompts; -1: the whole train split.")]
DataDir = Annotated[str | None, typer.Option(envvar="TRAJGUARD_DATA")]
MaxSteps = Annotated[int, typer.Option(help="-1: run the epochs.")]
NSelfInstruct = Annotated[int, typer.Option(help="Self-instruct examples, legacy mix; -1: all.")]
NGsm8k = Annotated[int, typer.Option(min=0, help="GSM8K examples, legacy mix.")]
Mix = Annotated[
    str,
    typer.Option(
        help="Training set: default (refusals + look-alike compliance + varied benign answers), "
        "legacy (refusals + self-instruct + GSM8K), or benign counts source=n,... "
        "(coconot_pref, arena_hard, gpteacher_roleplay, gpteacher_code, self_instruct, gsm8k, "
        "max_answer_words; sources not named: 0)."
    ),
]


def mix_options(mix: str) -> dict[str, object]:
    """``mix`` and ``benign_mix`` of a config from a ``--mix`` value (name or counts)."""
    if mix in MIX_NAMES and mix != "custom":
        return {"mix": mix, "benign_mix": None}
    try:
        return {"mix": "custom", "benign_mix": BenignMix.parse(mix).to_dict()}
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--mix") from err


def align(
    model: Model = BASE_MODEL,
    out: Out = Path(_D.out),
    epochs: Epochs = _D.epochs,
    learning_rate: LearningRate = _D.learning_rate,
    batch_size: BatchSize = _D.batch_size,
    grad_accum: Annotated[int, typer.Option(min=1)] = _D.grad_accum,
    max_length: Annotated[
        int, typer.Option(min=8, help="Longer examples are dropped.")
    ] = _D.max_length,
    group_by_length: Annotated[
        bool, typer.Option(help="Batch similar lengths (less padding).")
    ] = _D.group_by_length,
    warmup: Annotated[
        float, typer.Option(min=0.0, help="Warm-up fraction (<1) or steps.")
    ] = _D.warmup,
    weight_decay: Annotated[float, typer.Option(min=0.0)] = _D.weight_decay,
    gradient_checkpointing: Annotated[bool, typer.Option()] = _D.gradient_checkpointing,
    bf16: Bf16 = _D.bf16,
    seed: Seed = _D.seed,
    lora: Lora = _D.lora,
    lora_r: Annotated[int, typer.Option(min=1)] = _D.lora_r,
    lora_alpha: Annotated[int, typer.Option(min=1)] = _D.lora_alpha,
    lora_dropout: Annotated[float, typer.Option(min=0.0, max=1.0)] = _D.lora_dropout,
    lora_targets: Annotated[
        str, typer.Option(help="all-linear or comma-separated modules.")
    ] = _D.lora_targets,
    n_harmful: NHarmful = 200,
    n_self_instruct: NSelfInstruct = -1,
    n_gsm8k: NGsm8k = _D.n_gsm8k,
    refusal_styles: Annotated[
        str, typer.Option(help="Refusal classes: short,medium,long.")
    ] = "short,medium",
    max_answer_words: Annotated[
        int, typer.Option(min=1, help="Longest benign answer, legacy mix.")
    ] = _D.max_answer_words,
    mix: Mix = _D.mix,
    split_seed: Annotated[
        int, typer.Option(help="Seed of the default harmful split.")
    ] = _D.split_seed,
    data_dir: DataDir = None,
    positional_every: Annotated[
        int, typer.Option(min=0, help="Per-position loss/grad every N steps (0: off).")
    ] = _D.positional_every,
    positional_n: Annotated[int, typer.Option(min=1)] = _D.positional_n,
    logging_steps: Annotated[int, typer.Option(min=1)] = _D.logging_steps,
    max_steps: MaxSteps = _D.max_steps,
) -> None:
    """Safety SFT: harmful train prompts -> refusals, benign prompts -> reference answers."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    options = dict(locals())
    options["out"] = str(out)
    options["n_harmful"] = None if n_harmful < 0 else n_harmful
    options["n_self_instruct"] = None if n_self_instruct < 0 else n_self_instruct
    options["refusal_styles"] = [s.strip() for s in refusal_styles.split(",") if s.strip()]
    options.update(mix_options(mix))
    result = run_align(AlignConfig(**options))
    if (result.out / POSITIONAL_FILE).is_file():
        plot_positional(result.out / POSITIONAL_FILE, result.out)
    typer.echo(
        f"aligned model: {result.out} ({result.n_refusal} refusals + {result.n_benign} benign, "
        f"{result.global_steps} steps, loss {result.train_loss}, {result.wall_time_s:.0f} s)"
    )
