"""Benign side of an attack run: over-refusal, guard false triggers and a utility figure.

Prompts are the held-out evaluation half of :func:`training.common.benign.benign_sets`
(XSTest safe prompts and GSM8K test questions), never used to fit or calibrate a probe.
Utility is the mean per-token log-likelihood of GSM8K test reference answers (higher is
better; compare against the base model).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from guard import SamplingParams, encode_chat, load_model
from training.attacks.harness import AttackConfig, build_engine
from training.common.benign import benign_eval_prompts, benign_sets, clean_gsm8k_answer
from training.common.generation import generate_requests
from training.common.stats import Rate
from training.common.worst import mean_target_logprobs
from training.data import load_gsm8k, load_xstest_prompts
from training.judge import is_refusal

logger = logging.getLogger(__name__)


UTILITY_SOURCES: tuple[str, ...] = ("gsm8k", "arena_hard")
"""Sources of held-out reference answers for :func:`reference_loglik`."""


def reference_loglik(
    lm: Any,
    n: int = 100,
    data_dir: str | None = None,
    *,
    source: str = "gsm8k",
    max_answer_tokens: int = 256,
) -> float:
    """Mean per-token log-likelihood of the first ``n`` held-out reference answers of ``source``.

    ``gsm8k``: GSM8K test answers (calculator notes removed); ``arena_hard``: the reference
    answers of the held-out half of Arena-Hard (real user prompts), each cut to its first
    ``max_answer_tokens`` tokens. Higher is better; compare a fine-tune against its base.
    """
    if source == "gsm8k":
        items = [
            (b.prompt, clean_gsm8k_answer(b.answer)) for b in load_gsm8k(data_dir, split="test")
        ]
    elif source == "arena_hard":
        items = [(p.prompt, p.answer) for p in benign_eval_prompts(source, data_dir) if p.answer]
    else:
        raise ValueError(f"utility source must be one of {UTILITY_SOURCES}, got {source!r}")
    items = items[:n]
    contexts = [
        encode_chat(lm.tokenizer, [{"role": "user", "content": q}]).prompt_ids for q, _ in items
    ]
    targets = [
        lm.tokenizer.encode(a, add_special_tokens=False)[:max_answer_tokens] for _, a in items
    ]
    lp = mean_target_logprobs(
        lm.model, contexts, targets, pad_id=lm.tokenizer.pad_token_id or 0, batch_size=8
    )
    return float(np.nanmean(lp))


def run_benign(
    config: AttackConfig, *, n_eval: int = 120, n_utility: int = 100, progress: bool = True
) -> dict[str, Any]:
    """Generate (guarded when ``config.probe``) on benign prompts; write ``benign*.json[l]``."""
    start = time.perf_counter()
    lm = load_model(config.model)
    engine = build_engine(lm, config.probe, config.policy, strict_probe=config.strict_probe)
    prompts = benign_sets(n_eval=n_eval, seed=config.seed, data_dir=config.data_dir).eval_prompts
    xstest = {p.prompt for p in load_xstest_prompts(config.data_dir)}
    ids = [encode_chat(lm.tokenizer, [{"role": "user", "content": p}]).prompt_ids for p in prompts]
    results = generate_requests(
        engine,
        [(i, []) for i in ids],
        SamplingParams(
            max_tokens=config.max_tokens, temperature=config.temperature, seed=config.seed
        ),
        batch_size=config.batch_size,
        desc="benign",
        progress=progress,
    )
    records = [
        {
            "prompt": p,
            "set": "xstest_safe" if p in xstest else "gsm8k_test",
            "continuation": r.text,
            "refusal": is_refusal(r.text),
            "triggered": bool(r.summary.triggered) if r.summary else None,
            "interventions": len(r.interventions),
        }
        for p, r in zip(prompts, results)
    ]
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "benign.jsonl").open("w", encoding="utf-8") as f:
        for row in records:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def rate(key: str, subset: str | None = None) -> dict[str, Any]:
        rows = [r for r in records if subset is None or r["set"] == subset]
        return Rate.of(sum(bool(r[key]) for r in rows), len(rows)).to_dict()

    summary = {
        "config": asdict(config),
        "model_id": lm.model_id,
        "n_prompts": len(records),
        "over_refusal_xstest_safe": rate("refusal", "xstest_safe"),
        "refusal_gsm8k_test": rate("refusal", "gsm8k_test"),
        "false_trigger_rate": rate("triggered") if config.probe else None,
        "reference_loglik_gsm8k": reference_loglik(lm, n_utility, config.data_dir),
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    (out / "benign_summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    logger.info("benign: %s", {k: v for k, v in summary.items() if k != "config"})
    return summary
