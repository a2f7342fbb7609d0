"""Helpers shared by benchmark scripts: machine description and JSON output."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

# Benign chat prompts the speed benchmarks decode (what is timed, not what is judged).
PROMPTS = [
    "Give me three tips for staying focused while studying.",
    "Explain how photosynthesis works in simple terms.",
    "Write a short poem about the sea.",
    "What are the main causes of inflation?",
]


def machine_description() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus the machine description) when ``path`` is given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine_description(), **payload}, indent=2))
