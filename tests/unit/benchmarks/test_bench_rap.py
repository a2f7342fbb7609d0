"""The opt-in ``rap`` family of the attack bench (tiny model), next to plain prefill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.bench import BenchConfig, run_bench
from benchmarks.bench.cells import ALL_ATTACKS, ATTACKS, attack_cells
from training.attacks import rap as rap_module
from training.attacks.harness import AttackConfig


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def test_rap_is_available_but_not_run_by_default() -> None:
    assert "rap" in ALL_ATTACKS and "rap" not in ATTACKS
    assert BenchConfig().attacks == list(ATTACKS)
    names = [c.name for c in attack_cells(["rap", "prefill"], ks=[2], positions=[0], lengths=[3])]
    assert names == ["prefill", "rap"]
    with pytest.raises(ValueError):
        attack_cells(["rap", "bogus"], ks=[2], positions=[0], lengths=[3])


def test_bench_runs_rap_guarded_and_not_searching_once_per_prompt(
    isolated_home,
    tiny_model_dir,
    tiny_probe_dir,
    split_prompts_file,
    tiny_judge_dir,
    tmp_path,
    monkeypatch,
) -> None:
    lengths: list[int] = []
    real = rap_module.rap_prefix

    def spy(*args, **kwargs):
        lengths.append(kwargs["length"])
        return real(*args, **kwargs)

    monkeypatch.setattr(rap_module, "rap_prefix", spy)
    out = tmp_path / "bench"
    harness = AttackConfig(
        attack="bench", probe=str(tiny_probe_dir), strict_probe=False,
        prompts_file=str(split_prompts_file), max_tokens=6, batch_size=4,
        judge=str(tiny_judge_dir), writer=str(tiny_model_dir), writer_tokens=8, out=str(out),
    )  # fmt: skip
    config = BenchConfig(
        models=[str(tiny_model_dir)],
        seeds=[0, 1],
        attacks=["prefill", "rap"],
        ks=[2, 4],
        benign_limit=0,
        utility_n=0,
        harness=harness,
    )
    results = run_bench(config, progress=False)
    assert lengths == [4, 4, 4]  # 3 prompts, searched once to the longest k for both seeds

    cells = {(c["defence"], c["attack"], c["label"]): c for c in results["cells"]}
    for defence in ("none", "guard:rollback"):
        for attack in ("prefill", "rap"):
            for k in (2, 4):
                cell = cells[(defence, attack, f"k={k}")]
                asr = cell["asr"]
                assert asr["n"] == 3 * 2 and 0.0 <= asr["low"] <= asr["rate"] <= asr["high"] <= 1
                assert (cell["trigger_rate"] is None) == (defence == "none")
    assert {k for k in cells if k[1] == "rap"} == {
        (d, "rap", f"k={k}") for d in ("none", "guard:rollback") for k in (2, 4)
    }

    records = _records(out)
    rap = [r for r in records if r["attack"] == "rap"]
    assert len(rap) == 2 * 2 * 3 * 2  # defences x seeds x prompts x ks
    for r in rap:
        assert len(r["meta"]["ranks"]) == r["cell"]["k"] and r["meta"]["top_k"] == 20
    prefill = {
        (r["prompt"], r["cell"]["k"]): r["prefill"] for r in records if r["attack"] == "prefill"
    }
    assert any(prefill[(r["prompt"], r["cell"]["k"])] != r["prefill"] for r in rap)
    assert "| rap | k=4 |" in (out / "results.md").read_text()

    # resume: every generation is read back; the searches live in one run's memory only
    again = run_bench(config, progress=False)
    assert again["run"]["generated"] == 0 and lengths == [4] * 6  # a new run searches again
