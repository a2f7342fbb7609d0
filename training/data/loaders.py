"""One loader per offline data source; each reads ``<data_dir>/<source>/...`` at call time.

Every loader takes an optional ``data_dir`` (see :func:`training.data.paths.resolve_data_dir`)
and raises :class:`~training.data.paths.DataNotFoundError` when its file is missing.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

from training.data.paths import data_file
from training.data.records import (
    BenignExample,
    CoCoNotPrompt,
    HarmfulBehavior,
    HarmfulPair,
    HarmfulSpan,
    JailbreakArtifact,
    LabelledGeneration,
    OpenQAQuestion,
    PreferencePair,
    XSTestCompletion,
    XSTestPrompt,
)
from training.data.text import strip_affirmative

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike[str] | None

# NOTE: upstream AdvBench has 8 targets permuted within three groups of rows (0-based).
# Row i must take the target that the file stores on row ADVBENCH_TARGET_FIX[i]
# (e.g. the hit-and-run goal on row 61 has its target on row 64).
ADVBENCH_TARGET_FIX: dict[int, int] = {
    61: 64, 63: 61, 64: 63,
    281: 282, 282: 283, 283: 281,
    458: 459, 459: 458,
}  # fmt: skip

XSTEST_MODELS: tuple[str, ...] = ("gpt4", "llama2orig")
GPTEACHER_FILES: dict[str, str] = {
    "roleplay": "roleplay-instruct.json",
    "code": "codegen-instruct.json",
}
COCONOT_FILES: dict[str, str] = {
    "contrast": "coconot_contrast_eval.jsonl",
    "eval": "coconot_eval.jsonl",
}
COCONOT_SAFETY_CATEGORY = "Requests with safety concerns"
_DERTA_INSTRUCTION = "### Instruction:"
_DERTA_RESPONSE = "### Response:"


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _read_json(path: Path) -> Any:
    with path.open(encoding="utf-8") as f:
        return json.load(f)


class _HasPrompt(Protocol):
    @property
    def prompt(self) -> str: ...


P = TypeVar("P", bound=_HasPrompt)


def drop_duplicate_prompts(records: Iterable[P]) -> list[P]:
    """Keep the first record of each exact ``prompt`` text, in input order.

    Unlike :func:`training.data.splits.deduplicate` nothing is normalised: prompts that
    differ in case or punctuation (which matters in code) are both kept.
    """
    first: dict[str, P] = {}
    for record in records:
        first.setdefault(record.prompt, record)
    return list(first.values())


def _subset_file(files: dict[str, str], subset: str, what: str) -> str:
    """Return ``files[subset]``, or raise a ``ValueError`` that lists the valid subsets."""
    if subset not in files:
        raise ValueError(f"{what} subset must be one of {sorted(files)}, got {subset!r}")
    return files[subset]


def _join_instruction(instruction: str, extra: str) -> str:
    """An instruction followed, after a blank line, by its input when that is non-empty."""
    prompt = instruction.strip()
    return f"{prompt}\n\n{extra.strip()}" if extra.strip() else prompt


def load_advbench_behaviors(
    data_dir: PathLike = None, *, fix_targets: bool = True
) -> list[HarmfulBehavior]:
    """Load AdvBench ``harmful_behaviors.csv`` (520 goals with "Sure, here is" targets).

    Args:
        data_dir: Data directory override.
        fix_targets: Undo the upstream permutation of 8 targets (see ``ADVBENCH_TARGET_FIX``).

    Returns:
        One record per row, ``source_id`` ``"harmful_behaviors.csv#<row>"`` (0-based).
    """
    rows = _read_csv(data_file("advbench/harmful_behaviors.csv", data_dir))
    targets = [row["target"] for row in rows]
    if fix_targets:
        for row, take_from in ADVBENCH_TARGET_FIX.items():
            targets[row] = rows[take_from]["target"]
    return [
        HarmfulBehavior(row["goal"], target, "advbench", f"harmful_behaviors.csv#{i}")
        for i, (row, target) in enumerate(zip(rows, targets, strict=True))
    ]


def load_advbench_strings(data_dir: PathLike = None) -> list[HarmfulSpan]:
    """Load AdvBench ``harmful_strings.csv`` (574 short harmful output strings)."""
    rows = _read_csv(data_file("advbench/harmful_strings.csv", data_dir))
    return [
        HarmfulSpan(row["target"], "advbench", f"harmful_strings.csv#{i}")
        for i, row in enumerate(rows)
    ]


def load_harmbench_targets(data_dir: PathLike = None) -> dict[str, str]:
    """Load HarmBench ``BehaviorID -> affirmative target`` (400 entries)."""
    return dict(_read_json(data_file("harmbench/harmbench_targets_text.json", data_dir)))


def load_harmbench_behaviors(data_dir: PathLike = None) -> list[HarmfulBehavior]:
    """Load the 80 HarmBench validation text behaviours joined with their targets.

    Contextual behaviours get their context prepended the way HarmBench formats them
    (``context + "\\n\\n---\\n\\n" + behavior``).
    """
    rows = _read_csv(data_file("harmbench/harmbench_behaviors_text_val.csv", data_dir))
    targets = load_harmbench_targets(data_dir)
    records = []
    for row in rows:
        prompt = row["Behavior"]
        if row["ContextString"].strip():
            prompt = f"{row['ContextString']}\n\n---\n\n{prompt}"
        records.append(
            HarmfulBehavior(
                prompt,
                targets.get(row["BehaviorID"]),
                "harmbench",
                row["BehaviorID"],
                row["SemanticCategory"] or None,
            )
        )
    return records


def harmbench_behavior_texts(data_dir: PathLike = None) -> dict[str, str]:
    """BehaviorID -> behaviour text: the val CSV where it has the id, else the bare target."""
    texts = {k: strip_affirmative(v) for k, v in load_harmbench_targets(data_dir).items()}
    rows = _read_csv(data_file("harmbench/harmbench_behaviors_text_val.csv", data_dir))
    texts.update({row["BehaviorID"]: row["Behavior"] for row in rows})
    return texts


def load_harmbench_classifier_val(data_dir: PathLike = None) -> list[LabelledGeneration]:
    """Load HarmBench ``classifier_val_set.json``: 602 generations, label = human majority.

    ``prompt`` is the attack test case; ``behavior`` is the behaviour text (or its id when
    HarmBench publishes no text for it).
    """
    data = _read_json(data_file("harmbench/classifier_val_set.json", data_dir))
    behaviors = harmbench_behavior_texts(data_dir)
    records = []
    for behavior_id, entries in data.items():
        for i, entry in enumerate(entries):
            votes = sum(int(entry[f"human_{k}"]) for k in range(3))
            records.append(
                LabelledGeneration(
                    prompt=entry["test_case"],
                    generation=entry["generation"],
                    label=int(votes >= 2),
                    source="harmbench",
                    source_id=f"classifier_val_set.json#{behavior_id}/{i}",
                    behavior=behaviors.get(behavior_id, behavior_id),
                )
            )
    return records


def load_jbb_behaviors(data_dir: PathLike = None) -> list[HarmfulBehavior]:
    """Load the 100 JailbreakBench behaviours (goal, target, category)."""
    rows = _read_csv(data_file("jailbreakbench/behaviors.csv", data_dir))
    return [
        HarmfulBehavior(row["Goal"], row["Target"], "jbb", f"behaviors.csv#{i}", row["Category"])
        for i, row in enumerate(rows)
    ]


def load_jbb_artifacts(data_dir: PathLike = None) -> list[JailbreakArtifact]:
    """Load all JailbreakBench artifact files (18 x 100 attack attempts, 937 jailbroken).

    Files are read in sorted name order so the result is deterministic.
    """
    folder = data_file("jailbreakbench/artifacts", data_dir)
    files = sorted(folder.glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no *.json artifact files in {folder}")
    records = []
    for path in files:
        payload = _read_json(path)
        params = payload["parameters"]
        for entry in payload["jailbreaks"]:
            records.append(
                JailbreakArtifact(
                    goal=entry["goal"],
                    prompt=entry["prompt"],
                    response=entry["response"],
                    jailbroken=bool(entry["jailbroken"]),
                    method=params["method"],
                    model=params["model"],
                    category=entry["category"],
                    source_id=f"{path.name}#{entry['index']}",
                )
            )
    return records


def _split_derta_prefix(prefix: str) -> str:
    """Return the instruction inside a ``### Instruction: ... ### Response:`` wrapper."""
    body = prefix.strip()
    if not (body.startswith(_DERTA_INSTRUCTION) and body.endswith(_DERTA_RESPONSE)):
        raise ValueError(f"unexpected DeRTa prefix format: {prefix[:60]!r}")
    return body[len(_DERTA_INSTRUCTION) : -len(_DERTA_RESPONSE)].strip()


