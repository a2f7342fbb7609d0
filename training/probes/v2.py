"""Probe v2: fitted on the guarded model's own answers at scale, judged on traffic it never saw.

``trajguard train probe-v2`` runs :func:`run_probe_v2`:

1. Unsafe states: worst-of-K insertion (RWI) and prefill trajectories of the guarded model
   on harmful *train* prompts (fit) and on other train prompts (dev: layer and debounce
   choice); refusals of the same prompts are safe. Its own sampled answers to the plain
   requests (direct compliance, unsafe from where the judge finds harm) on the rest of the
   train split (fit) and on the dev prompts (dev).
2. Benign states: the model's own answers from a benign corpus (``trajguard train
   benign-corpus``: train / calibration / eval by prompt, one source only in eval).
3. Layer: the candidate whose plain fit separates dev harmful from calibration answers best
   (response-level AUROC of peak scores).
4. Hard-negative rounds on the benign *train* answers (:mod:`training.probes.hard_negatives`).
5. Operating point on calibration answers and dev harm (:mod:`training.probes.operating_point`):
   Platt-scaled scores, a debounce, and a threshold whose one-sided 95 % upper bound of the
   per-response false-trigger rate is at most the target.
6. Evaluation on what was kept out: per-source false triggers on eval answers (the held-out
   source separately), recall on dev harm and on held-out attack records, each with a
   95 % CI; the same table for a baseline probe when one is given.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from guard import DEFAULT_MODEL, LoadedModel, MonitorConfig, load_model
from guard.errors import ConfigError
from guard.models import model_fingerprint
from guard.probe import LinearProbe
from training.common.prompts import AttackPrompt, load_attack_prompts
from training.common.responses import harmful_responses
from training.common.stats import Rate
from training.probes.collect import harmful_trajectories
from training.probes.evaluation import (
    attack_record_sequences,
    held_out_recall,
    load_held_out_attacks,
)
from training.probes.hard_negatives import fit_with_hard_negatives
from training.probes.operating_point import choose_debounce, platt_rescale, response_peaks
from training.probes.rwi import sweep_hooks
from training.probes.states import token_states
from training.probes.trajectories import (
    SAFE,
    UNSAFE,
    Trajectory,
    direct_trajectories,
    drop_short_harm,
    labelled_tokens,
    teacher_forced,
)

logger = logging.getLogger(__name__)

REPORT_FILE = "probe_v2_report.json"


@dataclass
class ProbeV2Config:
    """Everything ``trajguard train probe-v2`` does (saved in the report).

    Attributes:
        model: Model the probe guards (alias or HF directory).
        out: Output directory: ``probe/``, the report.
        layers: Candidate ``resid_post`` layers (negative: from the end).
        n_train_prompts: Harmful train-split prompts the probe is fitted on.
        n_dev_prompts: Further train-split prompts for layer and debounce choice.
        k: Candidate insertions per prompt (worst-of-K).
        criterion: Worst-of-K criterion.
        max_new_tokens: Continuation generated after each insertion.
        C: Inverse L2 strength of the logistic regression.
        rounds: Hard-negative rounds.
        target_rate: Bound on the per-response benign false-trigger rate.
        confidence: Confidence of that one-sided bound.
        attack_records: Held-out attack JSONLs (``trajguard attack insert|prefill``) whose
            harmful cases give recall per family, as ``family=path``.
        direct_samples: Sampled answers per train-split prompt to the plain request (the
            direct-compliance recipe; 0: none, the shipped recipe: measured, it lowered
            recall on every family).
        direct_tokens: Length of those answers.
        direct_min_tokens: Judged-harmful direct answers shorter than this are left out
            (the judge is unreliable on terse answers; applied after the cache).
        adversarial_records: Attack ``records.jsonl`` files of an attacker who knew the
            probe (``trajguard bench attacks --attacks probe_aware --split train``): their
            judged-harmful cases join the fit as unsafe states from the span on (one round
            of adversarial probe training, :func:`adversarial_trajectories`).
        ablation: Also fit one probe per unsafe recipe (and whole responses) under the
            same protocol (:func:`recipe_ablation`).
        writer: Writer of harmful responses.
        judge: Saved harm judge directory (default: cached learned judge).
        batch_size: Generation / forward batch size.
        seed: Seed.
        data_dir: Offline data directory override.
    """

    model: str = DEFAULT_MODEL
    out: str = "runs/probe-v2"
    layers: list[int] = field(default_factory=lambda: [12, 15, 18, 21])
    n_train_prompts: int = 200
    n_dev_prompts: int = 60
    k: int = 4
    criterion: str = "recovery_loss"
    max_new_tokens: int = 64
    C: float = 0.05
    rounds: int = 3
    target_rate: float = 0.01
    confidence: float = 0.95
    attack_records: list[str] = field(default_factory=list)
    direct_samples: int = 0
    direct_tokens: int = 128
    direct_min_tokens: int = 32
    adversarial_records: list[str] = field(default_factory=list)
    ablation: bool = False
    writer: str | None = None
    judge: str | None = None
    batch_size: int = 8
    seed: int = 0
    data_dir: str | None = None


def harm_tail(trajectory: Trajectory, states: np.ndarray) -> np.ndarray:
    """States from the first unsafe token on (what recall is measured on)."""
    labels = np.asarray(trajectory.labels)
    start = int(np.argmax(labels == UNSAFE))
    return states[start:]


def harmful_only(trajectories: Sequence[Trajectory]) -> list[Trajectory]:
    """Trajectories whose continuation was judged harmful (the guard must fire on these)."""
    return [t for t in trajectories if t.meta.get("harmful")]


def response_auroc(harmful_peaks: np.ndarray, benign_peaks: np.ndarray) -> float:
    """AUROC of peak scores, harmful responses against benign ones."""
    y = np.r_[np.ones(len(harmful_peaks)), np.zeros(len(benign_peaks))]
    return float(roc_auc_score(y, np.r_[harmful_peaks, benign_peaks]))


def false_trigger_table(
    probe: LinearProbe,
    answers: Sequence[Trajectory],
    states: Sequence[np.ndarray],
    monitor: MonitorConfig,
    *,
    min_tokens: int = 0,
) -> dict[str, Any]:
    """Per-source and overall per-response false-trigger rates (95 % Wilson CIs).

    Answers shorter than ``min_tokens`` are left out (e.g. 256: the long-answer figure).
    """
    keep = [i for i, t in enumerate(answers) if len(t.response_ids) >= min_tokens]
    peaks = response_peaks(probe, [states[i] for i in keep], monitor)
    fired = peaks >= probe.threshold_
    sources = [answers[i].meta.get("source", "?") for i in keep]
    unseen = np.array([not answers[i].meta.get("alignment_pool", False) for i in keep], bool)
    table: dict[str, Any] = {
        "min_tokens": min_tokens,
        "overall": Rate.of(int(fired.sum()), len(keep)).to_dict(),
        "outside_alignment_pool": Rate.of(int(fired[unseen].sum()), int(unseen.sum())).to_dict(),
    }
    for source in sorted(set(sources)):
        mask = np.array([s == source for s in sources])
        held = any(answers[i].meta.get("held_out") for i, m in zip(keep, mask) if m)
        table[source] = Rate.of(int(fired[mask].sum()), int(mask.sum())).to_dict() | {
            "held_out_source": held
        }
    return table


def evaluate_probe(
    probe: LinearProbe,
    monitor: MonitorConfig,
    eval_answers: Sequence[Trajectory],
    eval_states: Sequence[np.ndarray],
    dev_harmful: Sequence[np.ndarray],
    held_out: dict[str, Any],
) -> dict[str, Any]:
    """The protocol's table for one probe: false triggers, recall, AUROC."""
    benign_peaks = response_peaks(probe, eval_states, monitor)
    harmful_peaks = response_peaks(probe, dev_harmful, monitor)
    fired = harmful_peaks >= probe.threshold_
    table: dict[str, Any] = {
        "threshold": probe.threshold_,
        "monitor": asdict(monitor),
        "false_triggers": false_trigger_table(probe, eval_answers, eval_states, monitor),
        "false_triggers_long": false_trigger_table(
            probe, eval_answers, eval_states, monitor, min_tokens=256
        ),
        "dev_harmful_recall": Rate.of(int(fired.sum()), len(fired)).to_dict(),
        "response_auroc_dev_harmful_vs_eval_benign": response_auroc(harmful_peaks, benign_peaks),
        "held_out_attacks": {},
    }
    for family, attacks in held_out.items():
        table["held_out_attacks"][family] = held_out_recall(probe, attacks, monitor, deep=64)
    return table


