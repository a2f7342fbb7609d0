"""THE project's harmful-prompt split: AdvBench + HarmBench val + JBB behaviours.

Every training script (safety SFT, probes, RWI) takes its harmful prompts from ``train`` and
every attack evaluates on ``test``. Near-duplicates never straddle the parts (see
:func:`training.data.split_prompts`), and neither do rewordings: a dev or test prompt that
asks for the same thing as a train prompt in other words
(:func:`training.data.paraphrase.paraphrase_similarity`) moves to train, and a test prompt
that rewords a dev prompt moves to dev. Prompts only ever leave the evaluation parts, so
whatever was fitted on an earlier, larger-looking test part's complement stays held out.
"""

from __future__ import annotations

import logging
from typing import Literal

from training.data import (
    HarmfulBehavior,
    Splits,
    deduplicate,
    load_advbench_behaviors,
    load_harmbench_behaviors,
    load_jbb_behaviors,
    split_prompts,
)
from training.data.loaders import PathLike
from training.data.paraphrase import REWORDING_THRESHOLD, paraphrase_similarity

logger = logging.getLogger(__name__)

DEFAULT_SPLIT_SEED = 0
SplitName = Literal["train", "dev", "test"]
SPLIT_NAMES: tuple[str, ...] = ("train", "dev", "test")


def default_harmful_behaviors(data_dir: PathLike = None) -> list[HarmfulBehavior]:
    """AdvBench, HarmBench val and JBB behaviours, exact duplicates removed (first kept)."""
    behaviors = [
        *load_advbench_behaviors(data_dir),
        *load_harmbench_behaviors(data_dir),
        *load_jbb_behaviors(data_dir),
    ]
    return deduplicate(behaviors)


def default_harmful_split(
    data_dir: PathLike = None, *, seed: int = DEFAULT_SPLIT_SEED
) -> Splits[HarmfulBehavior]:
    """Split :func:`default_harmful_behaviors` 70/10/20 by near-duplicate group, rewordings
    of train (dev) prompts moved out of dev and test (test) — see the module docstring.

    Args:
        data_dir: Data directory override.
        seed: Split seed; the project's split is seed 0.

    Returns:
        Train, dev and test behaviours; no test prompt has a near-duplicate in train.
    """
    splits = without_rewordings(split_prompts(default_harmful_behaviors(data_dir), seed=seed))
    logger.info(
        "default harmful split (seed %d): %d/%d/%d",
        seed,
        len(splits.train),
        len(splits.dev),
        len(splits.test),
    )
    return splits


def without_rewordings(
    splits: Splits[HarmfulBehavior], *, threshold: float = REWORDING_THRESHOLD
) -> Splits[HarmfulBehavior]:
    """Move dev/test prompts that reword a train prompt to train, and test prompts that
    reword a dev prompt to dev, until none is left (order kept; train and dev only grow).

    The IDF is fitted once on every prompt, so a pair scores the same whatever part its
    prompts sit in.
    """
    parts = [list(splits.train), list(splits.dev), list(splits.test)]
    corpus = [b.prompt for part in parts for b in part]
    moved = True
    while moved:
        moved = False
        for source, target in ((1, 0), (2, 0), (2, 1)):  # dev->train, test->train, test->dev
            sims = paraphrase_similarity(
                [b.prompt for b in parts[source]],
                [b.prompt for b in parts[target]],
                corpus=corpus,
            )
            move = (sims >= threshold).tolist()
            if any(move):
                moved = True
                parts[target] += [b for b, m in zip(parts[source], move) if m]
                parts[source] = [b for b, m in zip(parts[source], move) if not m]
    return Splits(*(tuple(part) for part in parts))


def split_part(
    name: str, data_dir: PathLike = None, *, seed: int = DEFAULT_SPLIT_SEED
) -> tuple[HarmfulBehavior, ...]:
    """One part (``"train"``, ``"dev"`` or ``"test"``) of the default harmful split.

    Raises:
        ValueError: An unknown part name.
    """
    if name not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {SPLIT_NAMES}, got {name!r}")
    return getattr(default_harmful_split(data_dir, seed=seed), name)
