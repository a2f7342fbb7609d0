"""Ordinary traffic: how often the guard fires on, and the model refuses, benign prompts.

Prompts come from the evaluation part of every benign source
(:func:`training.common.benign.benign_eval_prompts`: real user prompts, role-play, code,
search questions, math, look-alike prompts that only sound harmful), a seeded sample per
source; no training set of ours contains them. The model answers them guarded (long answers: real traffic is
hundreds of tokens, and every token is a chance to fire), and each source gets its own
false-trigger and over-refusal rate with a 95 % Wilson interval: a pooled rate hides the
source where the guard fails. Nothing here fits or calibrates anything.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from guard import SamplingParams, encode_chat, load_model
from training.attacks.harness import AttackConfig, build_engine
from training.common.benign import TRAIN_ONLY_SOURCES, benign_eval_prompts
from training.common.generation import generate_requests
from training.common.stats import Rate
from training.data import BENIGN_SOURCES
from training.judge import is_refusal

logger = logging.getLogger(__name__)

#: Sources measured by default: every source with an evaluation part.
DEFAULT_SOURCES: tuple[str, ...] = tuple(s for s in BENIGN_SOURCES if s not in TRAIN_ONLY_SOURCES)


def sample_prompts(
    sources: Sequence[str], n_per_source: int, *, seed: int = 0, data_dir: str | None = None
) -> list[tuple[str, str]]:
    """``(source, prompt)`` pairs: a seeded sample of ``n_per_source`` prompts per source."""
    pairs = []
    for source in sources:
        prompts = [p.prompt for p in benign_eval_prompts(source, data_dir)]
        if n_per_source < len(prompts):
            prompts = random.Random(f"{seed}:{source}").sample(prompts, n_per_source)
        pairs += [(source, p) for p in prompts]
    return pairs


def _rates(rows: Sequence[dict[str, Any]], guarded: bool) -> dict[str, Any]:
    peaks = [r["max_score"] for r in rows if r["max_score"] is not None]
    return {
        "n": len(rows),
        "false_trigger": Rate.of(sum(r["triggered"] for r in rows), len(rows)).to_dict()
        if guarded
        else None,
        "over_refusal": Rate.of(sum(r["refusal"] for r in rows), len(rows)).to_dict(),
        "median_peak_score": float(np.median(peaks)) if peaks else None,
        "mean_new_tokens": float(np.mean([r["n_new_tokens"] for r in rows])),
    }


def run_traffic(
    config: AttackConfig,
    *,
    sources: Sequence[str] = DEFAULT_SOURCES,
    n_per_source: int = 25,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer benign prompts of every source (guarded when ``config.probe``).

    Writes ``traffic.jsonl`` (one row per answer) and ``traffic_summary.json`` (rates per
    source and pooled) to ``config.out``; returns the summary.
    """
    start = time.perf_counter()
    lm = load_model(config.model)
    engine = build_engine(lm, config.probe, config.policy, strict_probe=config.strict_probe)
    pairs = sample_prompts(sources, n_per_source, seed=config.seed, data_dir=config.data_dir)
    ids = [encode_chat(lm.tokenizer, [{"role": "user", "content": p}]).prompt_ids for _, p in pairs]
    params = SamplingParams(
        max_tokens=config.max_tokens, temperature=config.temperature, seed=config.seed
    )
    results = generate_requests(
        engine,
        [(i, []) for i in ids],
        params,
        batch_size=config.batch_size,
        desc="traffic",
        progress=progress,
    )
    records = [
        {
            "source": source,
            "prompt": prompt,
            "continuation": r.text,
            "n_new_tokens": len(r.token_ids),
            "refusal": is_refusal(r.text),
            "triggered": bool(r.summary.triggered) if r.summary else False,
            "max_score": r.summary.max_score if r.summary else None,
        }
        for (source, prompt), r in zip(pairs, results)
    ]
    guarded = config.probe is not None
    summary = {
        "config": asdict(config),
        "model_id": lm.model_id,
        "threshold": engine.threshold if guarded else None,
        "pooled": _rates(records, guarded),
        "by_source": {
            s: _rates([r for r in records if r["source"] == s], guarded) for s in sources
        },
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "traffic.jsonl").open("w", encoding="utf-8") as f:
        for row in records:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "traffic_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
