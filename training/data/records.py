"""Typed, immutable records shared by the loaders, splits, pools and judges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RefusalStyle = Literal["short", "medium", "long"]


@dataclass(frozen=True, slots=True)
class HarmfulBehavior:
    """A harmful request, with an affirmative target response where the source has one.

    Attributes:
        prompt: The harmful instruction (AdvBench ``goal``, HarmBench ``Behavior``, JBB ``Goal``).
        target: Affirmative target ("Sure, here is ..."), or ``None`` if the source has none.
        source: Data set name, e.g. ``"advbench"``.
        source_id: Row identifier inside the source, e.g. ``"harmful_behaviors.csv#61"``.
        category: Harm category where the source gives one, else ``None``.
    """

    prompt: str
    target: str | None
    source: str
    source_id: str
    category: str | None = None


@dataclass(frozen=True, slots=True)
class BenignExample:
    """A benign request, with a reference answer where the source has one."""

    prompt: str
    answer: str | None
    source: str
    source_id: str


@dataclass(frozen=True, slots=True)
class BenignPrompt:
    """A benign prompt from one of the benign sources (see :mod:`training.data.benign_sources`).

    Attributes:
        prompt: The request text.
        source: Benign source name, e.g. ``"gpteacher_code"``.
        source_id: Row identifier inside the source; stable across runs.
        answer: Reference (complying) answer, or ``None`` if the source has none.
        rejected: An over-cautious answer to the same prompt where the source has one
            (CoCoNot preference data), else ``None``.
        category: Category where the source gives one, else ``None``.
    """

    prompt: str
    source: str
    source_id: str
    answer: str | None = None
    rejected: str | None = None
    category: str | None = None

    @property
    def uid(self) -> str:
        """Identifier unique across all benign sources: ``"<source>:<source_id>"``."""
        return f"{self.source}:{self.source_id}"


@dataclass(frozen=True, slots=True)
class OpenQAQuestion:
    """A short-answer question with every accepted answer string (NQ-open)."""

    prompt: str
    answers: tuple[str, ...]
    source_id: str


@dataclass(frozen=True, slots=True)
class CoCoNotPrompt:
    """A CoCoNot prompt with its noncompliance category.

    Attributes:
        prompt: The request text.
        category: Top-level category, e.g. ``"Requests with safety concerns"``.
        subcategory: Finer category, e.g. ``"dangerous or sensitive topics"``.
        source_id: The CoCoNot ``id``.
        response: Reference response, or ``None`` where the file leaves it empty.
    """

    prompt: str
    category: str
    subcategory: str
    source_id: str
    response: str | None = None


@dataclass(frozen=True, slots=True)
class PreferencePair:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) answer."""

    prompt: str
    chosen: str
    rejected: str
    source: str
    source_id: str
    category: str | None = None
    subcategory: str | None = None


@dataclass(frozen=True, slots=True)
class LabelledGeneration:
    """A model generation with a binary harm label (1 = harmful).

    Attributes:
        prompt: What the model was sent (attack prompt, test case or plain request).
        generation: What the model answered, i.e. the text the user would receive.
        label: 1 if the generation is harmful, else 0.
        source: Data set name.
        source_id: Row identifier inside the source.
        behavior: The underlying request; all generations for one behaviour share it, so
            splits keyed on it keep them together.
    """

    prompt: str
    generation: str
    label: int
    source: str
    source_id: str
    behavior: str


@dataclass(frozen=True, slots=True)
class HarmfulPair:
    """A harmful instruction with a harmful (complying) answer, e.g. from DeRTa."""

    prompt: str
    response: str
    source: str
    source_id: str


@dataclass(frozen=True, slots=True)
class HarmfulSpan:
    """A short piece of harmful output text, for insertion attacks, with its provenance.

    Attributes:
        text: The span.
        source: Data set name.
        source_id: Row identifier inside the source.
        prompt: The request this span answers, if known; lets callers drop spans of
            held-out behaviours.
    """

    text: str
    source: str
    source_id: str
    prompt: str | None = None


@dataclass(frozen=True, slots=True)
class RefusalText:
    """A refusal string and its length class."""

    text: str
    style: RefusalStyle

    @property
    def n_words(self) -> int:
        """Number of whitespace-separated words (a lower bound on subword tokens)."""
        return len(self.text.split())


@dataclass(frozen=True, slots=True)
class JailbreakArtifact:
    """One JailbreakBench attack attempt: the prompt sent, the response and its verdict.

    ``prompt`` and ``response`` are ``None`` where the attack produced no submission.
    """

    goal: str
    prompt: str | None
    response: str | None
    jailbroken: bool
    method: str
    model: str
    category: str
    source_id: str


@dataclass(frozen=True, slots=True)
class XSTestPrompt:
    """An XSTest prompt: ``label`` is ``"safe"`` (looks unsafe, is fine) or ``"unsafe"``."""

    prompt: str
    type: str
    label: Literal["safe", "unsafe"]
    focus: str
    source_id: str


@dataclass(frozen=True, slots=True)
class XSTestCompletion:
    """A labelled XSTest completion.

    Attributes:
        prompt: The XSTest prompt.
        completion: The model's answer.
        type: XSTest prompt type; ``contrast_*`` types are the unsafe prompts.
        final_label: ``"1_full_compliance"``, ``"2_full_refusal"`` or ``"3_partial_refusal"``.
        model: Which model answered (``"gpt4"`` or ``"llama2orig"``).
        source_id: Row identifier.
    """

    prompt: str
    completion: str
    type: str
    final_label: str
    model: str
    source_id: str

    @property
    def unsafe_prompt(self) -> bool:
        """True for XSTest's unsafe contrast prompts."""
        return self.type.startswith("contrast_")

    @property
    def is_refusal(self) -> bool:
        """True for full or partial refusals (the human label)."""
        return self.final_label != "1_full_compliance"
