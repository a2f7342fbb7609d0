"""Benign prompt sets, disjoint by role (probe training, calibration, evaluation), and answers.

Probe training uses reference answers (self-instruct, GSM8K train, XSTest safe prompts with
compliant GPT-4 answers). Calibration and evaluation use the *model's own* answers to
held-out benign prompts (XSTest safe prompts and GSM8K test questions), which is what the
guard sees when it serves. GSM8K reference answers are cleaned by
:func:`clean_gsm8k_answer` wherever they are trained on or scored.

The hold-out rule of the benign registry (:mod:`training.data.benign_sources`) also lives
here: every source is evaluation-only, split into a train and a held-out eval half, or
training-only (:func:`benign_role`); :func:`benign_eval_prompts` gives what evaluations may
use and :func:`benign_train_prompts` what training sets may use, rewordings of any
evaluation prompt removed.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from training.data import (
    BENIGN_SOURCES,
    DEFAULT_THRESHOLD,
    BenignPrompt,
    drop_duplicate_prompts,
    load_benign_prompts,
    load_gsm8k,
    load_self_instruct,
    load_xstest_completions,
    load_xstest_prompts,
    normalize_text,
    resolve_data_dir,
    split_prompts,
)
from training.data.loaders import PathLike
from training.data.paraphrase import REWORDING_THRESHOLD, paraphrase_similarity
from training.data.splits import max_similarity

logger = logging.getLogger(__name__)

_CALCULATOR = re.compile(r"<<[^>]*>>")
_FINAL = re.compile(r"\n?####\s*(.+?)\s*$")


@dataclass(frozen=True, slots=True)
class BenignSets:
    """Reference ``(prompt, answer)`` pairs for training; prompts for calibration and eval."""

    train_pairs: list[tuple[str, str]]
    calibration_prompts: list[str]
    eval_prompts: list[str]


def benign_sets(
    *, n_calibration: int = 120, n_eval: int = 120, seed: int = 0, data_dir: PathLike = None
) -> BenignSets:
    """Split XSTest safe prompts three ways (train / calibration / eval) and add GSM8K.

    Half of the calibration and of the evaluation prompts are XSTest safe prompts (the
    over-refusal probes), half GSM8K test questions; both sets are disjoint from each other
    and from the training pairs.
    """
    rng = random.Random(seed)
    safe = [p.prompt for p in load_xstest_prompts(data_dir) if p.label == "safe"]
    rng.shuffle(safe)
    n_cal, n_ev = n_calibration // 2, n_eval // 2
    cal_x, eval_x, train_x = safe[:n_cal], safe[n_cal : n_cal + n_ev], set(safe[n_cal + n_ev :])
    gsm_test = [b.prompt for b in load_gsm8k(data_dir, split="test")]
    rng.shuffle(gsm_test)
    cal_g, eval_g = (
        gsm_test[: n_calibration - n_cal],
        gsm_test[n_calibration - n_cal :][: n_eval - n_ev],
    )
    compliant = [
        (c.prompt, c.completion)
        for c in load_xstest_completions(data_dir, models=("gpt4",))
        if c.prompt in train_x and c.final_label == "1_full_compliance"
    ]
    references = [(b.prompt, b.answer) for b in load_self_instruct(data_dir) if b.answer]
    references += [(b.prompt, b.answer) for b in rng.sample(load_gsm8k(data_dir), 100)]
    return BenignSets(compliant + references, cal_x + cal_g, eval_x + eval_g)


def clean_gsm8k_answer(answer: str) -> str:
    """Drop GSM8K calculator annotations and turn ``#### 72`` into "The answer is 72."."""
    text = _CALCULATOR.sub("", answer)
    match = _FINAL.search(text)
    if match:
        text = text[: match.start()].rstrip() + f"\nThe answer is {match.group(1)}."
    return text.strip()


# --- Train/eval roles of the benign sources (the hold-out rule) --------------------------------

#: Seed of the train/eval halves of :data:`SPLIT_SOURCES`. Fixed, so every training run and
#: every evaluation agree on which prompts are held out; never vary it with a run's seed.
BENIGN_HOLDOUT_SEED = 0
#: Sources used only for evaluation: no prompt of theirs is ever trained on. ``gsm8k`` here is
#: the registry's GSM8K *test* split (training answers come from GSM8K train, a separate
#: file); ``nq_open`` answers are 1-3 word phrases (median 2), too short to teach an answer.
EVAL_ONLY_SOURCES: tuple[str, ...] = (
    "xstest_safe",
    "coconot_contrast",
    "mitre_frr",
    "nq_open",
    "gsm8k",
)
#: Sources split by prompt into a train half and a held-out eval half (seeded, near-duplicate
#: groups kept on one side), so over-refusal and reference log-likelihood can be measured on
#: prompts no training run has seen.
SPLIT_SOURCES: tuple[str, ...] = (
    "arena_hard",
    "coconot_pref",
    "gpteacher_roleplay",
    "gpteacher_code",
)
#: Sources that are training data only (175 seed tasks; probe training uses them too).
TRAIN_ONLY_SOURCES: tuple[str, ...] = ("self_instruct",)


