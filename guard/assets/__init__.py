"""Artefacts shipped with trajguard (probes: safetensors + JSON, no pickles)."""

from pathlib import Path

from guard.errors import ConfigError
from guard.models import BASE_MODEL, DEFAULT_MODEL

PROBES_DIR = Path(__file__).parent / "probes"
SHIPPED_PROBES: dict[str, str] = {
    DEFAULT_MODEL: "smollm2-135m-instruct-aligned-rwi",
    BASE_MODEL: "smollm2-135m-instruct-rwi",
}
"""Embedded alias -> the probe shipped for it (a directory under ``guard/assets/probes``)."""


def shipped_probe_dir(name: str) -> Path:
    """Directory of a probe shipped inside the package (e.g. ``smollm2-135m-instruct-rwi``)."""
    return PROBES_DIR / name


def default_probe_dir() -> Path:
    """Directory of the probe shipped for the default model (``guard.DEFAULT_MODEL``)."""
    return probe_dir_for(DEFAULT_MODEL)


def probe_dir_for(model: str) -> Path:
    """The probe shipped for ``model`` (an embedded alias).

    Raises:
        ConfigError: nothing is shipped for ``model`` (pass a probe directory).
    """
    if model not in SHIPPED_PROBES:
        raise ConfigError(
            f"no probe is shipped for {model!r} (shipped for: {', '.join(SHIPPED_PROBES)}); "
            "pass --probe DIR"
        )
    return shipped_probe_dir(SHIPPED_PROBES[model])


ADAPTERS_DIR = Path(__file__).parent / "adapters"


def shipped_adapter_dir(name: str) -> Path:
    """Directory of a LoRA adapter shipped inside the package (may not exist yet)."""
    return ADAPTERS_DIR / name
