"""Put trained artefacts into the package: the aligned alias's LoRA adapter and its probe.

``training/`` writes runs under ``runs/``; users get what is shipped under ``guard/assets``.
Shipping checks what the product relies on: the adapter is a plain LoRA on the alias's base
and fits the size budget; the probe was fitted on exactly the model the alias loads (its
``model_fingerprint`` equals the merged model's). Each copy carries the run record it came
from (``training.json``), so ``trajguard train replay`` rebuilds it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from guard.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ALIGNED, read_adapter_config
from guard.assets import SHIPPED_PROBES, shipped_adapter_dir, shipped_probe_dir
from guard.errors import ConfigError, ProbeMismatchError
from guard.models import load_model
from guard.probe import LinearProbe
from training.finetune.align import ADAPTER_DIR, RUN_FILE

logger = logging.getLogger(__name__)

MAX_ADAPTER_BYTES = 16 * 1024 * 1024
RECORD_FILE = "training.json"
PROBE_FILES = ("probe.json", "probe.safetensors")
_RECORD_KEYS = (
    "config",
    "method",
    "wall_time_s",
    "train_runtime_s",
    "train_loss",
    "global_steps",
    "n_refusal",
    "n_benign",
    "n_augmented",
    "n_by_source",
    "selection",
    "trajguard_version",
    "world_size",
)


def run_record(run_dir: Path) -> dict[str, Any]:
    """The shippable part of a training run's record (config, counts, losses, wall time)."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} holds no {RUN_FILE}: not a trajguard training run")
    record = json.loads(path.read_text(encoding="utf-8"))
    record.setdefault("method", "align")
    return {k: record[k] for k in _RECORD_KEYS if k in record}


def ship_adapter(run_dir: Path, alias: str) -> Path:
    """Copy ``<run_dir>/adapter`` into the package as aligned ``alias``'s adapter.

    Raises:
        ConfigError: unknown alias, no adapter, another base, or over the size budget.
    """
    if alias not in ALIGNED:
        raise ConfigError(f"{alias!r} is not an aligned alias ({', '.join(ALIGNED)})")
    source = run_dir / ADAPTER_DIR
    if not (source / ADAPTER_WEIGHTS).is_file():
        raise ConfigError(f"{source} holds no {ADAPTER_WEIGHTS} (train with --lora)")
    read_adapter_config(source, base_name=ALIGNED[alias].base)
    size = (source / ADAPTER_WEIGHTS).stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise ConfigError(f"adapter is {size / 2**20:.1f} MiB, over the 16 MiB budget (lower r)")
    target = shipped_adapter_dir(ALIGNED[alias].adapter)
    _replace_dir(target, {name: source / name for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)})
    _write_json(target / RECORD_FILE, run_record(run_dir))
    logger.info("shipped adapter %s (%.1f MiB) -> %s", source, size / 2**20, target)
    return target


def ship_probe(probe_dir: Path, alias: str) -> Path:
    """Copy a fitted probe into the package as the probe shipped for ``alias``.

    Raises:
        ConfigError: no probe is shipped for ``alias``, or the probe was fitted on another
            model than the one ``alias`` loads (fingerprints differ).
    """
    if alias not in SHIPPED_PROBES:
        raise ConfigError(f"no shipped probe slot for {alias!r} ({', '.join(SHIPPED_PROBES)})")
    probe = LinearProbe.load(probe_dir)
    if probe.metadata_.get("model_fingerprint") is None:
        raise ConfigError(f"probe {probe_dir} records no model fingerprint (fit it with trajguard)")
    try:
        probe.check_compatible(load_model(alias).model)
    except ProbeMismatchError as exc:
        raise ConfigError(f"{exc} (fit it with --model {alias})") from exc
    target = shipped_probe_dir(SHIPPED_PROBES[alias])
    _replace_dir(target, {name: probe_dir / name for name in PROBE_FILES})
    logger.info("shipped probe %s -> %s", probe_dir, target)
    return target


def _replace_dir(target: Path, files: dict[str, Path]) -> None:
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name, source in files.items():
        shutil.copyfile(source, target / name)


def _write_json(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


__all__ = ["MAX_ADAPTER_BYTES", "run_record", "ship_adapter", "ship_probe"]
