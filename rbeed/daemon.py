"""The daemon: binds listeners, owns the registry, catalogs and workers, and handles signals."""

from __future__ import annotations

import errno
import fcntl
import logging
import math
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import ExitStack
from functools import partial
from pathlib import Path

import trio

from . import __version__, config as configuration, operations as ops
from .api import JobAPI
from .backends import ProcessBackend
from .blobs import Blobs
from .catalog import Catalog
from .config import Config
from .hives import Hive, Hives
from .inference import Inference
from .jobs import Changed, JobRegistry, JobState
from .metrics import MetricsRoute, Totals
from .models import Model, Models
from .ollama import OllamaAPI
from .openai import OpenAIAPI
from .origins import Origins
from .router import Router
from .sdnotify import Notifier, extend_timeout
from .server import bind_tcp, bind_unix, describe, serve_listeners
from .systemd import SystemdBackend, systemd_reachable, template_runtime_dir
from .workers import Supervisor

log = logging.getLogger("rbeed")

# Settings that SIGHUP cannot change: they shape sockets, directories or running machinery.
RESTART_ONLY = {"state_dir", "runtime_dir", "server.listen", "server.socket", "server.socket_mode",
                "server.max_header_bytes", "workers.backend"}  # fmt: skip


def bind_sockets(config: Config, inherited: list[tuple[str, socket.socket]]) -> tuple[list[socket.socket], Path | None]:
    """Sockets passed by systemd (socket activation, `inherited`) or bound here; the Unix path we own, if any."""
    if inherited:
        log.info("socket activation: %s", ", ".join(f"{name!r}={describe(s)}" for name, s in inherited))
        return [sock for _, sock in inherited], None
    sockets = [bind_tcp(address) for address in config.server.listen]
    path = config.socket_path
    sockets.append(bind_unix(path, config.server.socket_mode))
    return sockets, path


def _file_id(path: Path | None) -> tuple[int, int] | None:
    """The file at `path` (device, inode), None if there is none."""
    if path is None:
        return None
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino


