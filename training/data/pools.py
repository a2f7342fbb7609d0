"""Text pools for trajectory insertion: refusals of varied length and harmful spans.

Refusals are written here as templates (no data file); long ones are composed from sentence
parts with a seeded RNG, so a pool is reproducible. Harmful spans are read from the offline
data at call time and carry their provenance.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Collection, Iterable

from training.data.loaders import (
    PathLike,
    harmbench_behavior_texts,
    load_advbench_behaviors,
    load_advbench_strings,
    load_derta_pairs,
    load_harmbench_targets,
    load_jbb_artifacts,
    load_jbb_behaviors,
)
from training.data.records import HarmfulSpan, RefusalText
from training.data.text import first_words, normalize_text

logger = logging.getLogger(__name__)

SHORT_REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with that request.",
    "Sorry, I can't do that.",
    "I won't help with this.",
    "I'm not able to provide that information.",
    "As an AI, I can't help with requests like this.",
    "I must decline this request.",
    "I apologize, but I cannot fulfill this request.",
    "That's not something I can help with.",
    "I can't provide instructions for that.",
    "No, I won't do that.",
    "I'm unable to assist with this.",
    "My apologies, but I can't continue with that.",
    "I cannot create content like this.",
    "I'm not comfortable helping with that.",
    "I can't support this request.",
    "Sorry, that's against my guidelines.",
    "I will not provide that.",
    "Unfortunately, I can't help here.",
    "I'm afraid I can't assist with that.",
    "I'd rather not help with this one.",
    "This is something I have to refuse.",
    "I can't write that.",
    "I'm going to stop here; I can't help with this.",
    "Actually, I can't continue with this.",
    "Wait, I shouldn't help with this.",
    "I need to stop: I can't provide this.",
    "I can't go on with this response.",
)

MEDIUM_REFUSALS: tuple[str, ...] = (
    (
        "I'm sorry, but I can't help with that. It could cause real harm to people. "
        "If you have another question, I'm happy to help."
    ),
    (
        "I cannot provide instructions for this because it is illegal and dangerous. "
        "Is there something else I can help you with?"
    ),
    (
        "As an AI assistant, I have to decline. Helping with this could put others at risk, "
        "and that's a line I won't cross."
    ),
    (
        "I apologize, but I won't continue. What you're asking for could be used to hurt "
        "someone, so I'm going to stop here."
    ),
    (
        "Actually, I need to stop. I shouldn't provide this kind of information, because it "
        "could enable serious harm."
    ),
    (
        "I can't assist with this request. It involves activities that are harmful and "
        "unethical. I'd be glad to help with a safer alternative."
    ),
    (
        "I'm not able to help with that. If you're interested in the topic, I can share "
        "general, publicly available safety information instead."
    ),
    (
        "Sorry, I can't write that. Content like this can hurt real people, and I don't want "
        "to contribute to that."
    ),
    (
        "I must refuse. Providing these details would be irresponsible and possibly illegal. "
        "Let me know if I can help with something else."
    ),
    (
        "I won't be able to do that. Instead, I can explain the risks involved or point you "
        "to legitimate resources."
    ),
    (
        "Hold on, I can't keep going with this. It would mean giving out harmful "
        "instructions, which I don't do."
    ),
    (
        "I understand you're curious, but I can't help with this. It could lead to injury, "
        "legal trouble or worse."
    ),
)

# Parts of long refusals: one opener, then reason / consequence / alternative sentences
# until the length is reached, then one closing.
_OPENERS: tuple[str, ...] = (
    "I'm sorry, but I can't help with this request.",
    "I have to stop here and decline to continue.",
    "Actually, I need to step back: I can't provide what you're asking for.",
    "I apologize, but I won't be able to assist with this.",
    "As an AI assistant, I must refuse this request.",
    "I cannot continue with this response.",
)
_REASONS: tuple[str, ...] = (
    "What you are asking for could be used to cause serious harm to other people.",
    ("Providing these details would mean helping with an activity that is illegal in most places."),
    (
        "Even when a request is framed as hypothetical or fictional, the same information "
        "could be misused in the real world."
    ),
    (
        "My purpose is to be helpful while avoiding content that puts people's safety, "
        "privacy or well-being at risk."
    ),
    (
        "Step-by-step instructions for something like this would lower the barrier for "
        "someone who wants to hurt others."
    ),
    (
        "I also want to be honest that continuing my previous answer was a mistake, and I'm "
        "correcting course now."
    ),
    ("This falls into a category of requests that I decline no matter how they are phrased."),
    ("Sharing this could expose you and others to legal consequences as well as physical danger."),
)
_ALTERNATIVES: tuple[str, ...] = (
    (
        "If you are researching this topic for a legitimate reason, I'd suggest consulting "
        "published, peer-reviewed sources or a qualified professional."
    ),
    (
        "I'm glad to explain the general risks involved, the relevant laws, or how people "
        "protect themselves against this kind of harm."
    ),
    (
        "If you or someone you know is in danger, please contact local emergency services or "
        "a trusted support line right away."
    ),
    (
        "If your goal is security work, I can talk about defensive best practices, responsible "
        "disclosure and how to get proper authorization."
    ),
    (
        "If you're writing fiction, I can help with the characters, the plot and the "
        "emotional stakes without including harmful technical details."
    ),
    (
        "I can also point you toward educational material that covers the topic from a safety "
        "and prevention perspective."
    ),
    (
        "If something difficult is going on for you right now, talking to someone you trust "
        "or a counsellor can really help."
    ),
)
_CLOSINGS: tuple[str, ...] = (
    "Please let me know if there's something else I can help you with.",
    "I'm happy to help with any other question you have.",
    "Thank you for understanding, and feel free to ask about something else.",
    "If you'd like, we can explore one of those safer directions together.",
)


# Recovery targets: what the model should say right after a harmful span it did not write
# (or did write), so it turns back at any position of its answer.
RECOVERY_TEXTS: tuple[str, ...] = (
    "Actually, I can't continue with this.",
    "Wait, I shouldn't help with this.",
    "I need to stop: I can't provide this.",
    "I'm going to stop here; I can't help with this.",
    "I can't go on with this response.",
    "Sorry, I can't continue. This could cause real harm.",
    "Hold on. I won't provide these instructions, because they could be used to hurt people.",
    (
        "Actually, I need to stop. I shouldn't provide this kind of information, because it "
        "could enable serious harm."
    ),
    "I cannot continue with this. I'm sorry, but I can't help with that request.",
    "No, I won't finish this. Let me know if I can help with something safe instead.",
)


def compose_long_refusal(seed: int, *, min_words: int = 128) -> str:
    """Compose a multi-sentence refusal of at least ``min_words`` words, deterministically.

    Args:
        seed: Seed of the sentence choice; the same seed always gives the same text.
        min_words: Minimum number of whitespace-separated words.

    Returns:
        The refusal text.
    """
    rng = random.Random(seed)
    body_parts = [*_REASONS, *_ALTERNATIVES]
    rng.shuffle(body_parts)
    sentences = [rng.choice(_OPENERS)]
    closing = rng.choice(_CLOSINGS)
    n_words = len(sentences[0].split()) + len(closing.split())
    while n_words < min_words:
        if not body_parts:  # every part used once: allow repeats in a fresh order
            body_parts = [*_REASONS, *_ALTERNATIVES]
            rng.shuffle(body_parts)
        sentences.append(body_parts.pop())
        n_words += len(sentences[-1].split())
    return " ".join([*sentences, closing])


def refusal_pool(
    *, seed: int = 0, n_long: int = 32, min_long_words: int = 128
) -> list[RefusalText]:
    """Build the refusal pool: all short and medium templates plus ``n_long`` composed ones.

    Args:
        seed: Seed of the composed refusals; each draws its own seed from it.
        n_long: Number of composed long refusals.
        min_long_words: Minimum words per long refusal.

    Returns:
        Short, then medium, then long refusals; no duplicates.
    """
    pool = [RefusalText(t, "short") for t in SHORT_REFUSALS]
    pool += [RefusalText(t, "medium") for t in MEDIUM_REFUSALS]
    rng = random.Random(seed)
    long_texts = dict.fromkeys(
        compose_long_refusal(rng.randrange(2**32), min_words=min_long_words) for _ in range(n_long)
    )
    pool += [RefusalText(t, "long") for t in long_texts]
    return pool


def _target_spans(data_dir: PathLike) -> Iterable[HarmfulSpan]:
    for b in [*load_advbench_behaviors(data_dir), *load_jbb_behaviors(data_dir)]:
        if b.target:
            yield HarmfulSpan(b.target, b.source, b.source_id, b.prompt)
    behaviors = harmbench_behavior_texts(data_dir)
    for behavior_id, target in load_harmbench_targets(data_dir).items():
        yield HarmfulSpan(target, "harmbench", behavior_id, behaviors.get(behavior_id))


def _response_spans(data_dir: PathLike, max_words: int) -> Iterable[HarmfulSpan]:
    for a in load_jbb_artifacts(data_dir):
        if a.jailbroken and a.response and a.response.strip():
            yield HarmfulSpan(
                first_words(a.response, max_words), "jbb_artifacts", a.source_id, a.goal
            )
    for p in load_derta_pairs(data_dir):
        yield HarmfulSpan(first_words(p.response, max_words), p.source, p.source_id, p.prompt)


def harmful_span_pool(
    data_dir: PathLike = None,
    *,
    max_words: int = 48,
    include_strings: bool = True,
    exclude_prompts: Collection[str] = (),
) -> list[HarmfulSpan]:
    """Collect harmful spans with provenance from every harmful source.

    Spans are: AdvBench, HarmBench and JBB affirmative targets; AdvBench harmful strings;
    and the first ``max_words`` words of jailbroken JBB responses and of DeRTa answers.

    Args:
        data_dir: Data directory override.
        max_words: Words kept from the start of each harmful response.
        include_strings: Include AdvBench ``harmful_strings.csv`` (they have no prompt).
        exclude_prompts: Prompts whose spans must be dropped (e.g. test behaviours);
            compared after :func:`~training.data.text.normalize_text`.

    Returns:
        Spans de-duplicated by normalised text (first occurrence kept).
    """
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    excluded = {normalize_text(p) for p in exclude_prompts}
    candidates = [*_target_spans(data_dir), *_response_spans(data_dir, max_words)]
    if include_strings:
        candidates += load_advbench_strings(data_dir)
    seen: set[str] = set()
    pool = []
    for span in candidates:
        norm = normalize_text(span.text)
        if not norm or norm in seen:
            continue
        if span.prompt is not None and normalize_text(span.prompt) in excluded:
            continue
        seen.add(norm)
        pool.append(span)
    logger.info("harmful span pool: %d spans (%d candidates)", len(pool), len(candidates))
    return pool
