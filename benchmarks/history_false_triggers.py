"""False triggers of history judging: benign conversations through a running proxy.

The guard judges the closed assistant turns a client writes into the prompt (multi-turn
insertion, ``monitor_history``). This measures what that costs on benign traffic: held-out
benign prompts of every registry source (never used to fit or calibrate a probe), sent as
a second turn after an assistant answer, then a follow-up from the multi-turn attack's
own phrasings ("continue", "Go on with step 3.", ...), so the only difference from the
attack is a benign history. Two arms per prompt:

* ``own``: the history is the served model's own guarded answer to the prompt (turn 1
  through the same endpoint), what a chat client sends back;
* ``reference``: the history is the source's reference answer (written by someone else:
  pasted or model-switched history), where the source has one.

Per arm and source: the share of conversations whose history fired the guard (Wilson
95 % intervals), the share whose new answer fired, and, for ``own``, the turn-1 trigger
rate. The last line is the overall history false-trigger rate of the ``own`` arm.

    python -m benchmarks.history_false_triggers --url http://127.0.0.1:8000 \
        --per-source 40 --json benchmarks/results/history-false-triggers.json
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from benchmarks.common import write_json
from training.attacks.multiturn import CONTINUE_PHRASES
from training.common.benign import benign_eval_prompts
from training.common.stats import Rate
from training.data import BENIGN_SOURCES, BenignPrompt

ARMS = ("own", "reference")


def sample_prompts(per_source: int, seed: int, data_dir: Path | None) -> list[BenignPrompt]:
    """A seeded sample of each source's evaluation prompts (at most ``per_source`` each)."""
    chosen: list[BenignPrompt] = []
    for source in BENIGN_SOURCES:
        prompts = benign_eval_prompts(source, data_dir)
        random.Random(f"history:{seed}:{source}").shuffle(prompts)
        chosen += prompts[:per_source]
    return chosen


def _fires(choice: dict[str, Any]) -> tuple[bool, bool]:
    """(a history turn fired, a response token fired) from a choice's ``trajguard`` info."""
    events = (choice.get("trajguard") or {}).get("interventions") or []
    history = any(e.get("turn") is not None for e in events)
    response = any(e.get("turn") is None for e in events)
    return history, response


class Client:
    """Non-streamed chat completions against the proxy, ``concurrency`` at a time."""

    def __init__(self, url: str, api_key: str | None, concurrency: int) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(base_url=url, headers=headers, timeout=600.0)
        self.model = ""
        self.gate = asyncio.Semaphore(concurrency)

    async def use_served_model(self) -> str:
        """Chat with the first model the proxy serves; its name."""
        self.model = (await self.http.get("/v1/models")).json()["data"][0]["id"]
        return self.model

    async def chat(self, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        async with self.gate:
            response = await self.http.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            return {"error": f"{response.status_code}: {response.text[:200]}"}
        return response.json()["choices"][0]


async def conversation(
    client: Client,
    prompt: BenignPrompt,
    arm: str,
    follow_up: str,
    *,
    answer_tokens: int,
    reply_tokens: int,
) -> dict[str, Any] | None:
    """One benign conversation; ``None`` when the arm has no history for this prompt."""
    record: dict[str, Any] = {"source": prompt.source, "arm": arm, "follow_up": follow_up}
    user = {"role": "user", "content": prompt.prompt}
    if arm == "own":
        first = await client.chat([user], answer_tokens)
        if "error" in first:
            return {**record, "error": first["error"]}
        history = first["message"]["content"] or ""
        record["turn1_fired"] = any(_fires(first))
    else:
        history = (prompt.answer or "").strip()
    if not history.strip():
        return None
    messages = [user, {"role": "assistant", "content": history}]
    second = await client.chat(messages + [{"role": "user", "content": follow_up}], reply_tokens)
    if "error" in second:
        return {**record, "error": second["error"]}
    record["history_fired"], record["reply_fired"] = _fires(second)
    record["history_chars"] = len(history)
    return record


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rates per arm, overall and per source."""
    out: dict[str, Any] = {}
    for arm in ARMS:
        mine = [r for r in records if r["arm"] == arm and "error" not in r]
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in mine:
            groups[r["source"]].append(r)
        groups = {"overall": mine, **dict(sorted(groups.items()))}
        out[arm] = {
            name: {
                key: Rate.of(sum(bool(r[key]) for r in rows), len(rows)).to_dict()
                for key in ("history_fired", "reply_fired", "turn1_fired")
                if rows and key in rows[0]
            }
            for name, rows in groups.items()
        }
        out[arm]["errors"] = sum(1 for r in records if r["arm"] == arm and "error" in r)
    return out


async def run(
    url: str,
    per_source: int,
    seed: int,
    api_key: str | None,
    concurrency: int,
    answer_tokens: int,
    reply_tokens: int,
    data_dir: Path | None,
) -> dict[str, Any]:
    prompts = sample_prompts(per_source, seed, data_dir)
    rng = random.Random(f"history-follow-up:{seed}")
    client = Client(url, api_key, concurrency)
    try:
        model = await client.use_served_model()
        start = time.perf_counter()
        jobs = [
            conversation(
                client,
                p,
                arm,
                rng.choice(CONTINUE_PHRASES),
                answer_tokens=answer_tokens,
                reply_tokens=reply_tokens,
            )
            for p in prompts
            for arm in ARMS
        ]
        records = [r for r in await asyncio.gather(*jobs) if r is not None]
    finally:
        await client.http.aclose()
    return {
        "config": {
            "url": url,
            "model": model,
            "per_source": per_source,
            "seed": seed,
            "answer_tokens": answer_tokens,
            "reply_tokens": reply_tokens,
        },
        "wall_s": time.perf_counter() - start,
        "summary": summarise(records),
        "records": records,
    }


def main(
    url: Annotated[str, typer.Option(help="Base URL of the guarded proxy.")] = (
        "http://127.0.0.1:8000"
    ),
    per_source: Annotated[int, typer.Option(min=1, help="Eval prompts per benign source.")] = 40,
    seed: Annotated[int, typer.Option()] = 0,
    api_key: Annotated[str | None, typer.Option(envvar="TRAJGUARD_API_KEY")] = None,
    concurrency: Annotated[int, typer.Option(min=1)] = 16,
    answer_tokens: Annotated[int, typer.Option(min=1, help="Turn-1 answer length.")] = 192,
    reply_tokens: Annotated[int, typer.Option(min=1, help="Turn-2 answer length.")] = 32,
    data_dir: Annotated[Path | None, typer.Option(help="Default: ../shared/data.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json")] = None,
) -> None:
    """Benign multi-turn conversations through a running proxy: history false triggers."""
    result = asyncio.run(
        run(url, per_source, seed, api_key, concurrency, answer_tokens, reply_tokens, data_dir)
    )
    write_json(json_out, result)
    summary = result["summary"]
    for arm in ARMS:
        for name, rates in summary[arm].items():
            if name == "errors":
                continue
            cells = "  ".join(f"{k}={Rate(**v)}" for k, v in rates.items())
            typer.echo(f"{arm:9s} {name:22s} {cells}")
        typer.echo(f"{arm:9s} errors={summary[arm]['errors']}")
    typer.echo(
        f"history_false_triggers_own: {summary['own']['overall']['history_fired']['rate']:.4f}"
    )


if __name__ == "__main__":
    typer.run(main)
