"""An endpoint model: the bench against a real ``trajguard serve`` app over HTTP (uvicorn thread)."""

from __future__ import annotations

import pytest

from benchmarks.bench import BenchConfig, run_bench
from benchmarks.bench.attacks import RECORDS_FILE
from benchmarks.serve_load import _start_server
from guard import load_model
from server.app import build_app
from server.config import ServerConfig
from server.local import LocalGuardEngine
from training.attacks.harness import AttackConfig, build_engine


def test_endpoint_answers_like_the_library(
    isolated_home,
    tiny_model_dir,
    tiny_probe_dir,
    split_prompts_file,
    tiny_judge_dir,
    tmp_path,
    monkeypatch,
) -> None:
    """The proxy, guarded with the same probe and policy, gives the library's direct answers.

    ``stop`` is the policy whose kept tokens the proxy's answer tells exactly.
    """
    import json

    import benchmarks.bench.attacks as bench_attacks

    builds = []
    real_jobs = bench_attacks._jobs
    monkeypatch.setattr(
        bench_attacks, "_jobs", lambda *a, **k: builds.append(a[1].model_id) or real_jobs(*a, **k)
    )

    lm = load_model(str(tiny_model_dir))
    decoder = build_engine(lm, tiny_probe_dir, "stop", strict_probe=False)
    app = build_app(ServerConfig(), LocalGuardEngine(decoder, model_name="tiny"), environ={})
    server, thread, url = _start_server(app)
    try:
        harness = AttackConfig(
            attack="bench",
            probe=str(tiny_probe_dir),
            policy="stop",
            strict_probe=False,
            prompts_file=str(split_prompts_file),
            max_tokens=10,
            batch_size=3,
            judge=str(tiny_judge_dir),
            writer=str(tiny_model_dir),
            writer_tokens=8,
            out=str(tmp_path / "bench"),
        )
        config = BenchConfig(
            models=[str(tiny_model_dir), f"{tiny_model_dir}@{url}/v1"],
            attacks=["direct", "prefill"],
            ks=[3],
            benign_limit=2,
            harness=harness,
        )
        results = run_bench(config, progress=False)
    finally:
        server.should_exit = True
        thread.join(10)

    assert len(builds) == 1  # the local model and its endpoint share one set of cases
    served_label = f"{tiny_model_dir.name}@{url.split('://')[1]}"
    runs = {(b["model"], b["defence"]) for b in results["benign"]}
    assert runs == {
        (tiny_model_dir.name, "none"),
        (tiny_model_dir.name, "guard:stop"),
        (served_label, "served"),
    }
    served_benign = next(b for b in results["benign"] if b["defence"] == "served")
    assert served_benign["utility"] is None and served_benign["false_trigger"]["n"] == 2
    assert results["thresholds"][f"{served_label}|served"] is None

    lines = (tmp_path / "bench" / RECORDS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    library = {r["sample"]: r for r in records if r["defence"] == "guard:stop"}
    served = [r for r in records if r["defence"] == "served"]
    assert len(served) == len(library) == 3 + 3 + 2
    direct = [r for r in served if r["attack"] in ("direct", "benign")]
    for r in direct:  # no prefill: the proxy sees exactly what the library sees
        twin = library[r["sample"]]
        assert r["continuation"] == twin["continuation"]
        assert r["triggered"] == twin["triggered"] and r["success"] == twin["success"]
        assert r["scores"] == pytest.approx(twin["scores"], abs=1e-5)
        assert r["n_new_tokens"] == twin["n_new_tokens"]  # one score per released token
        assert r["leaked_tokens"] == twin["leaked_tokens"]  # stop: kept = released tokens
    assert any(r["triggered"] for r in direct) and not all(r["triggered"] for r in direct)
    assert all(r["triggered"] is not None for r in served)  # the proxy's verdicts came back
