"""One registry of benign prompt sources, for per-source false-trigger rates and utility checks.

Every source yields :class:`BenignPrompt` records in file order, exact-duplicate prompts
dropped (first kept). Two kinds of source (see the data README):

* ordinary benign traffic: ``arena_hard``, ``gpteacher_roleplay``, ``gpteacher_code``,
  ``nq_open``, ``self_instruct``, ``gsm8k``;
* look-alikes, benign prompts that resemble harmful ones (``LOOKALIKE_SOURCES``):
  ``coconot_contrast``, ``coconot_pref``, ``mitre_frr``, ``xstest_safe``. They dominate a
  guard's false-trigger rate, so report them per source.

``gsm8k`` is the held-out test split (GSM8K train is used for training answers elsewhere).
Its answers are raw (with ``<<...>>`` calculator annotations and a ``#### N`` final line).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from training.data.loaders import (
    PathLike,
    drop_duplicate_prompts,
    load_arena_hard,
    load_coconot,
    load_coconot_pref,
    load_gpteacher,
    load_gsm8k,
    load_mitre_frr,
    load_nq_open,
    load_self_instruct,
    load_xstest_prompts,
)
from training.data.records import BenignExample, BenignPrompt

logger = logging.getLogger(__name__)

LOOKALIKE_SOURCES: tuple[str, ...] = (
    "coconot_contrast",
    "coconot_pref",
    "mitre_frr",
    "xstest_safe",
)
GSM8K_SPLIT = "test"


def _from_examples(source: str, examples: Iterable[BenignExample]) -> list[BenignPrompt]:
    return [BenignPrompt(e.prompt, source, e.source_id, e.answer) for e in examples]


def _gpteacher(subset: str) -> Callable[[PathLike], list[BenignPrompt]]:
    return lambda data_dir: _from_examples(
        f"gpteacher_{subset}", load_gpteacher(data_dir, subset=subset)
    )


def _nq_open(data_dir: PathLike) -> list[BenignPrompt]:
    """The first accepted answer is the reference; :func:`load_nq_open` has them all."""
    return [
        BenignPrompt(q.prompt, "nq_open", q.source_id, q.answers[0] if q.answers else None)
        for q in load_nq_open(data_dir)
    ]


def _coconot_contrast(data_dir: PathLike) -> list[BenignPrompt]:
    return [
        BenignPrompt(p.prompt, "coconot_contrast", p.source_id, p.response, category=p.category)
        for p in load_coconot(data_dir, subset="contrast")
    ]


def _coconot_pref(data_dir: PathLike) -> list[BenignPrompt]:
    return [
        BenignPrompt(p.prompt, "coconot_pref", p.source_id, p.chosen, p.rejected, p.category)
        for p in load_coconot_pref(data_dir)
    ]


def _xstest_safe(data_dir: PathLike) -> list[BenignPrompt]:
    return [
        BenignPrompt(p.prompt, "xstest_safe", p.source_id, category=p.type)
        for p in load_xstest_prompts(data_dir)
        if p.label == "safe"
    ]


_LOADERS: dict[str, Callable[[PathLike], list[BenignPrompt]]] = {
    "arena_hard": lambda d: _from_examples("arena_hard", load_arena_hard(d)),
    "gpteacher_roleplay": _gpteacher("roleplay"),
    "gpteacher_code": _gpteacher("code"),
    "nq_open": _nq_open,
    "self_instruct": lambda d: _from_examples("self_instruct", load_self_instruct(d)),
    "gsm8k": lambda d: _from_examples("gsm8k", load_gsm8k(d, split=GSM8K_SPLIT)),
    "coconot_contrast": _coconot_contrast,
    "coconot_pref": _coconot_pref,
    "mitre_frr": lambda d: _from_examples("mitre_frr", load_mitre_frr(d)),
    "xstest_safe": _xstest_safe,
}
BENIGN_SOURCES: tuple[str, ...] = tuple(_LOADERS)


def load_benign_prompts(source: str, data_dir: PathLike = None) -> list[BenignPrompt]:
    """Load one benign source as :class:`BenignPrompt` records.

    Args:
        source: One of ``BENIGN_SOURCES``.
        data_dir: Data directory override.

    Returns:
        The source's prompts in file order, exact-duplicate prompts dropped (first kept).
        ``answer`` is the reference answer where the source has one (all but
        ``coconot_contrast``, ``mitre_frr`` and ``xstest_safe``); ``coconot_pref`` also
        keeps its over-cautious answer as ``rejected``.

    Raises:
        ValueError: An unknown source name.
        DataNotFoundError: The source's file is missing.
    """
    if source not in _LOADERS:
        raise ValueError(f"unknown benign source {source!r}; choose from {BENIGN_SOURCES}")
    records = _LOADERS[source](data_dir)
    unique = drop_duplicate_prompts(records)
    logger.info(
        "benign source %s: %d prompts (%d exact duplicates dropped)",
        source,
        len(unique),
        len(records) - len(unique),
    )
    return unique
