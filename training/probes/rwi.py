"""Fit the RWI probe: layer sweep, calibration, equal-size recipe ablation, held-out recall.

``trajguard train probe`` runs :func:`run_probe_training`, whose steps are the public
functions below: collect labelled trajectories, collect their token states, sweep layers,
run the recipe ablation and fit the shipped probe, write the report. The probe the guard
ships is the ``rwi`` recipe at the layer with the best dev AUROC, calibrated so at most
``target_rate`` of the model's own answers to held-out benign prompts trigger.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from guard import LoadedModel, MonitorConfig, load_model
from guard.hooks import hook_name, parse_hook_name
from guard.probe import LinearProbe
from training.attacks.judging import load_or_fit_judge
from training.common.plots import Curve, plot_curves
from training.probes.collect import ProbeSets, States, collect_states, collect_trajectories
from training.probes.config import ProbeTrainingConfig
from training.probes.evaluation import (
    HeldOutAttacks,
    calibrate_on_benign,
    held_out_recall,
    load_held_out_attacks,
)
from training.probes.trajectories import RECIPES, SAFE, UNSAFE, Trajectory, labelled_tokens

logger = logging.getLogger(__name__)

REPORT_FILE = "probe_report.json"
HOOK_KIND = "resid_post"

Tokens = tuple[np.ndarray, np.ndarray]  # (X, y) of labelled tokens


@dataclass
class RecipeProbe:
    """A probe of the ablation and its report row."""

    probe: LinearProbe
    row: dict[str, Any]


def sweep_hooks(layers: Sequence[int], n_layers: int) -> list[str]:
    """``resid_post`` hook names of ``layers`` (negative: from the end), duplicates dropped."""
    return list(dict.fromkeys(hook_name(HOOK_KIND, layer % n_layers) for layer in layers))


def _train_tokens(
    sets: dict[str, list[Trajectory]], states: States, recipe: str, hook: str
) -> Tokens:
    return labelled_tokens(sets[recipe] + sets["safe"], states[recipe][hook] + states["safe"][hook])


def _dev_tokens(sets: dict[str, list[Trajectory]], states: States, hook: str) -> Tokens:
    """RWI dev tokens and the model's own benign (calibration) answers."""
    return labelled_tokens(
        sets["rwi_dev"] + sets["calibration"],
        states["rwi_dev"][hook] + states["calibration"][hook],
    )


def _auroc(probe: LinearProbe, tokens: Tokens) -> float:
    X, y = tokens
    return float(roc_auc_score(y, probe.predict_proba(X)[:, 1]))


def layer_sweep(
    sets: dict[str, list[Trajectory]], states: States, hooks: Sequence[str], C: float
) -> list[dict[str, Any]]:
    """Per hook: fit on RWI + safe train tokens, dev AUROC on :func:`_dev_tokens`."""
    sweep = []
    for hook in hooks:
        probe = LinearProbe(hook, C=C).fit(*_train_tokens(sets, states, "rwi", hook))
        sweep.append({"hook": hook, "dev_auroc": _auroc(probe, _dev_tokens(sets, states, hook))})
        logger.info("layer sweep %s: dev AUROC %.4f", hook, sweep[-1]["dev_auroc"])
    return sweep


def _subsample(X: np.ndarray, y: np.ndarray, n_unsafe: int, n_safe: int, seed: int) -> Tokens:
    rng = np.random.default_rng(seed)
    unsafe = rng.choice(np.flatnonzero(y == UNSAFE), n_unsafe, replace=False)
    safe = rng.choice(np.flatnonzero(y == SAFE), n_safe, replace=False)
    index = np.concatenate([unsafe, safe])
    return X[index], y[index]


def recipe_ablation(
    config: ProbeTrainingConfig,
    sets: dict[str, list[Trajectory]],
    states: States,
    hook: str,
    tokens: dict[str, Tokens],
    monitor: MonitorConfig,
    held_out: HeldOutAttacks | None,
) -> dict[str, RecipeProbe]:
    """Fit and calibrate one probe per recipe on equally many unsafe and safe tokens."""
    n_unsafe = min(int((y == UNSAFE).sum()) for _, y in tokens.values())
    n_safe = min(int((y == SAFE).sum()) for _, y in tokens.values())
    calibration, evaluation = states["calibration"][hook], states["eval"][hook]
    dev = _dev_tokens(sets, states, hook)
    results = {}
    for recipe, (X, y) in tokens.items():
        probe = LinearProbe(hook, C=config.C).fit(*_subsample(X, y, n_unsafe, n_safe, config.seed))
        false_trigger_rate = calibrate_on_benign(
            probe, calibration, evaluation, monitor, config.target_rate
        )
        row: dict[str, Any] = {
            "n_unsafe_tokens": n_unsafe,
            "n_safe_tokens": n_safe,
            "threshold": probe.threshold_,
            "benign_eval_false_trigger_rate": false_trigger_rate,
            "n_benign_eval": len(evaluation),
            "dev_auroc": _auroc(probe, dev),
        }
        if held_out is not None:
            row["held_out_insertion_recall"] = held_out_recall(
                probe, held_out, monitor, config.deep_position
            )
        results[recipe] = RecipeProbe(probe, row)
        logger.info("recipe %s: %s", recipe, row)
    return results