def load_derta_pairs(data_dir: PathLike = None) -> list[HarmfulPair]:
    """Load DeRTa harmful instruction -> harmful answer pairs (264), wrapper stripped."""
    path = data_file("derta/harmful_pairs.jsonl", data_dir)
    return [
        HarmfulPair(_split_derta_prefix(row["prefix"]), row["text"].strip(), "derta", f"#{i}")
        for i, row in enumerate(_read_jsonl(path))
    ]


def load_xstest_prompts(data_dir: PathLike = None) -> list[XSTestPrompt]:
    """Load the 450 XSTest prompts (250 safe, 200 unsafe contrasts)."""
    rows = _read_csv(data_file("xstest/xstest_prompts.csv", data_dir))
    records = []
    for row in rows:
        label = row["label"]
        if label not in ("safe", "unsafe"):
            raise ValueError(f"XSTest prompt id={row['id']}: unexpected label {label!r}")
        records.append(
            XSTestPrompt(row["prompt"], row["type"], label, row["focus"], f"id={row['id']}")
        )
    return records


def load_xstest_completions(
    data_dir: PathLike = None, *, models: tuple[str, ...] = XSTEST_MODELS
) -> list[XSTestCompletion]:
    """Load labelled XSTest completions (450 per model).

    Args:
        data_dir: Data directory override.
        models: Which completion files to read (``completions_<model>.csv``).
    """
    records = []
    for model in models:
        rows = _read_csv(data_file(f"xstest/completions_{model}.csv", data_dir))
        records.extend(
            XSTestCompletion(
                row["prompt"],
                row["completion"],
                row["type"],
                row["final_label"],
                model,
                f"completions_{model}.csv#{row['id']}",
            )
            for row in rows
        )
    return records


