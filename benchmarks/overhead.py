"""Guarded vs unguarded decoding speed of the default model, measured side by side.

Both arms run the same :class:`guard.GuardedEngine` loop on the same prompts; the
guarded arm adds the capture hook, the probe dot product and the monitor per step. The
arms alternate (ABBA...) so drift in machine load hits both. The guard's threshold is set
so it never intervenes: interventions would change the work done, not the overhead.
Plain ``model.generate`` is timed too, as a reference for the engine itself.

    python benchmarks/overhead.py --rounds 4 --max-tokens 64 --json results/overhead.json
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

from benchmarks.common import PROMPTS, write_json
from guard import (
    DEFAULT_MODEL,
    GuardConfig,
    GuardedEngine,
    LinearProbe,
    MonitorConfig,
    SamplingParams,
    encode_chat,
    load_model,
)
from guard.assets import default_probe_dir


def _time_engine(
    engine: GuardedEngine, prompts: list[list[int]], params: SamplingParams, batch: int
) -> tuple[int, float]:
    tokens, start = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        tokens += sum(len(r.token_ids) for r in engine.generate(prompts[i : i + batch], params))
    return tokens, time.perf_counter() - start


def _time_hf(model, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    tokens, start = 0, time.perf_counter()
    for prompt in prompts:
        ids = torch.tensor([prompt])
        out = model.generate(
            ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False
        )
        tokens += out.shape[1] - ids.shape[1]
    return tokens, time.perf_counter() - start


def main(
    model: Annotated[str, typer.Option()] = DEFAULT_MODEL,
    probe: Annotated[
        Path | None,
        typer.Option(help="Probe dir (default: the shipped probe of the default model)."),
    ] = None,
    rounds: Annotated[int, typer.Option(min=1)] = 4,
    max_tokens: Annotated[int, typer.Option(min=1)] = 64,
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes (repeatable).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json")] = None,
) -> None:
    """Print tokens/s guarded vs unguarded; the last line is the batch-1 ratio."""
    batch = batch or [1, 4]
    torch.manual_seed(0)
    lm = load_model(model)
    probe_obj = LinearProbe.load(probe or default_probe_dir())
    never = GuardConfig(monitor=MonitorConfig(threshold=1 - 1e-9))
    arms = {
        "unguarded": GuardedEngine(lm.model, lm.tokenizer),
        "guarded": GuardedEngine(lm.model, lm.tokenizer, probe_obj, never),
    }
    prompts = [
        encode_chat(lm.tokenizer, [{"role": "user", "content": p}]).prompt_ids for p in PROMPTS
    ]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    _time_engine(arms["guarded"], prompts[:1], SamplingParams(max_tokens=4), 1)  # warm-up
    results: dict = {}
    for b in batch:
        rates: dict[str, list[float]] = {name: [] for name in arms}
        for r in range(rounds):
            order = list(arms) if r % 2 == 0 else list(reversed(arms))
            for name in order:
                tokens, seconds = _time_engine(arms[name], prompts, params, b)
                rates[name].append(tokens / seconds)
        ratios = [g / u for g, u in zip(rates["guarded"], rates["unguarded"])]
        results[f"batch_{b}"] = {
            "tokens_per_s": {k: statistics.median(v) for k, v in rates.items()},
            "ratio_median": statistics.median(ratios),
            "ratios": ratios,
        }
        typer.echo(
            f"batch {b}: unguarded {results[f'batch_{b}']['tokens_per_s']['unguarded']:.1f} tok/s, "
            f"guarded {results[f'batch_{b}']['tokens_per_s']['guarded']:.1f} tok/s, "
            f"ratio {results[f'batch_{b}']['ratio_median']:.3f} (per round: {', '.join(f'{x:.3f}' for x in ratios)})"
        )
    hf_tokens, hf_seconds = _time_hf(lm.model, prompts, max_tokens)
    results["hf_generate_tokens_per_s"] = hf_tokens / hf_seconds
    typer.echo(f"reference: plain model.generate {hf_tokens / hf_seconds:.1f} tok/s (batch 1)")
    write_json(
        json_out, {"model": model, "max_tokens": max_tokens, "rounds": rounds, "results": results}
    )
    typer.echo(
        f"guarded/unguarded tokens_per_s ratio: {results[f'batch_{batch[0]}']['ratio_median']:.3f}"
    )


if __name__ == "__main__":
    typer.run(main)
