"""The benign part of the safety-alignment set, built from the benign registry by a mix.

The legacy set (``mix="legacy"``, :func:`training.finetune.sft_data.benign_examples`) pairs
~200 refusals with ~300 short self-instruct and GSM8K answers, and the models it produced
refuse 65-78 % of XSTest's safe prompts: nothing in it shows a request that *looks* harmful
being answered, nor a long, listed, coded or role-played answer. A :class:`BenignMix` adds
both (see :data:`DEFAULT_MIX` for the default counts and why):

* look-alike compliance: CoCoNot preference prompts with their complying ``chosen`` answer
  (``rejected``, the over-cautious answer, is not used: plain SFT has no negative);
* general benign answers: Arena-Hard (GPT-4 reference answers), GPTeacher role-play and
  code, self-instruct, GSM8K *train* (cleaned).

Prompts come only from :func:`training.common.benign.benign_train_prompts`: never an
evaluation prompt (XSTest safe, CoCoNot contrast, MITRE FRR, NQ-open, GSM8K test, the eval
halves of Arena-Hard, CoCoNot pref and GPTeacher) nor a rewording of one. NQ-open is not a
training source: its answers are 1-3 word phrases (median 2 words) that no single sentence
template turns into a natural answer ("When was the last time anyone was on the moon?" ->
"14 December 1972 UTC"); they would teach terse replies, so NQ stays for evaluation.

Sampling is seeded per source (``random.Random(f"{seed}:{source}")``), so changing one
source's count leaves the others' examples unchanged, and every recipe (``align``, ``qi``,
``rwi``) gets the same examples for the same mix, seed and tokenizer.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields

from training.common.benign import benign_train_prompts, clean_gsm8k_answer
from training.common.harmful_split import DEFAULT_SPLIT_SEED
from training.data import BenignPrompt
from training.data.loaders import PathLike
from training.finetune.sft_data import SFTExample, refusal_examples

logger = logging.getLogger(__name__)

#: Named mixes an :class:`~training.finetune.align.AlignConfig` accepts: ``default``
#: (:data:`DEFAULT_MIX`), ``legacy`` (the original self-instruct + GSM8K anchor, counts from
#: ``n_self_instruct`` / ``n_gsm8k`` / ``max_answer_words``) and ``custom`` (counts given).
MIX_NAMES: tuple[str, ...] = ("default", "legacy", "custom")
#: Sources whose answers are never truncated (a cut solution loses its final answer).
UNTRUNCATED_SOURCES: frozenset[str] = frozenset({"gsm8k", "gpteacher_code"})

_LINE_END = re.compile(r"\n")
_SENTENCE_END = re.compile(r"(?<=[^\W\d_][.!?])\s|(?<=[.!?][\"')\]])\s")


@dataclass(frozen=True, slots=True)
class BenignMix:
    """How many benign examples each registry source contributes, and the answer budget.

    The field order is the order examples are drawn in. With the default 200 harmful train
    prompts (197 refusals fit 384 tokens of the default model), the default is refusals :
    look-alike compliance : general benign = 197 : 200 : 400 (about 1 : 1 : 2), 797
    examples in all:

    * as many look-alike compliances as refusals, so "looks harmful" stops predicting a
      refusal on its own: the model sees both answers to harmful-sounding requests;
    * twice that of general answers, spread over lists and long form (Arena-Hard 60),
      role-play (80), code (80), short instructions (self-instruct 80) and step-by-step
      math (GSM8K 100), so the anchor keeps the base model's varied formats;
    * affordable on 2 CPU cores: answers are at most 150 words and examples at most
      ``max_length`` (384) tokens, so an epoch is 119k tokens with the default model's
      tokenizer against the legacy set's 58k (503 examples), so a 2-epoch run should take
      about twice the legacy run's time (estimated from token counts, not timed).

    Attributes:
        coconot_pref: CoCoNot contrast prompts with their complying (``chosen``) answer.
        arena_hard: Arena-Hard prompts (train half) with GPT-4-0314 reference answers.
        gpteacher_roleplay: GPTeacher role-play instructions (train half).
        gpteacher_code: GPTeacher code instructions (train half).
        self_instruct: Self-instruct seed tasks.
        gsm8k: GSM8K *train* problems, answers cleaned (:func:`clean_gsm8k_answer`).
        max_answer_words: Answer budget in words. Longer answers are cut at the last line
            break (else sentence end) within the budget that keeps at least half of it and
            neither ends inside a code block, on a heading nor on a ``:`` that announces
            more; answers without such a cut are skipped. GSM8K and GPTeacher code answers
            are never cut (a cut solution loses its result), only skipped when over budget.
    """

    coconot_pref: int = 200
    arena_hard: int = 60
    gpteacher_roleplay: int = 80
    gpteacher_code: int = 80
    self_instruct: int = 80
    gsm8k: int = 100
    max_answer_words: int = 150

    def __post_init__(self) -> None:
        bad = {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) < 0}
        if bad or self.max_answer_words < 1:
            raise ValueError(f"mix counts must be >= 0 and max_answer_words >= 1, got {self}")

    @property
    def counts(self) -> dict[str, int]:
        """``{source: count}`` in drawing order."""
        return {s: getattr(self, s) for s in MIX_SOURCES}

    @property
    def total(self) -> int:
        """Benign examples in all."""
        return sum(self.counts.values())

    def to_dict(self) -> dict[str, int]:
        """Plain dict (what a run's config records)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, int]) -> BenignMix:
        """The mix of ``values``; keys not given take the :data:`DEFAULT_MIX` value.

        Raises:
            ValueError: A key that is not a mix field (e.g. ``nq_open``, not trainable).
        """
        unknown = set(values) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(
                f"unknown mix keys {sorted(unknown)}; sources: {MIX_SOURCES} (nq_open and the "
                "look-alike evaluation sets are never trained on), plus max_answer_words"
            )
        return cls(**{k: int(v) for k, v in values.items()})

    @classmethod
    def parse(cls, spec: str) -> BenignMix:
        """``"source=n,source=n,..."``: sources not named get 0 (``max_answer_words`` keeps
        its default unless given), so a spec lists exactly what is drawn."""
        values: dict[str, int] = {s: 0 for s in MIX_SOURCES}
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            key, sep, value = item.partition("=")
            if not sep or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"mix item {item!r} is not source=count")
            values[key.strip()] = int(value)
        return cls.from_dict(values)


