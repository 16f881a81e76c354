"""Test support: the real daemon as a subprocess (ready by sd_notify), raw HTTP and SSE helpers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import trio

from rbeed.httpclient import Client

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Daemon:
    """A running `rbeed serve` subprocess and where to reach it."""

    proc: subprocess.Popen
    host: str
    port: int
    socket_path: Path
    state_dir: Path
    runtime_dir: Path
    log_path: Path
    notifications: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def unix_url(self) -> str:
        return f"unix:{self.socket_path}"

    def client(self, unix: bool = True, **kwargs) -> Client:
        return Client(self.unix_url if unix else self.url, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not exit within {timeout} s after {sig}:\n{self.log()}")


def start_daemon(base: Path, *args: str, config: str | None = None, env: dict | None = None) -> Daemon:
    """Start the daemon on an ephemeral TCP port and a socket under `base`; return once READY."""
    base.mkdir(parents=True, exist_ok=True)
    notify_path = base / "notify.sock"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    argv = [sys.executable, "-m", "rbeed", "serve", "--listen", "127.0.0.1:0",
            "--socket", str(base / "rbeed.sock"), "--state-dir", str(base / "state"),
            "--runtime-dir", str(base / "run"), *args]  # fmt: skip
    if config is not None:
        (base / "rbeed.toml").write_text(config)
        argv += ["--config", str(base / "rbeed.toml")]
    log_path = base / "daemon.log"
    full_env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT)
    daemon = Daemon(proc, "127.0.0.1", 0, base / "rbeed.sock", base / "state", base / "run", log_path)
    try:
        while True:
            try:
                message = notify.recv(4096).decode()
            except TimeoutError:
                raise AssertionError(f"daemon not ready in 30 s:\n{daemon.log()}") from None
            daemon.notifications.append(message)
            if "READY=1" in message.splitlines():
                break
    finally:
        notify.close()
    status = next(line for line in message.splitlines() if line.startswith("STATUS="))
    tcp = [part for part in status.removeprefix("STATUS=listening on ").split(", ") if not part.startswith("unix:")]
    if tcp:
        daemon.port = int(tcp[0].rsplit(":", 1)[1])
    return daemon


# -- raw HTTP over real sockets ----------------------------------------------------------------


async def open_stream(daemon: Daemon, unix: bool) -> trio.abc.Stream:
    if unix:
        return await trio.open_unix_socket(str(daemon.socket_path))
    return await trio.open_tcp_stream(daemon.host, daemon.port)


async def exchange(daemon: Daemon, data: bytes, unix: bool = False, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the server closes; the whole reply."""
    with trio.fail_after(timeout):
        stream = await open_stream(daemon, unix)
        async with stream:
            await stream.send_all(data)
            chunks = []
            while chunk := await stream.receive_some(65536):
                chunks.append(chunk)
    return b"".join(chunks)


def parse_sse(text: str) -> list[dict]:
    """Events of an SSE body as dicts with id, event, data (comments dropped)."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        event: dict = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            event[key] = value.removeprefix(" ")
        if event:
            events.append(event)
    return events


async def submit(client: Client, payload: dict) -> str:
    response = await client.request("POST", "/v1/jobs", body=json.dumps(payload).encode())
    assert response.status == 201, response.content
    return response.json()["job_id"]


async def run_job(client: Client, payload: dict) -> list:
    """Submit a job and follow its stream to the end; returns the events."""
    job_id = await submit(client, payload)
    events = []
    async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
        assert response.status == 200
        async for event in response.aiter_sse():
            events.append(event)
    return events


def end_marker(events) -> str:
    assert events and events[-1].event == "end", events
    return events[-1].data


def result_of(events):
    results = [json.loads(e.data) for e in events if e.event == "result"]
    assert len(results) == 1, events
    return results[0]
