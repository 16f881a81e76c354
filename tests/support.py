"""Test support: the real daemon as a subprocess (ready by sd_notify), raw HTTP and SSE helpers."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h11
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


def start_daemon(base: Path, *args: str, config: str | None = None, env: dict | None = None,
                 prefix: tuple[str, ...] = ()) -> Daemon:  # fmt: skip
    """Start the daemon on an ephemeral TCP port and a socket under `base`; return once READY.

    `prefix`: a command that execs the daemon's (such as taskset)."""
    base.mkdir(parents=True, exist_ok=True)
    notify_path = base / "notify.sock"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    argv = [*prefix, sys.executable, "-m", "rbeed", "serve", "--listen", "127.0.0.1:0",
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


# -- core tests: raw h11 exchanges, slow jobs, daemons expected to fail ------------------------

# hive_start of a remote hive runs [hives] start_command; this one narrates a line, then runs
# until it is cancelled: the job the cancel, keep-alive, resume and shutdown tests act on.
SLOW_START_COMMAND = "sh -c 'echo starting {ssh_host} {action}; exec sleep 30'"


def slow_hive_config(extra: str = "", hives: str = "") -> str:
    """A config whose remote hive_start runs until cancelled; `hives`: more [hives] lines,
    `extra`: other TOML sections."""
    return f'[hives]\nstart_command = "{SLOW_START_COMMAND}"\n{hives}\n{extra}'


# Register this hive once per daemon (port 9: nothing answers there), then submit SLOW_JOB.
SLOW_HIVE = {"operation": "hive_create", "host": "127.0.0.1", "port": 9, "id": "slow"}
SLOW_JOB = {"operation": "hive_start", "hive_id": "slow"}


async def read_events_until(events, predicate) -> list:
    """Read SSE events from the async iterator `events` up to the first one `predicate` accepts."""
    seen = []
    async for event in events:
        seen.append(event)
        if predicate(event):
            return seen
    raise AssertionError(f"stream ended before the awaited event: {seen}")


def is_narration(message: str):
    """A predicate for read_events_until: the narration event saying exactly `message`."""
    return lambda event: event.event == "narration" and json.loads(event.data)["message"] == message


class RawConnection:
    """One client connection driven by h11: for tests that care which connection carries what."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def open(cls, daemon: Daemon, unix: bool = False) -> RawConnection:
        return cls(await open_stream(daemon, unix))

    async def send(self, method: str, target: str, headers: list[tuple[str, str]] = (), body: bytes | None = None):
        headers = [("host", "localhost"), *headers]
        if body is not None and not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
            headers.append(("content-length", str(len(body))))
        data = self.h11.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        await self.stream.send_all(data)

    async def _event(self):
        while (event := self.h11.next_event()) is h11.NEED_DATA:
            self.h11.receive_data(await self.stream.receive_some(65536))
        return event

    async def head(self) -> h11.Response:
        """The next final response's head (1xx responses are skipped)."""
        while isinstance(event := await self._event(), h11.InformationalResponse):
            pass
        assert isinstance(event, h11.Response), event
        return event

    async def body(self) -> bytes:
        chunks = []
        while not isinstance(event := await self._event(), h11.EndOfMessage):
            assert isinstance(event, h11.Data), event
            chunks.append(event.data)
        if self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()
        return b"".join(chunks)

    async def request(self, method: str, target: str, headers=(), body: bytes | None = None):
        """Send a request and read its whole response: (status, headers dict, body)."""
        await self.send(method, target, headers, body)
        head = await self.head()
        return head.status_code, headers_of(head), await self.body()

    async def at_eof(self) -> bool:
        """Whether the server closed the connection (reads; True once EOF arrives, never False)."""
        while data := await self.stream.receive_some(65536):
            raise AssertionError(f"unexpected bytes instead of EOF: {data[:200]!r}")
        return True

    async def aclose(self) -> None:
        await self.stream.aclose()


def headers_of(head) -> dict[str, str]:
    return {name.decode().lower(): value.decode("latin-1") for name, value in head.headers}


def parse_response(raw: bytes, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """The first final response in `raw` (a whole reply read until close): status, headers, body."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(raw)
    conn.receive_data(b"")
    while isinstance(event := conn.next_event(), h11.InformationalResponse):
        pass
    assert isinstance(event, h11.Response), (event, raw[:300])
    body = b""
    while not isinstance(part := conn.next_event(), h11.EndOfMessage):
        assert isinstance(part, h11.Data), (part, raw[:300])
        body += part.data
    return event.status_code, headers_of(event), body


def error_of(raw: bytes) -> tuple[int, str]:
    """Status and `error` message of a JSON error reply; fails if the body is anything else."""
    status, headers, body = parse_response(raw)
    assert headers["content-type"] == "application/json", headers
    assert set(json.loads(body)) == {"error"}, body
    return status, json.loads(body)["error"]


def run_daemon_to_exit(base: Path, *args: str, config: str | None = None, timeout: float = 10):
    """Run `rbeed serve` expected to fail at start-up; the finished process (output captured).

    No --listen unless given in `args`: the config file's [server] listen then applies.
    """
    base.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "rbeed", "serve", "--state-dir", str(base / "state"),
            "--runtime-dir", str(base / "run"), *args]  # fmt: skip
    if "--socket" not in args:
        argv += ["--socket", str(base / "rbeed.sock")]
    if config is not None:
        (base / "rbeed.toml").write_text(config)
        argv += ["--config", str(base / "rbeed.toml")]
    env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


# -- models, workers and inference: short paths, job outcomes, processes ------------------------


def short_base() -> Path:
    """A fresh directory directly under /tmp: worker socket paths must fit in 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="rb"))


