"""`make run`'s launcher (rbeed.demo): the daemon in the foreground, stopped by one Ctrl-C or a kill."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from rbeed.demo import DEMO_MODEL
from support import ROOT, job_result, pid_alive, short_base, start_daemon


@pytest.fixture(scope="module")
def state(tiny_model) -> Iterator[Path]:
    """A state dir in which the demo model is registered already (the tiny model under its id):
    the demo does not assemble the 253 MB gemma."""
    base = short_base()
    daemon = start_daemon(base)

    async def register() -> None:
        async with daemon.client() as client:
            await job_result(client, {"operation": "model_download", "model": str(tiny_model), "id": DEMO_MODEL})

    try:
        trio.run(register)
        assert daemon.stop() == 0
        yield daemon.state_dir
    finally:
        daemon.stop(signal.SIGKILL)
        shutil.rmtree(base)


@contextmanager
def running_demo(state: Path, tmp_path: Path, until: str = "rbeed is running") -> Iterator[tuple[subprocess.Popen[str], list[str], int]]:
    """`python -m rbeed.demo` in a session of its own, as a terminal runs it, once it has said
    `until` (the daemon is running): (the demo, its output lines so far, the daemon's pid)."""
    env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
    env |= {"STATE_DIRECTORY": str(state), "RUNTIME_DIRECTORY": str(tmp_path / "run")}
    demo = subprocess.Popen([sys.executable, "-m", "rbeed.demo", "--listen", "127.0.0.1:0"], stderr=subprocess.PIPE,
                            text=True, env=env, cwd=ROOT, start_new_session=True)  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in demo.stderr], daemon=True).start()
    seen: list[str] = []
    try:
        while until not in "".join(seen):
            seen.append(lines.get(timeout=30))
        daemon_pid = int((tmp_path / "run" / "rbeed.lock").read_text())
        yield demo, seen, daemon_pid
        demo.wait(timeout=30)
        while not lines.empty() or demo.stderr and not demo.stderr.closed and lines.qsize():
            seen.append(lines.get())
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)


def test_one_ctrl_c_stops_the_daemon_gracefully_once(state, tmp_path):
    with running_demo(state, tmp_path) as (demo, seen, daemon_pid):
        os.killpg(demo.pid, signal.SIGINT)  # the terminal's Ctrl-C: to the foreground process group
    # The daemon shared that group: it got the terminal's SIGINT and the one the demo forwarded,
    # took the second for a second Ctrl-C and cancelled the running jobs at once.
    assert demo.returncode == 0 and not pid_alive(daemon_pid)
    output = "".join(seen)
    assert "SIGINT: shutting down" in output and "second SIGINT" not in output, output


def test_a_ctrl_c_while_the_model_is_assembled_stops_both(tmp_path):
    with running_demo(tmp_path / "empty-state", tmp_path, until="assembling gemma3 270M") as (demo, seen, daemon_pid):
        os.killpg(demo.pid, signal.SIGINT)
    assert demo.returncode == 0 and not pid_alive(daemon_pid), "".join(seen)
    assert "registering the model failed" not in "".join(seen)


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_kill_of_the_demo_stops_the_daemon_too(state, tmp_path, sent):
    with running_demo(state, tmp_path) as (demo, seen, daemon_pid):
        demo.send_signal(sent)  # a kill, an IDE's stop button, a closed terminal: to the demo alone
    # It died of the signal and left the daemon running, holding its port and runtime dir.
    assert demo.returncode == 0 and not pid_alive(daemon_pid), "".join(seen)
