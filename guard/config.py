"""Frozen, validated configuration records of the guard (no I/O, no env reads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from guard.errors import ConfigError, GuardValidationError

PolicyKind = Literal["stop", "rollback", "resample"]
DebounceKind = Literal["k_of_n", "ema"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request decoding parameters (OpenAI semantics; ``temperature == 0`` is greedy)."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise GuardValidationError("max_tokens must be >= 1", param="max_tokens")
        if not 0.0 <= self.temperature <= 2.0:
            raise GuardValidationError("temperature must be in [0, 2]", param="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise GuardValidationError("top_p must be in (0, 1]", param="top_p")
        if any(not s for s in self.stop):
            raise GuardValidationError("stop strings must be non-empty", param="stop")


@dataclass(frozen=True, slots=True)
class MonitorConfig:
    """When a per-step probe score counts as a trigger.

    Args:
        threshold: P(unsafe) at or above which a step is *hot*; ``None`` takes the
            probe's calibrated threshold.
        debounce: ``"k_of_n"`` fires when ``k`` of the last ``n`` steps are hot;
            ``"ema"`` fires when the exponential moving average reaches the threshold;
            ``None`` (default): the rule the probe was calibrated with (its threshold only
            means its false-trigger rate under that rule), one hot step when it records
            none. Giving ``k``/``n`` (or ``ema_alpha``) alone picks ``k_of_n`` (``ema``).
        ema_alpha: weight of the newest score for ``"ema"``.
    """

    threshold: float | None = None
    debounce: DebounceKind | None = None
    k: int = 1
    n: int = 1
    ema_alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.debounce is None and self.ema_alpha != 0.5:
            object.__setattr__(self, "debounce", "ema")
        elif self.debounce is None and (self.k, self.n) != (1, 1):
            object.__setattr__(self, "debounce", "k_of_n")
        if self.debounce not in (None, "k_of_n", "ema"):
            raise ConfigError(f"debounce must be 'k_of_n' or 'ema', got {self.debounce!r}")
        if not 1 <= self.k <= self.n:
            raise ConfigError(f"need 1 <= k <= n, got k={self.k}, n={self.n}")
        if not 0.0 < self.ema_alpha <= 1.0:
            raise ConfigError(f"ema_alpha must be in (0, 1], got {self.ema_alpha}")

    @property
    def rule(self) -> dict[str, float | int | str]:
        """The debounce rule as recorded in a probe's calibration (``None`` reads k_of_n)."""
        return {
            "kind": self.debounce or "k_of_n",
            "k": self.k,
            "n": self.n,
            "ema_alpha": self.ema_alpha,
        }


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """How to recover once the monitor fires.

    Args:
        kind: ``"stop"`` ends the answer (``finish_reason="content_filter"``);
            ``"rollback"`` discards the rising span, injects ``recovery_text`` and lets the
            model continue; ``"resample"`` rewinds ``resample_window`` tokens and samples
            again with the offending token banned.
        refusal_message: text appended by ``stop`` (may be empty).
        recovery_text: prefix injected by ``rollback``.
        max_recoveries: rollbacks/resamples allowed before falling back to ``stop``.
        rise_fraction: rollback goes back to the first step of the contiguous run of
            scores ≥ ``rise_fraction * threshold`` that ends at the trigger.
        resample_window: tokens rewound by ``resample``.
    """

    kind: PolicyKind = "rollback"
    refusal_message: str = "I can't help with that."
    recovery_text: str = "I'm sorry, but I can't help with that."
    max_recoveries: int = 2
    rise_fraction: float = 0.5
    resample_window: int = 4

    def __post_init__(self) -> None:
        if self.kind not in ("stop", "rollback", "resample"):
            raise ConfigError(f"policy kind must be stop, rollback or resample, got {self.kind!r}")
        if self.max_recoveries < 0:
            raise ConfigError("max_recoveries must be >= 0")
        if not 0.0 < self.rise_fraction <= 1.0:
            raise ConfigError("rise_fraction must be in (0, 1]")
        if self.resample_window < 1:
            raise ConfigError("resample_window must be >= 1")
        if self.kind == "rollback" and not self.recovery_text:
            raise ConfigError("rollback needs a non-empty recovery_text")


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Everything the guarded decoder needs besides the model and the probe.

    Args:
        holdback: a token is released only after this many further steps scored safe,
            so a recovery never has to retract released text.
        on_monitor_error: ``"block"`` ends the request with an error when scoring fails
            (fail closed); ``"allow"`` continues unguarded.
        monitor_prefill: score client-supplied assistant prefill tokens too.
        monitor_history: judge the closed assistant turns a client wrote into the prompt
            (multi-turn insertion), each under a fresh monitor.
    """

    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    holdback: int = 4
    on_monitor_error: Literal["block", "allow"] = "block"
    monitor_prefill: bool = True
    monitor_history: bool = True

    def __post_init__(self) -> None:
        if self.holdback < 0:
            raise ConfigError("holdback must be >= 0")
        if self.on_monitor_error not in ("block", "allow"):
            raise ConfigError("on_monitor_error must be 'block' or 'allow'")