@contextmanager
def running_daemon(config: str | None = None, env: dict | None = None):
    """A daemon in a fresh short directory, removed afterwards; it must exit cleanly on SIGTERM."""
    base = short_base()
    daemon = start_daemon(base, config=config, env=env)
    try:
        yield daemon
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.stop(signal.SIGKILL)  # only if the test left it running
        shutil.rmtree(base)


async def job_result(client: Client, payload: dict, timeout: float = 30):
    """Run a job that must end [DONE]; its result."""
    with trio.fail_after(timeout):
        events = await run_job(client, payload)
    assert end_marker(events) == "[DONE]", events
    return result_of(events)


async def job_error(client: Client, payload: dict, timeout: float = 30) -> str:
    """Run a job that must end [ERROR]; the message after the marker."""
    with trio.fail_after(timeout):
        events = await run_job(client, payload)
    marker = end_marker(events)
    assert marker.startswith("[ERROR] "), events
    return marker.removeprefix("[ERROR] ")


@asynccontextmanager
async def job_events(client: Client, payload: dict):
    """Submit a job and open its stream: (job id, async iterator of its events)."""
    job_id = await submit(client, payload)
    async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
        assert response.status == 200
        yield job_id, response.aiter_sse()


async def rest_of(events, timeout: float) -> list:
    """The remaining events of a stream, which must end within `timeout` seconds."""
    with trio.fail_after(timeout):
        return [event async for event in events]


async def logged(daemon, pattern: str, timeout: float = 10) -> re.Match:
    """Bounded poll of the daemon's log (workers write theirs there) for a line matching `pattern`."""
    with trio.fail_after(timeout):
        while (match := re.search(pattern, daemon.log(), re.MULTILINE)) is None:
            await trio.sleep(0.02)
    return match


def is_token(event) -> bool:
    return event.event == "token"


def narrations(events) -> list[str]:
    return [json.loads(e.data)["message"] for e in events if e.event == "narration"]


async def register(daemon: Daemon, *sources: Path | str) -> None:
    """Register each model source (model_download) in `daemon`."""
    async with daemon.client() as client:
        for source in sources:
            await job_result(client, {"operation": "model_download", "model": str(source)})


async def register_copy(daemon: Daemon, client: Client, model: Path, name: str) -> tuple[Path, Path]:
    """Register a copy of `model` as model `name`: the copy, and the file installed in the models dir."""
    source = shutil.copyfile(model, daemon.state_dir.parent / f"{name}.gguf")
    await job_result(client, {"operation": "model_download", "model": str(source)})
    return source, daemon.state_dir / "models" / f"{name}.gguf"


def steady(record: dict) -> dict:
    """A worker record without its resident memory, which moves while the process runs."""
    return {key: value for key, value in record.items() if key != "rss"}


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status: State, ShdPnd (the signals pending for the process, SIGTERM = 1 << 14)..."""
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


async def until_stopped(pid: int) -> None:
    """Bounded poll: until process `pid`, sent SIGSTOP, has stopped (before, a signal would be taken)."""
    with trio.fail_after(5):
        while not proc_status(pid)["State"].startswith("T"):
            await trio.sleep(0.01)


async def until_pending(pid: int, signum: int) -> None:
    """Bounded poll: until stopped process `pid` has been sent `signum`."""
    with trio.fail_after(5):
        while not int(proc_status(pid)["ShdPnd"], 16) & 1 << signum - 1:
            await trio.sleep(0.01)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def wait_pids_gone(pids, timeout: float = 10) -> None:
    """Bounded poll of /proc until every pid has exited (an external fact: no event to wait on)."""
    with trio.fail_after(timeout):
        while alive := [pid for pid in pids if pid_alive(pid)]:
            await trio.sleep(0.02)
