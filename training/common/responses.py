"""A harmful response per attack prompt, for prefilling, insertion spans and teacher forcing.

Preference order: a jailbroken JailbreakBench response to that behaviour, a DeRTa harmful
answer, else the behaviour's affirmative target continued greedily by a *writer* model (the
default, non-aligned SmolLM2 complies), else "Sure, here is" continued by the writer.
Writer continuations are cached under ``$TRAJGUARD_HOME/responses``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from guard import GuardedEngine, LoadedModel, SamplingParams, encode_chat
from guard.models import model_fingerprint, trajguard_home
from training.common.generation import generate_requests
from training.common.prompts import AttackPrompt
from training.data import load_derta_pairs, load_jbb_artifacts, normalize_text
from training.data.loaders import PathLike

logger = logging.getLogger(__name__)

DEFAULT_OPENING = "Sure, here is"


@dataclass(frozen=True, slots=True)
class HarmfulResponse:
    """A harmful response text and where it came from (``jbb:<id>``, ``target+writer``, ...)."""

    text: str
    source: str


def known_responses(
    data_dir: PathLike = None, *, min_words: int = 40
) -> dict[str, HarmfulResponse]:
    """Normalised prompt -> first recorded harmful response with at least ``min_words`` words."""
    found: dict[str, HarmfulResponse] = {}
    for a in load_jbb_artifacts(data_dir):
        if a.jailbroken and a.response and len(a.response.split()) >= min_words:
            found.setdefault(
                normalize_text(a.goal), HarmfulResponse(a.response.strip(), f"jbb:{a.source_id}")
            )
    for p in load_derta_pairs(data_dir):
        if len(p.response.split()) >= min_words:
            found.setdefault(
                normalize_text(p.prompt), HarmfulResponse(p.response, f"derta:{p.source_id}")
            )
    return found


def _cache_file(writer: LoadedModel, n_tokens: int) -> Path:
    return trajguard_home() / "responses" / f"{model_fingerprint(writer.model)}-n{n_tokens}.json"


def _key(prompt: str, opening: str) -> str:
    return hashlib.sha1(f"{prompt}\x00{opening}".encode()).hexdigest()


def write_continuations(
    writer: LoadedModel,
    items: Sequence[tuple[str, str]],
    *,
    n_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy continuations of ``(prompt, opening)`` pairs by ``writer``, cached on disk.

    Returns:
        ``opening + continuation`` per pair.
    """
    path = _cache_file(writer, n_tokens)
    cache: dict[str, str] = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    missing = [(p, o) for p, o in dict.fromkeys(items) if _key(p, o) not in cache]
    if missing:
        logger.info("writing %d harmful continuations with %s", len(missing), writer.model_id)
        requests = []
        for prompt, opening in missing:
            encoded = encode_chat(
                writer.tokenizer,
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": opening}],
            )
            requests.append((encoded.prompt_ids, encoded.prefill_ids))
        engine = GuardedEngine(writer.model, writer.tokenizer)
        results = generate_requests(
            engine,
            requests,
            SamplingParams(max_tokens=n_tokens),
            batch_size=batch_size,
            desc="writer",
        )
        for (prompt, opening), result in zip(missing, results):
            cache[_key(prompt, opening)] = result.text
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache), encoding="utf-8")
    return [o + cache[_key(p, o)] for p, o in items]


def harmful_responses(
    prompts: Sequence[AttackPrompt],
    writer: LoadedModel | None,
    *,
    n_tokens: int = 64,
    min_words: int = 40,
    batch_size: int = 8,
    data_dir: PathLike = None,
) -> list[HarmfulResponse]:
    """One harmful response per prompt (see the module docstring for the order).

    Args:
        prompts: Attack prompts.
        writer: Model that continues targets; ``None`` keeps bare targets (short).
        n_tokens: Tokens the writer adds after the target.
        min_words: Minimum words of a recorded (JBB/DeRTa) response to use it.
        batch_size: Writer batch size.
        data_dir: Data directory override.
    """
    try:
        known = known_responses(data_dir, min_words=min_words)
    except FileNotFoundError:
        known = {}
    out: list[HarmfulResponse | None] = [known.get(normalize_text(p.prompt)) for p in prompts]
    todo = [i for i, r in enumerate(out) if r is None]
    openings = [prompts[i].target or DEFAULT_OPENING for i in todo]
    if writer is not None and todo:
        texts = write_continuations(
            writer,
            [(prompts[i].prompt, o) for i, o in zip(todo, openings)],
            n_tokens=n_tokens,
            batch_size=batch_size,
        )
        for i, text in zip(todo, texts):
            kind = "target" if prompts[i].target else "opening"
            out[i] = HarmfulResponse(text, f"{kind}+{writer.model_id}")
    else:
        for i, opening in zip(todo, openings):
            out[i] = HarmfulResponse(opening, "target" if prompts[i].target else "opening")
    return [r for r in out if r is not None]
