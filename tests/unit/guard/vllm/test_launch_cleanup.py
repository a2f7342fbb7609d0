"""A signalled process leaves no vLLM server behind (without vLLM: a fake one).

A parent process starts a :class:`guard.vllm.launch.VLLMServer` whose
``python -m vllm.entrypoints.openai.api_server`` finds a fake ``vllm`` package first on
``PYTHONPATH``: it answers ``/health`` and starts a "worker" that ignores SIGTERM, so
only the process-group sweep ends it. The test signals the parent and waits for the
server's whole process group to disappear.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

# By path: importing ``guard.vllm.launch`` would import the guard package, and torch.
LAUNCH = Path(__file__).resolve().parents[4] / "guard" / "vllm" / "launch.py"
pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="POSIX process groups")

FAKE_SERVER = """
import http.server, subprocess, sys

port = int(sys.argv[sys.argv.index("--port") + 1])
# A worker that survives SIGTERM: only a SIGKILL to the group ends it.
subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300"])


class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""

PARENT = """
import importlib.util, signal, sys, time

signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
spec = importlib.util.spec_from_file_location("launch", sys.argv[1])
launch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(launch)
try:
    with launch.VLLMServer(sys.executable, "fake-model", env={"PYTHONPATH": sys.argv[2]},
                           log_path=sys.argv[3], start_timeout=30) as server:
        print(server.proc.pid, flush=True)
        time.sleep(300)
finally:
    print("unwound", flush=True)
"""


def fake_vllm(root: Path) -> Path:
    package = root / "vllm" / "entrypoints" / "openai"
    package.mkdir(parents=True)
    for folder in (root / "vllm", root / "vllm" / "entrypoints", package):
        (folder / "__init__.py").touch()
    (package / "api_server.py").write_text(textwrap.dedent(FAKE_SERVER))
    return root


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "signum, returncodes",
    [
        (signal.SIGTERM, {128 + signal.SIGTERM}),  # SystemExit(143)
        (signal.SIGINT, {-signal.SIGINT, 128 + signal.SIGINT}),  # KeyboardInterrupt
    ],
)
def test_signalled_parent_stops_the_server_group(tmp_path, signum, returncodes):
    fake = fake_vllm(tmp_path / "fake")
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(LAUNCH), str(fake), str(tmp_path / "log")],
        stdout=subprocess.PIPE,
        text=True,
    )
    pgid = None
    try:
        pgid = int(parent.stdout.readline())  # the server is healthy: its group leads itself
        assert group_alive(pgid)
        parent.send_signal(signum)
        assert parent.wait(20) in returncodes
        assert parent.stdout.read().strip() == "unwound"  # finally blocks ran
        deadline = time.monotonic() + 8  # dead members linger until init reaps them
        while group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not group_alive(pgid), (tmp_path / "log").read_text()
    finally:
        parent.kill()
        parent.wait()
        if pgid is not None and group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)


def test_handlers_are_installed_while_a_server_lives(tmp_path):
    """Ours while a server lives, the previous ones again once the last one stopped."""
    from guard.vllm import launch

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    fake = fake_vllm(tmp_path / "fake")
    with launch.VLLMServer(
        sys.executable, "fake-model", env={"PYTHONPATH": str(fake)}, log_path=tmp_path / "log"
    ) as server:
        assert signal.getsignal(signal.SIGTERM) is launch._on_stop_signal
        assert signal.getsignal(signal.SIGINT) is launch._on_stop_signal
        assert server in launch._live
    assert server.proc.returncode is not None
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert server not in launch._live
