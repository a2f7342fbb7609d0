"""Attack prompts: a user prompt file, or a seeded sample of a part of the default split."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from training.common.harmful_split import DEFAULT_SPLIT_SEED, default_harmful_behaviors, split_part
from training.data import HarmfulBehavior, load_prompt_file, normalize_text
from training.data.loaders import PathLike, load_coconot_harmful_prompts

logger = logging.getLogger(__name__)

HELDOUT = "heldout"
"""Attack-prompt set: the test split plus CoCoNot's safety-concern requests."""


@dataclass(frozen=True, slots=True)
class AttackPrompt:
    """A harmful request under attack, with its affirmative target where one is known."""

    prompt: str
    target: str | None
    source: str
    source_id: str


def _from_behavior(b: HarmfulBehavior) -> AttackPrompt:
    return AttackPrompt(b.prompt, b.target, b.source, b.source_id)


def load_attack_prompts(
    *,
    prompts_file: str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    split_seed: int = DEFAULT_SPLIT_SEED,
    data_dir: PathLike = None,
) -> list[AttackPrompt]:
    """Load the prompts to attack.

    Args:
        prompts_file: CSV/JSONL with a ``prompt`` or ``goal`` column; wins over ``split``.
            Targets are looked up among the known behaviours by normalised prompt.
        split: Part of the default harmful split (``train``, ``dev`` or ``test``), or
            ``heldout``: the test part plus CoCoNot's safety-concern requests (prompts of
            another source, never trained on; no targets), the n >= 200 evaluation set.
        limit: Keep a seeded random sample of this many prompts (``None``: all).
        seed: Seed of that sample.
        split_seed: Seed of the default harmful split.
        data_dir: Data directory override.

    Returns:
        Prompts in a deterministic order.
    """
    if prompts_file is not None:
        texts = load_prompt_file(prompts_file)
        try:
            known = {normalize_text(b.prompt): b for b in default_harmful_behaviors(data_dir)}
        except FileNotFoundError:  # no offline data: prompts without targets
            known = {}
        prompts = []
        for i, text in enumerate(texts):
            b = known.get(normalize_text(text))
            prompts.append(
                AttackPrompt(text, b.target if b else None, "file", f"{prompts_file}#{i}")
            )
    elif split == HELDOUT:
        prompts = [_from_behavior(b) for b in split_part("test", data_dir, seed=split_seed)]
        prompts += [_from_behavior(b) for b in load_coconot_harmful_prompts(data_dir)]
    else:
        prompts = [_from_behavior(b) for b in split_part(split, data_dir, seed=split_seed)]
    if limit is not None and limit < len(prompts):
        prompts = random.Random(seed).sample(prompts, limit)
    logger.info("attack prompts: %d", len(prompts))
    return prompts
