"""Fixtures: real uvicorn servers on free loopback ports, backed by tiny random models."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import openai
import pytest
import torch
import uvicorn

from guard import GuardConfig, GuardedEngine
from guard.probe import LinearProbe
from server.app import build_app
from server.config import ServerConfig
from server.local import LocalGuardEngine
from tests.conftest import build_tiny_model
from tests.helpers import ScriptedProbe, fitted_probe

MODEL = "tiny-llama"


def constant_probe(score: float = 0.1) -> ScriptedProbe:
    """Scores every token ``score`` (below the 0.5 threshold: never fires)."""
    return ScriptedProbe(fitted_probe(32), lambda call, n: [score] * n)


def slow_steps(engine: GuardedEngine, delay: float) -> None:
    """Make every decoding step take at least ``delay`` seconds (for disconnect/limit tests)."""
    step = engine.step

    def slowed():
        time.sleep(delay)
        return step()

    engine.step = slowed


@dataclass
class LiveServer:
    """A running server: its URL, the local engine behind it and the decoder inside that."""

    base_url: str
    engine: LocalGuardEngine
    decoder: GuardedEngine
    _server: uvicorn.Server
    _thread: threading.Thread

    def client(self, api_key: str = "unused", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, **kwargs
        )

    def wait_idle(self, timeout: float = 2.0) -> bool:
        """Whether the decoder holds no request within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.engine.has_unfinished():
                return True
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)


def start_server(app, engine: LocalGuardEngine, decoder: GuardedEngine) -> LiveServer:
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        log_level="warning",
        lifespan="on",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return LiveServer(f"http://127.0.0.1:{port}", engine, decoder, server, thread)


def make_engine(
    tokenizer,
    *,
    probe: LinearProbe | None,
    guard_config: GuardConfig | None = None,
    max_context: int = 256,
    step_delay: float = 0.0,
) -> tuple[LocalGuardEngine, GuardedEngine]:
    model = build_tiny_model("llama", len(tokenizer), max_position_embeddings=max_context)
    decoder = GuardedEngine(model, tokenizer, probe, guard_config or GuardConfig(holdback=2))
    if step_delay:
        slow_steps(decoder, step_delay)
    return LocalGuardEngine(decoder, model_name=MODEL), decoder


ServerFactory = Callable[..., LiveServer]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny models step ~10x faster on one thread than on two contended ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def make_server(tiny_tokenizer) -> Iterator[ServerFactory]:
    """``make_server(probe=..., guard_config=..., step_delay=..., **ServerConfig fields)``."""
    started: list[LiveServer] = []

    def make(
        *,
        probe: LinearProbe | None = None,
        guard_config: GuardConfig | None = None,
        step_delay: float = 0.0,
        environ: dict | None = None,
        **config,
    ) -> LiveServer:
        engine, decoder = make_engine(
            tiny_tokenizer, probe=probe, guard_config=guard_config, step_delay=step_delay
        )
        app = build_app(ServerConfig(model=MODEL, **config), engine, environ=environ or {})
        live = start_server(app, engine, decoder)
        started.append(live)
        return live

    yield make
    for live in started:
        live.stop()


@pytest.fixture(scope="module")
def shared_server(tiny_tokenizer) -> Iterator[LiveServer]:
    """One guarded server (never-firing probe) for tests that do not change its state."""
    engine, decoder = make_engine(tiny_tokenizer, probe=constant_probe(0.1))
    app = build_app(ServerConfig(model=MODEL, max_n=8), engine, environ={})
    live = start_server(app, engine, decoder)
    yield live
    live.stop()


def sse_frames(text: str) -> list[str]:
    """Split an SSE body into its frames (each ending with a blank line)."""
    return [frame + "\n\n" for frame in text.split("\n\n") if frame]
