"""THE project's harmful-prompt split: AdvBench + HarmBench val + JBB behaviours.

Every training script (safety SFT, probes, RWI) takes its harmful prompts from ``train`` and
every attack evaluates on ``test``; near-duplicates never straddle the two (see
:func:`training.data.split_prompts`).
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
    """Split :func:`default_harmful_behaviors` 70/10/20 by near-duplicate group.

    Args:
        data_dir: Data directory override.
        seed: Split seed; the project's split is seed 0.

    Returns:
        Train, dev and test behaviours; no test prompt has a near-duplicate in train.
    """
    splits = split_prompts(default_harmful_behaviors(data_dir), seed=seed)
    logger.info(
        "default harmful split (seed %d): %d/%d/%d",
        seed,
        len(splits.train),
        len(splits.dev),
        len(splits.test),
    )
    return splits


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
