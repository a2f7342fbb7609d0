"""Benign prompt sets, disjoint by role (probe training, calibration, evaluation), and answers.

Probe training uses reference answers (self-instruct, GSM8K train, XSTest safe prompts with
compliant GPT-4 answers). Calibration and evaluation use the *model's own* answers to
held-out benign prompts (XSTest safe prompts and GSM8K test questions), which is what the
guard sees when it serves. GSM8K reference answers are cleaned by
:func:`clean_gsm8k_answer` wherever they are trained on or scored.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from training.data import (
    load_gsm8k,
    load_self_instruct,
    load_xstest_completions,
    load_xstest_prompts,
)
from training.data.loaders import PathLike

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
