"""Fit the RWI probe: layer sweep, calibration, equal-size recipe ablation, held-out recall.

``trajguard train probe`` runs :func:`run_probe_training`. The probe the guard ships is
the ``rwi`` recipe at the layer with the best dev AUROC, calibrated so at most
``target_rate`` of the model's own answers to held-out benign prompts trigger.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from guard import DEFAULT_MODEL, LoadedModel, MonitorConfig, load_model
from guard.monitor import peak_debounced_score
from guard.probe import LinearProbe, calibrate_threshold
from training.attacks.judging import load_or_fit_judge
from training.attacks.prompts import load_attack_prompts
from training.attacks.responses import harmful_responses
from training.data import refusal_pool
from training.dynamics.plots import Curve, plot_curves
from training.probes.benign import benign_sets
from training.probes.states import token_states
from training.probes.trajectories import (
    RECIPES,
    SAFE,
    UNSAFE,
    Trajectory,
    generated_responses,
    insertion_trajectories,
    labelled_tokens,
    teacher_forced,
)
from training.rwi.data import HarmfulSource, train_span_texts

logger = logging.getLogger(__name__)

REPORT_FILE = "probe_report.json"


@dataclass
class ProbeTrainingConfig:
    """Everything ``trajguard train probe`` does (saved in the report).

    Attributes:
        model: Model the probe guards (alias or HF directory).
        out: Output directory: ``probe/`` (the RWI probe), ``ablation/<recipe>/``, report, plot.
        layers: ``resid_post`` layers swept (negative: from the end).
        n_train_prompts: Harmful train-split prompts for probe training.
        n_dev_prompts: Harmful dev-split prompts for the layer sweep.
        k: Candidate insertions per prompt.
        criterion: Worst-of-K criterion.
        max_new_tokens: Continuation generated after each insertion.
        n_calibration: Benign prompts whose own answers calibrate the threshold.
        n_eval: Held-out benign prompts for the false-trigger rate.
        target_rate: Allowed per-response benign false-trigger rate.
        C: Inverse L2 strength of the logistic regression.
        ablation: Also fit prefill-only and whole-response probes at equal size.
        attack_records: Insertion-attack JSONL (``trajguard attack insert``) on held-out
            prompts for recall at the calibrated threshold.
        deep_position: Positions at or beyond this count as deep in the recall table.
        writer: Writer of harmful responses (see ``trajguard attack``).
        judge: Saved harm judge directory (default: cached learned judge).
        batch_size: Generation / forward batch size.
        seed: Sampling seed.
        data_dir: Offline data directory override.
    """

    model: str = DEFAULT_MODEL
    out: str = "runs/probe-rwi"
    layers: list[int] = field(default_factory=lambda: [3, 6, 9, 12, 15, 18, 21, 24, 27, 29])
    n_train_prompts: int = 120
    n_dev_prompts: int = 48
    k: int = 4
    criterion: str = "recovery_loss"
    max_new_tokens: int = 32
    n_calibration: int = 120
    n_eval: int = 120
    target_rate: float = 0.01
    C: float = 0.05
    ablation: bool = True
    attack_records: str | None = None
    deep_position: int = 64
    writer: str = DEFAULT_MODEL
    judge: str | None = None
    batch_size: int = 8
    seed: int = 0
    data_dir: str | None = None


def _hook(layer: int, n_layers: int) -> str:
    return f"blocks.{layer % n_layers}.hook_resid_post"


def _harmful_part(
    config: ProbeTrainingConfig, lm: LoadedModel, writer: LoadedModel, split: str, n: int
):
    prompts = load_attack_prompts(split=split, limit=n, seed=config.seed, data_dir=config.data_dir)
    responses = harmful_responses(
        prompts, writer, batch_size=config.batch_size, data_dir=config.data_dir
    )
    return prompts, [HarmfulSource(p.prompt, r.text, r.source) for p, r in zip(prompts, responses)]


def _span_choices(sources: list[HarmfulSource], pool: list[tuple[str, str]], seed: int):
    rng = random.Random(seed)
    return [[(s.response, f"own:{s.response_source}"), *rng.sample(pool, 3)] for s in sources]


def _peaks(probe: LinearProbe, states: list[np.ndarray], monitor: MonitorConfig) -> np.ndarray:
    return np.array(
        [
            peak_debounced_score(probe.predict_proba(s)[:, 1], monitor) if len(s) else 0.0
            for s in states
        ]
    )


def _calibrate(
    probe: LinearProbe,
    calibration: list[np.ndarray],
    evaluation: list[np.ndarray],
    monitor: MonitorConfig,
    target_rate: float,
) -> float:
    """Calibrate ``probe`` on the calibration answers; its false-trigger rate on the others."""
    calibrate_threshold(probe, calibration, target_rate=target_rate, monitor=monitor)
    return float((_peaks(probe, evaluation, monitor) >= probe.threshold_).mean())


def _subsample(X: np.ndarray, y: np.ndarray, n_unsafe: int, n_safe: int, seed: int):
    rng = np.random.default_rng(seed)
    unsafe = rng.choice(np.flatnonzero(y == UNSAFE), n_unsafe, replace=False)
    safe = rng.choice(np.flatnonzero(y == SAFE), n_safe, replace=False)
    index = np.concatenate([unsafe, safe])
    return X[index], y[index]


def attack_record_sequences(lm: LoadedModel, path: Path) -> list[dict[str, Any]]:
    """Held-out insertion cases as token sequences, with where the span starts."""
    from guard.chat import encode_chat

    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    out = []
    for r in rows:
        prompt = encode_chat(lm.tokenizer, [{"role": "user", "content": r["prompt"]}]).prompt_ids
        response = lm.tokenizer.encode(r["prefill"] + r["continuation"], add_special_tokens=False)
        out.append(
            {
                "prompt_ids": prompt,
                "response_ids": response,
                "span_start": int(r["meta"].get("p_eff", 0)),
                "position": r["cell"].get("p"),
                "success": bool(r["success"]),
            }
        )
    return out


def _recall(
    probe: LinearProbe,
    cases: list[dict[str, Any]],
    states: list[np.ndarray],
    monitor: MonitorConfig,
    deep: int,
) -> dict[str, Any]:
    """Share of harmful (unguarded-successful) cases whose peak after the span start fires."""
    fired = []
    for case, s in zip(cases, states):
        tail = s[min(case["span_start"], len(s) - 1) :]
        fired.append(
            peak_debounced_score(probe.predict_proba(tail)[:, 1], monitor) >= probe.threshold_
        )
    fired = np.array(fired)
    success = np.array([c["success"] for c in cases])
    deep_mask = np.array(
        [
            c["position"] == "end" or (isinstance(c["position"], int) and c["position"] >= deep)
            for c in cases
        ]
    )

    def rate(mask: np.ndarray) -> dict[str, Any]:
        n = int(mask.sum())
        return {"n": n, "recall": float(fired[mask].mean()) if n else None}

    return {
        "all_harmful": rate(success),
        f"deep_p>={deep}_harmful": rate(success & deep_mask),
        "fired_on_all_cases": rate(np.ones_like(success)),
    }


def run_probe_training(config: ProbeTrainingConfig) -> dict[str, Any]:
    """Collect states, sweep layers, fit + calibrate the RWI probe, run the ablation.

    Returns:
        The report (also written to ``<out>/probe_report.json``).
    """
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    lm = load_model(config.model)
    writer = lm if config.writer == config.model else load_model(config.writer)
    judge = load_or_fit_judge(config.judge, data_dir=config.data_dir)
    n_layers = lm.model.config.num_hidden_layers
    hooks = list(dict.fromkeys(_hook(layer, n_layers) for layer in config.layers))
    train_prompts, train_sources = _harmful_part(
        config, lm, writer, "train", config.n_train_prompts
    )
    dev_prompts, dev_sources = _harmful_part(config, lm, writer, "dev", config.n_dev_prompts)
    pool = train_span_texts([], data_dir=config.data_dir)
    common: dict[str, Any] = {
        "k": config.k,
        "criterion": config.criterion,
        "max_new_tokens": config.max_new_tokens,
        "batch_size": config.batch_size,
        "seed": config.seed,
    }
    train_spans = _span_choices(train_sources, pool, config.seed)
    sets: dict[str, list[Trajectory]] = {
        "rwi": insertion_trajectories(
            lm,
            train_prompts,
            train_spans,
            judge,
            recipe="rwi",
            **common,
        ),
        "rwi_dev": insertion_trajectories(
            lm,
            dev_prompts,
            _span_choices(dev_sources, pool, config.seed + 1),
            judge,
            recipe="rwi",
            **common,
        ),
    }
    if config.ablation:
        sets["prefill"] = insertion_trajectories(
            lm,
            train_prompts,
            train_spans,
            judge,
            recipe="prefill",
            **common,
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
    pad = lm.tokenizer.pad_token_id or 0
    states = {
        name: token_states(
            lm.model, [(t.prompt_ids, t.response_ids) for t in ts], hooks, pad_id=pad
        )
        for name, ts in sets.items()
    }
    monitor = MonitorConfig()

    # Layer sweep: RWI + safe train tokens; dev AUROC on RWI dev tokens + own benign answers.
    sweep = []
    for hook in hooks:
        X, y = labelled_tokens(
            sets["rwi"] + sets["safe"], states["rwi"][hook] + states["safe"][hook]
        )
        probe = LinearProbe(hook, C=config.C).fit(X, y)
        Xd, yd = labelled_tokens(
            sets["rwi_dev"] + sets["calibration"],
            states["rwi_dev"][hook] + states["calibration"][hook],
        )
        sweep.append(
            {"hook": hook, "dev_auroc": float(roc_auc_score(yd, probe.predict_proba(Xd)[:, 1]))}
        )
        logger.info("layer sweep %s: dev AUROC %.4f", hook, sweep[-1]["dev_auroc"])
    best = max(sweep, key=lambda r: r["dev_auroc"])["hook"]

    recall_cases, recall_states = [], []
    if config.attack_records:
        recall_cases = attack_record_sequences(lm, Path(config.attack_records))
        recall_states = token_states(
            lm.model,
            [(c["prompt_ids"], c["response_ids"]) for c in recall_cases],
            [best],
            pad_id=pad,
        )[best]

    recipes = [r for r in RECIPES if r in sets]
    per_recipe = {
        r: labelled_tokens(sets[r] + sets["safe"], states[r][best] + states["safe"][best])
        for r in recipes
    }
    n_unsafe = min(int((y == UNSAFE).sum()) for _, y in per_recipe.values())
    n_safe = min(int((y == SAFE).sum()) for _, y in per_recipe.values())
    calibration, evaluation = states["calibration"][best], states["eval"][best]
    Xd, yd = labelled_tokens(
        sets["rwi_dev"] + sets["calibration"], states["rwi_dev"][best] + calibration
    )
    ablation, probes = {}, {}
    for recipe, (X, y) in per_recipe.items():
        Xs, ys = _subsample(X, y, n_unsafe, n_safe, config.seed)
        probe = LinearProbe(best, C=config.C).fit(Xs, ys)
        false_trigger_rate = _calibrate(probe, calibration, evaluation, monitor, config.target_rate)
        row: dict[str, Any] = {
            "n_unsafe_tokens": n_unsafe,
            "n_safe_tokens": n_safe,
            "threshold": probe.threshold_,
            "benign_eval_false_trigger_rate": false_trigger_rate,
            "n_benign_eval": len(evaluation),
            "dev_auroc": float(roc_auc_score(yd, probe.predict_proba(Xd)[:, 1])),
        }
        if recall_cases:
            row["held_out_insertion_recall"] = _recall(
                probe, recall_cases, recall_states, monitor, config.deep_position
            )
        ablation[recipe] = row
        probes[recipe] = probe
        logger.info("recipe %s: %s", recipe, row)

    # The shipped probe: RWI recipe on all its tokens (not subsampled), calibrated.
    X, y = per_recipe["rwi"]
    probe = LinearProbe(best, C=config.C).fit(X, y)
    false_trigger_rate = _calibrate(probe, calibration, evaluation, monitor, config.target_rate)
    rwi_meta = [t.meta for t in sets["rwi"]]
    probe.metadata_["training_data"] = {
        "recipe": "random worst-insertion (RWI): worst of K insertions into a refusal + own continuation, judged",
        "k": config.k,
        "criterion": config.criterion,
        "n_harmful_prompts": len(train_prompts),
        "n_unsafe_tokens": int((y == UNSAFE).sum()),
        "n_safe_tokens": int((y == SAFE).sum()),
        "continuations_harmful": int(sum(m["harmful"] for m in rwi_meta)),
        "continuations_recovered": int(sum(m["recovered"] for m in rwi_meta)),
        "layer_sweep": sweep,
        "benign_eval_false_trigger_rate": false_trigger_rate,
        "seed": config.seed,
    }
    probe = probe.bind(lm.model, model_id=lm.model_id)
    probe.save(out / "probe")
    for recipe, p in probes.items():
        p.bind(lm.model, model_id=lm.model_id).save(out / "ablation" / recipe)
    report = {
        "config": asdict(config),
        "model_id": lm.model_id,
        "chosen_hook": best,
        "layer_sweep": sweep,
        "probe": {
            "threshold": probe.threshold_,
            "benign_eval_false_trigger_rate": probe.metadata_["training_data"][
                "benign_eval_false_trigger_rate"
            ],
            **{
                k: v
                for k, v in probe.metadata_["training_data"].items()
                if k.startswith(("n_", "continuations"))
            },
        },
        "ablation": ablation,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    if recall_cases:
        report["probe"]["held_out_insertion_recall"] = _recall(
            probe, recall_cases, recall_states, monitor, config.deep_position
        )
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    layers = [int(r["hook"].split(".")[1]) for r in sweep]
    plot_curves(
        out / "layer_sweep.png",
        {"dev AUROC": Curve(layers, [r["dev_auroc"] for r in sweep])},
        xlabel="layer (resid_post)",
        ylabel="token AUROC (dev)",
        title=f"RWI probe layer sweep on {lm.model_id}",
    )
    return report