def claim(directory: Path, what: str) -> int:
    """Lock `directory` for this daemon's life (the kernel drops the lock when it exits, however it
    exits): a second daemon on the same catalog or worker sockets would corrupt both."""
    directory.mkdir(parents=True, exist_ok=True)
    # O_NOFOLLOW: a symlink in its place would have this truncate and write the file it names.
    fd = os.open(directory / "rbeed.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 16).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        option = "--" + what.replace(" ", "-")  # --state-dir, --runtime-dir
        raise OSError(errno.EBUSY, f"{what} {directory} is in use by another rbeed (pid {holder}): "
                                   f"stop that one, or give this one its own with {option}") from None  # fmt: skip
    os.ftruncate(fd, 0)
    os.write(fd, b"%d\n" % os.getpid())
    return fd


def choose_backend(config: Config):
    wanted, runtime = config.workers.backend, config.runtime_path
    # The worker template reads its settings from %t/rbeed: a daemon with another runtime dir
    # (a second one under the same manager, run by hand) cannot start its units, and would
    # stop the ones of the daemon that can, whose names it shares.
    template_dir = template_runtime_dir()
    fits = runtime.resolve() == template_dir.resolve()
    if wanted == "systemd" and not fits:
        raise configuration.ConfigError(f"the systemd worker backend needs the runtime dir {template_dir}, "
                                        f"where rbeed-worker@.service reads its settings, not {runtime}")  # fmt: skip
    if wanted == "systemd" or (wanted == "auto" and fits and systemd_reachable()):
        return SystemdBackend(runtime, config.workers)
    return ProcessBackend(runtime, config.workers)


def api_key() -> str | None:
    """The key TCP clients must send: $RBEED_API_KEY, else the credential `api-key`."""
    return configuration.read_secret("RBEED_API_KEY", "api-key")


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None, overrides: dict | None = None):
        self.config = config
        self.config_path = config_path
        self.overrides = overrides or {}
        self.notifier = Notifier.from_env(unset=True)
        database = config.state_path / "rbeed.sqlite3"
        self.catalogs = [Catalog(database, "hives", Hive), Catalog(database, "models", Model)]
        self.hives = Hives(self.catalogs[0], config.hives)
        self.blobs = Blobs((config.state_path / "blobs").absolute())  # a create names a blob by its path
        self.models = Models(self.catalogs[1], config.state_path / "models", config.models, self.blobs)
        self.supervisor = Supervisor(config.workers, self.models, choose_backend(config), config.runtime_path)
        totals = Totals()
        inference = Inference(self.supervisor, totals)
        self.router = Router(self.hives, {
            ops.WorkerSpawn: self.supervisor.op_spawn, ops.WorkerList: self.supervisor.op_list,
            ops.WorkerGet: self.supervisor.op_get, ops.WorkerDelete: self.supervisor.op_delete,
            ops.ModelDownload: self.models.download, ops.ModelList: self.models.list,
            ops.ModelGet: self.models.get, ops.ModelCopy: self.models.copy, ops.ModelDelete: self.models.delete,
            ops.Infer: inference.infer, ops.Embed: inference.embed, ops.Tokenize: inference.tokenize,
            ops.Detokenize: inference.detokenize,
        })  # fmt: skip
        self.registry = JobRegistry(config.jobs, self.router, lambda: config.server.sse_keepalive)
        self.api = JobAPI(self.registry, api_key(), Origins(config.server))
        openai = OpenAIAPI(self.registry, self.models, lambda: self.api.accepting)
        self.api.routes.update(openai.routes)
        self.api.error_shapes.update(openai.error_shapes)
        ollama = OllamaAPI(self.registry, self.models, self.supervisor, lambda: self.api.accepting)
        self.api.routes.update(ollama.routes)
        self.api.uploads.update(ollama.uploads)
        self.api.routes.update(MetricsRoute(self.registry, self.models, self.supervisor, totals,
                                            lambda: self.connections).routes)  # fmt: skip
        self.connections = 0
        self._poked = Changed()  # jobs, workers or connections changed
        self._reloaded = Changed()
        self.reload_record = config.runtime_path / "reloaded"  # what `rbeed reload` waits on
        self.reload_record.unlink(missing_ok=True)  # an earlier daemon's
        self.reloads = 0
        self.registry.on_change = self.supervisor.on_change = self._poked.fire
        self._stop = trio.Event()

    def status_line(self) -> str:
        running = self.registry.count(JobState.RUNNING)
        return f"{self.supervisor.status()}, {running} job{'s' if running != 1 else ''} running"

    async def run(self, sockets: list[socket.socket], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.config.state_path.mkdir(parents=True, exist_ok=True)
        for catalog in self.catalogs:
            await catalog.open()
        self.models.prune()
        self.blobs.prune(self.models.blob_keep())
        log.info("workers run as %s", self.supervisor.backend.name)
        try:
            async with trio.open_nursery() as services:
                services.start_soon(self.models.refresh)
                await services.start(self.supervisor.run)
                await services.start(self.registry.run)
                async with trio.open_nursery() as connections:
                    async with trio.open_nursery() as accepting:  # its own nursery: cancelling it closes the listeners
                        listen = partial(serve_listeners, on_count=self._count_connection,
                                         reads_body=self.api.reads_body, shape_error=self.api.shape_error)
                        timers = await accepting.start(listen, sockets, self.api, self.config.server, connections)
                        where = ", ".join(describe(sock) for sock in sockets)
                        log.info("rbeed %s listening on %s", __version__, where)
                        if self.api.api_key:
                            log.info("TCP clients must send the API key (the Unix socket needs none)")
                        self.notifier.notify("READY=1", f"STATUS=listening on {where}")
                        services.start_soon(self.notifier.watchdog)
                        services.start_soon(self._report_status)
                        services.start_soon(self._exit_when_idle)
                        task_status.started()
                        await self._stop.wait()
                        accepting.cancel_scope.cancel()
                    self.api.accepting = False
                    self.notifier.notify("STOPPING=1", "STATUS=draining")
                    await self._drain()
                    # Streams have their end events queued; give them a moment to flush, then close.
                    # Keep-alive connections between requests close at once: nothing is coming to them.
                    timers.close_idle()
                    connections.cancel_scope.deadline = trio.current_time() + 1
                services.cancel_scope.cancel()  # stops the workers too
        finally:
            with trio.CancelScope(shield=True):
                for catalog in self.catalogs:
                    await catalog.close()
            log.info("rbeed stopped")

    def stop(self) -> None:
        self._stop.set()

    def _count_connection(self, delta: int) -> None:
        self.connections += delta
        self._poked.fire()

    async def _report_status(self) -> None:
        """Keep `systemctl status` current, at most once a second."""
        if not self.notifier.enabled:
            return
        shown = None
        while True:
            line = self.status_line()
            if line != shown:
                self.notifier.notify(f"STATUS={line}")
                shown = line
                await trio.sleep(1)
                continue  # what changed during the pause was not waited for: look again
            await self._poked.wait()

    def _busy(self) -> bool:
        return bool(self.connections or self.registry.count(JobState.QUEUED, JobState.RUNNING)
                    or any(worker.live for worker in self.supervisor.workers.values()))  # fmt: skip

    async def _exit_when_idle(self) -> None:
        """With `idle_exit` set: exit once nothing happened for that long (socket activation restarts us)."""
        while True:
            after = self.config.server.idle_exit
            if not after:
                await self._reloaded.wait()
                continue
            deadline = math.inf if self._busy() else trio.current_time() + after
            with trio.CancelScope(deadline=deadline) as timer:
                await self._poked.wait()
            if timer.cancelled_caught:
                log.info("idle for %g s: exiting", after)
                self.stop()
                return

    async def _drain(self) -> None:
        """No new jobs; running ones get the grace period, then end `[CANCELLED]`."""
        for job in self.registry.list(JobState.QUEUED):
            self.registry.cancel(job, JobState.CANCELLED, "daemon shutting down")
        grace = self.config.server.shutdown_grace
        if self.registry.count(JobState.RUNNING):
            log.info("draining: %s (grace %g s)", self.status_line(), grace)
            self.notifier.notify(extend_timeout(grace + self.config.workers.stop_grace + 5))
            with trio.move_on_after(grace):
                while self.registry.count(JobState.RUNNING):
                    await self.registry.changed.wait()
        for job in self.registry.list(JobState.RUNNING):
            job.narrate("daemon shutting down")
        self.registry.cancel_all(JobState.CANCELLED, "daemon shutting down")

    def reload(self) -> None:
        """Re-read the config file; everything but RESTART_ONLY applies to new jobs and workers."""
        try:
            fresh = configuration.load(self.config_path, self.overrides)
        except configuration.ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            self._record_reload(f"failed, keeping the running config: {exc}")
            return
        changed, ignored = [], []
        for section in ("", "server", "jobs", "hives", "models", "workers"):
            live = getattr(self.config, section) if section else self.config
            new = getattr(fresh, section) if section else fresh
            for name in live.__struct_fields__:
                key = f"{section}.{name}" if section else name
                old_value, new_value = getattr(live, name), getattr(new, name)
                if isinstance(old_value, configuration.Section) or old_value == new_value:
                    continue
                if key in RESTART_ONLY:
                    ignored.append(key)
                else:
                    setattr(live, name, new_value)
                    changed.append(key)
        try:
            key = api_key()
        except OSError as exc:
            log.error("reload: %s; keeping the API key", exc)
        else:
            if key != self.api.api_key:
                self.api.api_key = key
                changed.append("api key")
        log.info("reloaded %s: %s", self.config_path or "defaults", ", ".join(changed) or "nothing changed")
        if ignored:
            log.warning("not reloaded (restart needed): %s", ", ".join(ignored))
        for worker in self.supervisor.workers.values():
            worker.retime()  # an idle worker's stop moves with [workers] keep_alive
        self._reloaded.fire()
        self._poked.fire()
        self._record_reload("ok")

    def _record_reload(self, outcome: str) -> None:
        """Write RUNTIME_DIR/reloaded: `PID N OUTCOME` of this daemon's Nth reload."""
        self.reloads += 1
        beside = self.reload_record.with_name(".reloaded.new")
        try:
            beside.write_text(f"{os.getpid()} {self.reloads} {outcome}\n")
            os.replace(beside, self.reload_record)
        except OSError as exc:
            log.warning("cannot record the reload in %s: %s", self.reload_record, exc.strerror)

    async def handle_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                self.notifier.notify("RELOADING=1")
                self.reload()
                self.notifier.notify("READY=1", f"STATUS={self.status_line()}")
            elif not self._stop.is_set():
                log.info("%s: shutting down", signal.Signals(signum).name)
                self.stop()
            else:
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                self.registry.cancel_all(JobState.CANCELLED, "daemon shutting down")


async def serve(config: Config, config_path: Path | None = None, overrides: dict | None = None,
                inherited: list[tuple[str, socket.socket]] | None = None) -> None:  # fmt: skip
    """Run the daemon until a signal stops it, on the sockets socket activation passed (`inherited`), else its own."""
    # Handled from here to the end: a signal while the daemon starts, or while it stops its
    # workers, must not kill it (and leave its socket and workers behind).
    with ExitStack() as held, trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        # One lock per directory: the state and runtime dirs may be the same one.
        if (runtime := config.runtime_path) == configuration.shared_tmp_dir():
            runtime.mkdir(mode=0o700, exist_ok=True)
            if why := configuration.not_private(runtime):
                raise OSError(errno.EPERM, f"runtime dir {runtime} is {why}: another user may have made it; "
                                           "remove it, or give rbeed one of its own (XDG_RUNTIME_DIR, --runtime-dir)")
        dirs = {config.runtime_path.resolve(): "runtime dir", config.state_path.resolve(): "state dir"}
        for directory, what in dirs.items():
            held.callback(os.close, claim(directory, what))
        sockets, unix_path = bind_sockets(config, inherited or [])
        bound = _file_id(unix_path)
        try:
            daemon = Daemon(config, config_path, overrides)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.handle_signals, signals)
                await daemon.run(sockets)
                nursery.cancel_scope.cancel()
        finally:
            for sock in sockets:
                sock.close()
            if unix_path is not None and _file_id(unix_path) == bound:  # not one a later daemon bound there
                unix_path.unlink(missing_ok=True)
