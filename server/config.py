"""``ServerConfig``: every setting of the proxy, validated once at the edge (pydantic)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from guard.config import GuardConfig, MonitorConfig, PolicyConfig
from guard.models import DEFAULT_MODEL


class ServerConfig(BaseModel):
    """Settings of ``trajguard serve`` (frozen; constructing it reads no files or env vars).

    Args:
        host: interface to bind; auth may only be off on a loopback host.
        backend: ``local`` (in-process guarded decoding) or ``vllm`` (guard an upstream
            vLLM server with a shadow scorer; needs ``upstream``).
        upstream: base URL of the upstream OpenAI-compatible vLLM server.
        model: embedded alias, HF directory or cached HF id (for ``vllm``: the same model
            the upstream serves; only its tokenizer and layers up to the probe are loaded).
        served_model_name: the ``model`` name clients use (default: ``model``).
        probe: probe directory (default: the probe shipped for the default model).
        shadow_dtype: dtype of the ``vllm`` backend's shadow scorer (``bfloat16``: faster on
            CPUs with bf16 instructions, and the dtype the in-engine plugin scores in).
        monitor_history: judge the closed assistant turns a client wrote into the prompt
            (multi-turn insertion), each under a fresh monitor.
        api_keys: accepted bearer keys (``TRAJGUARD_API_KEYS`` and ``api_keys_file`` add more).
        allow_unauthenticated: allow a non-loopback host without any API key.
        max_prompt_tokens: larger prompts are refused with 413 (``None``: context only).
        request_timeout_s: a generation running longer is aborted with an error.
        sse_ping_interval_s: keep-alive comment frames while a stream is idle.
        sse_send_timeout_s: close a stream whose client stopped reading for this long.
        allow_unguarded_requests: honour ``{"trajguard": {"guard": false}}``.
        log_bodies: log prompts and completions at DEBUG (off: they are never logged).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    backend: Literal["local", "vllm"] = "local"
    upstream: str | None = None
    upstream_api_key: str | None = Field(None, repr=False)
    model: str = DEFAULT_MODEL
    served_model_name: str | None = None
    probe: Path | None = None
    shadow_dtype: Literal["float32", "bfloat16"] = "float32"
    policy: Literal["stop", "rollback", "resample"] = "rollback"
    holdback: int = Field(4, ge=0)
    threshold: float | None = Field(None, gt=0.0, lt=1.0)
    max_recoveries: int = Field(2, ge=0)
    on_monitor_error: Literal["block", "allow"] = "block"
    monitor_history: bool = True
    api_keys: tuple[str, ...] = Field((), repr=False)
    api_keys_file: Path | None = None
    allow_unauthenticated: bool = False
    max_concurrent_requests: int = Field(64, ge=1)
    max_body_bytes: int = Field(1 << 20, ge=1)
    max_prompt_tokens: int | None = Field(None, ge=1)
    max_n: int = Field(8, ge=1)
    default_max_tokens: int = Field(256, ge=1)
    default_temperature: float = Field(1.0, ge=0.0, le=2.0)
    request_timeout_s: float = Field(300.0, gt=0.0)
    sse_ping_interval_s: float | None = Field(15.0, gt=0.0)
    sse_send_timeout_s: float | None = Field(60.0, gt=0.0)
    allow_unguarded_requests: bool = False
    log_bodies: bool = False

    @model_validator(mode="after")
    def _backend_needs(self) -> ServerConfig:
        if self.backend == "vllm" and not self.upstream:
            raise ValueError("backend 'vllm' needs upstream (the vLLM server's base URL)")
        if self.backend == "vllm" and self.policy == "resample":
            raise ValueError("backend 'vllm' supports the stop and rollback policies, not resample")
        return self

    @property
    def model_name(self) -> str:
        """The name clients pass as ``model``."""
        return self.served_model_name or self.model

    @property
    def is_loopback(self) -> bool:
        """Whether ``host`` is only reachable from this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def guard_config(self) -> GuardConfig:
        """The guard settings of the local backend."""
        return GuardConfig(
            monitor=MonitorConfig(threshold=self.threshold),
            policy=PolicyConfig(kind=self.policy, max_recoveries=self.max_recoveries),
            holdback=self.holdback,
            on_monitor_error=self.on_monitor_error,
            monitor_history=self.monitor_history,
        )