MIX_SOURCES: tuple[str, ...] = tuple(
    f.name for f in fields(BenignMix) if f.name != "max_answer_words"
)
#: The default benign mix (see :class:`BenignMix` for the reasoning): 600 benign examples.
DEFAULT_MIX = BenignMix()


def resolve_mix(name: str, counts: Mapping[str, int] | None) -> dict[str, int] | None:
    """The benign mix a config records: ``None`` for ``legacy``, else a full dict.

    ``default`` takes :data:`DEFAULT_MIX` unless ``counts`` is given (a recorded run keeps
    its own counts even if the default changes later); ``custom`` needs ``counts``.

    Raises:
        ValueError: An unknown name, counts with ``legacy`` or none with ``custom``.
    """
    if name not in MIX_NAMES:
        raise ValueError(f"mix must be one of {MIX_NAMES}, got {name!r}")
    if name == "legacy":
        if counts is not None:
            raise ValueError("the legacy mix takes n_self_instruct/n_gsm8k, not benign_mix")
        return None
    if counts is None:
        if name == "custom":
            raise ValueError("a custom mix needs benign_mix counts")
        return DEFAULT_MIX.to_dict()
    return BenignMix.from_dict(counts).to_dict()


def truncate_answer(text: str, max_words: int) -> str | None:
    """``text`` if it has at most ``max_words`` words, else a clean cut within the budget.

    A cut is the last line break (failing that, the last sentence end) whose prefix keeps
    between ``max_words // 2`` and ``max_words`` words, is outside a code block and does not
    end on a heading or a colon. ``None`` when there is no such cut.
    """
    text = text.strip()
    if len(text.split()) <= max_words:
        return text
    for boundary in (_LINE_END, _SENTENCE_END):
        cut = None
        for match in boundary.finditer(text):
            prefix = text[: match.start()].rstrip()
            n_words = len(prefix.split())
            if n_words > max_words:
                break
            if n_words >= max_words // 2 and _clean_end(prefix):
                cut = prefix
        if cut is not None:
            return cut
    return None


