"""Settings of the in-engine guard: the plugin's environment and each request's ``vllm_xargs``.

vLLM loads plugins in every process it starts, so the plugin is configured through the
environment of ``vllm serve`` (read once, by :meth:`PluginSettings.from_env`). Requests
choose per call through ``vllm_xargs`` (:meth:`RequestOptions.from_extra_args`).

Environment:

=============================  =========================================================
``TRAJGUARD_PROBE``            probe directory; unset = the plugin does nothing
``TRAJGUARD_EVENTS``           ``host:port`` of the score event stream (default
                               ``127.0.0.1:7461``; ``off`` disables it)
``TRAJGUARD_EVENTS_SECRET``    shared secret (>= 16 characters) that subscribers must prove
                               (HMAC handshake, :mod:`guard.vllm.channel`); the proxy reads
                               the same variable. Unset: the stream is unauthenticated and
                               may only bind loopback (a start-up error otherwise)
``TRAJGUARD_GUARD_ALL``        ``1``: requests without a ``trajguard`` option are guarded
``TRAJGUARD_POLICY``           ``stop`` (refusal message, then EOS) or ``rollback``
                               (recovery text, then the model continues); default rollback
``TRAJGUARD_THRESHOLD``        overrides the probe's calibrated threshold
``TRAJGUARD_DEBOUNCE``         ``k_of_n`` (with ``TRAJGUARD_K``, ``TRAJGUARD_N``) or ``ema``
                               (with ``TRAJGUARD_EMA_ALPHA``); unset: the rule the probe
                               was calibrated with
``TRAJGUARD_RECOVERY_TEXT``    text forced by ``rollback``
``TRAJGUARD_REFUSAL_MESSAGE``  text forced by ``stop`` before EOS
``TRAJGUARD_MAX_RECOVERIES``   rollbacks before a trigger stops the request
``TRAJGUARD_ON_MONITOR_ERROR`` ``block`` (default): a NaN/infinite/missing score stops the
                               request (fail closed); ``allow``: recorded unscored
=============================  =========================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from guard.config import MonitorConfig, PolicyConfig
from guard.errors import ConfigError
from guard.vllm.channel import events_key

Mode = Literal["off", "guard", "observe"]

DEFAULT_EVENTS = "127.0.0.1:7461"
#: The event stream's shared secret, read by the plugin and by the proxy.
EVENTS_SECRET_ENV = "TRAJGUARD_EVENTS_SECRET"

#: What ``--logits-processors`` must name for the guard to act.
ACTUATOR = "guard.vllm.actuator:TrajguardLogitsProcessor"

#: ``vllm_xargs`` keys the guard reads.
XARG_MODE = "trajguard"
XARG_THRESHOLD = "trajguard_threshold"
XARG_ID = "trajguard_id"
XARG_POLICY = "trajguard_policy"
XARG_PREFIX = "trajguard_prefix"
_XARGS = {XARG_MODE, XARG_THRESHOLD, XARG_ID, XARG_POLICY, XARG_PREFIX}

_TRUE = {"1", "true", "on", "yes", "guard"}
_FALSE = {"0", "false", "off", "no", ""}


def _flag(value: str) -> bool:
    value = value.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"expected a boolean, got {value!r}")


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` -> ``(host, port)``.

    Raises:
        ConfigError: malformed address.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"expected host:port, got {address!r}")
    return host, int(port)


@dataclass(frozen=True, slots=True)
class PluginSettings:
    """What ``vllm serve`` was started with (see the module docstring for the variables).

    Args:
        probe: probe directory, or ``None`` (plugin inactive).
        events: ``(host, port)`` of the event stream, or ``None`` (no stream).
        events_secret: the stream's shared secret (``None``: unauthenticated, loopback only).
        guard_all: guard requests that do not say otherwise.
        monitor: debounce and threshold override.
        policy: ``kind`` (``stop``/``rollback``), texts and ``max_recoveries``.
        on_monitor_error: ``block`` (fail closed) or ``allow`` (as ``GuardConfig``).
    """

    probe: Path | None = None
    events: tuple[str, int] | None = None
    events_secret: str | None = field(default=None, repr=False)
    guard_all: bool = False
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    on_monitor_error: Literal["block", "allow"] = "block"

    def __post_init__(self) -> None:
        if self.policy.kind not in ("stop", "rollback"):
            raise ConfigError("the in-engine guard supports the stop and rollback policies")
        if self.on_monitor_error not in ("block", "allow"):
            raise ConfigError("TRAJGUARD_ON_MONITOR_ERROR must be 'block' or 'allow'")
        if self.probe is not None and self.events is not None:  # active and publishing
            events_key(self.events[0], self.events_secret)  # no secret: loopback only

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PluginSettings:
        """Read ``TRAJGUARD_*`` variables (``environ`` defaults to ``os.environ``).

        Raises:
            ConfigError: a malformed value.
        """
        env = os.environ if environ is None else environ
        probe = env.get("TRAJGUARD_PROBE") or None
        events = env.get("TRAJGUARD_EVENTS", DEFAULT_EVENTS).strip()
        monitor = MonitorConfig(
            threshold=float(env["TRAJGUARD_THRESHOLD"]) if env.get("TRAJGUARD_THRESHOLD") else None,
            debounce=env.get("TRAJGUARD_DEBOUNCE") or None,
            k=int(env.get("TRAJGUARD_K", 1)),
            n=int(env.get("TRAJGUARD_N", env.get("TRAJGUARD_K", 1))),
            ema_alpha=float(env.get("TRAJGUARD_EMA_ALPHA", 0.5)),
        )
        defaults = PolicyConfig()
        policy = PolicyConfig(
            kind=env.get("TRAJGUARD_POLICY", defaults.kind),
            recovery_text=env.get("TRAJGUARD_RECOVERY_TEXT", defaults.recovery_text),
            refusal_message=env.get("TRAJGUARD_REFUSAL_MESSAGE", defaults.refusal_message),
            max_recoveries=int(env.get("TRAJGUARD_MAX_RECOVERIES", defaults.max_recoveries)),
        )
        return cls(
            probe=Path(probe) if probe else None,
            events=None if events.lower() in _FALSE else parse_address(events),
            events_secret=env.get(EVENTS_SECRET_ENV, "").strip() or None,
            guard_all=_flag(env.get("TRAJGUARD_GUARD_ALL", "0")),
            monitor=monitor,
            policy=policy,
            on_monitor_error=env.get("TRAJGUARD_ON_MONITOR_ERROR", "block").strip().lower(),
        )


def check_engine(*, use_v2_model_runner: bool, logits_processors: Sequence[Any] | None) -> None:
    """Refuse to score in an engine where the actuator would not run (fail loud, not open).

    Args:
        use_v2_model_runner: ``VllmConfig.use_v2_model_runner``.
        logits_processors: ``ModelConfig.logits_processors`` (FQCN strings or classes).

    Raises:
        ConfigError: vLLM's V2 model runner (its logits-processor interface is not
            supported yet), or the actuator missing from ``--logits-processors``.
    """
    if use_v2_model_runner:
        raise ConfigError(
            "the trajguard vLLM plugin needs the V1 model runner: start vLLM with "
            "VLLM_USE_V2_MODEL_RUNNER=0 (the V2 logits-processor interface is not supported yet)"
        )
    names = {
        p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}"
        for p in logits_processors or ()
    }
    if ACTUATOR not in names:
        raise ConfigError(
            f"TRAJGUARD_PROBE is set but the guard's actuator is not loaded: add "
            f"--logits-processors {ACTUATOR}"
        )


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """One request's guard options, from ``SamplingParams.extra_args`` (``vllm_xargs``).

    Keys: ``trajguard`` (``"on"``/``"off"``/``"observe"`` or a boolean: guard, leave
    alone, or only score), ``trajguard_threshold`` (P(unsafe) in [0, 1]),
    ``trajguard_id`` (key of this request's events), ``trajguard_policy``
    (``stop``/``rollback``) and ``trajguard_prefix`` (token ids forced first and judged,
    e.g. a client-written assistant prefill).
    """

    mode: Mode = "off"
    threshold: float | None = None
    key: str | None = None
    policy: Literal["stop", "rollback"] | None = None
    prefix: tuple[int, ...] = ()

    @property
    def active(self) -> bool:
        """Whether the request is scored at all."""
        return self.mode != "off"

    @classmethod
    def from_extra_args(
        cls, extra_args: Mapping[str, Any] | None, *, guard_all: bool = False
    ) -> RequestOptions:
        """Parse and validate the ``trajguard*`` keys of ``extra_args``.

        Raises:
            ValueError: an unknown ``trajguard_*`` key or a bad value (vLLM answers 400).
        """
        args = {k: v for k, v in (extra_args or {}).items() if k.startswith(XARG_MODE)}
        unknown = set(args) - _XARGS
        if unknown:
            raise ValueError(
                f"unknown trajguard options {sorted(unknown)}; known: {sorted(_XARGS)}"
            )
        options = cls(mode="guard" if guard_all else "off")
        if XARG_MODE in args:
            options = replace(options, mode=_parse_mode(args[XARG_MODE]))
        if XARG_THRESHOLD in args:
            threshold = args[XARG_THRESHOLD]
            if isinstance(threshold, bool) or not isinstance(threshold, int | float):
                raise ValueError(f"{XARG_THRESHOLD} must be a number")
            if not 0.0 <= float(threshold) <= 1.0:
                raise ValueError(f"{XARG_THRESHOLD} must be in [0, 1], got {threshold}")
            options = replace(options, threshold=float(threshold))
        if XARG_ID in args:
            options = replace(options, key=str(args[XARG_ID]))
        if XARG_POLICY in args:
            if args[XARG_POLICY] not in ("stop", "rollback"):
                raise ValueError(f"{XARG_POLICY} must be 'stop' or 'rollback'")
            options = replace(options, policy=args[XARG_POLICY])
        if XARG_PREFIX in args:
            prefix = args[XARG_PREFIX]
            if not isinstance(prefix, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prefix
            ):
                raise ValueError(f"{XARG_PREFIX} must be a list of token ids")
            options = replace(options, prefix=tuple(prefix))
        if options.prefix and not options.active:
            raise ValueError(f"{XARG_PREFIX} needs the guard on or in observe mode")
        return options


def _parse_mode(value: Any) -> Mode:
    if isinstance(value, bool):
        return "guard" if value else "off"
    if isinstance(value, int | float):
        return "guard" if value else "off"
    text = str(value).strip().lower()
    if text == "observe":
        return "observe"
    if text in _TRUE:
        return "guard"
    if text in _FALSE:
        return "off"
    raise ValueError(f"{XARG_MODE} must be 'on', 'off' or 'observe', got {value!r}")
