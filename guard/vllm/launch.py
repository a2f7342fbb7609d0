"""Start and stop a vLLM OpenAI server in a subprocess (for tests and benchmarks).

The server runs from another Python (the vLLM venv), in its own process group, so
stopping it also ends vLLM's engine-core and worker processes. No server outlives this
process short of a SIGKILL: the servers still running when it exits normally, or on
SIGTERM or SIGINT, are stopped first (see :func:`stop_all`).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Self

import httpx

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SIGNAL_GRACE_S = 10.0  # a signalled process has little time left: SIGKILL sooner
_Handler = Callable[[int, FrameType | None], object] | int | None

_live: set[VLLMServer] = set()  # started by this process and not stopped yet
_previous: dict[int, _Handler] = {}  # the handlers ours replaced, by signal


def stop_all(timeout: float = 60.0) -> None:
    """Stop every :class:`VLLMServer` this process started and has not stopped.

    Runs at interpreter exit and on SIGTERM/SIGINT while a server is live.
    """
    for server in list(_live):
        server.stop(timeout)


def _on_stop_signal(signum: int, frame: FrameType | None) -> None:
    """Stop the servers, then do what the replaced handler would have done.

    A default SIGTERM becomes ``SystemExit(128 + signum)`` instead of an instant death,
    so ``finally`` blocks and context managers still run.
    """
    previous = _previous.get(signum, signal.SIG_DFL)
    stop_all(SIGNAL_GRACE_S)  # the last stop restores the previous handlers
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _track(server: VLLMServer) -> None:
    _live.add(server)
    if not _in_main_thread():  # signal handlers can only be set from the main thread
        return
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not _on_stop_signal:
            _previous[signum] = signal.getsignal(signum)
            signal.signal(signum, _on_stop_signal)


def _untrack(server: VLLMServer) -> None:
    _live.discard(server)
    if _live or not _in_main_thread():
        return
    for signum, handler in list(_previous.items()):
        if signal.getsignal(signum) is _on_stop_signal:  # unless someone replaced ours
            # None: a handler not set from Python, which Python cannot reinstate.
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)
        del _previous[signum]


atexit.register(stop_all)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:  # the whole group has exited already
        pass


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
        self._stopped = False
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                command,
                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _track(self)
        try:
            self._wait_healthy(start_timeout)
        except BaseException:
            self.stop()
            raise

    @classmethod
    def attach(cls, url: str, *, served_name: str = "model") -> VLLMServer:
        """A handle on a server started elsewhere (:meth:`stop` leaves it running)."""
        server = cls.__new__(cls)
        server.url, server.served_name, server.proc = url.rstrip("/"), served_name, None
        server._stopped = False
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
        raise RuntimeError(f"vLLM did not start within {timeout:.0f} s; see {self.log_path}")

    def stop(self, timeout: float = 60.0) -> None:
        """End the server's process group (idempotent).

        SIGTERM to the group; once the server exits (SIGKILL after ``timeout`` seconds),
        SIGKILL to whatever is left of the group, e.g. a worker that outlived it.
        """
        if self.proc is None or self._stopped:
            return
        try:
            _signal_group(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
            self._stopped = True
        finally:
            _untrack(self)

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
