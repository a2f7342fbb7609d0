"""``trajguard serve``: run the OpenAI-compatible guarded proxy with uvicorn."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import typer
import uvicorn

from guard.errors import TrajguardError
from guard.models import DEFAULT_MODEL
from server.app import build_app
from server.auth import resolve_api_keys
from server.backends import build_engine
from server.config import ServerConfig

logger = logging.getLogger(__name__)


def serve(
    model: str = typer.Option(DEFAULT_MODEL, help="Embedded alias, HF directory or cached HF id."),
    probe: Path | None = typer.Option(
        None, help="Probe directory (default: the probe shipped for an embedded alias)."
    ),
    host: str = typer.Option(
        "127.0.0.1", help="Interface to bind; non-loopback hosts require API keys."
    ),
    port: int = typer.Option(8000),
    backend: str = typer.Option(
        "local", help="local (in-process guarded decoding) | vllm (guard an upstream vLLM server)."
    ),
    upstream: str | None = typer.Option(
        None, help="vllm backend: base URL of the upstream vLLM server, e.g. http://127.0.0.1:8001."
    ),
    served_model_name: str | None = typer.Option(None, help="Name clients pass as `model`."),
    shadow_dtype: str = typer.Option(
        "float32", help="vllm backend: shadow scorer dtype, float32 | bfloat16."
    ),
    policy: str = typer.Option("rollback", help="stop | rollback | resample"),
    holdback: int = typer.Option(4, min=0, help="Tokens held back until scored safe."),
    threshold: float | None = typer.Option(None, help="Override the probe's calibrated threshold."),
    on_monitor_error: str = typer.Option("block", help="block (fail closed) | allow"),
    monitor_history: bool = typer.Option(
        True, help="Judge the assistant turns a client wrote into the prompt (multi-turn)."
    ),
    api_keys_file: Path | None = typer.Option(
        None, help="One API key per line (also: $TRAJGUARD_API_KEYS)."
    ),
    allow_unauthenticated: bool = typer.Option(
        False, help="Allow a non-loopback host without API keys."
    ),
    max_concurrent_requests: int = typer.Option(64, min=1),
    max_body_bytes: int = typer.Option(1 << 20, min=1),
    max_prompt_tokens: int | None = typer.Option(None, min=1),
    request_timeout: float = typer.Option(300.0, help="Seconds before a generation is aborted."),
    allow_unguarded_requests: bool = typer.Option(
        False, help='Honour {"trajguard": {"guard": false}}.'
    ),
    log_bodies: bool = typer.Option(
        False, help="Log prompts and completions (at DEBUG). Off by default."
    ),
    threads: int | None = typer.Option(
        None, min=1, help="torch intra-op threads (default: torch's choice)."
    ),
    log_level: str = typer.Option("info"),
) -> None:
    """Serve the guarded model behind an OpenAI-compatible API (/v1/chat/completions, ...)."""
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if log_bodies:
        logging.getLogger("server").setLevel(logging.DEBUG)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        config = ServerConfig(
            host=host,
            port=port,
            backend=backend,
            upstream=upstream,
            upstream_api_key=os.environ.get("TRAJGUARD_UPSTREAM_API_KEY"),
            model=model,
            served_model_name=served_model_name,
            probe=probe,
            shadow_dtype=shadow_dtype,
            policy=policy,
            holdback=holdback,
            threshold=threshold,
            on_monitor_error=on_monitor_error,
            monitor_history=monitor_history,
            api_keys_file=api_keys_file,
            allow_unauthenticated=allow_unauthenticated,
            max_concurrent_requests=max_concurrent_requests,
            max_body_bytes=max_body_bytes,
            max_prompt_tokens=max_prompt_tokens,
            request_timeout_s=request_timeout,
            allow_unguarded_requests=allow_unguarded_requests,
            log_bodies=log_bodies,
        )
        resolve_api_keys(config)  # config errors first, then the (slow) model load
        app = build_app(config, build_engine(config))  # load before binding: fail fast
    except (TrajguardError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    typer.run(serve)
