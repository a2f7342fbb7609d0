"""The machine a bench ran on: :func:`benchmarks.common.machine_description` plus CPU details."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import machine_description


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine() -> dict[str, Any]:
    """CPU model, logical and usable cores, torch version and threads, GPU (if any)."""
    info = machine_description()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info.update(
        cpu_model=_cpu_model(),
        cpu_cores=os.cpu_count(),
        cpu_cores_usable=usable,
        platform=platform.platform(),
        gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
    )
    return info
