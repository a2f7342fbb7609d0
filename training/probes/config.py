"""Settings of an RWI probe run (``trajguard train probe``), saved in its report."""

from __future__ import annotations

from dataclasses import dataclass, field

from guard import BASE_MODEL, DEFAULT_MODEL


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
    writer: str = BASE_MODEL
    judge: str | None = None
    batch_size: int = 8
    seed: int = 0
    data_dir: str | None = None
