"""Safety-alignment SFT with TRL: full fine-tune (default) or LoRA (merged before saving).

The output directory is a plain HF checkpoint (safetensors + tokenizer, no
``quantization_config``) that ``guard.load_model(dir)`` and ``vllm serve`` load as-is, plus
``trajguard_align.json`` (the config, data counts, losses and wall time). The same command
runs under ``accelerate launch`` for multi-GPU data parallelism.

The training set is chosen by ``mix`` (:mod:`training.finetune.mix`): since the benign mix
was added the default is ``"default"`` (refusals + look-alike compliance + varied benign
answers, :data:`~training.finetune.mix.DEFAULT_MIX`); ``"legacy"`` rebuilds the original
refusals + self-instruct + GSM8K set exactly. The record's ``config`` holds the resolved
per-source counts (``benign_mix``), so ``AlignConfig(**record["config"])`` rebuilds the
run's examples even if the default mix changes later.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, set_seed
from trl import SFTConfig, SFTTrainer

from guard import BASE_MODEL, __version__
from guard.models import resolve_model_path
from training.dynamics.positional import PositionalDynamicsCallback
from training.finetune.mix import BenignMix, build_mixed_examples, resolve_mix
from training.finetune.sft_data import SFTExample, build_sft_examples, drop_long, fits_length

logger = logging.getLogger(__name__)

RUN_FILE = "trajguard_align.json"
ADAPTER_DIR = "adapter"
POSITIONAL_FILE = "positional.json"


@dataclass
class AlignConfig:
    """Everything ``trajguard train align`` does; saved as JSON next to the model.

    Attributes:
        model: Base model: embedded alias, HF directory or cached id.
        out: Output directory (the aligned HF checkpoint).
        epochs: Training epochs.
        learning_rate: Peak learning rate (cosine schedule after warm-up).
        batch_size: Per-device batch size.
        grad_accum: Gradient accumulation steps.
        max_length: Examples longer than this many tokens are dropped.
        group_by_length: Batch examples of similar length (much less padding on CPU).
        warmup: Warm-up, a fraction of the steps (< 1) or a step count.
        weight_decay: AdamW weight decay.
        gradient_checkpointing: Trade compute for memory (off: faster on small models).
        bf16: bfloat16 mixed precision (GPU).
        seed: Training and data seed.
        lora: Train a LoRA adapter instead of all weights (merged into the saved model).
        lora_r: LoRA rank.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        lora_targets: Modules to adapt (``all-linear`` or comma-separated names).
        n_harmful: Harmful train prompts (refusal targets); ``None``: the whole train split.
        n_self_instruct: Self-instruct benign examples; ``None``: all that fit (legacy mix).
        n_gsm8k: GSM8K benign examples (legacy mix).
        refusal_styles: Refusal length classes drawn from the pool.
        max_answer_words: Longest benign answer kept (legacy mix; a benign mix has its own
            ``max_answer_words``).
        mix: Training set: ``default`` (since the benign mix: refusals + look-alike
            compliance + varied benign answers), ``legacy`` (refusals + self-instruct +
            GSM8K, the set before it) or ``custom`` (``benign_mix`` given).
        benign_mix: Per-source counts and answer budget of the benign part
            (:class:`~training.finetune.mix.BenignMix` as a dict); filled from ``mix`` when
            not given, ``None`` for ``legacy``. Recorded, so a run rebuilds from its record.
        split_seed: Seed of the default harmful split.
        data_dir: Offline data directory override.
        positional_every: Record per-position loss/grad every this many steps (0: off).
        positional_n: Refusal examples in the positional batch.
        logging_steps: Trainer logging interval.
        max_steps: Stop after this many steps (-1: run the epochs).
    """

    model: str = BASE_MODEL
    out: str = "runs/aligned-sft"
    epochs: float = 2.0
    learning_rate: float = 2e-5
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 384
    group_by_length: bool = True
    warmup: float = 0.05
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    bf16: bool = False
    seed: int = 0
    lora: bool = False
    lora_r: int = 8  # all-linear r=8 on SmolLM2-135M: 9.8 MB fp32, under the 16 MB we ship
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: str = "all-linear"
    n_harmful: int | None = 200
    n_self_instruct: int | None = None
    n_gsm8k: int = 150
    refusal_styles: list[str] = field(default_factory=lambda: ["short", "medium"])
    max_answer_words: int = 100
    mix: str = "default"
    benign_mix: dict[str, int] | None = None
    split_seed: int = 0
    data_dir: str | None = None
    positional_every: int = 10
    positional_n: int = 4
    logging_steps: int = 5
    max_steps: int = -1

    def __post_init__(self) -> None:
        self.benign_mix = resolve_mix(self.mix, self.benign_mix)


@dataclass
class AlignResult:
    """Where the aligned model went and how the run went."""

    out: Path
    wall_time_s: float
    train_loss: float | None
    global_steps: int
    n_refusal: int
    n_benign: int
    n_by_source: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(
        cls, out: Path, start: float, train_output: Any, examples: list[SFTExample]
    ) -> AlignResult:
        """The result of a finished ``trainer.train()`` begun at ``start`` (perf_counter)."""
        n_refusal = sum(e.kind == "refusal" for e in examples)
        loss = train_output.training_loss
        return cls(
            out=out,
            wall_time_s=time.perf_counter() - start,
            train_loss=None if loss is None else float(loss),
            global_steps=int(train_output.global_step),
            n_refusal=n_refusal,
            n_benign=len(examples) - n_refusal,
            n_by_source=dict(sorted(Counter(f"{e.kind}/{e.source}" for e in examples).items())),
        )


def peft_config(config: AlignConfig) -> Any:
    """The LoRA config of ``config`` (``--lora``)."""
    from peft import LoraConfig

    targets: str | list[str] = config.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def alignment_examples(config: AlignConfig, tokenizer) -> list[SFTExample]:
    """Refusals + benign part of ``config``, without examples over ``max_length`` tokens.

    The one builder of every recipe's fixed examples (``align``, ``qi`` and ``rwi``), so the
    same config, seed and tokenizer give the same examples. A benign mix draws per-source
    counts exactly (long examples are skipped while drawing); ``legacy`` drops them after.
    """
    if config.benign_mix is not None:
        return build_mixed_examples(
            BenignMix.from_dict(config.benign_mix),
            n_harmful=config.n_harmful,
            refusal_styles=config.refusal_styles,
            seed=config.seed,
            split_seed=config.split_seed,
            data_dir=config.data_dir,
            fits=lambda e: fits_length(tokenizer, e, config.max_length),
        )
    examples = build_sft_examples(
        n_harmful=config.n_harmful,
        n_self_instruct=config.n_self_instruct,
        n_gsm8k=config.n_gsm8k,
        refusal_styles=config.refusal_styles,
        max_answer_words=config.max_answer_words,
        seed=config.seed,
        split_seed=config.split_seed,
        data_dir=config.data_dir,
    )
    return drop_long(examples, tokenizer, config.max_length)


def training_args(config: AlignConfig) -> SFTConfig:
    """Trainer arguments shared by every safety fine-tuning method (same schedule, same budget)."""
    return SFTConfig(
        output_dir=config.out,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=config.warmup,
        weight_decay=config.weight_decay,
        gradient_checkpointing=config.gradient_checkpointing,
        bf16=config.bf16,
        max_length=config.max_length,
        completion_only_loss=True,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to="none",
        disable_tqdm=False,
    )


def finalize_checkpoint(out: Path) -> None:
    """Make ``out/config.json`` loadable by vLLM: drop any ``quantization_config``."""
    path = out / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.pop("quantization_config", None) is not None:
        path.write_text(json.dumps(config, indent=2), encoding="utf-8")
        logger.info("removed quantization_config from %s", path)


def save_adapter(peft_model: Any, config: AlignConfig, out: Path) -> Path:
    """Save the LoRA adapter alone (what ``trajguard train ship`` puts in the package).

    ``base_model_name_or_path`` is rewritten to ``config.model`` as given (an alias, not this
    machine's cache path), which ``guard.adapters`` checks against the base it merges into.
    """
    adapter_dir = out / ADAPTER_DIR
    peft_model.save_pretrained(adapter_dir, safe_serialization=True)
    path = adapter_dir / "adapter_config.json"
    adapter_config = json.loads(path.read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = config.model
    path.write_text(json.dumps(adapter_config, indent=2), encoding="utf-8")
    (adapter_dir / "README.md").unlink(missing_ok=True)  # peft's model-card template
    return adapter_dir


def save_checkpoint(trainer: Trainer, tokenizer: Any, config: AlignConfig, out: Path) -> None:
    """Save a plain HF checkpoint (LoRA merged) that ``vllm serve`` loads as-is.

    A LoRA run also keeps its adapter under ``<out>/adapter/`` (see :func:`save_adapter`).
    """
    if config.lora:
        if trainer.is_world_process_zero():
            save_adapter(trainer.model, config, out)
        merged = trainer.model.merge_and_unload()  # a plain model: no adapter files to ship
        if trainer.is_world_process_zero():
            merged.save_pretrained(out, safe_serialization=True)
    else:
        trainer.save_model(str(out))  # gathers sharded weights under any accelerate backend
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(out)
        finalize_checkpoint(out)
        (out / "training_args.bin").unlink(
            missing_ok=True
        )  # a pickle; the JSON record has the config


def load_trainable(config: AlignConfig) -> tuple[Path, Any, Any]:
    """Seed everything and load the base model's path, tokenizer (with a pad token) and model."""
    set_seed(config.seed)
    source = resolve_model_path(config.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if config.bf16 else torch.float32
    return source, tokenizer, AutoModelForCausalLM.from_pretrained(source, dtype=dtype)


def run_align(config: AlignConfig) -> AlignResult:
    """Build the SFT set, fine-tune, save the aligned checkpoint and the run record.

    Returns:
        The run's result (also written to ``<out>/trajguard_align.json``).
    """
    start = time.perf_counter()
    out = Path(config.out)
    source, tokenizer, model = load_trainable(config)
    examples = alignment_examples(config, tokenizer)
    callbacks = []
    if config.positional_every > 0:
        probe_pairs = [
            (e.prompt, e.completion) for e in _positional_examples(examples, config.positional_n)
        ]
        callbacks.append(
            PositionalDynamicsCallback(
                tokenizer, probe_pairs, out / POSITIONAL_FILE, every=config.positional_every
            )
        )
    trainer = SFTTrainer(
        model=model,
        args=training_args(config),
        train_dataset=Dataset.from_list([e.to_row() for e in examples]),
        processing_class=tokenizer,
        peft_config=peft_config(config) if config.lora else None,
        callbacks=callbacks,
    )
    train_output = trainer.train()
    save_checkpoint(trainer, tokenizer, config, out)
    result = AlignResult.of(out, start, train_output, examples)
    write_run_record(
        trainer,
        train_output,
        result,
        config,
        source,
        {"positional": POSITIONAL_FILE if callbacks else None},
    )
    logger.info("aligned model saved to %s in %.1f s", out, result.wall_time_s)
    return result


def _positional_examples(examples: list[SFTExample], n: int) -> list[SFTExample]:
    """The ``n`` longest refusal examples (the safety signal whose depth we track).

    Long ones, so that later position buckets hold tokens of every sequence.
    """
    refusals = [e for e in examples if e.kind == "refusal"]
    return sorted(refusals, key=lambda e: len(e.completion), reverse=True)[:n]


def write_run_record(
    trainer: Trainer,
    train_output: Any,
    result: AlignResult,
    config: AlignConfig,
    source: Path,
    extra: dict[str, Any],
) -> None:
    """Write ``<out>/trajguard_align.json``: config, data counts, losses, wall time (rank 0)."""
    if not trainer.is_world_process_zero():
        return
    record = {
        "config": asdict(config),
        "base_model_path": str(source),
        "wall_time_s": round(result.wall_time_s, 1),
        "train_runtime_s": train_output.metrics.get("train_runtime"),
        "train_loss": result.train_loss,
        "global_steps": result.global_steps,
        "n_refusal": result.n_refusal,
        "n_benign": result.n_benign,
        "n_by_source": result.n_by_source,
        "log_history": trainer.state.log_history,
        "trajguard_version": __version__,
        "world_size": trainer.args.world_size,
        **extra,
    }
    (result.out / RUN_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