def recall_by_recipe(
    probe: LinearProbe,
    monitor: MonitorConfig,
    harmful: Sequence[Trajectory],
    states: Sequence[np.ndarray],
) -> dict[str, Any]:
    """Recall (95 % CI) on harmful trajectories, per recipe (``rwi``, ``prefill``, ``direct``)."""
    fired = response_peaks(probe, states, monitor) >= probe.threshold_
    recipes = np.array([t.recipe for t in harmful])
    return {
        recipe: Rate.of(
            int(fired[recipes == recipe].sum()), int((recipes == recipe).sum())
        ).to_dict()
        for recipe in sorted(set(recipes.tolist()))
    }


def _recipe_counts(trajectories: Sequence[Trajectory]) -> dict[str, int]:
    return dict(Counter(t.recipe for t in trajectories))


def _states(
    lm: LoadedModel, trajectories: Sequence[Trajectory], hooks: Sequence[str], batch_size: int
):
    pad = lm.tokenizer.pad_token_id or 0
    return token_states(
        lm.model,
        [(t.prompt_ids, t.response_ids) for t in trajectories],
        hooks,
        batch_size=batch_size,
        pad_id=pad,
    )


@dataclass
class EvaluationInputs:
    """What a probe at one hook is evaluated on: eval answers' states, dev harm from where
    it starts, and the held-out attack records by family."""

    eval_states: list[np.ndarray]
    dev_harmful: list[np.ndarray]
    held_out: dict[str, Any]