@dataclass(frozen=True, slots=True)
class BenignHoldout:
    """The train part and the held-out eval part of one benign source.

    ``train`` is the raw train side: :func:`benign_train_prompts` also removes rewordings
    of evaluation prompts before anything is trained on.
    """

    train: tuple[BenignPrompt, ...]
    eval: tuple[BenignPrompt, ...]


def benign_role(source: str) -> str:
    """``"eval"``, ``"split"`` or ``"train"``; a registry source not listed here is
    treated as evaluation-only (never trained on by accident)."""
    if source not in BENIGN_SOURCES:
        raise ValueError(f"unknown benign source {source!r}; choose from {BENIGN_SOURCES}")
    if source in SPLIT_SOURCES:
        return "split"
    if source in TRAIN_ONLY_SOURCES:
        return "train"
    return "eval"


def benign_holdout(source: str, data_dir: PathLike = None) -> BenignHoldout:
    """Split one registry source by its role (see the module constants).

    Split sources are halved with :func:`training.data.split_prompts` (seed
    :data:`BENIGN_HOLDOUT_SEED`, near-duplicate groups whole), so the halves are a function
    of the data file only. Cached per resolved data directory for the process.
    """
    return _holdout(source, resolve_data_dir(data_dir))


def benign_eval_prompts(source: str, data_dir: PathLike = None) -> list[BenignPrompt]:
    """The prompts of ``source`` that evaluations use and no training set contains.

    All of an evaluation-only source, the eval half of a split source, nothing of
    ``self_instruct`` (a training source).
    """
    return list(benign_holdout(source, data_dir).eval)


def evaluation_prompt_texts(data_dir: PathLike = None) -> tuple[str, ...]:
    """Every prompt any benign evaluation uses: the eval part of every registry source."""
    return _evaluation_texts(resolve_data_dir(data_dir))


def benign_train_prompts(source: str, data_dir: PathLike = None) -> tuple[BenignPrompt, ...]:
    """The prompts of ``source`` a training set may use, in file order.

    The train part of the source (for ``gsm8k``: GSM8K *train*, ``source_id``
    ``train.jsonl#i``, raw answers), without any prompt that equals (normalised) or rewords
    (content-word TF-IDF cosine >= :data:`~training.data.paraphrase.REWORDING_THRESHOLD`,
    the harmful split's rule) or is a near-duplicate of (character n-gram cosine >=
    :data:`~training.data.DEFAULT_THRESHOLD`) an evaluation prompt of *any* source. Empty
    for evaluation-only sources other than ``gsm8k``. Cached like :func:`benign_holdout`.
    """
    return _train_prompts(source, resolve_data_dir(data_dir))


@lru_cache(maxsize=32)
def _holdout(source: str, data_dir: Path) -> BenignHoldout:
    prompts = load_benign_prompts(source, data_dir)
    role = benign_role(source)
    if role == "eval":
        return BenignHoldout((), tuple(prompts))
    if role == "train":
        return BenignHoldout(tuple(prompts), ())
    halves = split_prompts(prompts, seed=BENIGN_HOLDOUT_SEED, fractions=(0.5, 0.0, 0.5))
    return BenignHoldout(halves.train, halves.test)


@lru_cache(maxsize=4)
def _evaluation_texts(data_dir: Path) -> tuple[str, ...]:
    return tuple(p.prompt for s in BENIGN_SOURCES for p in _holdout(s, data_dir).eval)


@lru_cache(maxsize=32)
def _train_prompts(source: str, data_dir: Path) -> tuple[BenignPrompt, ...]:
    if source == "gsm8k":
        candidates = [
            BenignPrompt(e.prompt, "gsm8k", e.source_id, e.answer)
            for e in drop_duplicate_prompts(load_gsm8k(data_dir, split="train"))
        ]
    else:
        candidates = list(_holdout(source, data_dir).train)
    if not candidates:
        return ()
    references = _evaluation_texts(data_dir)
    texts = [p.prompt for p in candidates]
    exact = {normalize_text(t) for t in references}
    reworded = paraphrase_similarity(texts, references) >= REWORDING_THRESHOLD
    near = max_similarity(texts, references) >= DEFAULT_THRESHOLD
    kept = tuple(
        p
        for p, r, n in zip(candidates, reworded, near)
        if not (r or n) and normalize_text(p.prompt) not in exact
    )
    logger.info(
        "benign train prompts %s: %d of %d (rewordings of evaluation prompts removed)",
        source,
        len(kept),
        len(candidates),
    )
    return kept
