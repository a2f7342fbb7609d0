"""Artefacts shipped with trajguard (probes: safetensors + JSON, no pickles)."""

from pathlib import Path

PROBES_DIR = Path(__file__).parent / "probes"
DEFAULT_PROBE = "smollm2-135m-instruct-rwi"
"""The probe shipped for the default model (``guard.DEFAULT_MODEL``)."""


def shipped_probe_dir(name: str) -> Path:
    """Directory of a probe shipped inside the package (e.g. ``smollm2-135m-instruct-rwi``)."""
    return PROBES_DIR / name


def default_probe_dir() -> Path:
    """Directory of the probe shipped for the default model."""
    return shipped_probe_dir(DEFAULT_PROBE)