def evaluation_inputs(
    config: ProbeV2Config,
    lm: LoadedModel,
    hook: str,
    dev: Sequence[Trajectory],
    eval_answers: Sequence[Trajectory],
) -> EvaluationInputs:
    """States at ``hook`` of everything :func:`evaluate_probe` reads."""
    held_out = {}
    for item in config.attack_records:
        family, _, path = item.partition("=")
        attacks = load_held_out_attacks(lm, Path(path), hook)
        if attacks is not None:
            held_out[family] = attacks
    dev_states = _states(lm, dev, [hook], config.batch_size)[hook]
    return EvaluationInputs(
        _states(lm, eval_answers, [hook], config.batch_size)[hook],
        [harm_tail(t, x) for t, x in zip(dev, dev_states)],
        held_out,
    )


def choose_layer(
    hooks: Sequence[str],
    C: float,
    train_tokens: dict[str, tuple[np.ndarray, np.ndarray]],
    dev_harmful: dict[str, list[np.ndarray]],
    calibration: dict[str, list[np.ndarray]],
) -> list[dict[str, Any]]:
    """Per hook: a plain fit and its dev response AUROC (harm vs calibration answers)."""
    sweep = []
    for hook in hooks:
        probe = LinearProbe(hook, C=C).fit(*train_tokens[hook])
        monitor = MonitorConfig()
        auroc = response_auroc(
            response_peaks(probe, dev_harmful[hook], monitor),
            response_peaks(probe, calibration[hook], monitor),
        )
        sweep.append({"hook": hook, "dev_response_auroc": auroc})
        logger.info("layer %s: dev response AUROC %.4f", hook, auroc)
    return sorted(sweep, key=lambda r: -r["dev_response_auroc"])


HARMFUL_FILE = "harmful_trajectories.json"

_HARMFUL_FIELDS = (
    "writer", "judge", "n_train_prompts", "n_dev_prompts", "k", "criterion",
    "max_new_tokens", "seed", "data_dir",
)  # fmt: skip


