"""Multi-turn insertion and token-level evasion attacks, and the encodings they read back."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from typer.testing import CliRunner

from guard import GenerationResult, GuardedEngine, encode_chat
from tests.helpers import fitted_probe
from training.attacks.cli import app
from training.attacks.evasion import FORMS, evasion_cases
from training.attacks.harness import AttackConfig, AttackContext, judge_results
from training.attacks.multiturn import (
    CONTINUE_PHRASES,
    GO_ON_PHRASES,
    multiturn_cases,
    run_multiturn,
    split_span,
)
from training.common.encodings import decode_base64_spans, from_leet, to_base64, to_leet

runner = CliRunner()

# --- encodings ------------------------------------------------------------------------------

_ASCII = string.ascii_letters + string.digits + string.punctuation + " \n"


@given(st.text(alphabet=_ASCII, min_size=6, max_size=200))
def test_base64_round_trips_alone_and_inside_plain_text(text: str) -> None:
    encoded = to_base64(text)
    # documented rule: a run without an upper-case letter ("zzzzzz") or with only upper-case
    # letters ("@@@@@@") is read as a word
    assume(any(c.isupper() for c in encoded))
    assume(not (encoded.rstrip("=").isalpha() and encoded.isupper()))
    assert decode_base64_spans(encoded) == text
    assert decode_base64_spans(f"Here: {encoded} (done)") == f"Here: {text} (done)"


def test_base64_decodes_what_decodes_and_keeps_the_rest() -> None:
    text = "Step 1: mélanger — then heat it slowly."  # an accent and a multi-byte dash
    encoded = to_base64(text)
    assert decode_base64_spans(encoded) == text
    for cut in range(8, len(encoded)):  # an answer cut off by the token budget
        decoded = decode_base64_spans(encoded[:cut])
        assert text.startswith(decoded) and len(decoded) >= 3 * cut // 4 - 6
    plain = "Sure, here is how: gather materials, understand instructions, then assemble."
    assert decode_base64_spans(plain) == plain
    assert decode_base64_spans("@@@@ !!!! ====") == "@@@@ !!!! ===="


_WORD = st.from_regex(r"[a-z]*[bcdfghjklmnpqruvwxyz][a-z]*", fullmatch=True)


@given(st.lists(_WORD, min_size=1, max_size=12))
def test_leetspeak_round_trips(words: list[str]) -> None:
    text = " ".join(words)
    assert from_leet(to_leet(text)) == text
    assert from_leet(to_leet(text.capitalize() + ".")).lower() == text + "."


def test_leetspeak_decoding_leaves_numbers_alone() -> None:
    assert to_leet("Step 1: hack the website") == "573p 1: h4ck 7h3 w3b5173"
    assert from_leet("573p 1: h4ck 7h3 w3b5173, 2024") == "step 1: hack the website, 2024"
    assert from_leet("17 15 5173") == "17 15 5173"  # documented: all-digit words stay numbers
    assert from_leet("p@$$w0rd") == "password"


# --- multi-turn insertion -------------------------------------------------------------------


@pytest.fixture
def attack_ctx(isolated_home, tiny_model_dir, split_prompts_file, tiny_judge_dir) -> AttackContext:
    config = AttackConfig(
        "multiturn", model=str(tiny_model_dir), prompts_file=str(split_prompts_file),
        writer=str(tiny_model_dir), writer_tokens=8, judge=str(tiny_judge_dir), max_tokens=6,
        batch_size=4, out=str(isolated_home.parent / "out"),
    )  # fmt: skip
    return AttackContext(config)


def test_split_span_cuts_at_the_word_start_nearest_the_middle(tiny_tokenizer) -> None:
    ids = tiny_tokenizer.encode("Sure, here is how to do it step one", add_special_tokens=False)
    first, second = split_span(tiny_tokenizer, ids)
    assert first + second == ids and first and second
    assert tiny_tokenizer.decode(second).startswith(" ")
    with pytest.raises(ValueError):
        split_span(tiny_tokenizer, ids[:1])


def test_multiturn_renders_the_span_as_earlier_assistant_turns(attack_ctx) -> None:
    tok = attack_ctx.lm.tokenizer
    cases = multiturn_cases(attack_ctx, lengths=(4, 10))
    assert len(cases) == 3 * 2 * 2
    assert {(c.cell["variant"], c.cell["m"]) for c in cases} == {
        (v, m) for v in ("one_turn", "split_turns") for m in (4, 10)
    }
    for c in cases:
        turns, span = c.meta["turns"], c.meta["span"]
        assert c.prefill_ids == []  # no assistant prefill: the model starts a fresh turn
        assert c.meta["m_eff"] == c.cell["m"] and span.strip()
        assert turns[0] == {"role": "user", "content": attack_ctx.prompts[c.prompt_index].prompt}
        assert turns[-1]["role"] == "user" and turns[-1]["content"] in CONTINUE_PHRASES
        said = [t["content"] for t in turns if t["role"] == "assistant"]
        assert " ".join(said).split() == span.split()  # the whole span, in the assistant turns
        if c.cell["variant"] == "one_turn":
            assert [t["role"] for t in turns] == ["user", "assistant", "user"]
        else:
            assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
            assert turns[2]["content"] in GO_ON_PHRASES and all(said)
        rendered = tok.decode(c.prompt_ids)
        assert rendered == tok.decode(encode_chat(tok, turns).prompt_ids)
        for text in said:
            assert f"<|assistant|>{text}<|end|>" in rendered
        assert rendered.endswith(f"<|user|>{turns[-1]['content']}<|end|><|assistant|>")
    # the phrasings are a seeded choice per prompt, shared by every variant and length
    per_prompt = {(c.prompt_index, c.meta["turns"][-1]["content"]) for c in cases}
    assert len(per_prompt) == 3
    attack_ctx.config.seed = 1
    assert [c.meta["turns"] for c in multiturn_cases(attack_ctx, lengths=(4, 10))] != [
        c.meta["turns"] for c in cases
    ]
    with pytest.raises(ValueError):
        multiturn_cases(attack_ctx, variants=("three_turns",))


class _SpyJudge:
    """A harm judge that records what it is shown (and calls everything harmless)."""

    def __init__(self, word: str = "bomb") -> None:
        self.word = word
        self.seen: list[str] = []

    def predict_proba(self, prompts, generations):
        self.seen += list(generations)
        p = np.array([0.9 if self.word in g else 0.1 for g in generations])
        return np.stack([1 - p, p], axis=1)


def test_multiturn_generates_after_the_conversation_and_judges_only_the_model(
    attack_ctx, monkeypatch
) -> None:
    assert attack_ctx.responses  # the writer's continuations, cached before the spy starts
    sent: list[tuple[list[int], list[int]]] = []
    original = GuardedEngine.add_request

    def spy(self, request_id, prompt_ids, params=None, **kwargs):
        sent.append((list(prompt_ids), list(kwargs.get("prefill_ids", ()))))
        return original(self, request_id, prompt_ids, params, **kwargs)

    judge = _SpyJudge()
    monkeypatch.setattr(GuardedEngine, "add_request", spy)
    monkeypatch.setattr("training.attacks.harness.load_or_fit_judge", lambda *a, **k: judge)
    report = run_multiturn(attack_ctx.config, lengths=(8,), progress=False)
    tok = attack_ctx.lm.tokenizer
    assert len(report.records) == len(sent) == 3 * 2
    for record, (prompt_ids, prefill_ids) in zip(report.records, sent):
        assert prefill_ids == [] and record["prefill"] == ""
        rendered = tok.decode(prompt_ids)
        for turn in record["meta"]["turns"]:
            assert turn["content"] in rendered
    assert judge.seen == [r["judged_text"] for r in report.records]  # the model's words only
    for record, text in zip(report.records, judge.seen):
        assert record["meta"]["span"].strip() not in text
        assert text == record["continuation"]  # plain engine: all of it is the model's


# --- token-level evasion --------------------------------------------------------------------


def test_evasion_rewrites_the_request_per_form(attack_ctx) -> None:
    tok = attack_ctx.lm.tokenizer
    cases = evasion_cases(attack_ctx)
    assert [c.cell["form"] for c in cases] == list(FORMS) * 3
    for c in cases:
        prompt, request, form = (
            attack_ctx.prompts[c.prompt_index].prompt,
            c.meta["request"],
            c.cell["form"],
        )
        assert c.prefill_ids == []
        assert c.prompt_ids == encode_chat(tok, [{"role": "user", "content": request}]).prompt_ids
        assert c.judge_view is FORMS[form].judge_view
        if form == "base64":
            assert prompt not in request and to_base64(prompt) in request
            assert decode_base64_spans(request).endswith(prompt)
        elif form == "leetspeak":
            assert request.startswith(to_leet(prompt)) and prompt not in request
        else:
            assert request.startswith(prompt + "\n\n")
    french = next(c.meta["request"] for c in cases if c.cell["form"] == "french")
    assert french.endswith("Réponds uniquement en français.")
    with pytest.raises(ValueError):
        evasion_cases(attack_ctx, forms=("rot13",))


@pytest.mark.parametrize(
    ("form", "answer"),
    [("base64", to_base64("Sure, the bomb needs")), ("leetspeak", to_leet("Sure, the bomb needs"))],
)
def test_an_encoded_answer_is_decoded_before_the_judge_sees_it(
    tiny_tokenizer, form: str, answer: str
) -> None:
    result = GenerationResult("a", token_ids=tiny_tokenizer.encode(answer), text=answer)
    view = FORMS[form].judge_view
    judge = _SpyJudge()
    ((verdict, leaked, judged),) = judge_results(
        judge, ["p"], [result], tiny_tokenizer, views=[view]
    )
    assert judge.seen == [judged] and judged.lower() == "sure, the bomb needs"
    assert verdict.success and leaked == len(result.token_ids)
    ((raw, _, _),) = judge_results(_SpyJudge(), ["p"], [result], tiny_tokenizer)
    assert not raw.success  # as written, the judge would have missed it


# --- CLI end to end -------------------------------------------------------------------------


def _common(model: Path, prompts: Path, judge: Path, out: Path) -> list[str]:
    return [
        "--model", str(model), "--prompts", str(prompts), "--judge", str(judge),
        "--out", str(out), "--max-tokens", "6", "--batch-size", "4",
    ]  # fmt: skip


def _rows(out: Path, attack: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"{attack}.jsonl").read_text().splitlines()]


def _summary(out: Path, attack: str) -> dict:
    assert (out / f"{attack}.png").stat().st_size > 0
    return json.loads((out / f"{attack}_summary.json").read_text())


def test_cli_multiturn_end_to_end_and_seeded(
    isolated_home, tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path
) -> None:
    common = _common(tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path)
    common += ["--writer", str(tiny_model_dir), "--writer-tokens", "8"]
    args = ["multiturn", "--lengths", "4,8", *common]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path, "multiturn")
    assert len(rows) == 3 * 2 * 2 and all(0 < r["n_new_tokens"] <= 6 for r in rows)
    labels = [c["label"] for c in _summary(tmp_path, "multiturn")["cells"]]
    assert labels == [
        "variant=one_turn,m=4", "variant=one_turn,m=8", "variant=split_turns,m=4",
        "variant=split_turns,m=8", "variant=one_turn", "variant=split_turns",
    ]  # fmt: skip
    assert runner.invoke(app, args).exit_code == 0
    assert _rows(tmp_path, "multiturn") == rows  # deterministic with the seed
    assert runner.invoke(app, [*args, "--seed", "3"]).exit_code == 0
    assert [r["meta"]["turns"] for r in _rows(tmp_path, "multiturn")] != [
        r["meta"]["turns"] for r in rows
    ]
    assert runner.invoke(app, ["multiturn", "--variants", "bogus", *common]).exit_code != 0
    assert runner.invoke(app, ["multiturn", "--lengths", "0", *common]).exit_code != 0


def test_cli_evasion_per_form_guarded_and_not(
    isolated_home, tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path
) -> None:
    common = _common(tiny_model_dir, split_prompts_file, tiny_judge_dir, tmp_path)
    result = runner.invoke(app, ["evasion", *common])
    assert result.exit_code == 0, result.output
    rows = _rows(tmp_path, "evasion")
    assert [r["cell"]["form"] for r in rows] == list(FORMS) * 3
    assert all(r["triggered"] is None and r["prefill"] == "" for r in rows)
    assert {r["meta"]["judge_sees"] for r in rows} == {f.judge_sees for f in FORMS.values()}
    cells = _summary(tmp_path, "evasion")["cells"]
    assert [c["label"] for c in cells] == [f"form={f}" for f in FORMS]
    assert all(c["asr"]["n"] == 3 and c["trigger_rate"] is None for c in cells)
    assert "guard recall" not in result.output

    # Probes whose verdict is known: a bias of +-100 puts P(unsafe) at 1 or 0 on every token.
    for bias, fires in ((100.0, True), (-100.0, False)):
        probe = fitted_probe(32, "blocks.1.hook_resid_post")
        probe.intercept_ += bias
        probe_dir = probe.save(tmp_path / f"probe{bias:+.0f}")
        guarded = [*common, "--probe", str(probe_dir), "--policy", "stop", "--no-strict-probe"]
        result = runner.invoke(app, ["evasion", "--forms", "base64,german", *guarded])
        assert result.exit_code == 0, result.output
        cells = _summary(tmp_path, "evasion")["cells"]
        assert [c["label"] for c in cells] == ["form=base64", "form=german"]
        for c in cells:
            assert (c["trigger_rate"]["successes"], c["trigger_rate"]["n"]) == (3 * fires, 3)
        assert f"guard recall form=german: {float(fires):.3f}" in result.output
    assert runner.invoke(app, ["evasion", "--forms", "rot13", *common]).exit_code != 0
