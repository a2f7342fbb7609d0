"""``trajguard train rwi`` and ``train qi``: safety SFT plus an insertion augmentation.

Both start from the same base model as plain alignment and train on the same refusals and
benign part (:func:`~training.finetune.align.alignment_examples` of the same config: same
``mix``, ``benign_mix`` and seed, so the same examples) with the same schedule; they add one
augmented example per harmful prompt:

- ``rwi`` (random worst-insertion): K random harmful insertions into a refusal, the worst
  one re-picked with the current weights every step, loss on the recovery that follows.
- ``qi`` (Qi et al. 2024, safety-recovery augmentation): the first k ~ U[0, 100] tokens of a
  harmful response, then a refusal.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from guard import BASE_MODEL
from guard.models import load_model
from training.common.candidates import DEFAULT_SPAN_LENGTHS
from training.common.prompts import AttackPrompt, load_attack_prompts
from training.common.responses import harmful_responses
from training.finetune.align import (
    AlignConfig,
    AlignResult,
    alignment_examples,
    load_trainable,
    peft_config,
    save_checkpoint,
    training_args,
    write_run_record,
)
from training.finetune.sft_data import SFTExample
from training.finetune.tokenized import TokenizedExample, chat_example
from training.rwi.data import (
    HarmfulSource,
    InsertionGroup,
    insertion_groups,
    qi_examples,
    train_span_texts,
)
from training.rwi.trainer import SelectionLog, WorstInsertionTrainer

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("rwi", "qi")
SELECTION_FILE = "rwi_selection.json"


@dataclass
class AugmentedConfig(AlignConfig):
    """:class:`AlignConfig` plus the augmentation's settings.

    Attributes:
        method: ``rwi`` or ``qi``.
        k: Candidate insertions per harmful prompt (rwi).
        criterion: Worst-of-K criterion: ``recovery_loss`` or ``harm_likelihood`` (rwi).
        span_lengths: Inserted span lengths m, drawn uniformly (rwi).
        long_refusal_share: Share of groups whose refusal is a long (128+ word) one (rwi).
        max_prefix_tokens: Upper bound of Qi's harmful prefix length k ~ U[0, max] (qi).
        writer: Model that continues affirmative targets into harmful responses.
        writer_tokens: Tokens the writer adds after a target.
    """

    out: str = "runs/aligned-rwi"
    method: str = "rwi"
    k: int = 4
    criterion: str = "recovery_loss"
    span_lengths: list[int] = field(default_factory=lambda: list(DEFAULT_SPAN_LENGTHS))
    long_refusal_share: float = 0.5
    max_prefix_tokens: int = 100
    writer: str = BASE_MODEL
    writer_tokens: int = 64
    group_by_length: bool = False  # batches mix fixed examples and groups


def harmful_sources(config: AugmentedConfig, prompts: list[str]) -> list[HarmfulSource]:
    """A harmful response per harmful train prompt (recorded, else target + writer)."""
    known = {
        p.prompt: p
        for p in load_attack_prompts(
            split="train", split_seed=config.split_seed, data_dir=config.data_dir
        )
    }
    attack_prompts = [known.get(p) or AttackPrompt(p, None, "train", p) for p in prompts]
    responses = harmful_responses(
        attack_prompts,
        load_model(config.writer),
        n_tokens=config.writer_tokens,
        batch_size=config.batch_size,
        data_dir=config.data_dir,
    )
    return [HarmfulSource(p, r.text, r.source) for p, r in zip(prompts, responses)]


def _fixed_examples(tokenizer, examples: list[SFTExample]) -> list[TokenizedExample]:
    return [
        chat_example(
            tokenizer,
            e.prompt,
            [],
            tokenizer.encode(e.completion, add_special_tokens=False),
            kind=e.kind,
            meta={"source": e.source},
        )
        for e in examples
    ]


def run_augmented(config: AugmentedConfig) -> AlignResult:
    """Build the data, fine-tune with :class:`WorstInsertionTrainer`, save checkpoint + record."""
    if config.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {config.method!r}")
    start = time.perf_counter()
    out = Path(config.out)
    source, tokenizer, model = load_trainable(config)
    sft = alignment_examples(config, tokenizer)
    items: list[TokenizedExample | InsertionGroup] = list(_fixed_examples(tokenizer, sft))
    sources = harmful_sources(config, [e.prompt for e in sft if e.kind == "refusal"])
    if config.method == "qi":
        augmented: list = qi_examples(
            tokenizer, sources, max_prefix_tokens=config.max_prefix_tokens, seed=config.seed
        )
    else:
        spans = train_span_texts(sources, split_seed=config.split_seed, data_dir=config.data_dir)
        augmented = insertion_groups(
            tokenizer,
            sources,
            spans,
            k=config.k,
            lengths=config.span_lengths,
            long_refusal_share=config.long_refusal_share,
            seed=config.seed,
        )
    items += augmented
    log = SelectionLog()
    args = training_args(config)
    args.remove_unused_columns = False  # batches are Python objects until selection
    trainer = WorstInsertionTrainer(
        model=model if not config.lora else _with_lora(model, config),
        args=args,
        train_dataset=items,
        processing_class=tokenizer,
        criterion=config.criterion,
        pad_id=tokenizer.pad_token_id,
        selection_log=log,
    )
    train_output = trainer.train()
    save_checkpoint(trainer, tokenizer, config, out)
    result = AlignResult.of(out, start, train_output, sft)
    extra = {"method": config.method, "n_augmented": len(augmented)}
    if config.method == "rwi":
        extra["selection"] = log.summary()
        if trainer.is_world_process_zero():
            (out / SELECTION_FILE).write_text(json.dumps(log.records), encoding="utf-8")
    write_run_record(trainer, train_output, result, config, source, extra)
    logger.info("%s model saved to %s in %.1f s", config.method, out, result.wall_time_s)
    return result


def _with_lora(model, config: AugmentedConfig):
    from peft import get_peft_model

    return get_peft_model(model, peft_config(config))