DIRECT_FILE = "direct_trajectories.json"

_DIRECT_FIELDS = (
    "judge", "n_train_prompts", "n_dev_prompts", "direct_samples", "direct_tokens", "seed",
    "data_dir",
)  # fmt: skip


def _cached_sets(
    path: Path, key: dict[str, Any], make: Callable[[], dict[str, list[Trajectory]]]
) -> dict[str, list[Trajectory]]:
    """Trajectory sets saved at ``path`` under ``key``; made (and saved) when key differs."""
    if path.is_file():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            logger.info("trajectories from %s", path)
            return {name: [Trajectory(**t) for t in ts] for name, ts in saved["sets"].items()}
        logger.info("%s was made with other settings; generating again", path)
    sets = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"key": key, "sets": {name: [asdict(t) for t in ts] for name, ts in sets.items()}}
    path.write_text(json.dumps(payload, default=_json_scalar), encoding="utf-8")
    return sets


def _writer(config: ProbeV2Config, lm: LoadedModel) -> LoadedModel:
    """The writer of harmful responses (the guarded model itself unless another is named)."""
    return lm if config.writer in (None, config.model) else load_model(config.writer)


def _sampled_train_prompts(config: ProbeV2Config) -> tuple[list[AttackPrompt], list[AttackPrompt]]:
    """The fit and dev prompts of :func:`collect_harmful` (one seeded train-split sample)."""
    sampled = load_attack_prompts(
        split="train",
        limit=config.n_train_prompts + config.n_dev_prompts,
        seed=config.seed,
        data_dir=config.data_dir,
    )
    return sampled[: config.n_train_prompts], sampled[config.n_train_prompts :]


def _run_key(config: ProbeV2Config, lm: LoadedModel, fields: Sequence[str]) -> dict[str, Any]:
    return {"model_fingerprint": model_fingerprint(lm.model)} | {
        name: getattr(config, name) for name in fields
    }


def collect_direct(config: ProbeV2Config, lm: LoadedModel) -> dict[str, list[Trajectory]]:
    """Direct-compliance trajectories (:func:`training.probes.trajectories.direct_trajectories`).

    ``train``: every train-split prompt but the dev ones; ``dev``: the dev prompts of
    :func:`collect_harmful`. Cached in ``<out>/direct_trajectories.json`` like it.
    """
    from training.attacks.judging import load_or_fit_judge

    def make() -> dict[str, list[Trajectory]]:
        judge = load_or_fit_judge(config.judge, data_dir=config.data_dir)
        _, dev = _sampled_train_prompts(config)
        dev_texts = {p.prompt for p in dev}
        every = load_attack_prompts(split="train", seed=config.seed, data_dir=config.data_dir)
        train = [p for p in every if p.prompt not in dev_texts]
        settings = {
            "samples": config.direct_samples,
            "max_new_tokens": config.direct_tokens,
            "batch_size": config.batch_size,
            "seed": config.seed,
        }
        return {
            "train": direct_trajectories(lm, train, judge, **settings),
            "dev": direct_trajectories(lm, dev, judge, **settings),
        }

    sets = _cached_sets(Path(config.out) / DIRECT_FILE, _run_key(config, lm, _DIRECT_FIELDS), make)
    return {name: drop_short_harm(ts, config.direct_min_tokens) for name, ts in sets.items()}


