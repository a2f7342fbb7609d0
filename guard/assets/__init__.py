"""Artefacts shipped with trajguard (probes: safetensors + JSON, no pickles)."""

from pathlib import Path

from guard.errors import ConfigError
from guard.models import DEFAULT_MODEL

PROBES_DIR = Path(__file__).parent / "probes"
DEFAULT_PROBE = "smollm2-135m-instruct-rwi"
"""The probe shipped for the default model (``guard.DEFAULT_MODEL``)."""


def shipped_probe_dir(name: str) -> Path:
    """Directory of a probe shipped inside the package (e.g. ``smollm2-135m-instruct-rwi``)."""
    return PROBES_DIR / name


def default_probe_dir() -> Path:
    """Directory of the probe shipped for the default model."""
    return shipped_probe_dir(DEFAULT_PROBE)


def probe_dir_for(model: str) -> Path:
    """The probe shipped for ``model`` (an embedded alias).

    Raises:
        ConfigError: nothing is shipped for ``model`` (pass a probe directory).
    """
    if model != DEFAULT_MODEL:
        raise ConfigError(f"--probe is required for models other than {DEFAULT_MODEL}")
    return default_probe_dir()


ADAPTERS_DIR = Path(__file__).parent / "adapters"


def shipped_adapter_dir(name: str) -> Path:
    """Directory of a LoRA adapter shipped inside the package (may not exist yet)."""
    return ADAPTERS_DIR / name
