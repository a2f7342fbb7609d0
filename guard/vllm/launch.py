"""Start and stop a vLLM OpenAI server in a subprocess (for tests and benchmarks).

The server runs from another Python (the vLLM venv), in its own process group, so
stopping it also ends vLLM's engine-core and worker processes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Self

import httpx


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VLLMServer:
    """``python -m vllm.entrypoints.openai.api_server`` serving ``model`` on a free port.

    Args:
        python: the vLLM venv's interpreter.
        model: model directory.
        env: extra environment (e.g. ``TRAJGUARD_PROBE``).
        args: extra server arguments.
        served_name: the ``model`` name requests use.
        log_path: where the server's output goes (default ``/tmp/trajguard-vllm-PORT.log``).
        start_timeout: seconds to wait for ``/health``.

    Raises:
        RuntimeError: the server exited or did not become healthy in time.
    """

    def __init__(
        self,
        python: str,
        model: str,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        served_name: str = "model",
        log_path: str | Path | None = None,
        start_timeout: float = 900.0,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.served_name = served_name
        self.log_path = Path(log_path or f"/tmp/trajguard-vllm-{self.port}.log")
        command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        command += ["--dtype", "bfloat16", "--port", str(self.port)]
        command += ["--served-model-name", served_name, *args]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                command,
                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._wait_healthy(start_timeout)

    @classmethod
    def attach(cls, url: str, *, served_name: str = "model") -> VLLMServer:
        """A handle on a server started elsewhere (:meth:`stop` leaves it running)."""
        server = cls.__new__(cls)
        server.url, server.served_name, server.proc = url.rstrip("/"), served_name, None
        server.port = int(url.rsplit(":", 1)[1].split("/")[0])
        server.log_path = None
        return server

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"vLLM did not start within {timeout:.0f} s; see {self.log_path}")

    def stop(self) -> None:
        """Terminate the server's process group (idempotent)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def complete(
        self, prompt_ids: list[int], max_tokens: int, *, xargs: dict | None = None, **extra
    ) -> dict:
        """Greedy ``/v1/completions`` with token ids; returns the first choice.

        Raises:
            RuntimeError: the server answered with an error.
        """
        body = {
            "model": self.served_name,
            "prompt": prompt_ids,
            "max_tokens": max_tokens,
            "temperature": 0,
            "return_token_ids": True,
            "skip_special_tokens": False,
            **extra,
        }
        if xargs:
            body["vllm_xargs"] = xargs
        response = httpx.post(f"{self.url}/v1/completions", json=body, timeout=600)
        if response.status_code != 200:
            raise RuntimeError(f"vLLM answered {response.status_code}: {response.text[:300]}")
        return response.json()["choices"][0]