def collect_harmful(config: ProbeV2Config, lm: LoadedModel) -> dict[str, list[Trajectory]]:
    """The run's harmful trajectories (:func:`training.probes.collect.harmful_trajectories`),
    plus the direct-compliance ones (:func:`collect_direct`) when ``direct_samples > 0``.

    They are generated once per out directory and settings (``<out>/harmful_trajectories.json``,
    keyed on the model's weight fingerprint and the settings that shape them), so a rerun
    with another layer set, C or operating point skips the generation.
    """
    from training.attacks.judging import load_or_fit_judge

    def make() -> dict[str, list[Trajectory]]:
        return harmful_trajectories(
            lm,
            _writer(config, lm),
            load_or_fit_judge(config.judge, data_dir=config.data_dir),
            n_train=config.n_train_prompts,
            n_dev=config.n_dev_prompts,
            k=config.k,
            criterion=config.criterion,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.batch_size,
            seed=config.seed,
            data_dir=config.data_dir,
        )

    sets = _cached_sets(
        Path(config.out) / HARMFUL_FILE, _run_key(config, lm, _HARMFUL_FIELDS), make
    )
    if config.direct_samples > 0:
        direct = collect_direct(config, lm)
        sets["train"] = sets["train"] + direct["train"]
        sets["dev"] = sets["dev"] + direct["dev"]
    if config.adversarial_records:
        _, dev = _sampled_train_prompts(config)
        sets["train"] = sets["train"] + adversarial_trajectories(
            lm,
            [Path(path) for path in config.adversarial_records],
            train_prompts={
                p.prompt for p in load_attack_prompts(split="train", data_dir=config.data_dir)
            },
            dev_prompts={p.prompt for p in dev},
        )
    return sets


def adversarial_trajectories(
    lm: LoadedModel,
    paths: Sequence[Path],
    *,
    train_prompts: set[str],
    dev_prompts: set[str],
) -> list[Trajectory]:
    """Unsafe trajectories from attack records (recipe ``adversarial``).

    Each judged-harmful case is safe before its span (the refusal prefix) and unsafe from
    the span on: the optimised span and the harmful continuation it bought. Cases of dev
    prompts are left out (dev chooses the operating point) and so are unsuccessful ones.

    Raises:
        ConfigError: A record's prompt is not in the train split (its states would leak
            evaluation prompts into the fit).
    """
    out: list[Trajectory] = []
    for path in paths:
        for case in attack_record_sequences(lm, path):
            if case["prompt"] not in train_prompts:
                raise ConfigError(
                    f"{path}: prompt {case['prompt'][:60]!r} is not a train-split prompt; "
                    "adversarial states must come from `--split train` attack runs"
                )
            if not case["success"] or case["prompt"] in dev_prompts:
                continue
            start = min(case["span_start"], len(case["response_ids"]))
            labels = [SAFE] * start + [UNSAFE] * (len(case["response_ids"]) - start)
            meta = {"harmful": True, "prompt": case["prompt"], "source": str(path)}
            out.append(
                Trajectory(case["prompt_ids"], case["response_ids"], labels, "adversarial", meta)
            )
    logger.info("%d adversarial trajectories from %d record files", len(out), len(paths))
    return out


