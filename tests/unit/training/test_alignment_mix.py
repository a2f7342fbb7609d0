"""The benign mix of the alignment set: hold-out rule, per-source counts, one builder for
every recipe, and the legacy set unchanged."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict

import pytest
import typer

import training.finetune.align as align_module
import training.rwi.run as rwi_run
from training.common.benign import (
    BENIGN_HOLDOUT_SEED,
    EVAL_ONLY_SOURCES,
    SPLIT_SOURCES,
    TRAIN_ONLY_SOURCES,
    benign_eval_prompts,
    benign_holdout,
    benign_role,
    benign_train_prompts,
    evaluation_prompt_texts,
)
from training.common.harmful_split import default_harmful_split
from training.data import (
    BENIGN_SOURCES,
    DEFAULT_THRESHOLD,
    load_benign_prompts,
    load_gsm8k,
    normalize_text,
)
from training.data.splits import max_similarity
from training.finetune.align import AlignConfig, alignment_examples
from training.finetune.cli import mix_options
from training.finetune.mix import (
    DEFAULT_MIX,
    MIX_SOURCES,
    BenignMix,
    mix_benign_examples,
    resolve_mix,
    truncate_answer,
)
from training.finetune.sft_data import SFTExample, benign_examples, drop_long, refusal_examples
from training.rwi.run import AugmentedConfig

# sha256 of the legacy benign part (self-instruct + GSM8K train, seed 0, 100 words, the
# AlignConfig defaults) as built before the benign mix existed: 308 examples.
LEGACY_BENIGN_SHA256 = "1afe28c684750441d5876e526e81a65c9b272f04c01e3b915233339d13a2917d"
# The tiny test tokenizer (384-token vocabulary) needs ~2x the tokens of a real one; at this
# length the default mix fits with it as it does with the default model's tokenizer at 384.
LONG = 1024
SMALL = BenignMix(
    coconot_pref=6, arena_hard=3, gpteacher_roleplay=3, gpteacher_code=3, self_instruct=3, gsm8k=3
)


def _digest(examples: list[SFTExample]) -> str:
    rows = [[e.prompt, e.completion, e.kind, e.source] for e in examples]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _counts(examples: list[SFTExample]) -> dict[str, int]:
    counts = dict.fromkeys(MIX_SOURCES, 0)
    for e in examples:
        if e.kind == "benign":
            counts[e.source] += 1
    return counts


# --- the mix and its config ----------------------------------------------------------------


def test_mix_parse_resolve_and_config_round_trip() -> None:
    assert DEFAULT_MIX.total == 600 and DEFAULT_MIX.coconot_pref == 200
    assert BenignMix.parse("coconot_pref=2, gsm8k=1").counts == {
        **dict.fromkeys(MIX_SOURCES, 0),
        "coconot_pref": 2,
        "gsm8k": 1,
    }
    for bad in ("nq_open=3", "xstest_safe=1", "gsm8k", "gsm8k=x", "gsm8k=-1"):
        with pytest.raises(ValueError):
            BenignMix.parse(bad)
    assert resolve_mix("legacy", None) is None
    assert resolve_mix("default", None) == DEFAULT_MIX.to_dict()
    assert resolve_mix("default", {"gsm8k": 7})["gsm8k"] == 7  # a recorded run keeps its own
    for name, counts in (("custom", None), ("legacy", {"gsm8k": 1}), ("nope", None)):
        with pytest.raises(ValueError):
            resolve_mix(name, counts)
    assert AlignConfig().benign_mix == DEFAULT_MIX.to_dict()  # the documented new default
    assert AlignConfig(mix="legacy").benign_mix is None
    config = AlignConfig(mix="custom", benign_mix={"gsm8k": 5})
    assert AlignConfig(**asdict(config)) == config
    assert AugmentedConfig(**asdict(AugmentedConfig(method="qi"))).benign_mix == (
        DEFAULT_MIX.to_dict()
    )
    assert mix_options("legacy") == {"mix": "legacy", "benign_mix": None}
    assert mix_options("default") == {"mix": "default", "benign_mix": None}
    assert mix_options("gsm8k=2")["benign_mix"]["gsm8k"] == 2
    with pytest.raises(typer.BadParameter):
        mix_options("custom")


def test_truncate_answer_cuts_cleanly_or_not_at_all() -> None:
    short = "One two three."
    assert truncate_answer(f"  {short}\n", 5) == short
    listed = "Here are the steps:\n\n1. Oil the lock well.\n2. Turn the key slowly.\n3. Call a pro."
    cut = truncate_answer(listed, 14)
    assert cut == "Here are the steps:\n\n1. Oil the lock well.\n2. Turn the key slowly."
    # never ends on an announcing colon or inside a code block; no clean cut: None
    assert truncate_answer("Do this:\n" + "word " * 20, 10) is None
    code = "Use this.\n```python\nx = 1\ny = 2\nz = 3\n```\nThen run it and look at the output now."
    assert truncate_answer(code, 13) == "Use this.\n```python\nx = 1\ny = 2\nz = 3\n```"
    assert truncate_answer("A long sentence with many words in it. " * 3, 20) == (
        "A long sentence with many words in it. A long sentence with many words in it."
    )
    assert truncate_answer("no boundary at all " * 10, 8) is None


# --- the hold-out rule ---------------------------------------------------------------------


def test_every_benign_source_has_one_role() -> None:
    roles = {source: benign_role(source) for source in BENIGN_SOURCES}
    assert {s for s, r in roles.items() if r == "eval"} == set(EVAL_ONLY_SOURCES)
    assert {s for s, r in roles.items() if r == "split"} == set(SPLIT_SOURCES)
    assert {s for s, r in roles.items() if r == "train"} == set(TRAIN_ONLY_SOURCES)
    with pytest.raises(ValueError):
        benign_role("advbench")
    assert not set(MIX_SOURCES) & (set(EVAL_ONLY_SOURCES) - {"gsm8k"})  # nq_open, look-alikes


def test_split_sources_are_halved_by_prompt() -> None:
    assert BENIGN_HOLDOUT_SEED == 0
    for source in SPLIT_SOURCES:
        holdout = benign_holdout(source)
        everything = load_benign_prompts(source)
        train_ids = {p.uid for p in holdout.train}
        eval_ids = {p.uid for p in benign_eval_prompts(source)}
        assert not train_ids & eval_ids
        assert train_ids | eval_ids == {p.uid for p in everything}
        assert abs(len(train_ids) - len(eval_ids)) <= 0.05 * len(everything)
        # near-duplicates never straddle the halves
        assert (
            max_similarity(
                [p.prompt for p in holdout.train], [p.prompt for p in holdout.eval]
            ).max()
            < DEFAULT_THRESHOLD
        )
    for source in EVAL_ONLY_SOURCES:
        assert benign_eval_prompts(source) == load_benign_prompts(source)
    assert benign_eval_prompts("self_instruct") == []
    assert not benign_train_prompts("xstest_safe") and not benign_train_prompts("nq_open")


def test_train_prompts_exclude_every_evaluation_prompt() -> None:
    evaluation = {normalize_text(t) for t in evaluation_prompt_texts()}
    for source in ("xstest_safe", "coconot_contrast", "mitre_frr", "gsm8k", "nq_open"):
        assert {normalize_text(p.prompt) for p in load_benign_prompts(source)} <= evaluation
    for source in ("arena_hard", "coconot_pref"):
        held_out = {normalize_text(p.prompt) for p in benign_eval_prompts(source)}
        assert held_out and held_out <= evaluation
    gsm8k_train = {normalize_text(e.prompt) for e in load_gsm8k()}
    for source in MIX_SOURCES:
        train = benign_train_prompts(source)
        assert train and not {normalize_text(p.prompt) for p in train} & evaluation
        if source == "gsm8k":
            assert {normalize_text(p.prompt) for p in train} <= gsm8k_train  # train file only


# --- the alignment set ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_set(tiny_tokenizer) -> list[SFTExample]:
    return alignment_examples(AlignConfig(max_length=LONG), tiny_tokenizer)


def test_default_set_counts_and_no_held_out_prompt(default_set, tiny_tokenizer) -> None:
    assert _counts(default_set) == DEFAULT_MIX.counts
    refusals = [e for e in default_set if e.kind == "refusal"]
    legacy = drop_long(refusal_examples(200), tiny_tokenizer, LONG)
    assert sorted(refusals, key=lambda e: e.prompt) == sorted(legacy, key=lambda e: e.prompt)
    trained = {normalize_text(e.prompt) for e in default_set}
    assert len(trained) == len(default_set)
    assert not trained & {normalize_text(t) for t in evaluation_prompt_texts()}
    for source in ("xstest_safe", "coconot_contrast", "mitre_frr"):  # by name, all of them
        assert not trained & {normalize_text(p.prompt) for p in load_benign_prompts(source)}
    for source in ("arena_hard", "coconot_pref", "gpteacher_roleplay", "gpteacher_code"):
        assert not trained & {normalize_text(p.prompt) for p in benign_eval_prompts(source)}
    splits = default_harmful_split()
    assert not trained & {normalize_text(b.prompt) for b in splits.dev + splits.test}
    benign = [e for e in default_set if e.kind == "benign"]
    # no near-copy of an evaluation prompt either (the filter removes char cosine >= 0.7 with
    # the IDF of its own corpus; here the IDF is fitted on another one, hence the margin)
    closest = max_similarity([e.prompt for e in benign], list(evaluation_prompt_texts()))
    assert closest.max() < DEFAULT_THRESHOLD + 0.1
    # look-alikes learn the complying answer (cut at most), never the over-cautious one
    pref = {p.prompt: p for p in load_benign_prompts("coconot_pref")}
    for e in benign:
        if e.source == "coconot_pref":
            assert pref[e.prompt].answer.strip().startswith(e.completion)
            assert not pref[e.prompt].rejected.strip().startswith(e.completion)
        if e.source == "gsm8k":
            assert "<<" not in e.completion and "####" not in e.completion
        assert len(e.completion.split()) <= DEFAULT_MIX.max_answer_words
    assert all(
        len(tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": e.prompt}, {"role": "assistant", "content": e.completion}],
            tokenize=True,
        )["input_ids"]) <= LONG
        for e in default_set
    )  # fmt: skip


def test_sft_qi_and_rwi_get_the_same_examples(default_set, tiny_tokenizer) -> None:
    assert rwi_run.alignment_examples is align_module.alignment_examples  # one builder
    for method in ("qi", "rwi"):
        config = AugmentedConfig(method=method, max_length=LONG)
        assert alignment_examples(config, tiny_tokenizer) == default_set
    options = {"seed": 3, "n_harmful": 20, "mix": "custom", "benign_mix": SMALL.to_dict()}
    sft = alignment_examples(AlignConfig(**options), tiny_tokenizer)
    assert _counts(sft) == SMALL.counts
    for method in ("qi", "rwi"):
        config = AugmentedConfig(method=method, k=2, max_prefix_tokens=7, **options)
        assert alignment_examples(config, tiny_tokenizer) == sft
    assert alignment_examples(AlignConfig(**options), tiny_tokenizer) == sft  # seeded
    other = alignment_examples(AlignConfig(**{**options, "seed": 4}), tiny_tokenizer)
    assert _counts(other) == SMALL.counts and other != sft


def test_sources_are_drawn_independently() -> None:
    base = mix_benign_examples(SMALL, seed=1)
    more = mix_benign_examples(BenignMix(**{**SMALL.to_dict(), "gsm8k": 9}), seed=1)
    assert [e for e in more if e.source != "gsm8k"] == [e for e in base if e.source != "gsm8k"]
    assert [e for e in more if e.source == "gsm8k"][:3] == [e for e in base if e.source == "gsm8k"]
    with pytest.raises(ValueError, match="self_instruct"):
        mix_benign_examples(BenignMix.parse("self_instruct=1000"))


def test_legacy_mix_reproduces_the_original_set(tiny_tokenizer) -> None:
    config = AlignConfig(mix="legacy")
    benign = benign_examples(None, config.n_gsm8k, max_answer_words=config.max_answer_words)
    assert len(benign) == 308 and _digest(benign) == LEGACY_BENIGN_SHA256
    refusals = refusal_examples(config.n_harmful)
    original = refusals + benign
    random.Random(config.seed + 1).shuffle(original)  # build_sft_examples' order
    expected = drop_long(original, tiny_tokenizer, config.max_length)
    assert alignment_examples(config, tiny_tokenizer) == expected
