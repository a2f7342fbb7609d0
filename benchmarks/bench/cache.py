"""Resumable sample cache: one JSONL line per generated sample, keyed by target hash + sample.

A key is ``<target>:<sample>``. The target part hashes everything besides the case that
decides a generation (see :func:`benchmarks.bench.attacks._target_hash`): the weights
(:func:`guard.models.model_fingerprint`, not the path, so a model retrained in place
generates again), the tokenizer, the sampling settings and, for a guarded model, the
full resolved :class:`~guard.GuardConfig`, its threshold and the probe files' digest; for
an endpoint, its URL, the served model id and the fingerprint it reports (a trajguard
proxy reports one; any other endpoint is known by its id alone). The sample part hashes
the prompt, cell, prefill and seed.

Only generations are cached; verdicts are not: judging is cheap and reruns on every
aggregation, so a new judge never needs new generations and the judge is no part of a
key. A line is appended as soon as its chunk of samples is generated, so an interrupted
run loses at most one chunk.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from guard import GenerationResult, GuardSummary, Intervention

logger = logging.getLogger(__name__)


def digest(payload: Any, n: int = 16) -> str:
    """Short stable hash of a JSON-able value."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def files_digest(*paths: Path, n: int = 16) -> str:
    """Short hash of the named files' names and bytes (a missing file hashes as absent)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\x00")
        h.update(path.read_bytes() if path.is_file() else b"\x00<absent>")
        h.update(b"\x01")
    return h.hexdigest()[:n]


def probe_digest(directory: str | Path) -> str:
    """Hash of what :meth:`guard.LinearProbe.load` reads: ``probe.json`` and the weights."""
    directory = Path(directory)
    return files_digest(directory / "probe.json", directory / "probe.safetensors")


def tokenizer_digest(tokenizer: Any) -> str:
    """Hash of a tokenizer's vocabulary, special tokens and chat template."""
    return digest(
        [
            sorted(tokenizer.get_vocab().items()),
            tokenizer.special_tokens_map,
            getattr(tokenizer, "chat_template", None),
        ]
    )


def result_to_json(result: GenerationResult) -> dict[str, Any]:
    """A generation as JSON (the guard summary without its per-token trace)."""
    summary = result.summary
    return {
        "token_ids": list(result.token_ids),
        "text": result.text,
        "scores": list(result.scores),
        "finish_reason": result.finish_reason,
        "interventions": [asdict(i) for i in result.interventions],
        "summary": None
        if summary is None
        else {
            "triggered": summary.triggered,
            "trigger_index": summary.trigger_index,
            "max_score": summary.max_score,
            "action": summary.action,
            "recoveries": summary.recoveries,
        },
        "error": result.error,
    }


def result_from_json(request_id: str, data: dict[str, Any]) -> GenerationResult:
    """Inverse of :func:`result_to_json`."""
    interventions = [Intervention(**i) for i in data["interventions"]]
    summary = data["summary"]
    return GenerationResult(
        request_id=request_id,
        token_ids=list(data["token_ids"]),
        text=data["text"],
        scores=list(data["scores"]),
        finish_reason=data["finish_reason"],
        summary=None
        if summary is None
        else GuardSummary(**summary, interventions=tuple(interventions)),
        interventions=interventions,
        error=data.get("error"),
    )


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


class SampleCache:
    """``key -> {"result", "gen_s", "run"}`` backed by an append-only JSONL file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            with path.open(encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        entry = json.loads(line)
                    except json.JSONDecodeError:  # a line cut short by an interrupted run
                        logger.warning("%s:%d: unreadable cache line skipped", path, n)
                        continue
                    self.entries[entry["key"]] = entry
        logger.info("sample cache %s: %d samples", path, len(self.entries))

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> tuple[GenerationResult, dict[str, Any]]:
        """The cached result and its entry (``gen_s``, ``run``)."""
        entry = self.entries[key]
        return result_from_json(key, entry["result"]), entry

    def add(self, rows: list[tuple[str, GenerationResult, float]], run: str) -> None:
        """Append ``(key, result, seconds)`` rows and flush them to disk."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torn = _ends_mid_line(self.path)
        with self.path.open("a", encoding="utf-8") as f:
            if torn:  # an interrupted run left half a line: start a new one
                f.write("\n")
            for key, result, seconds in rows:
                entry = {"key": key, "result": result_to_json(result), "gen_s": seconds, "run": run}
                self.entries[key] = entry
                f.write(json.dumps(entry, ensure_ascii=False) + "\n")