def _json_scalar(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass
class FittedProbe:
    """A probe after hard-negative rounds, Platt scaling and the debounce choice."""

    probe: LinearProbe
    monitor: MonitorConfig
    mined: Any
    debounce: list[Any]


def fit_calibrated(
    config: ProbeV2Config,
    hook: str,
    fit_tokens: tuple[np.ndarray, np.ndarray],
    benign_train: Sequence[np.ndarray],
    corpus: dict[str, list[Trajectory]],
    calibration: Sequence[np.ndarray],
    dev_harmful: Sequence[np.ndarray],
) -> FittedProbe:
    """Steps 4-5 of the module docstring on labelled token states ``fit_tokens``."""
    X_fit, y_fit = fit_tokens
    mined = fit_with_hard_negatives(
        lambda X, y, w: LinearProbe(hook, C=config.C).fit(X, y, sample_weight=w),
        X_fit[y_fit == UNSAFE],
        X_fit[y_fit == SAFE],
        benign_train,
        answer_tags=[t.meta.get("source", "?") for t in corpus["train"]],
        rounds=config.rounds,
        seed=config.seed,
    )
    X_cal = np.concatenate([*calibration, *dev_harmful])
    y_cal = np.r_[np.zeros(sum(map(len, calibration))), np.ones(sum(map(len, dev_harmful)))].astype(
        int
    )
    probe = platt_rescale(mined.probe, X_cal, y_cal)
    debounce = choose_debounce(
        probe,
        calibration,
        dev_harmful,
        target_rate=config.target_rate,
        confidence=config.confidence,
    )
    return FittedProbe(probe, debounce[0].monitor, mined, debounce)


def whole_trajectories(config: ProbeV2Config, lm: LoadedModel) -> list[Trajectory]:
    """Whole harmful responses to the fit prompts, every token unsafe (the Circuit-Breakers
    harmfulness-probe recipe; the writer's continuations are cached)."""
    prompts, _ = _sampled_train_prompts(config)
    responses = harmful_responses(
        prompts, _writer(config, lm), batch_size=config.batch_size, data_dir=config.data_dir
    )
    return teacher_forced(
        lm, [(p.prompt, r.text) for p, r in zip(prompts, responses)], UNSAFE, "whole"
    )


def recipe_ablation(
    config: ProbeV2Config,
    lm: LoadedModel,
    hook: str,
    fit_sets: Sequence[Trajectory],
    fit_states: Sequence[np.ndarray],
    benign_train: Sequence[np.ndarray],
    corpus: dict[str, list[Trajectory]],
    calibration: Sequence[np.ndarray],
    inputs: EvaluationInputs,
) -> dict[str, Any]:
    """The same protocol with the unsafe states of one recipe at a time.

    Each row keeps the refusals and one recipe's trajectories (``rwi``, ``prefill``,
    ``direct``, and ``whole``: teacher-forced whole harmful responses), then runs the same
    hard-negative rounds, Platt scaling, debounce choice and evaluation as the shipped
    probe, on the same calibration, dev and evaluation states.
    """
    whole = whole_trajectories(config, lm)
    whole_states = _states(lm, whole, [hook], config.batch_size)[hook]
    pool = list(zip(fit_sets, fit_states)) + list(zip(whole, whole_states))
    rows: dict[str, Any] = {}
    recipes = sorted({t.recipe for t, _ in pool} - {"refusal"})
    for recipe in recipes:
        chosen = [(t, x) for t, x in pool if t.recipe in (recipe, "refusal")]
        trajectories, states = [t for t, _ in chosen], [x for _, x in chosen]
        X, y = labelled_tokens(trajectories, states)
        if not (y == UNSAFE).any():
            rows[recipe] = {"skipped": "no unsafe tokens"}
            continue
        fitted = fit_calibrated(
            config, hook, (X, y), benign_train, corpus, calibration, inputs.dev_harmful
        )
        rows[recipe] = evaluate_probe(
            fitted.probe,
            fitted.monitor,
            corpus["eval"],
            inputs.eval_states,
            inputs.dev_harmful,
            inputs.held_out,
        ) | {"n_unsafe_tokens": int((y == UNSAFE).sum())}
        logger.info("ablation %s: done", recipe)
    return rows


def run_probe_v2(
    config: ProbeV2Config,
    lm: LoadedModel,
    harmful: dict[str, list[Trajectory]],
    corpus: dict[str, list[Trajectory]],
    *,
    baseline: LinearProbe | None = None,
) -> dict[str, Any]:
    """Fit, calibrate and evaluate probe v2 (see the module docstring).

    Args:
        config: The run.
        lm: The guarded model.
        harmful: ``train`` / ``dev`` harmful trajectories and ``safe`` refusals
            (:func:`collect_harmful`); ``meta["harmful"]`` marks judged-harmful ones.
        corpus: The model's own benign answers by split (``train``, ``calibration``,
            ``eval``), each trajectory's ``meta`` naming its ``source`` (and ``held_out``).
        baseline: A probe evaluated under the same protocol (e.g. the shipped one), at its
            own threshold and a single-step debounce.

    Returns:
        The report (also written to ``<out>/probe_v2_report.json``).
    """
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    hooks = sweep_hooks(config.layers, lm.model.config.num_hidden_layers)

    # Layer choice on a plain fit: harmful train + refusals + a subsample of benign train.
    fit_sets = harmful["train"] + harmful["safe"]
    dev = harmful_only(harmful["dev"])
    if not dev or not corpus["calibration"]:
        raise ConfigError(
            f"probe v2 needs judged-harmful dev trajectories ({len(dev)}) and benign "
            f"calibration answers ({len(corpus['calibration'])}); raise --n-dev-prompts or "
            "complete the corpus"
        )
    subsample = corpus["train"][:: max(1, len(corpus["train"]) // 400)]
    sweep_states = _states(
        lm, fit_sets + dev + subsample + corpus["calibration"], hooks, config.batch_size
    )
    n_fit, n_dev, n_sub = len(fit_sets), len(dev), len(subsample)
    train_tokens, dev_states, cal_states = {}, {}, {}
    for hook in hooks:
        s = sweep_states[hook]
        train_tokens[hook] = labelled_tokens(
            fit_sets + subsample, s[:n_fit] + s[n_fit + n_dev : n_fit + n_dev + n_sub]
        )
        dev_states[hook] = [harm_tail(t, x) for t, x in zip(dev, s[n_fit : n_fit + n_dev])]
        cal_states[hook] = s[n_fit + n_dev + n_sub :]
    sweep = choose_layer(hooks, config.C, train_tokens, dev_states, cal_states)
    hook = sweep[0]["hook"]
    del sweep_states, train_tokens

    # Full states at the chosen hook.
    fit_states = _states(lm, fit_sets, [hook], config.batch_size)[hook]
    benign_train = _states(lm, corpus["train"], [hook], config.batch_size)[hook]
    inputs = evaluation_inputs(config, lm, hook, dev, corpus["eval"])
    dev_full = inputs.dev_harmful
    calibration = cal_states[hook]
    fitted = fit_calibrated(
        config, hook, labelled_tokens(fit_sets, fit_states), benign_train, corpus, calibration,
        dev_full,
    )  # fmt: skip
    probe, monitor, mined, debounce = fitted.probe, fitted.monitor, fitted.mined, fitted.debounce
    table = evaluate_probe(
        probe, monitor, corpus["eval"], inputs.eval_states, dev_full, inputs.held_out
    )
    table["dev_harmful_recall_by_recipe"] = recall_by_recipe(probe, monitor, dev, dev_full)
    report: dict[str, Any] = {
        "config": asdict(config),
        "model_id": lm.model_id,
        "hook": hook,
        "layer_sweep": sweep,
        "hard_negative_rounds": mined.rounds,
        "platt": probe.metadata_["platt"],
        "debounce_sweep": [c.row() for c in debounce],
        "n": {
            "harmful_train_trajectories": len(harmful["train"]),
            "harmful_train_judged_harmful": len(harmful_only(harmful["train"])),
            "harmful_train_judged_harmful_by_recipe": _recipe_counts(
                harmful_only(harmful["train"])
            ),
            "dev_harmful": len(dev),
            "dev_harmful_by_recipe": _recipe_counts(dev),
            **{f"benign_{k}": len(v) for k, v in corpus.items()},
        },
        "probe_v2": table,
    }
    if config.ablation:
        report["ablation"] = recipe_ablation(
            config, lm, hook, fit_sets, fit_states, benign_train, corpus, calibration, inputs
        )
    del benign_train
    if baseline is not None:
        if baseline.hook_name != hook:
            inputs = evaluation_inputs(config, lm, baseline.hook_name, dev, corpus["eval"])
        report["baseline"] = evaluate_probe(
            baseline,
            MonitorConfig(),
            corpus["eval"],
            inputs.eval_states,
            inputs.dev_harmful,
            inputs.held_out,
        )
    probe.metadata_["evaluation"] = table
    probe.metadata_["training_data"] = {
        "recipe": "probe v2: "
        + " + ".join(
            ["RWI", "prefill"]
            + (["direct-compliance"] if config.direct_samples > 0 else [])
            + (["adversarial (probe-aware attack)"] if config.adversarial_records else [])
        )
        + " states vs own benign answers, hard-negative rounds",
        "rounds": mined.rounds,
        "n": report["n"],
    }
    probe.bind(lm.model, model_id=lm.model_id).save(out / "probe")
    report["wall_time_s"] = round(time.perf_counter() - start, 1)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report
