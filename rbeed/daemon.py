"""The daemon: binds listeners, owns the registry, catalogs and workers, and handles signals."""

from __future__ import annotations

import logging
import signal
import socket
from pathlib import Path

import trio

from . import __version__
from .activation import listen_fds
from .api import JobAPI
from .config import Config
from . import operations as ops
from .backends import ProcessBackend
from .catalog import Catalog
from .hives import Hive, Hives
from .inference import Inference
from .jobs import JobRegistry, JobState
from .models import Model, Models
from .router import Router
from .workers import Supervisor
from .sdnotify import Notifier
from .server import bind_tcp, bind_unix, describe, serve_listeners

log = logging.getLogger("rbeed")


def bind_sockets(config: Config) -> tuple[list[socket.socket], Path | None]:
    """Sockets passed by systemd (socket activation) or bound here; the Unix path we own, if any."""
    inherited = listen_fds()
    if inherited:
        log.info("socket activation: %s", ", ".join(f"{name}={describe(s)}" for name, s in inherited))
        return [sock for _, sock in inherited], None
    sockets = [bind_tcp(address) for address in config.server.listen]
    path = config.socket_path
    sockets.append(bind_unix(path, config.server.socket_mode))
    return sockets, path


class Daemon:
    def __init__(self, config: Config, config_path: Path | None = None):
        self.config = config
        self.config_path = config_path
        self.notifier = Notifier.from_env(unset=True)
        database = config.state_path / "rbeed.sqlite3"
        self.catalogs = [Catalog(database, "hives", Hive), Catalog(database, "models", Model)]
        self.hives = Hives(self.catalogs[0], config.hives)
        self.models = Models(self.catalogs[1], config.state_path / "models", config.models)
        workers = config.workers
        backend = ProcessBackend(config.runtime_path, workers.n_ctx, workers.n_batch, workers.stop_grace)
        self.supervisor = Supervisor(workers, self.models, backend, config.runtime_path)
        inference = Inference(self.supervisor)
        self.router = Router(self.hives, {
            ops.WorkerSpawn: self.supervisor.op_spawn, ops.WorkerList: self.supervisor.op_list,
            ops.WorkerGet: self.supervisor.op_get, ops.WorkerDelete: self.supervisor.op_delete,
            ops.ModelDownload: self.models.download, ops.ModelList: self.models.list,
            ops.ModelGet: self.models.get, ops.ModelDelete: self.models.delete,
            ops.Infer: inference.infer,
        })  # fmt: skip
        self.registry = JobRegistry(config.jobs, self.router)
        self.api = JobAPI(self.registry, config.server.sse_keepalive)
        self._stop = trio.Event()

    def status_line(self) -> str:
        running = self.registry.count(JobState.RUNNING)
        return f"{self.supervisor.status()}, {running} job{'s' if running != 1 else ''} running"

    async def run(self, sockets: list[socket.socket], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self.config.state_path.mkdir(parents=True, exist_ok=True)
        for catalog in self.catalogs:
            await catalog.open()
        try:
            async with trio.open_nursery() as services:
                services.start_soon(self._handle_signals)
                await services.start(self.supervisor.run)
                await services.start(self.registry.run)
                async with trio.open_nursery() as connections:
                    with trio.CancelScope() as accepting:
                        await connections.start(serve_listeners, sockets, self.api, self.config.server, connections)
                        where = ", ".join(describe(sock) for sock in sockets)
                        log.info("rbeed %s listening on %s", __version__, where)
                        self.notifier.notify("READY=1", f"STATUS=listening on {where}")
                        services.start_soon(self.notifier.watchdog)
                        task_status.started()
                        await self._stop.wait()
                    accepting.cancel()
                    self.api.accepting = False
                    self.notifier.notify("STOPPING=1", "STATUS=draining")
                    await self._drain()
                    # Streams have their end events queued; give them a moment to flush, then close.
                    connections.cancel_scope.deadline = trio.current_time() + 1
                services.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                for catalog in self.catalogs:
                    await catalog.close()
            log.info("rbeed stopped")

    def stop(self) -> None:
        self._stop.set()

    async def _drain(self) -> None:
        """No new jobs; running ones get the grace period, then end `[CANCELLED]`."""
        for job in self.registry.list(JobState.QUEUED):
            self.registry.cancel(job, JobState.CANCELLED, "daemon shutting down")
        grace = self.config.server.shutdown_grace
        if self.registry.count(JobState.RUNNING):
            log.info("draining %s (grace %.0f s)", self.status_line(), grace)
            self.notifier.extend_timeout(grace + 5)
            with trio.move_on_after(grace):
                while self.registry.count(JobState.RUNNING):
                    await self.registry.changed.wait()
        for job in self.registry.list(JobState.RUNNING):
            job.narrate("daemon shutting down")
        self.registry.cancel_all(JobState.CANCELLED, "daemon shutting down")

    async def _handle_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: nothing to reload")
                elif not self._stop.is_set():
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    self.stop()
                else:
                    log.warning("second %s: stopping now", signal.Signals(signum).name)
                    self.registry.cancel_all(JobState.CANCELLED, "daemon shutting down")


async def serve(config: Config, config_path: Path | None = None) -> None:
    sockets, unix_path = bind_sockets(config)
    try:
        await Daemon(config, config_path).run(sockets)
    finally:
        for sock in sockets:
            sock.close()
        if unix_path is not None:
            unix_path.unlink(missing_ok=True)
