"""``trajguard bench attacks`` with the multi-turn insertion and evasion families (tiny model)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from benchmarks.bench.cli import app
from training.attacks.evasion import FORMS

runner = CliRunner()


def _args(model: Path, probe: Path, prompts: Path, judge: Path, out: Path) -> list[str]:
    return [
        "attacks", "--model", str(model), "--probe", str(probe), "--no-strict-probe",
        "--prompts", str(prompts), "--limit", "2", "--benign-limit", "0", "--utility-n", "0",
        "--attacks", "multiturn,evasion", "--lengths", "3,6", "--max-tokens", "6",
        "--batch-size", "4", "--judge", str(judge), "--writer", str(model),
        "--writer-tokens", "8", "--out", str(out), "--no-progress",
    ]  # fmt: skip


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_bench_runs_the_multiturn_and_evasion_families(
    isolated_home, tiny_model_dir, tiny_probe_dir, split_prompts_file, tiny_judge_dir, tmp_path
) -> None:
    out = tmp_path / "bench"
    args = _args(tiny_model_dir, tiny_probe_dir, split_prompts_file, tiny_judge_dir, out)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output

    results = json.loads((out / "results.json").read_text())
    # 2 prompts: multiturn 2 variants x 2 lengths, evasion 6 forms; two defences
    assert results["run"]["generated"] == 2 * 2 * (2 * 2 + len(FORMS))
    cells = {(c["defence"], c["attack"], c["label"]): c for c in results["cells"]}
    expected = {
        **{
            ("multiturn", f"variant={v},m={m}"): 2
            for v in ("one_turn", "split_turns")
            for m in (3, 6)
        },
        ("multiturn", "variant=one_turn"): 4,
        ("multiturn", "variant=split_turns"): 4,
        ("multiturn", "all"): 8,
        **{("evasion", f"form={form}"): 2 for form in FORMS},
        # no pooled evasion cell: it would mix in the forms the judges cannot read
    }
    for defence in ("none", "guard:rollback"):
        for (attack, label), n in expected.items():
            cell = cells[(defence, attack, label)]
            asr = cell["asr"]
            assert asr["n"] == n and 0.0 <= asr["low"] <= asr["rate"] <= asr["high"] <= 1.0
            assert asr["high"] > asr["low"]  # a 95 % Wilson interval, never a point
            trigger = cell["trigger_rate"]
            assert (trigger is None) == (defence == "none")
            if trigger is not None:
                assert trigger["n"] == n and trigger["low"] < trigger["high"]
    assert {k for k in cells if k[0] == "none"} == {("none", *k) for k in expected}

    records = _records(out)
    multiturn = [r for r in records if r["attack"] == "multiturn"]
    assert all(r["prefill"] == "" and r["meta"]["turns"][-1]["role"] == "user" for r in multiturn)
    evasion = [r for r in records if r["attack"] == "evasion"]
    assert {r["cell"]["form"] for r in evasion} == set(FORMS)
    for defence in ("none", "guard:rollback"):  # every case is its own sample
        mine = [r["sample"] for r in records if r["defence"] == defence]
        assert len(set(mine)) == len(mine)
    guarded = [r for r in records if r["defence"] == "guard:rollback"]
    assert 0 < sum(r["triggered"] for r in guarded) < len(guarded)  # the guard fires sometimes

    table = (out / "results.md").read_text()
    for row in ("| none | multiturn | variant=one_turn |", "| guard:rollback | evasion | form=base64 |",
                "| multiturn | variant=split_turns,m=6 |"):  # fmt: skip
        assert row in table

    # resume: nothing to generate; a fresh run with the same seed writes the same answers
    assert runner.invoke(app, args).exit_code == 0
    assert json.loads((out / "results.json").read_text())["run"]["generated"] == 0
    again = tmp_path / "again"
    fresh = args[: args.index("--out") + 1] + [str(again), "--no-progress"]
    assert runner.invoke(app, fresh).exit_code == 0
    answers = [
        {(r["defence"], r["sample"]): r["continuation"] for r in rs}
        for rs in (records, _records(again))
    ]
    assert answers[0] == answers[1]


def test_an_endpoint_gets_the_attacks_own_conversation(
    isolated_home, tiny_model_dir, tiny_probe_dir, split_prompts_file, tiny_judge_dir, tmp_path
) -> None:
    """Through a guarded ``trajguard serve`` the two families answer as in the library."""
    from benchmarks.bench import BenchConfig, run_bench
    from benchmarks.serve_load import _start_server
    from guard import load_model
    from server.app import build_app
    from server.config import ServerConfig
    from server.local import LocalGuardEngine
    from training.attacks.harness import AttackConfig, build_engine

    lm = load_model(str(tiny_model_dir))
    decoder = build_engine(lm, tiny_probe_dir, "stop", strict_probe=False)
    app = build_app(ServerConfig(), LocalGuardEngine(decoder, model_name="tiny"), environ={})
    server, thread, url = _start_server(app)
    try:
        harness = AttackConfig(
            attack="bench", probe=str(tiny_probe_dir), policy="stop", strict_probe=False,
            prompts_file=str(split_prompts_file), max_tokens=8, batch_size=3,
            judge=str(tiny_judge_dir), writer=str(tiny_model_dir), writer_tokens=8,
            out=str(tmp_path / "bench"),
        )  # fmt: skip
        config = BenchConfig(
            models=[str(tiny_model_dir), f"{tiny_model_dir}@{url}/v1"],
            attacks=["multiturn", "evasion"],
            lengths=[4],
            benign_limit=0,
            utility_n=0,
            harness=harness,
        )
        run_bench(config, progress=False)
    finally:
        server.should_exit = True
        thread.join(10)
    records = _records(tmp_path / "bench")
    library = {r["sample"]: r for r in records if r["defence"] == "guard:stop"}
    served = [r for r in records if r["defence"] == "served"]
    assert len(served) == len(library) == 3 * 2 + 3 * len(FORMS)
    for r in served:  # no prefill: the proxy sees exactly the conversation the library sees
        twin = library[r["sample"]]
        assert r["continuation"] == twin["continuation"] and r["triggered"] == twin["triggered"]
    assert any(r["triggered"] for r in served) and not all(r["triggered"] for r in served)


def test_a_cases_own_conversation_is_part_of_its_sample_key() -> None:
    """The multi-turn span lives in the prompt ids, not the prefill: a new span is a new sample."""
    from types import SimpleNamespace

    from benchmarks.bench.attacks import _sample_keys
    from benchmarks.bench.cache import digest
    from training.attacks.harness import AttackCase
    from training.common.prompts import AttackPrompt

    ctx = SimpleNamespace(prompts=[AttackPrompt("How?", None, "file", "f#0")])
    cell = {"variant": "one_turn", "m": 4}
    single = AttackCase(0, {"k": 2}, [5, 6])
    spans = [AttackCase(0, cell, [], prompt_ids=ids) for ids in ([1, 2, 3], [1, 2, 4])]
    old, new = (_sample_keys(ctx, [case], seed=0) for case in spans)  # two runs, two spans
    assert old != new
    # the keys of single-turn cases are what they were before cases had their own prompt
    assert _sample_keys(ctx, [single], seed=0) == [f"{digest(['How?', {'k': 2}, [5, 6], 0])}.0"]


def test_headline_leaves_out_the_forms_the_judges_cannot_read() -> None:
    from benchmarks.bench.cli import headline

    def cell(form: str | None, rate: float) -> dict:
        key = {"form": form} if form else {}
        return {
            "grouping": list(key),
            "cell": key,
            "defence": "guard:rollback",
            "asr": {"n": 10, "rate": rate},
        }

    results = {"cells": [cell("french", 0.9), cell("base64", 0.2), cell(None, 0.1)]}
    assert headline(results).endswith(": 0.200")
    results["cells"][1]["cell"]["form"] = "german"
    assert headline(results).endswith(": 0.100")
