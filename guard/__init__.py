"""trajguard's guard: per-step hidden-state probes and mid-trajectory recovery.

Public API::

    from guard import load_model, LinearProbe, GuardedEngine, GuardConfig, SamplingParams
"""

from guard.capture import HiddenStateCapture
from guard.chat import EncodedPrompt, encode_chat
from guard.config import GuardConfig, MonitorConfig, PolicyConfig, SamplingParams
from guard.decoding import GuardedEngine
from guard.errors import (
    ConfigError,
    ContextLengthError,
    GuardValidationError,
    ModelNotFoundError,
    NotFittedError,
    ProbeMismatchError,
    TrajguardError,
    UnsupportedArchitectureError,
)
from guard.events import GenerationResult, GuardSummary, Intervention, RequestOutput
from guard.hooks import hook_name, parse_hook_name
from guard.models import BASE_MODEL, DEFAULT_MODEL, LoadedModel, load_model, model_fingerprint
from guard.monitor import StepMonitor, StepVerdict
from guard.policies import Action, RecoveryPolicy
from guard.probe import LinearProbe, calibrate_threshold
from guard.version import __version__

__all__ = [
    "BASE_MODEL",
    "DEFAULT_MODEL",
    "Action",
    "ConfigError",
    "ContextLengthError",
    "EncodedPrompt",
    "GenerationResult",
    "GuardConfig",
    "GuardSummary",
    "GuardValidationError",
    "GuardedEngine",
    "HiddenStateCapture",
    "Intervention",
    "LinearProbe",
    "LoadedModel",
    "ModelNotFoundError",
    "MonitorConfig",
    "NotFittedError",
    "PolicyConfig",
    "ProbeMismatchError",
    "RecoveryPolicy",
    "RequestOutput",
    "SamplingParams",
    "StepMonitor",
    "StepVerdict",
    "TrajguardError",
    "UnsupportedArchitectureError",
    "__version__",
    "calibrate_threshold",
    "encode_chat",
    "hook_name",
    "load_model",
    "model_fingerprint",
    "parse_hook_name",
]