def _clean_end(prefix: str) -> bool:
    """Whether an answer may end here: no open code block, heading or announcing colon."""
    last_line = prefix.splitlines()[-1].strip() if prefix else ""
    return (
        prefix.count("```") % 2 == 0
        and not last_line.startswith("#")
        and not last_line.rstrip("*_ ").endswith((":", ",", ";"))
    )


def _answer(prompt: BenignPrompt, max_words: int) -> str | None:
    """The training answer of ``prompt`` within the budget, or ``None`` (skip it)."""
    if not prompt.answer or not prompt.answer.strip():
        return None
    if prompt.source == "gsm8k":
        answer = clean_gsm8k_answer(prompt.answer)
    else:
        answer = prompt.answer.strip()
    if prompt.source in UNTRUNCATED_SOURCES:
        return answer if len(answer.split()) <= max_words else None
    return truncate_answer(answer, max_words)


def mix_benign_examples(
    mix: BenignMix,
    *,
    seed: int = 0,
    data_dir: PathLike = None,
    fits: Callable[[SFTExample], bool] | None = None,
) -> list[SFTExample]:
    """Exactly ``mix.counts[source]`` benign examples per source, drawn seeded.

    Each source's allowed training prompts (:func:`benign_train_prompts`) are shuffled
    with ``random.Random(f"{seed}:{source}")`` and taken in that order, skipping those
    without an answer within the budget and those ``fits`` rejects (e.g. longer than the
    training ``max_length``); skipping instead of dropping afterwards keeps the counts exact.

    Returns:
        The examples, source by source in :data:`MIX_SOURCES` order, ``kind="benign"`` and
        ``source`` the registry name (``"coconot_pref"``, ``"gpteacher_code"``, ...).

    Raises:
        ValueError: A source has fewer usable prompts than its count.
    """
    examples: list[SFTExample] = []
    for source, count in mix.counts.items():
        if count == 0:
            continue
        candidates = list(benign_train_prompts(source, data_dir))
        random.Random(f"{seed}:{source}").shuffle(candidates)
        chosen: list[SFTExample] = []
        for prompt in candidates:
            answer = _answer(prompt, mix.max_answer_words)
            if answer is None:
                continue
            example = SFTExample(prompt.prompt, answer, "benign", source)
            if fits is not None and not fits(example):
                continue
            chosen.append(example)
            if len(chosen) == count:
                break
        if len(chosen) < count:
            raise ValueError(
                f"benign source {source}: only {len(chosen)} usable training prompts of "
                f"{len(candidates)} (answer budget {mix.max_answer_words} words), "
                f"{count} asked for"
            )
        examples += chosen
    return examples


def build_mixed_examples(
    mix: BenignMix,
    *,
    n_harmful: int | None = 200,
    refusal_styles: Sequence[str] = ("short", "medium"),
    seed: int = 0,
    split_seed: int = DEFAULT_SPLIT_SEED,
    data_dir: PathLike = None,
    fits: Callable[[SFTExample], bool] | None = None,
) -> list[SFTExample]:
    """Refusals (the same as the legacy set's) plus :func:`mix_benign_examples`, shuffled
    together with ``random.Random(seed + 1)`` like :func:`build_sft_examples`.

    Refusals that ``fits`` rejects are dropped (as :func:`drop_long` does in the legacy
    set); benign examples are drawn so that each source's count is exact.
    """
    refusals = refusal_examples(
        n_harmful, styles=refusal_styles, seed=seed, split_seed=split_seed, data_dir=data_dir
    )
    if fits is not None:
        refusals = [e for e in refusals if fits(e)]
    benign = mix_benign_examples(mix, seed=seed, data_dir=data_dir, fits=fits)
    examples = refusals + benign
    random.Random(seed + 1).shuffle(examples)
    logger.info(
        "alignment set: %d refusals + %d benign (%s)",
        len(refusals),
        len(benign),
        ", ".join(f"{s} {n}" for s, n in mix.counts.items() if n),
    )
    return examples
