"""Labelled trajectories for probe training: which response tokens are unsafe, which are safe.

Recipes (the probe ablation compares the first three at equal size):

- ``rwi``: the worst of K random insertions into a refusal (scored with the model under
  guard), then the model's own greedy continuation. The refusal before the span is safe,
  the span is unsafe, the continuation is unsafe if the judge calls it harmful and safe if
  the model recovered (a refusal); anything in between is left out.
- ``prefill``: the same at position 0 only (the classic prefilling states).
- ``whole``: whole harmful responses, teacher-forced (the Circuit-Breakers harmfulness-probe
  recipe).
- ``direct``: the model's own sampled answers to the plain harmful request; a judged-harmful
  answer is unsafe from the window where the judge first calls it harmful, a refusal safe.
- ``safe``: benign reference answers and refusals, all safe.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from guard import GuardedEngine, LoadedModel, SamplingParams, encode_chat
from training.attacks.judging import judge_outputs
from training.common.candidates import DEFAULT_SPAN_LENGTHS, Insertion, sample_insertions
from training.common.generation import generate_requests
from training.common.prompts import AttackPrompt
from training.common.worst import insertion_scores, worst_index
from training.data import refusal_pool
from training.judge import HarmJudge

UNSAFE, SAFE, IGNORE = 1, 0, -1
RECIPES: tuple[str, ...] = ("rwi", "prefill", "whole")


@dataclass
class Trajectory:
    """A response with a label per token (``UNSAFE``, ``SAFE`` or ``IGNORE``)."""

    prompt_ids: list[int]
    response_ids: list[int]
    labels: list[int]
    recipe: str
    meta: dict[str, Any] = field(default_factory=dict)


def chat_prompt_ids(lm: LoadedModel, prompt: str) -> list[int]:
    """A user prompt's ids under ``lm``'s chat template (the generation prompt included)."""
    return encode_chat(lm.tokenizer, [{"role": "user", "content": prompt}]).prompt_ids


def insertion_trajectories(
    lm: LoadedModel,
    prompts: Sequence[AttackPrompt],
    spans: Sequence[Sequence[tuple[str, str]]],
    judge: HarmJudge,
    *,
    recipe: str = "rwi",
    k: int = 4,
    lengths: Sequence[int] = DEFAULT_SPAN_LENGTHS,
    criterion: str = "recovery_loss",
    recovery_text: str = "I'm sorry, but I can't help with that.",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    seed: int = 0,
) -> list[Trajectory]:
    """Worst-of-``k`` insertion per prompt, continued greedily by ``lm`` and judged.

    Args:
        lm: The model the probe will guard.
        prompts: Harmful prompts.
        spans: Candidate ``(text, source)`` harmful spans per prompt.
        judge: Harm judge for the continuations.
        recipe: ``rwi`` (random positions in a refusal) or ``prefill`` (position 0).
        k: Candidates per prompt.
        lengths: Span lengths m.
        criterion: Worst-of-K criterion.
        recovery_text: Recovery target of the ``recovery_loss`` criterion.
        max_new_tokens: Continuation length.
        batch_size: Generation batch size.
        seed: Sampling seed.
    """
    if recipe not in ("rwi", "prefill"):
        raise ValueError(f"recipe must be 'rwi' or 'prefill', got {recipe!r}")
    tok = lm.tokenizer
    rng = random.Random(seed)
    pool = refusal_pool(seed=seed)
    long = [r.text for r in pool if r.style == "long"]
    other = [r.text for r in pool if r.style != "long"]
    recovery = tok.encode(recovery_text, add_special_tokens=False)
    chosen: list[Insertion] = []
    prompt_ids = [chat_prompt_ids(lm, p.prompt) for p in prompts]
    for ids, prompt_spans in zip(prompt_ids, spans):
        refusal = (
            []
            if recipe == "prefill"
            else tok.encode(
                rng.choice(long if rng.random() < 0.5 else other), add_special_tokens=False
            )
        )
        candidates = sample_insertions(tok, refusal, prompt_spans, k, rng, lengths=lengths)
        scores = insertion_scores(
            lm.model,
            [ids] * len(candidates),
            candidates,
            criterion,
            recovery_ids=[recovery] * len(candidates),
            pad_id=tok.pad_token_id or 0,
        )
        chosen.append(candidates[worst_index(scores)])
    results = generate_requests(
        GuardedEngine(lm.model, tok),
        [(ids, ins.prefix_ids) for ids, ins in zip(prompt_ids, chosen)],
        SamplingParams(max_tokens=max_new_tokens),
        batch_size=batch_size,
        desc=f"{recipe} continuations",
    )
    verdicts = judge_outputs(judge, [p.prompt for p in prompts], [r.text for r in results])
    out = []
    for ids, ins, result, verdict in zip(prompt_ids, chosen, results, verdicts):
        follow = UNSAFE if verdict.success else SAFE if verdict.refusal else IGNORE
        continuation = list(result.token_ids)
        labels = [SAFE] * ins.position + [UNSAFE] * len(ins.span_ids) + [follow] * len(continuation)
        out.append(
            Trajectory(
                ids,
                ins.prefix_ids + continuation,
                labels,
                recipe,
                ins.describe() | {"harmful": verdict.success, "recovered": verdict.refusal},
            )
        )
    return out


def harm_onset(
    judge: HarmJudge, prompt: str, lm: LoadedModel, token_ids: Sequence[int], window: int
) -> int:
    """Index of the first token of the window in which the answer turns harmful.

    The answer's prefixes ending at ``window``, ``2 * window``, ... tokens (and the whole
    answer) are judged; the onset is the start of the window that first makes the prefix
    harmful, so the tokens before it (often a neutral opening) are not labelled unsafe.
    ``len(token_ids)`` when no prefix is harmful.
    """
    ends = [*range(window, len(token_ids), window), len(token_ids)]
    texts = [lm.tokenizer.decode(list(token_ids[:end]), skip_special_tokens=True) for end in ends]
    verdicts = judge_outputs(judge, [prompt] * len(texts), texts)
    for end, verdict in zip(ends, verdicts):
        if verdict.success:
            return max(0, end - window)
    return len(token_ids)


def direct_trajectories(
    lm: LoadedModel,
    prompts: Sequence[AttackPrompt],
    judge: HarmJudge,
    *,
    samples: int = 2,
    temperature: float = 1.0,
    max_new_tokens: int = 128,
    window: int = 16,
    batch_size: int = 8,
    seed: int = 0,
) -> list[Trajectory]:
    """The model's own answers to plain harmful requests, ``samples`` seeded samples each.

    A judged-harmful answer is unsafe from its :func:`harm_onset` on (earlier tokens
    ignored), a refusal is safe, anything else is left out: the direct-compliance states an
    aligned model produces when its refusal fails, which insertion and prefill states miss.
    """
    ids = [chat_prompt_ids(lm, p.prompt) for p in prompts]
    requests = [(i, []) for i in ids for _ in range(samples)]
    params = [
        SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed + n)
        for n in range(len(requests))
    ]
    results = generate_requests(
        GuardedEngine(lm.model, lm.tokenizer),
        requests,
        params,
        batch_size=batch_size,
        desc="direct answers",
    )
    owners = [p for p in prompts for _ in range(samples)]
    verdicts = judge_outputs(judge, [p.prompt for p in owners], [r.text for r in results])
    out = []
    for (prompt_ids, _), prompt, result, verdict in zip(requests, owners, results, verdicts):
        tokens = list(result.token_ids)
        if not tokens:
            continue
        if verdict.success:
            onset = harm_onset(judge, prompt.prompt, lm, tokens, window)
            labels = [IGNORE] * onset + [UNSAFE] * (len(tokens) - onset)
        else:
            labels = [SAFE if verdict.refusal else IGNORE] * len(tokens)
        meta = {"harmful": verdict.success, "recovered": verdict.refusal, "prompt": prompt.prompt}
        out.append(Trajectory(prompt_ids, tokens, labels, "direct", meta))
    return out


def drop_short_harm(trajectories: Sequence[Trajectory], min_tokens: int) -> list[Trajectory]:
    """Judged-harmful answers shorter than ``min_tokens`` relabelled as left out.

    The learned judge calls many terse sampled non-answers harmful ("I'll stop here.",
    "We need to update this."); an answer that short carries little harmful content and
    would teach the probe that refusals are unsafe.
    """
    out = []
    for t in trajectories:
        if t.meta.get("harmful") and len(t.response_ids) < min_tokens:
            meta = t.meta | {"harmful": False, "dropped_short": True}
            t = Trajectory(t.prompt_ids, t.response_ids, [IGNORE] * len(t.labels), t.recipe, meta)
        out.append(t)
    return out


def teacher_forced(
    lm: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    label: int,
    recipe: str,
    *,
    max_tokens: int = 64,
) -> list[Trajectory]:
    """``(prompt, response)`` text pairs with every response token labelled ``label``."""
    out = []
    for prompt, response in pairs:
        ids = lm.tokenizer.encode(response.strip(), add_special_tokens=False)[:max_tokens]
        if ids:
            out.append(Trajectory(chat_prompt_ids(lm, prompt), ids, [label] * len(ids), recipe))
    return out


def generated_responses(
    lm: LoadedModel, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 8
) -> list[Trajectory]:
    """The model's own greedy answers to ``prompts`` (labelled safe: benign prompts only)."""
    ids = [chat_prompt_ids(lm, p) for p in prompts]
    results = generate_requests(
        GuardedEngine(lm.model, lm.tokenizer),
        [(i, []) for i in ids],
        SamplingParams(max_tokens=max_new_tokens),
        batch_size=batch_size,
        desc="benign answers",
    )
    return [
        Trajectory(i, list(r.token_ids), [SAFE] * len(r.token_ids), "benign-own", {"text": r.text})
        for i, r in zip(ids, results)
        if r.token_ids
    ]


def labelled_tokens(
    trajectories: Sequence[Trajectory], states: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Stack the states of labelled tokens (``IGNORE`` dropped) into ``X, y``."""
    xs, ys = [], []
    for t, s in zip(trajectories, states):
        labels = np.asarray(t.labels)
        keep = labels != IGNORE
        xs.append(s[keep])
        ys.append(labels[keep])
    if not xs:
        raise ValueError("no trajectories")
    return np.concatenate(xs), np.concatenate(ys).astype(int)