def fit_shipped_probe(
    config: ProbeTrainingConfig,
    collected: ProbeSets,
    states: States,
    hook: str,
    tokens: Tokens,
    monitor: MonitorConfig,
    sweep: list[dict[str, Any]],
) -> LinearProbe:
    """The RWI recipe on all its tokens (not subsampled), calibrated, with its provenance."""
    X, y = tokens
    probe = LinearProbe(hook, C=config.C).fit(X, y)
    false_trigger_rate = calibrate_on_benign(
        probe, states["calibration"][hook], states["eval"][hook], monitor, config.target_rate
    )
    rwi_meta = [t.meta for t in collected.trajectories["rwi"]]
    probe.metadata_["training_data"] = {
        "recipe": "random worst-insertion (RWI): worst of K insertions into a refusal + own continuation, judged",
        "k": config.k,
        "criterion": config.criterion,
        "n_harmful_prompts": collected.n_harmful_prompts,
        "n_unsafe_tokens": int((y == UNSAFE).sum()),
        "n_safe_tokens": int((y == SAFE).sum()),
        "continuations_harmful": int(sum(m["harmful"] for m in rwi_meta)),
        "continuations_recovered": int(sum(m["recovered"] for m in rwi_meta)),
        "layer_sweep": sweep,
        "benign_eval_false_trigger_rate": false_trigger_rate,
        "seed": config.seed,
    }
    return probe


def probe_report(
    config: ProbeTrainingConfig,
    lm: LoadedModel,
    hook: str,
    sweep: list[dict[str, Any]],
    probe: LinearProbe,
    ablation: dict[str, RecipeProbe],
    wall_time_s: float,
) -> dict[str, Any]:
    """The JSON report of a run (the shipped probe's held-out recall is added by the caller)."""
    training_data = probe.metadata_["training_data"]
    return {
        "config": asdict(config),
        "model_id": lm.model_id,
        "chosen_hook": hook,
        "layer_sweep": sweep,
        "probe": {
            "threshold": probe.threshold_,
            "benign_eval_false_trigger_rate": training_data["benign_eval_false_trigger_rate"],
            **{k: v for k, v in training_data.items() if k.startswith(("n_", "continuations"))},
        },
        "ablation": {recipe: result.row for recipe, result in ablation.items()},
        "wall_time_s": round(wall_time_s, 1),
    }


def plot_layer_sweep(path: Path, sweep: list[dict[str, Any]], model_id: str) -> Path:
    """Dev AUROC against the swept layer."""
    layers = [parse_hook_name(r["hook"]).layer for r in sweep]
    return plot_curves(
        path,
        {"dev AUROC": Curve(layers, [r["dev_auroc"] for r in sweep])},
        xlabel=f"layer ({HOOK_KIND})",
        ylabel="token AUROC (dev)",
        title=f"RWI probe layer sweep on {model_id}",
    )


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
    hooks = sweep_hooks(config.layers, lm.model.config.num_hidden_layers)
    collected = collect_trajectories(config, lm, writer, judge)
    sets = collected.trajectories
    states = collect_states(lm, sets, hooks)
    sweep = layer_sweep(sets, states, hooks, config.C)
    best = max(sweep, key=lambda r: r["dev_auroc"])["hook"]
    held_out = (
        load_held_out_attacks(lm, Path(config.attack_records), best)
        if config.attack_records
        else None
    )
    monitor = MonitorConfig()
    tokens = {r: _train_tokens(sets, states, r, best) for r in RECIPES if r in sets}
    ablation = recipe_ablation(config, sets, states, best, tokens, monitor, held_out)
    probe = fit_shipped_probe(config, collected, states, best, tokens["rwi"], monitor, sweep)
    probe = probe.bind(lm.model, model_id=lm.model_id)
    probe.save(out / "probe")
    for recipe, result in ablation.items():
        result.probe.bind(lm.model, model_id=lm.model_id).save(out / "ablation" / recipe)
    report = probe_report(config, lm, best, sweep, probe, ablation, time.perf_counter() - start)
    if held_out is not None:
        report["probe"]["held_out_insertion_recall"] = held_out_recall(
            probe, held_out, monitor, config.deep_position
        )
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    plot_layer_sweep(out / "layer_sweep.png", sweep, lm.model_id)
    return report