def load_gsm8k(data_dir: PathLike = None, *, split: str = "train") -> list[BenignExample]:
    """Load GSM8K math problems (``split`` is ``"train"`` (7,473) or ``"test"`` (1,319))."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = data_file(f"gsm8k/{split}.jsonl", data_dir)
    return [
        BenignExample(row["question"], row["answer"], "gsm8k", f"{split}.jsonl#{i}")
        for i, row in enumerate(_read_jsonl(path))
    ]


def load_self_instruct(data_dir: PathLike = None) -> list[BenignExample]:
    """Load the 175 self-instruct seed tasks; a non-empty first input is appended to the prompt."""
    path = data_file("self_instruct/seed_tasks.jsonl", data_dir)
    records = []
    for row in _read_jsonl(path):
        instance = row["instances"][0]
        prompt = _join_instruction(row["instruction"], instance["input"])
        records.append(BenignExample(prompt, instance["output"], "self_instruct", row["id"]))
    return records


def _arena_hard_answer(row: dict[str, Any]) -> str:
    """The reference answer of an Arena-Hard answer row (``messages[1].content.answer``)."""
    try:
        return row["messages"][1]["content"]["answer"]
    except (IndexError, KeyError, TypeError) as err:
        raise ValueError(
            f"arena_hard answer uid={row['uid']}: expected messages[1].content.answer, got "
            f"{str(row['messages'])[:80]!r}"
        ) from err


def load_arena_hard(data_dir: PathLike = None) -> list[BenignExample]:
    """Load the 500 Arena-Hard v0.1 prompts with GPT-4-0314 reference answers.

    Prompts keep the order of ``question_v0.1.jsonl``; answers are joined on ``uid``
    (``answer`` is ``None`` for a question without one). ``source_id`` is the ``uid``.
    """
    questions = _read_jsonl(data_file("arena_hard/question_v0.1.jsonl", data_dir))
    answer_rows = _read_jsonl(data_file("arena_hard/gpt-4-0314_answers_v0.1.jsonl", data_dir))
    answers = {row["uid"]: _arena_hard_answer(row) for row in answer_rows}
    return [
        BenignExample(row["prompt"], answers.get(row["uid"]), "arena_hard", row["uid"])
        for row in questions
    ]


def load_gpteacher(data_dir: PathLike = None, *, subset: str = "roleplay") -> list[BenignExample]:
    """Load GPTeacher instructions with their answers.

    Args:
        data_dir: Data directory override.
        subset: ``"roleplay"`` (1,923 rows) or ``"code"`` (4,535 rows, ``codegen-instruct.json``).

    Returns:
        One record per row; a non-empty ``input`` is appended to the instruction after a
        blank line. ``source_id`` is ``"<file>#<row>"``.
    """
    name = _subset_file(GPTEACHER_FILES, subset, "gpteacher")
    rows = _read_json(data_file(f"gpteacher/{name}", data_dir))
    return [
        BenignExample(
            _join_instruction(row["instruction"], row["input"]),
            row["response"],
            "gpteacher",
            f"{name}#{i}",
        )
        for i, row in enumerate(rows)
    ]


def load_nq_open(data_dir: PathLike = None) -> list[OpenQAQuestion]:
    """Load the 3,610 NQ-open dev questions with all their accepted short answers."""
    path = data_file("nq_open/NQ-open.dev.jsonl", data_dir)
    return [
        OpenQAQuestion(row["question"], tuple(row["answer"]), f"NQ-open.dev.jsonl#{i}")
        for i, row in enumerate(_read_jsonl(path))
    ]


def load_coconot(data_dir: PathLike = None, *, subset: str = "contrast") -> list[CoCoNotPrompt]:
    """Load CoCoNot prompts with their categories.

    Args:
        data_dir: Data directory override.
        subset: ``"contrast"`` (379 look-alike prompts that should be answered) or
            ``"eval"`` (1,001 prompts a model should not simply comply with).

    Returns:
        One record per row; an empty ``response`` becomes ``None`` (both files leave it empty).
    """
    name = _subset_file(COCONOT_FILES, subset, "coconot")
    return [
        CoCoNotPrompt(
            row["prompt"], row["category"], row["subcategory"], row["id"], row["response"] or None
        )
        for row in _read_jsonl(data_file(f"coconot/{name}", data_dir))
    ]


def load_coconot_pref(data_dir: PathLike = None) -> list[PreferencePair]:
    """Load the 927 CoCoNot preference rows (contrast prompts that should be answered).

    ``chosen`` complies, ``rejected`` is the over-cautious answer. Eight rows repeat an
    earlier prompt (with other answers); they are kept here.
    """
    path = data_file("coconot/coconot_pref.jsonl", data_dir)
    return [
        PreferencePair(
            row["prompt"],
            row["chosen"],
            row["rejected"],
            "coconot",
            row["id"],
            row["category"],
            row["subcategory"],
        )
        for row in _read_jsonl(path)
    ]


def load_coconot_harmful_prompts(data_dir: PathLike = None) -> list[HarmfulBehavior]:
    """Load the 395 ``Requests with safety concerns`` of ``coconot_eval.jsonl`` as harmful prompts.

    ``target`` is ``None``; ``category`` is the CoCoNot subcategory (e.g. ``"privacy
    violations"``); ``source_id`` is the CoCoNot ``id``. Exact-duplicate prompts are dropped.

    Raises:
        ValueError: The file has no row of that category (the category names changed).
    """
    rows = load_coconot(data_dir, subset="eval")
    records = [
        HarmfulBehavior(row.prompt, None, "coconot", row.source_id, row.subcategory)
        for row in rows
        if row.category == COCONOT_SAFETY_CATEGORY
    ]
    if not records:
        found = sorted({row.category for row in rows})
        raise ValueError(
            f"coconot_eval.jsonl has no {COCONOT_SAFETY_CATEGORY!r} rows; categories: {found}"
        )
    return drop_duplicate_prompts(records)


def load_mitre_frr(data_dir: PathLike = None) -> list[BenignExample]:
    """Load the 750 benign MITRE false-refusal prompts (CyberSecEval FRR), without answers.

    Raises:
        ValueError: A row is marked ``is_malicious`` (the set is benign by construction).
    """
    rows = _read_json(data_file("mitre_frr/mitre_frr.json", data_dir))
    records = []
    for i, row in enumerate(rows):
        if row["is_malicious"] is not False:
            raise ValueError(
                f"mitre_frr.json#{i}: is_malicious={row['is_malicious']!r}, expected false"
            )
        records.append(
            BenignExample(row["mutated_prompt"], None, "mitre_frr", f"mitre_frr.json#{i}")
        )
    return records
