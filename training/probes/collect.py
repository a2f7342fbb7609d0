"""The labelled trajectories an RWI probe run fits on, and their token states.

Harmful prompts come from the train and dev parts of the default split; each gets its own
harmful response plus pool spans (train-side only) as insertion candidates.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from guard import LoadedModel
from training.common.benign import benign_sets
from training.common.prompts import AttackPrompt, load_attack_prompts
from training.common.responses import harmful_responses
from training.data import refusal_pool
from training.judge import HarmJudge
from training.probes.config import ProbeTrainingConfig
from training.probes.states import token_states
from training.probes.trajectories import (
    SAFE,
    UNSAFE,
    Trajectory,
    generated_responses,
    insertion_trajectories,
    teacher_forced,
)
from training.rwi.data import HarmfulSource, train_span_texts

States = dict[str, dict[str, list[np.ndarray]]]  # set name -> hook -> array per trajectory


@dataclass
class ProbeSets:
    """Labelled trajectories by set, and how many harmful train prompts they came from.

    Sets: ``rwi`` and ``rwi_dev`` (worst insertions on train / dev prompts), ``prefill``
    and ``whole`` (ablation only), ``safe`` (benign references and refusals),
    ``calibration`` and ``eval`` (the model's own answers to held-out benign prompts).
    """

    trajectories: dict[str, list[Trajectory]]
    n_harmful_prompts: int


def _harmful_part(
    writer: LoadedModel,
    split: str,
    n: int,
    *,
    seed: int,
    batch_size: int,
    data_dir: str | None,
) -> tuple[list[AttackPrompt], list[HarmfulSource]]:
    prompts = load_attack_prompts(split=split, limit=n, seed=seed, data_dir=data_dir)
    responses = harmful_responses(prompts, writer, batch_size=batch_size, data_dir=data_dir)
    return prompts, [HarmfulSource(p.prompt, r.text, r.source) for p, r in zip(prompts, responses)]


def _span_choices(
    sources: list[HarmfulSource], pool: list[tuple[str, str]], seed: int
) -> list[list[tuple[str, str]]]:
    rng = random.Random(seed)
    return [[(s.response, f"own:{s.response_source}"), *rng.sample(pool, 3)] for s in sources]


def collect_trajectories(
    config: ProbeTrainingConfig, lm: LoadedModel, writer: LoadedModel, judge: HarmJudge
) -> ProbeSets:
    """Worst-insertion, ablation, safe and benign-answer trajectories (see :class:`ProbeSets`)."""
    part = {"seed": config.seed, "batch_size": config.batch_size, "data_dir": config.data_dir}
    train_prompts, train_sources = _harmful_part(writer, "train", config.n_train_prompts, **part)
    dev_prompts, dev_sources = _harmful_part(writer, "dev", config.n_dev_prompts, **part)
    pool = train_span_texts([], data_dir=config.data_dir)
    options: dict[str, Any] = {
        "k": config.k,
        "criterion": config.criterion,
        "max_new_tokens": config.max_new_tokens,
        "batch_size": config.batch_size,
        "seed": config.seed,
    }
    train_spans = _span_choices(train_sources, pool, config.seed)
    dev_spans = _span_choices(dev_sources, pool, config.seed + 1)
    sets = {
        "rwi": insertion_trajectories(
            lm, train_prompts, train_spans, judge, recipe="rwi", **options
        ),
        "rwi_dev": insertion_trajectories(
            lm, dev_prompts, dev_spans, judge, recipe="rwi", **options
        ),
    }
    if config.ablation:
        sets["prefill"] = insertion_trajectories(
            lm, train_prompts, train_spans, judge, recipe="prefill", **options
        )
        sets["whole"] = teacher_forced(
            lm, [(s.prompt, s.response) for s in train_sources], UNSAFE, "whole"
        )
    benign = benign_sets(
        n_calibration=config.n_calibration,
        n_eval=config.n_eval,
        seed=config.seed,
        data_dir=config.data_dir,
    )
    rng = random.Random(config.seed)
    refusals = [r.text for r in refusal_pool(seed=config.seed)]
    sets["safe"] = teacher_forced(lm, benign.train_pairs, SAFE, "benign-ref") + teacher_forced(
        lm, [(p.prompt, rng.choice(refusals)) for p in train_prompts[:60]], SAFE, "refusal"
    )
    sets["calibration"] = generated_responses(
        lm, benign.calibration_prompts, batch_size=config.batch_size
    )
    sets["eval"] = generated_responses(lm, benign.eval_prompts, batch_size=config.batch_size)
    return ProbeSets(sets, len(train_prompts))


def harmful_trajectories(
    lm: LoadedModel,
    writer: LoadedModel,
    judge: HarmJudge,
    *,
    n_train: int,
    n_dev: int,
    k: int = 4,
    criterion: str = "recovery_loss",
    max_new_tokens: int = 64,
    batch_size: int = 8,
    seed: int = 0,
    data_dir: str | None = None,
) -> dict[str, list[Trajectory]]:
    """RWI and prefill trajectories on harmful train-split prompts, and refusals.

    The first ``n_train`` prompts of a seeded sample of the train split give ``train``
    (worst-of-``k`` insertions into a refusal, and prefills, each continued by ``lm`` and
    judged); the next ``n_dev`` give ``dev`` the same way (never fitted on); ``safe`` holds
    refusals of the train prompts.
    """
    prompts, sources = _harmful_part(
        writer, "train", n_train + n_dev, seed=seed, batch_size=batch_size, data_dir=data_dir
    )
    pool = train_span_texts([], data_dir=data_dir)
    spans = _span_choices(sources, pool, seed)
    options: dict[str, Any] = {
        "k": k,
        "criterion": criterion,
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "seed": seed,
    }
    sets: dict[str, list[Trajectory]] = {}
    for name, part in (("train", slice(0, n_train)), ("dev", slice(n_train, None))):
        sets[name] = [
            t
            for recipe in ("rwi", "prefill")
            for t in insertion_trajectories(
                lm, prompts[part], spans[part], judge, recipe=recipe, **options
            )
        ]
    rng = random.Random(seed)
    refusals = [r.text for r in refusal_pool(seed=seed)]
    sets["safe"] = teacher_forced(
        lm, [(p.prompt, rng.choice(refusals)) for p in prompts[:n_train]], SAFE, "refusal"
    )
    return sets


def collect_states(
    lm: LoadedModel, sets: dict[str, list[Trajectory]], hooks: Sequence[str]
) -> States:
    """Response-token states of every set at every hook."""
    pad = lm.tokenizer.pad_token_id or 0
    return {
        name: token_states(
            lm.model, [(t.prompt_ids, t.response_ids) for t in ts], hooks, pad_id=pad
        )
        for name, ts in sets.items()
    }
