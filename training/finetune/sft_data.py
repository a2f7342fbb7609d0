"""The safety-alignment SFT set: harmful train prompts -> refusals, benign prompts -> answers.

Rows use TRL's conversational prompt-completion format (``{"prompt": [user message],
"completion": [assistant message]}``), so ``SFTTrainer`` puts the loss on completion tokens
only. Harmful prompts come from the train part of the default split only.

:func:`build_sft_examples` is the ``legacy`` set (refusals + self-instruct + GSM8K train);
the default training set adds a benign mix from the benign registry
(:mod:`training.finetune.mix`) with the same refusals. Both are reached through
:func:`training.finetune.align.alignment_examples`, the builder every recipe uses.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from training.common.benign import clean_gsm8k_answer
from training.common.harmful_split import DEFAULT_SPLIT_SEED, split_part
from training.data import load_gsm8k, load_self_instruct, refusal_pool
from training.data.loaders import PathLike

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SFTExample:
    """One alignment example: a user prompt and the assistant answer to learn.

    Attributes:
        prompt: User message.
        completion: Assistant message (the only tokens with loss).
        kind: ``"refusal"`` (harmful prompt) or ``"benign"`` (utility anchor).
        source: Where the prompt came from.
    """

    prompt: str
    completion: str
    kind: str
    source: str

    def to_row(self) -> dict[str, Any]:
        """TRL conversational prompt-completion row (extra columns are dropped by TRL)."""
        return {
            "prompt": [{"role": "user", "content": self.prompt}],
            "completion": [{"role": "assistant", "content": self.completion}],
            "kind": self.kind,
            "source": self.source,
        }


def refusal_examples(
    n: int | None,
    *,
    styles: Sequence[str] = ("short", "medium"),
    seed: int = 0,
    split_seed: int = DEFAULT_SPLIT_SEED,
    data_dir: PathLike = None,
) -> list[SFTExample]:
    """Harmful train prompts paired with refusals drawn (seeded) from the refusal pool.

    Args:
        n: Number of harmful prompts (a seeded sample of the train split); ``None``: all.
        styles: Refusal length classes to draw from (``short``, ``medium``, ``long``).
        seed: Sampling seed.
        split_seed: Seed of the default harmful split.
        data_dir: Data directory override.
    """
    rng = random.Random(seed)
    refusals = [r.text for r in refusal_pool(seed=seed) if r.style in styles]
    if not refusals:
        raise ValueError(f"no refusals of styles {tuple(styles)}")
    behaviors = list(split_part("train", data_dir, seed=split_seed))
    rng.shuffle(behaviors)
    chosen = behaviors if n is None else behaviors[:n]
    return [SFTExample(b.prompt, rng.choice(refusals), "refusal", b.source) for b in chosen]


def benign_examples(
    n_self_instruct: int | None,
    n_gsm8k: int,
    *,
    max_answer_words: int = 150,
    seed: int = 0,
    data_dir: PathLike = None,
) -> list[SFTExample]:
    """Benign utility anchor: self-instruct seed answers and cleaned GSM8K train answers.

    Answers longer than ``max_answer_words`` are dropped (not truncated, so the model never
    learns to stop mid-answer).
    """
    rng = random.Random(seed)
    self_instruct = [b for b in load_self_instruct(data_dir) if b.answer and b.answer.strip()]
    self_instruct = [b for b in self_instruct if len(b.answer.split()) <= max_answer_words]
    rng.shuffle(self_instruct)
    if n_self_instruct is not None:
        self_instruct = self_instruct[:n_self_instruct]
    gsm8k = [b for b in load_gsm8k(data_dir) if len(b.answer.split()) <= max_answer_words]
    gsm8k = rng.sample(gsm8k, min(n_gsm8k, len(gsm8k)))
    return [SFTExample(b.prompt, b.answer.strip(), "benign", b.source) for b in self_instruct] + [
        SFTExample(b.prompt, clean_gsm8k_answer(b.answer), "benign", b.source) for b in gsm8k
    ]


def fits_length(tokenizer: PreTrainedTokenizerBase, example: SFTExample, max_length: int) -> bool:
    """Whether the chat-templated prompt + completion has at most ``max_length`` tokens."""
    messages = [
        {"role": "user", "content": example.prompt},
        {"role": "assistant", "content": example.completion},
    ]
    ids = tokenizer.apply_chat_template(messages, tokenize=True)
    if not isinstance(ids, list):  # BatchEncoding in transformers v5
        ids = ids["input_ids"]
    return len(ids) <= max_length


def drop_long(
    examples: Sequence[SFTExample], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[SFTExample]:
    """Drop (rather than truncate) examples longer than ``max_length`` tokens.

    Truncation would cut the completion, the only part with loss, and pads every batch
    that holds a long example to that length.
    """
    kept = [e for e in examples if fits_length(tokenizer, e, max_length)]
    if len(kept) < len(examples):
        logger.info(
            "dropped %d examples longer than %d tokens", len(examples) - len(kept), max_length
        )
    return kept


def build_sft_examples(
    *,
    n_harmful: int | None = 200,
    n_self_instruct: int | None = None,
    n_gsm8k: int = 150,
    refusal_styles: Sequence[str] = ("short", "medium"),
    max_answer_words: int = 150,
    seed: int = 0,
    split_seed: int = DEFAULT_SPLIT_SEED,
    data_dir: PathLike = None,
) -> list[SFTExample]:
    """Refusal and benign examples, shuffled together (seeded).

    Returns:
        The examples; see :func:`refusal_examples` and :func:`benign_examples`.
    """
    examples = refusal_examples(
        n_harmful, styles=refusal_styles, seed=seed, split_seed=split_seed, data_dir=data_dir
    )
    examples += benign_examples(
        n_self_instruct, n_gsm8k, max_answer_words=max_answer_words, seed=seed, data_dir=data_dir
    )
    random.Random(seed + 1).shuffle(examples)
    n_refusal = sum(e.kind == "refusal" for e in examples)
    logger.info("SFT set: %d refusals + %d benign", n_refusal, len(examples) - n_refusal)
    return examples
