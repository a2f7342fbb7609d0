"""Training data of the two augmentations: RWI insertion groups and Qi et al.'s recovery examples.

Both pair a harmful train prompt with harmful text inside the assistant turn (no loss) and a
safe target after it (loss). Harmful text comes from train-side sources only: the prompt's
own harmful response and the harmful span pool with dev/test behaviours excluded.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from guard.chat import encode_chat
from training.common.candidates import DEFAULT_SPAN_LENGTHS, Insertion, sample_insertions
from training.common.harmful_split import DEFAULT_SPLIT_SEED, split_part
from training.data import RECOVERY_TEXTS, harmful_span_pool, refusal_pool
from training.data.loaders import PathLike
from training.finetune.tokenized import TokenizedExample, assistant_end_ids, chat_example


@dataclass(frozen=True, slots=True)
class HarmfulSource:
    """A harmful train prompt and a harmful response to it."""

    prompt: str
    response: str
    response_source: str


@dataclass
class InsertionGroup:
    """K candidate insertions for one prompt; training keeps the worst one each step.

    Attributes:
        prompt: User message.
        prompt_ids: Chat-templated prompt ids.
        insertions: The candidates.
        recovery_ids: Recovery target (loss) after whichever candidate is chosen.
        end_ids: End-of-turn tokens after the recovery (loss).
    """

    prompt: str
    prompt_ids: list[int]
    insertions: list[Insertion]
    recovery_ids: list[int]
    end_ids: list[int]

    def example(self, index: int) -> TokenizedExample:
        """Candidate ``index`` as a training sequence: loss on recovery + end only."""
        ins = self.insertions[index]
        prefix = ins.prefix_ids
        target = [*self.recovery_ids, *self.end_ids]
        return TokenizedExample(
            input_ids=(*self.prompt_ids, *prefix, *target),
            loss_mask=(0,) * (len(self.prompt_ids) + len(prefix)) + (1,) * len(target),
            kind="rwi",
            meta=ins.describe(),
        )


def train_span_texts(
    sources: Sequence[HarmfulSource],
    *,
    split_seed: int = DEFAULT_SPLIT_SEED,
    data_dir: PathLike = None,
) -> list[tuple[str, str]]:
    """Harmful ``(text, source)`` spans for training: the pool without dev/test behaviours,
    plus each train prompt's own response."""
    held_out = [
        b.prompt for part in ("dev", "test") for b in split_part(part, data_dir, seed=split_seed)
    ]
    pool = harmful_span_pool(data_dir, exclude_prompts=held_out)
    spans = [(s.text, f"pool:{s.source}") for s in pool if len(s.text.split()) >= 4]
    return spans + [(s.response, f"own:{s.response_source}") for s in sources]


def insertion_groups(
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[HarmfulSource],
    spans: Sequence[tuple[str, str]],
    *,
    k: int = 4,
    lengths: Sequence[int] = DEFAULT_SPAN_LENGTHS,
    long_refusal_share: float = 0.5,
    seed: int = 0,
) -> list[InsertionGroup]:
    """One group of ``k`` random insertions per harmful prompt.

    Refusals are long pool refusals with probability ``long_refusal_share`` (so positions
    of 64+ tokens occur), else short/medium ones; each candidate inserts either the prompt's
    own harmful response or a pool span.
    """
    rng = random.Random(seed)
    pool = refusal_pool(seed=seed)
    long = [r.text for r in pool if r.style == "long"]
    other = [r.text for r in pool if r.style != "long"]
    end = assistant_end_ids(tokenizer)
    groups = []
    for source in sources:
        refusal = rng.choice(long if rng.random() < long_refusal_share else other)
        refusal_ids = tokenizer.encode(refusal, add_special_tokens=False)
        own = (source.response, f"own:{source.response_source}")
        candidate_spans = [own, *rng.sample(list(spans), min(3, len(spans)))]
        groups.append(
            InsertionGroup(
                prompt=source.prompt,
                prompt_ids=encode_chat(
                    tokenizer, [{"role": "user", "content": source.prompt}]
                ).prompt_ids,
                insertions=sample_insertions(
                    tokenizer, refusal_ids, candidate_spans, k, rng, lengths=lengths
                ),
                recovery_ids=tokenizer.encode(rng.choice(RECOVERY_TEXTS), add_special_tokens=False),
                end_ids=end,
            )
        )
    return groups


def qi_examples(
    tokenizer: PreTrainedTokenizerBase,
    sources: Sequence[HarmfulSource],
    *,
    max_prefix_tokens: int = 100,
    seed: int = 0,
) -> list[TokenizedExample]:
    """Qi et al.'s safety-recovery augmentation: the first k ~ U[0, max] tokens of a harmful
    response (no loss), then a refusal (loss)."""
    rng = random.Random(seed)
    refusals = [r.text for r in refusal_pool(seed=seed) if r.style != "long"]
    refusals += list(RECOVERY_TEXTS)
    end = assistant_end_ids(tokenizer)
    out = []
    for source in sources:
        response = tokenizer.encode(source.response.strip(), add_special_tokens=False)
        k = min(rng.randint(0, max_prefix_tokens), len(response))
        refusal = rng.choice(refusals)
        target = tokenizer.encode((" " if k else "") + refusal, add_special_tokens=False)
        out.append(
            chat_example(
                tokenizer,
                source.prompt,
                response[:k],
                target,
                kind="qi",
                end_ids=end,
                meta={"k": k, "response_source": source.response_source},
            )
        )
    return out
