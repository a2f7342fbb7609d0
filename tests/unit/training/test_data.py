"""Loaders, data-dir resolution, pools and prompt files of training.data (reads ../shared/data)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from training import data as D
from training.data.paths import default_data_dir
from training.data.text import normalize_text, strip_affirmative
from training.judge.refusal import is_refusal

ROW_COUNTS = [
    (D.load_advbench_behaviors, 520),
    (D.load_advbench_strings, 574),
    (D.load_harmbench_behaviors, 80),
    (D.load_harmbench_targets, 400),
    (D.load_harmbench_classifier_val, 602),
    (D.load_jbb_behaviors, 100),
    (D.load_jbb_artifacts, 1800),
    (D.load_derta_pairs, 264),
    (D.load_xstest_prompts, 450),
    (D.load_xstest_completions, 900),
    (D.load_self_instruct, 175),
    (D.load_gsm8k, 7473),
    (D.load_arena_hard, 500),
    (D.load_gpteacher, 1923),
    (D.load_nq_open, 3610),
    (D.load_coconot, 379),
    (D.load_coconot_pref, 927),
    (D.load_mitre_frr, 750),
    (D.load_coconot_harmful_prompts, 395),
]


@pytest.mark.parametrize(
    ("loader", "expected"), ROW_COUNTS, ids=lambda x: getattr(x, "__name__", "")
)
def test_row_counts_match_readme(loader, expected: int) -> None:
    assert len(loader()) == expected


def test_gsm8k_test_split_and_bad_split() -> None:
    assert len(D.load_gsm8k(split="test")) == 1319
    with pytest.raises(ValueError, match="split"):
        D.load_gsm8k(split="validation")


def test_jbb_artifacts_jailbroken_count_and_provenance() -> None:
    artifacts = D.load_jbb_artifacts()
    assert sum(a.jailbroken for a in artifacts) == 937
    assert len({a.source_id for a in artifacts}) == 1800
    assert len({(a.method, a.model) for a in artifacts}) == 18  # one file per (method, model)


def test_harmbench_classifier_labels_are_human_majority() -> None:
    records = D.load_harmbench_classifier_val()
    assert sum(r.label for r in records) == 273  # 202 unanimous + 71 two-of-three
    assert all(r.behavior and r.source == "harmbench" for r in records)


def test_xstest_labels() -> None:
    prompts = {p.prompt: p.label for p in D.load_xstest_prompts()}
    assert Counter(prompts.values()) == {"safe": 250, "unsafe": 200}
    completions = D.load_xstest_completions()
    joined = [c for c in completions if c.prompt in prompts]
    assert len(joined) >= 890
    assert all(c.unsafe_prompt == (prompts[c.prompt] == "unsafe") for c in joined)
    labelled = D.labelled_from_xstest(completions)
    # harmful = full compliance with an unsafe prompt: exactly one (a GPT-4 answer)
    assert sum(r.label for r in labelled) == 1


def test_labelled_generations_sources() -> None:
    records = D.load_labelled_generations()
    counts = Counter(r.source for r in records)
    assert counts == {"harmbench": 602, "jbb": 1637, "xstest": 900}  # JBB: 163 had no response
    assert all(r.label in (0, 1) for r in records)
    with pytest.raises(ValueError, match="unknown labelled source"):
        D.load_labelled_generations(sources=["advbench"])


def _overlap(goal: str, target: str) -> float:
    a = set(normalize_text(goal).split())
    b = set(normalize_text(strip_affirmative(target)).split())
    return len(a & b) / len(a | b)


FIX_GROUPS = [(61, 63, 64), (281, 282, 283), (458, 459)]


@pytest.mark.parametrize("group", FIX_GROUPS)
def test_advbench_permuted_targets_are_fixed(group: tuple[int, ...]) -> None:
    fixed = D.load_advbench_behaviors()
    raw = D.load_advbench_behaviors(fix_targets=False)
    for row in group:
        own = _overlap(fixed[row].prompt, fixed[row].target)
        others = [_overlap(fixed[row].prompt, fixed[o].target) for o in group if o != row]
        assert own > max(others), (row, fixed[row])
        assert own >= 0.35
        # the raw file really is wrong on this row
        assert _overlap(raw[row].prompt, raw[row].target) < own
    # the fix is a permutation: it moves targets, it does not drop or duplicate them
    assert sorted(fixed[r].target for r in group) == sorted(raw[r].target for r in group)


def test_advbench_fix_semantics() -> None:
    rows = D.load_advbench_behaviors()
    assert "hit-and-run" in rows[61].prompt and "hit-and-run" in rows[61].target
    assert "credit card" in rows[282].prompt and "credit card" in rows[282].target
    assert "fake ID" in rows[459].prompt and "fake ID" in rows[459].target
    untouched = D.load_advbench_behaviors(fix_targets=False)
    changed = [i for i, (a, b) in enumerate(zip(rows, untouched)) if a.target != b.target]
    assert changed == sorted(D.ADVBENCH_TARGET_FIX)


def test_derta_wrapper_is_stripped() -> None:
    pairs = D.load_derta_pairs()
    for pair in pairs:
        assert pair.prompt and pair.response
        assert "###" not in pair.prompt and "Instruction:" not in pair.prompt
        assert not pair.response.startswith(" ")


def test_harmbench_behaviors_join_targets() -> None:
    behaviors = D.load_harmbench_behaviors()
    assert all(b.target and b.target.startswith("Sure") for b in behaviors)
    contextual = [b for b in behaviors if "\n\n---\n\n" in b.prompt]
    assert contextual, "contextual behaviours carry their context"


def test_other_subsets_and_bad_subsets() -> None:
    assert len(D.load_gpteacher(subset="code")) == 4535
    assert len(D.load_coconot(subset="eval")) == 1001
    with pytest.raises(ValueError, match="gpteacher subset must be one of"):
        D.load_gpteacher(subset="codegen-instruct")
    with pytest.raises(ValueError, match="coconot subset must be one of"):
        D.load_coconot(subset="pref")


# --- benign sources ------------------------------------------------------------------------

# README row counts; coconot_pref has 927 rows but 8 repeat an earlier prompt; gsm8k is the
# held-out test split.
BENIGN_COUNTS = {
    "arena_hard": 500,
    "gpteacher_roleplay": 1923,
    "gpteacher_code": 4535,
    "nq_open": 3610,
    "self_instruct": 175,
    "gsm8k": 1319,
    "coconot_contrast": 379,
    "coconot_pref": 927 - 8,
    "mitre_frr": 750,
    "xstest_safe": 250,
}
WITH_ANSWERS = {"arena_hard", "gpteacher_roleplay", "gpteacher_code", "nq_open"}
WITH_ANSWERS |= {"self_instruct", "gsm8k", "coconot_pref"}


def _jsonl(relative: str) -> list[dict]:
    lines = D.data_file(relative).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.fixture(scope="module")
def benign() -> dict[str, list[D.BenignPrompt]]:
    return {source: D.load_benign_prompts(source) for source in D.BENIGN_SOURCES}


def test_benign_source_counts(benign: dict[str, list[D.BenignPrompt]]) -> None:
    assert {source: len(records) for source, records in benign.items()} == BENIGN_COUNTS
    assert list(D.BENIGN_SOURCES) == list(BENIGN_COUNTS)
    assert set(D.LOOKALIKE_SOURCES) < set(D.BENIGN_SOURCES)


def test_benign_records_are_well_formed(benign: dict[str, list[D.BenignPrompt]]) -> None:
    for source, records in benign.items():
        assert all(r.source == source and r.prompt.strip() for r in records), source
        assert len({r.prompt for r in records}) == len(records), source  # no exact duplicates
        assert len({r.source_id for r in records}) == len(records), source
    uids = [r.uid for records in benign.values() for r in records]
    assert len(set(uids)) == len(uids)


def test_benign_reference_answers(benign: dict[str, list[D.BenignPrompt]]) -> None:
    for source, records in benign.items():
        if source in WITH_ANSWERS:
            assert all(r.answer and r.answer.strip() for r in records), source
        else:
            assert all(r.answer is None for r in records), source
        assert all((r.rejected is not None) == (source == "coconot_pref") for r in records)
    assert all(r.rejected.strip() for r in benign["coconot_pref"])


def test_benign_prompts_are_deterministic() -> None:
    for source in ("gpteacher_roleplay", "coconot_pref"):
        assert D.load_benign_prompts(source) == D.load_benign_prompts(source)


def test_benign_sources_reuse_existing_loaders(benign: dict[str, list[D.BenignPrompt]]) -> None:
    safe = [p.prompt for p in D.load_xstest_prompts() if p.label == "safe"]
    assert [r.prompt for r in benign["xstest_safe"]] == safe
    gsm8k = D.load_gsm8k(split=D.GSM8K_SPLIT)
    assert [(r.prompt, r.answer) for r in benign["gsm8k"]] == [(b.prompt, b.answer) for b in gsm8k]
    si = D.load_self_instruct()
    assert [(r.prompt, r.answer) for r in benign["self_instruct"]] == [
        (b.prompt, b.answer) for b in si
    ]


def test_arena_hard_answers_are_joined_on_uid(benign: dict[str, list[D.BenignPrompt]]) -> None:
    rows = {row["uid"]: row for row in _jsonl("arena_hard/gpt-4-0314_answers_v0.1.jsonl")}
    for record in benign["arena_hard"]:
        messages = rows[record.source_id]["messages"]
        assert messages[0]["content"] == record.prompt
        assert messages[1]["content"]["answer"] == record.answer
    first = benign["arena_hard"][0]  # question file order, not the (uid-sorted) answer file's
    assert first.prompt.startswith("Use ABC notation") and first.answer.startswith("X:1")


def test_gpteacher_joins_instruction_and_input() -> None:
    rows = json.loads(D.data_file("gpteacher/codegen-instruct.json").read_text(encoding="utf-8"))
    first = D.load_gpteacher(subset="code")[0]
    assert first.prompt == f"{rows[0]['instruction']}\n\n{rows[0]['input']}"
    assert first.answer == rows[0]["response"]
    assert first.source_id == "codegen-instruct.json#0"
    no_input = next(i for i, row in enumerate(rows) if not row["input"].strip())
    assert D.load_gpteacher(subset="code")[no_input].prompt == rows[no_input]["instruction"]


def test_nq_open_keeps_all_answers(benign: dict[str, list[D.BenignPrompt]]) -> None:
    questions = D.load_nq_open()
    assert all(q.answers for q in questions)
    assert sum(len(q.answers) > 1 for q in questions) > 1000
    assert [r.answer for r in benign["nq_open"]] == [q.answers[0] for q in questions]


def test_coconot_pref_keeps_first_of_duplicate_prompts(
    benign: dict[str, list[D.BenignPrompt]],
) -> None:
    pairs = D.load_coconot_pref()
    kept = {r.source_id for r in benign["coconot_pref"]}
    first_ids = {}
    for pair in pairs:
        first_ids.setdefault(pair.prompt, pair.source_id)
    assert kept == set(first_ids.values())
    by_id = {p.source_id: p for p in pairs}
    for record in benign["coconot_pref"]:
        assert (record.answer, record.rejected) == (
            by_id[record.source_id].chosen,
            by_id[record.source_id].rejected,
        )


def test_coconot_contrast_categories(benign: dict[str, list[D.BenignPrompt]]) -> None:
    counts = Counter(r.category for r in benign["coconot_contrast"])
    assert counts[D.COCONOT_SAFETY_CATEGORY] == 149  # the safety look-alikes


def test_mitre_frr_is_all_benign(tmp_path: Path) -> None:
    rows = json.loads(D.data_file("mitre_frr/mitre_frr.json").read_text(encoding="utf-8"))
    assert len(rows) == 750 and not any(row["is_malicious"] for row in rows)
    (tmp_path / "mitre_frr").mkdir()
    bad = [{"mutated_prompt": "x", "is_malicious": True, "attack_type": "t", "model": "m"}]
    (tmp_path / "mitre_frr" / "mitre_frr.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="is_malicious=True"):
        D.load_benign_prompts("mitre_frr", data_dir=tmp_path)


def test_coconot_harmful_prompts_are_the_safety_category(
    benign: dict[str, list[D.BenignPrompt]],
) -> None:
    rows = _jsonl("coconot/coconot_eval.jsonl")
    safety = {r["id"]: r for r in rows if r["category"] == "Requests with safety concerns"}
    harmful = D.load_coconot_harmful_prompts()
    assert len(harmful) == len(safety) == 395
    for h in harmful:
        assert h.source == "coconot" and h.target is None and h.prompt.strip()
        assert safety[h.source_id]["prompt"] == h.prompt
        assert safety[h.source_id]["subcategory"] == h.category
    coconot_benign = {r.prompt for s in ("coconot_contrast", "coconot_pref") for r in benign[s]}
    assert not coconot_benign & {h.prompt for h in harmful}


def test_coconot_harmful_prompts_need_the_category(tmp_path: Path) -> None:
    (tmp_path / "coconot").mkdir()
    row = {"id": "a", "category": "Safety", "subcategory": "s", "prompt": "p", "response": ""}
    (tmp_path / "coconot" / "coconot_eval.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="categories: \\['Safety'\\]"):
        D.load_coconot_harmful_prompts(tmp_path)


def test_unknown_benign_source_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown benign source 'advbench'; choose from"):
        D.load_benign_prompts("advbench")
    with pytest.raises(D.DataNotFoundError, match="question_v0.1.jsonl"):
        D.load_benign_prompts("arena_hard", data_dir=tmp_path)


# --- data-dir resolution -------------------------------------------------------------------


def test_default_data_dir_is_beside_the_clone() -> None:
    repo_root = Path(D.__file__).resolve().parents[2]
    assert default_data_dir() == (repo_root.parent / "shared" / "data").resolve()


def test_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(D.DATA_ENV_VAR, str(tmp_path / "env"))
    assert D.resolve_data_dir() == tmp_path / "env"
    assert D.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(D.DATA_ENV_VAR)
    assert D.resolve_data_dir() == default_data_dir()


def test_missing_file_error_names_path_and_env(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(D.DATA_ENV_VAR, str(tmp_path))
    with pytest.raises(D.DataNotFoundError) as excinfo:
        D.load_advbench_behaviors()
    message = str(excinfo.value)
    assert str(tmp_path / "advbench" / "harmful_behaviors.csv") in message
    assert "TRAJGUARD_DATA" in message
    assert isinstance(excinfo.value, FileNotFoundError)


def test_env_var_points_loaders_elsewhere(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "advbench").mkdir()
    (tmp_path / "advbench" / "harmful_strings.csv").write_text('target\n"x, y"\nz\n')
    monkeypatch.setenv(D.DATA_ENV_VAR, str(tmp_path))
    spans = D.load_advbench_strings()
    assert [s.text for s in spans] == ["x, y", "z"]


# --- pools ---------------------------------------------------------------------------------


def test_refusal_pool_lengths_and_styles() -> None:
    pool = D.refusal_pool(seed=0, n_long=16)
    styles = Counter(r.style for r in pool)
    assert styles["short"] >= 20 and styles["medium"] >= 10 and styles["long"] == 16
    assert min(r.n_words for r in pool) <= 6
    longs = [r for r in pool if r.style == "long"]
    assert all(r.n_words >= 128 for r in longs)  # >= 128 words, so >= 128 subword tokens
    assert len({r.text for r in pool}) == len(pool)
    assert all(is_refusal(r.text) for r in pool), (
        "the refusal judge must recognise every pool entry"
    )


def test_long_refusals_are_seeded() -> None:
    assert D.compose_long_refusal(7) == D.compose_long_refusal(7)
    assert D.compose_long_refusal(7) != D.compose_long_refusal(8)
    assert len(D.compose_long_refusal(3, min_words=300).split()) >= 300
    assert D.refusal_pool(seed=1) == D.refusal_pool(seed=1)
    assert D.refusal_pool(seed=1) != D.refusal_pool(seed=2)


@pytest.fixture(scope="module")
def spans() -> list[D.HarmfulSpan]:
    return D.harmful_span_pool(max_words=32)


def test_span_pool_provenance(spans: list[D.HarmfulSpan]) -> None:
    assert set(Counter(s.source for s in spans)) == {
        "advbench",
        "harmbench",
        "jbb",
        "jbb_artifacts",
        "derta",
    }
    assert all(s.text and s.source and s.source_id for s in spans)
    assert all(len(s.text.split()) <= 32 for s in spans if s.source in ("jbb_artifacts", "derta"))
    jailbroken = {a.source_id for a in D.load_jbb_artifacts() if a.jailbroken}
    from_artifacts = [s for s in spans if s.source == "jbb_artifacts"]
    assert len(from_artifacts) > 600  # 937 jailbroken, minus repeated 32-word openings
    assert all(s.source_id in jailbroken for s in from_artifacts)
    assert len({normalize_text(s.text) for s in spans}) == len(spans)


def test_span_pool_excludes_held_out_prompts(spans: list[D.HarmfulSpan]) -> None:
    goal = D.load_jbb_behaviors()[0].prompt
    assert any(s.prompt == goal for s in spans)
    kept = D.harmful_span_pool(max_words=32, exclude_prompts=[goal.upper()])
    assert not any(s.prompt == goal for s in kept)
    assert len(kept) < len(spans)


# --- prompt files --------------------------------------------------------------------------


def test_prompt_file_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = tmp_path / "p.csv"
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows(
            [["id", "prompt"], ["1", "How do I bake bread?"], ["2", ""], ["3", "Hi, there"]]
        )
    assert D.load_prompt_file(csv_path) == ["How do I bake bread?", "Hi, there"]
    jsonl_path = tmp_path / "p.jsonl"
    jsonl_path.write_text("\n".join(json.dumps({"goal": g}) for g in ["a", "b"]) + "\n\n")
    assert D.load_prompt_file(jsonl_path) == ["a", "b"]


def test_prompt_file_reads_upstream_csvs() -> None:
    assert len(D.load_prompt_file(D.data_file("advbench/harmful_behaviors.csv"))) == 520
    assert len(D.load_prompt_file(D.data_file("jailbreakbench/behaviors.csv"))) == 100  # "Goal"


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("p.csv", "id,text\n1,hello\n", "no 'prompt' or 'goal' column"),
        ("p.csv", "", "no rows"),
        ("p.jsonl", "", "no rows"),
        ("p.csv", "prompt\n\n", "no rows"),
        ("p.csv", 'prompt,x\n"",1\n', "no non-empty prompts"),
        ("p.jsonl", '{"prompt": "a"}\nnot json\n', "invalid JSON"),
        ("p.jsonl", '["a"]\n', "JSON object"),
        ("p.txt", "prompt\nhello\n", "unsupported format"),
        ("p.json", '[{"prompt": "a"}]', "unsupported format"),
    ],
)
def test_prompt_file_errors(tmp_path: Path, name: str, content: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(D.PromptFileError, match=match):
        D.load_prompt_file(path)


def test_prompt_file_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        D.load_prompt_file(tmp_path / "nope.csv")
