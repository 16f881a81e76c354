"""How a worker process is started and stopped: as a child process, or as a systemd unit."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import trio

from .config import WorkersConfig

log = logging.getLogger("rbeed.workers")


class WorkerStartError(Exception):
    """The worker did not become ready; the message says why (e.g. "not a GGUF file")."""


class LaunchSpec(Protocol):
    id: str
    model_path: Path
    device: str
    threads: int
    n_ctx: int
    n_batch: int  # 0: the whole context
    socket_path: Path


class Handle(Protocol):
    """A launched worker: its pid, readiness, and its end."""

    pid: int | None

    async def ready(self) -> None: ...  # raises WorkerStartError

    async def wait(self) -> str: ...  # returns once the worker has ended: how it ended


def remove_leftover_files(directory: Path) -> None:
    """Remove the sockets and settings of workers a killed daemon left in `directory`, the
    runtime dir's workers/, which this daemon holds (its lock): none of them is its own."""
    leftovers = [path for path in directory.glob("*") if path.suffix in (".sock", ".notify", ".env")]
    for path in leftovers:
        path.unlink(missing_ok=True)
    if leftovers:
        log.info("removed %d leftover worker file(s) from %s", len(leftovers), directory)


def worker_options(spec: LaunchSpec, config: WorkersConfig) -> list[str]:
    """The worker's llama.cpp flags, the same for every backend."""
    options = ["--n-ctx", str(spec.n_ctx), "--n-batch", str(spec.n_batch)]
    return options + (["--cpu-affinity", config.cpu_affinity] if config.cpu_affinity else [])


def worker_args(spec: LaunchSpec, config: WorkersConfig) -> list[str]:
    return ["worker", "--id", spec.id, "--model", str(spec.model_path), "--socket", str(spec.socket_path),
            "--device", spec.device, "--threads", str(spec.threads), *worker_options(spec, config)]  # fmt: skip


# The daemon's own: its sockets (socket activation) and its secrets are not a worker's business.
_NOT_FOR_WORKERS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "RBEED_API_KEY", "HF_TOKEN", "CREDENTIALS_DIRECTORY")


def worker_env() -> dict[str, str]:
    """The environment a worker process (or a probe) starts with: the daemon's, less its own."""
    return {key: value for key, value in os.environ.items() if key not in _NOT_FOR_WORKERS}


def parse_notify(datagram: bytes) -> dict[str, str]:
    fields = {}
    for line in datagram.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


async def first_of(*waits) -> None:
    """Return as soon as one of the given async callables returns (the others are cancelled)."""
    async with trio.open_nursery() as nursery:
        for wait in waits:

            async def run(wait=wait) -> None:
                await wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(run)


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal_name(-returncode)}"
    return f"exited with status {returncode}"


def signal_name(number: int) -> str:
    """SIGTERM, SIGRTMIN+6 (Signals names only SIGRTMIN and SIGRTMAX of the real-time ones), signal 32."""
    if signal.SIGRTMIN < number < signal.SIGRTMAX:
        return f"SIGRTMIN+{number - signal.SIGRTMIN}"
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


async def probe_device(device: str, timeout: float) -> str | None:
    """Why no worker could use `device` (llama-cpp-python built without CUDA), or None.

    A worker process answers, without a model: the daemon does not import llama_cpp. When the
    probe itself fails, the worker's own check at load time has the last word.
    """
    env = worker_env()
    env.pop("NOTIFY_SOCKET", None)
    command = [sys.executable, "-m", "rbeed", "worker", "--probe", device]
    try:
        with trio.fail_after(timeout):
            done = await trio.run_process(command, env=env, stdin=subprocess.DEVNULL, capture_stdout=True,
                                          capture_stderr=True, check=False)  # fmt: skip
    except (OSError, trio.TooSlowError) as exc:
        log.warning("cannot probe device %s: %s", device, exc or "timed out")
        return None
    last_line = (done.stderr.decode(errors="replace").splitlines() or [""])[-1]
    if done.returncode == 3 and last_line.startswith("rbeed-worker: failed: "):
        return last_line.removeprefix("rbeed-worker: failed: ")
    if done.returncode != 0:
        log.warning("cannot probe device %s: %s: %s", device, describe_exit(done.returncode), last_line)
    return None


class ProcessHandle:
    def __init__(self, process: trio.Process, notify: trio.socket.SocketType):
        self.process = process
        self.pid: int | None = process.pid
        self._notify = notify
        self._status = ""
        self._ready = trio.Event()

    async def _read_notify(self) -> None:
        while True:
            fields = parse_notify(await self._notify.recv(4096))
            self._status = fields.get("STATUS", self._status)
            if fields.get("READY") == "1":
                self._ready.set()

    async def ready(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._read_notify)
            await first_of(self._ready.wait, self.process.wait)
            nursery.cancel_scope.cancel()
        if not self._ready.is_set():
            reason = self._status.removeprefix("failed: ") if self._status.startswith("failed") else ""
            raise WorkerStartError(reason or f"worker {describe_exit(self.process.returncode)} while loading")

    async def wait(self) -> str:
        return describe_exit(await self.process.wait())


class ProcessBackend:
    """Workers as child processes in their own session; they die with the daemon (PDEATHSIG)."""

    name = "process"

    def __init__(self, runtime_dir: Path, config: WorkersConfig):
        self.dir = runtime_dir / "workers"
        self.config = config  # read at each launch, so that a reload applies to new workers

    async def remove_leftovers(self) -> None:
        """What a killed daemon left: its workers saw it go (PDEATHSIG), their files stayed."""
        remove_leftover_files(self.dir)

    @contextlib.asynccontextmanager
    async def launch(self, spec: LaunchSpec) -> AsyncIterator[ProcessHandle]:
        notify_path = self.dir / f"{spec.id}.notify"
        notify = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_DGRAM)
        env = worker_env() | {"NOTIFY_SOCKET": str(notify_path), "RBEED_PDEATHSIG": str(os.getpid())}
        try:
            try:  # a runtime dir too deep for a socket's path, one not writable, no memory to fork
                self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                notify_path.unlink(missing_ok=True)
                await notify.bind(str(notify_path))
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "rbeed", *worker_args(spec, self.config)],
                    env=env, stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                raise WorkerStartError(f"cannot start a worker process ({notify_path}): {exc}") from None
            try:
                yield ProcessHandle(process, notify)
            finally:
                with trio.CancelScope(shield=True):
                    await self._stop(process)
        finally:
            notify.close()
            notify_path.unlink(missing_ok=True)
            spec.socket_path.unlink(missing_ok=True)

    async def _stop(self, process: trio.Process) -> None:
        if process.returncode is None:
            process.terminate()
            with trio.move_on_after(self.config.stop_grace):
                await process.wait()
        if process.returncode is None:
            log.warning("worker pid %d ignored SIGTERM for %.0f s: SIGKILL", process.pid, self.config.stop_grace)
            process.kill()
            await process.wait()
