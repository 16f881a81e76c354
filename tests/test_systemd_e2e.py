"""rbeed end to end under a real systemd user manager: socket activation, worker units, sd_notify,
idle exit, shutdown; and the worker tests both backends (process, systemd) must pass alike."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio

import chaos
from rbeed import config as configuration
from rbeed.backends import ProcessBackend, WorkerStartError
from rbeed.config import WorkersConfig
from rbeed.daemon import choose_backend
from rbeed.httpclient import Client
from rbeed.systemd import SystemdBackend, UnitHandle
from support import (
    Daemon, end_marker, job_error, job_events, job_result, narrations, pid_alive, read_events_until,
    rest_of, result_of, run_job, short_base, start_daemon, steady,
)  # fmt: skip

from user_systemd import RBEED_UNITS as UNITS
from user_systemd import UserSystemd, install_rbeed_units

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parent.parent
SERVICE = "rbeed.service"

# Each worker sleeps this long after every token, so a long generation can be hit mid-stream.
TOKEN_DELAY = "0.05"
CONFIG = """
[server]
shutdown_grace = 0.5
[workers]
backend = "auto"
threads = 2
restart_backoff = 0.1
"""
# Greedy decoding of this prompt runs past 100 tokens without a sentence end: 5 s at TOKEN_DELAY.
LONG = {"operation": "infer", "model": "tiny", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 100}
SHORT = LONG | {"max_tokens": 3}  # always 3 tokens: no sentence end in greedy decoding
STATE_TIMEOUT = 20  # bound on every wait for a unit to reach a state


def spawn(**fields) -> dict:
    return {"operation": "worker_spawn", "model": "tiny", "threads": 1, **fields}


def is_token(event) -> bool:
    return event.event == "token"


def unit_of(worker_id: str) -> str:
    return f"rbeed-worker@{worker_id}.service"


class Installed:
    """Our units in the user manager (install_rbeed_units), running this Python's rbeed."""

    def __init__(self, manager: UserSystemd, tcp_port: int) -> None:
        self.manager = manager
        self.tcp_port = tcp_port
        self.log = manager.base / "rbeed-e2e.log"
        self.config = manager.base / "rbeed.toml"
        self.rbeed_dir = manager.runtime_dir / "rbeed"
        self.socket_path = self.rbeed_dir / "rbeed.sock"
        self.config.write_text(CONFIG)
        install_rbeed_units(manager, f"{sys.executable} -m rbeed", self.log, tcp_port,
                            serve_args=f"--config {self.config}", worker_env=f"RBEED_WORKER_TOKEN_DELAY={TOKEN_DELAY}")  # fmt: skip

    def uninstall(self) -> None:
        self.manager.systemctl("stop", "rbeed-worker@*.service", SERVICE, "rbeed.socket", "rbeed-tcp.socket")
        self.manager.systemctl("reset-failed")
        for unit in UNITS:
            (self.manager.unit_dir / unit).unlink(missing_ok=True)
            shutil.rmtree(self.manager.unit_dir / f"{unit}.d", ignore_errors=True)
        self.manager.systemctl("daemon-reload")

    def check(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.manager.systemctl(*args)
        assert result.returncode == 0, f"systemctl {' '.join(args)}: {result.stderr}\n{self.logs()}"
        return result

    async def acheck(self, *args: str) -> subprocess.CompletedProcess[str]:
        """check() in a thread: the caller's streams go on being read meanwhile."""
        return await trio.to_thread.run_sync(self.check, *args)

    def show(self, unit: str, prop: str) -> str:
        return self.manager.show(unit, prop)

    def main_pid(self, unit: str = SERVICE) -> int:
        return int(self.show(unit, "MainPID"))

    @property
    def state_dir(self) -> Path:
        """StateDirectory=rbeed, as the running daemon sees it ($XDG_CONFIG_HOME/rbeed with 252)."""
        environ = Path(f"/proc/{self.main_pid()}/environ").read_bytes().split(b"\0")
        return Path(next(v for k, _, v in (e.decode().partition("=") for e in environ) if k == "STATE_DIRECTORY"))

    async def wait_state(self, unit: str, *states: str, timeout: float = STATE_TIMEOUT) -> str:
        """Bounded poll of the manager until `unit` is in one of `states` (an external fact)."""
        state = ""
        with trio.move_on_after(timeout):
            while (state := self.show(unit, "ActiveState")) not in states:
                await trio.sleep(0.05)
            return state
        raise AssertionError(f"{unit} still {state!r}, not {states}\n{self.logs()}")

    def configure(self, text: str) -> None:
        """Write rbeed.toml; the next start of rbeed.service reads it."""
        self.config.write_text(text)
        self.check("stop", SERVICE)

    def client(self, tcp: bool = False) -> Client:
        url = f"http://127.0.0.1:{self.tcp_port}" if tcp else f"unix:{self.socket_path}"
        return Client(url, read_timeout=60)

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:] if self.log.exists() else ""


def free_tcp_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


async def register(rbeed, model: Path) -> None:
    async with rbeed.client() as client:
        await job_result(client, {"operation": "model_download", "model": str(model)})


async def delete_workers(rbeed) -> None:
    async with rbeed.client() as client:
        for worker in await job_result(client, {"operation": "worker_list"}):
            await job_result(client, {"operation": "worker_delete", "id": worker["id"]})


@pytest.fixture(scope="module")
def units(user_systemd) -> Iterator[Installed]:
    """Our units, installed with CONFIG; only the socket units started."""
    installed = Installed(user_systemd, free_tcp_port())
    try:
        installed.check("start", "rbeed.socket", "rbeed-tcp.socket")
        yield installed
    finally:
        installed.uninstall()
    whole_log = installed.log.read_text() if installed.log.exists() else ""  # none if rbeed never ran
    assert "Traceback" not in whole_log, installed.logs()


@pytest.fixture(scope="module")
def registered_model(units) -> Path:
    """The tiny model, registered in rbeed under the manager (the connection starts rbeed)."""
    import tinymodel

    # Below the manager's base (/dev/shm): visible to rbeed.service despite PrivateTmp=.
    model = tinymodel.write_tiny_model(units.manager.base / "tiny.gguf")
    trio.run(register, units, model)
    return model


@pytest.fixture
def rbeed(units, registered_model) -> Installed:
    """The daemon under the manager, running with CONFIG (restarted if a test changed it)."""
    if units.config.read_text() != CONFIG:
        units.configure(CONFIG)
    units.check("start", SERVICE)  # as a first connection would; it gets the sockets all the same
    return units


@pytest.fixture
async def client(rbeed) -> AsyncIterator[Client]:
    """A client of rbeed under the manager; the workers a test leaves behind are deleted after it."""
    async with rbeed.client() as client:
        yield client
    await delete_workers(rbeed)


# --- 1. socket activation, cold start ------------------------------------------------------


async def test_the_first_connection_starts_rbeed_and_is_answered(units):
    units.check("stop", SERVICE)
    assert units.show(SERVICE, "ActiveState") == "inactive"
    assert units.show("rbeed.socket", "ActiveState") == "active"
    assert units.show("rbeed-tcp.socket", "ActiveState") == "active"

    payload = json.dumps({"operation": "hive_list"}).encode()
    started = time.perf_counter()
    async with units.client() as client:
        with trio.fail_after(30):
            response = await client.request("POST", "/v1/jobs", body=payload)
            answered = time.perf_counter() - started
            assert response.status == 201, response.content
            async with client.stream("GET", f"/v1/jobs/{response.json()['job_id']}/stream") as stream:
                events = [event async for event in stream.aiter_sse()]
    finished = time.perf_counter() - started
    assert end_marker(events) == "[DONE]"
    [local] = result_of(events)
    main_pid = units.main_pid()
    assert (local["id"], local["local"], local["pid"]) == ("localhost", True, main_pid)
    assert units.show(SERVICE, "ActiveState") == "active"
    rss = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{main_pid}/status").read_text(), re.M)
    print(f"\ncold start: first answer {answered * 1000:.0f} ms after connect, stream done at "
          f"{finished * 1000:.0f} ms; idle RSS of rbeed (pid {main_pid}): {int(rss.group(1)) / 1024:.1f} MiB")

    # The TCP socket reaches the same daemon.
    async with units.client(tcp=True) as client:
        [local] = await job_result(client, {"operation": "hive_list"})
    assert local["pid"] == main_pid


# --- 2. workers as units --------------------------------------------------------------------


async def test_auto_backend_runs_each_worker_as_a_unit_that_delete_stops(rbeed, client):
    worker = await job_result(client, spawn())
    unit = unit_of(worker["id"])
    assert worker["backend"] == "systemd"
    assert rbeed.manager.systemctl("is-active", unit).stdout.strip() == "active"
    assert worker["pid"] == rbeed.main_pid(unit) != 0
    assert rbeed.show(unit, "StatusText").startswith("serving ")

    result = await job_result(client, SHORT | {"worker_id": worker["id"]})
    assert (result["worker_id"], result["completion_tokens"]) == (worker["id"], 3)

    stopped = await job_result(client, {"operation": "worker_delete", "id": worker["id"]})
    assert stopped["state"] == "stopped"
    assert rbeed.manager.systemctl("is-active", unit).stdout.strip() == "inactive"
    assert not pid_alive(worker["pid"])
    assert not (rbeed.rbeed_dir / "workers" / f"{worker['id']}.env").exists()


async def test_worker_limits_follow_the_config_of_each_start(rbeed):
    async def spawn_and_show(*props: str) -> tuple[str, list[str]]:
        async with rbeed.client() as client:
            worker = await job_result(client, spawn())
            values = [rbeed.show(unit_of(worker["id"]), prop) for prop in props]
            await job_result(client, {"operation": "worker_delete", "id": worker["id"]})
        return worker["id"], values

    rbeed.configure(CONFIG + 'memory_max = "256M"\ncpu_quota = "50%"\n')
    limited, values = await spawn_and_show("MemoryMax", "CPUQuotaPerSecUSec")
    assert values == [str(256 << 20), "500ms"]
    # The next daemon numbers its workers from 1 again: the same unit, without the limits.
    rbeed.configure(CONFIG)
    unlimited, values = await spawn_and_show("MemoryMax", "CPUQuotaPerSecUSec")
    assert unlimited == limited
    assert values == ["infinity", "infinity"]


def test_worker_settings_reach_the_unit_as_written_whatever_their_characters(units):
    # EnvironmentFile= reads quotes, backslashes and $ as a shell would: written bare, a state
    # dir's `we\ird` reached the worker as `weird`.
    odd = Path('/srv/we\\ird "models"/$HOME `x` \'y\'/tiny.gguf')
    spec = SimpleNamespace(id="odd", model_path=odd, socket_path=Path("/run/x.sock"), device="cpu", threads=1,
                           n_ctx=0, n_batch=32)  # fmt: skip
    settings, output = units.manager.base / "odd.env", units.manager.base / "odd.out"
    settings.write_text(SystemdBackend(units.manager.base, WorkersConfig())._environment(spec))
    run = subprocess.run(["systemd-run", "--user", "--wait", "--quiet", "-p", f"EnvironmentFile={settings}",
                          "-p", f"StandardOutput=file:{output}", "/usr/bin/env"],
                         env=units.manager.env, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert run.returncode == 0, run.stderr
    seen = dict(line.partition("=")[::2] for line in output.read_text().splitlines())
    assert seen["RBEED_MODEL"] == str(odd)
    assert seen["RBEED_WORKER_OPTS"] == "--n-ctx 0 --n-batch 32" and seen["RBEED_THREADS"] == "1"


@pytest.fixture
def as_its_service(units, monkeypatch) -> None:
    """This process's environment as a service of the test's user manager sees its own."""
    monkeypatch.setenv("INVOCATION_ID", "0" * 32)
    monkeypatch.setenv("MANAGERPID", str(units.manager.manager.pid))
    for name, value in units.manager.env.items():
        monkeypatch.setenv(name, value)


async def test_a_unit_that_systemctl_cannot_start_is_told_by_systemctl_s_words(as_its_service):
    # A unit that never ran has Result=success: it was told "stopped while loading".
    with pytest.raises(WorkerStartError) as refused:
        await UnitHandle("rbeed-nosuch@x.service").ready()
    assert str(refused.value).startswith("systemctl start rbeed-nosuch@x.service: ")
    assert "rbeed-nosuch@x.service not found" in str(refused.value)


def test_only_a_daemon_on_the_templates_runtime_dir_runs_workers_as_units(units, as_its_service):
    # As a second rbeed started from a unit (a shell in a terminal's user service) sees it: with
    # the systemd backend it stopped the first one's worker units, whose names it shares.

    def backend(runtime_dir: Path, wanted: str = "auto"):
        return choose_backend(configuration.load(Path("/dev/null"), {"runtime_dir": str(runtime_dir),
                                                                     "workers.backend": wanted}))  # fmt: skip

    other = units.manager.base / "other-run"
    assert isinstance(backend(units.rbeed_dir), SystemdBackend)
    assert isinstance(backend(other), ProcessBackend)
    with pytest.raises(configuration.ConfigError) as refused:
        backend(other, "systemd")
    assert str(refused.value) == (f"the systemd worker backend needs the runtime dir {units.rbeed_dir}, where "
                                  f"rbeed-worker@.service reads its settings, not {other}")  # fmt: skip


async def test_a_worker_unit_that_ignores_sigterm_is_killed_after_stop_grace(rbeed):
    drop_in = rbeed.manager.unit_dir / "rbeed-worker@.service.d" / "ignores-term.conf"
    drop_in.write_text("[Service]\nKillSignal=SIGCONT\n")  # as a worker stuck in a driver call would
    try:
        await rbeed.acheck("daemon-reload")
        rbeed.configure(CONFIG + "stop_grace = 1\n")
        async with rbeed.client() as client:
            worker = await job_result(client, spawn())
            with trio.fail_after(10):  # was the unit's TimeoutStopSec=, 30 s: the whole of rbeed's own
                stopped = await job_result(client, {"operation": "worker_delete", "id": worker["id"]})
        assert stopped["state"] == "stopped" and not pid_alive(worker["pid"])
        assert f"worker unit {unit_of(worker['id'])} ignored SIGTERM for 1 s: SIGKILL" in rbeed.logs()
    finally:
        drop_in.unlink()
        await rbeed.acheck("daemon-reload")


# --- 3. a worker unit stopped from outside ----------------------------------------------------


async def test_a_worker_unit_stopped_from_outside_fails_its_job_promptly_and_is_restarted(rbeed, client):
    worker = await job_result(client, spawn())
    unit = unit_of(worker["id"])
    async with job_events(client, LONG | {"worker_id": worker["id"]}) as (_, events):
        await read_events_until(events, is_token)
        await rbeed.acheck("stop", unit)
        rest = await rest_of(events, timeout=2)
    assert end_marker(rest) == f"[ERROR] worker {worker['id']} died (unit {unit} stopped)"
    # restart = "on-failure": the supervisor starts the unit again...
    assert (await job_result(client, {"operation": "worker_get", "id": worker["id"]}))["restarts"] == 1

    # ...and a job queued meanwhile is served by it.
    result = await job_result(client, SHORT | {"worker_id": worker["id"]})
    assert (result["worker_id"], result["completion_tokens"]) == (worker["id"], 3)
    restarted = await job_result(client, {"operation": "worker_get", "id": worker["id"]})
    assert restarted["state"] == "ready"
    assert restarted["pid"] == rbeed.main_pid(unit) != worker["pid"]
    assert not pid_alive(worker["pid"])


# --- 4. a bad model file -------------------------------------------------------------------


async def test_a_bad_model_file_fails_the_spawn_with_the_workers_reason(rbeed, client, registered_model):
    source = rbeed.manager.base / "broken.gguf"
    shutil.copyfile(registered_model, source)
    await job_result(client, {"operation": "model_download", "model": str(source)})
    installed = rbeed.state_dir / "models" / "broken.gguf"
    try:
        installed.write_bytes(b"<html>gone</html>" * 100)
        error = await job_error(client, spawn(model="broken"))
        # The reason is the unit's StatusText ("failed: ..."): the worker's stderr is not ours.
        match = re.fullmatch(rf"worker (broken-cpu-\d+) failed to load broken: not a GGUF file: {installed}", error)
        assert match, error
        assert rbeed.show(unit_of(match.group(1)), "ActiveState") == "inactive"  # not left failed
        assert await job_result(client, {"operation": "worker_list"}) == []
    finally:
        await job_result(client, {"operation": "model_delete", "id": "broken"})


@asynccontextmanager
async def loading_forever(rbeed, client, registered_model) -> AsyncIterator[tuple[str, str]]:
    """A spawn of model `stuck`, whose file is a FIFO (the worker's open() blocks: it loads
    forever), once its unit's main process runs: (its unit, the spawn's events)."""
    source = rbeed.manager.base / "stuck.gguf"
    shutil.copyfile(registered_model, source)
    await job_result(client, {"operation": "model_download", "model": str(source)})
    installed = rbeed.state_dir / "models" / "stuck.gguf"
    installed.unlink()
    os.mkfifo(installed)
    try:
        async with rbeed.client() as spawning, job_events(spawning, spawn(model="stuck")) as (_, events):
            [loading] = narrations(await read_events_until(events, lambda e: e.event == "narration"))
            unit = unit_of(loading.rsplit(" ", 1)[1])
            await rbeed.wait_state(unit, "activating")
            with trio.fail_after(STATE_TIMEOUT):
                while rbeed.show(unit, "MainPID") == "0":  # ExecStart= runs from here
                    await trio.sleep(0.02)
            yield unit, events
    finally:
        installed.unlink()


async def test_a_worker_killed_while_loading_fails_its_spawn_with_how_it_ended(rbeed, client, registered_model):
    async with loading_forever(rbeed, client, registered_model) as (unit, events):
        os.kill(rbeed.main_pid(unit), signal.SIGKILL)
        rest = await rest_of(events, timeout=10)
    # Was "unit ... failed to start (signal)"; the process backend says how, and so does this one.
    worker_id = unit.removeprefix("rbeed-worker@").removesuffix(".service")
    assert end_marker(rest) == f"[ERROR] worker {worker_id} failed to load stuck: worker killed by SIGKILL while loading"
    await job_result(client, {"operation": "model_delete", "id": "stuck"})


async def test_a_worker_loading_when_rbeed_stops_is_said_stopped_not_failed(rbeed, client, registered_model):
    async with loading_forever(rbeed, client, registered_model) as (unit, events):
        # StopPropagatedFrom= cancels the worker's start job at once: its Result stays "success".
        async with trio.open_nursery() as nursery:
            nursery.start_soon(rbeed.acheck, "stop", SERVICE)
            rest = await rest_of(events, timeout=10)
    worker_id = unit.removeprefix("rbeed-worker@").removesuffix(".service")
    assert end_marker(rest) == f"[ERROR] worker {worker_id} failed to load stuck: unit {unit} was stopped while loading", rbeed.logs()
    await rbeed.acheck("start", SERVICE)
    async with rbeed.client() as again:
        await job_result(again, {"operation": "model_delete", "id": "stuck"})


# --- 5. stopping rbeed.service --------------------------------------------------------------


async def test_stopping_the_service_drains_its_streams_and_stops_its_worker_units(rbeed, client):
    worker = await job_result(client, spawn())
    unit = unit_of(worker["id"])
    async with job_events(client, LONG | {"worker_id": worker["id"]}) as (_, events):
        await read_events_until(events, is_token)
        async with trio.open_nursery() as nursery:
            # systemctl stop returns once rbeed exited; the stream ends meanwhile.
            nursery.start_soon(rbeed.acheck, "stop", SERVICE)
            rest = await rest_of(events, timeout=10)
    assert end_marker(rest) == "[CANCELLED]"
    assert narrations(rest) == ["daemon shutting down"]
    # The worker went on generating through the grace period: systemd signalled rbeed first.
    assert sum(map(is_token, rest)) >= 3, rest
    assert rbeed.show(SERVICE, "ActiveState") == "inactive"
    assert (rbeed.show(SERVICE, "Result"), rbeed.show(SERVICE, "ExecMainStatus")) == ("success", "0")
    assert rbeed.show(unit, "ActiveState") == "inactive"
    assert not pid_alive(worker["pid"])


async def test_a_crash_of_rbeed_stops_its_worker_units_and_the_restarted_rbeed_starts_afresh(rbeed):
    await rbeed.acheck("restart", SERVICE)  # its first worker, tiny-cpu-1
    async with rbeed.client() as client:
        worker = await job_result(client, spawn())
    unit = unit_of(worker["id"])
    crashed = rbeed.main_pid()
    await rbeed.acheck("kill", "--signal=SIGKILL", SERVICE)
    # StopPropagatedFrom=: the worker unit goes with the crashed service, not on behind its back.
    await rbeed.wait_state(unit, "inactive")
    assert not pid_alive(worker["pid"])
    # Restart=on-failure brings rbeed back; it numbers its workers from 1 again, the same unit.
    await rbeed.wait_state(SERVICE, "active")
    assert rbeed.main_pid() != crashed
    async with rbeed.client() as again:
        assert await job_result(again, {"operation": "worker_list"}) == []
        fresh = await job_result(again, spawn())
        assert (fresh["id"], rbeed.main_pid(unit)) == (worker["id"], fresh["pid"])
        assert fresh["pid"] != worker["pid"]
        result = await job_result(again, SHORT | {"worker_id": fresh["id"]})
        assert result["completion_tokens"] == 3
    assert rbeed.show(SERVICE, "NRestarts") == "1"
    await delete_workers(rbeed)


async def test_worker_units_left_running_are_stopped_when_rbeed_starts(rbeed):
    """Units this rbeed did not start (those of a daemon run outside rbeed.service that crashed,
    an admin's systemctl start): the new daemon would take one for its worker of the same id."""
    await rbeed.acheck("restart", SERVICE)
    async with rbeed.client() as client:
        worker = await job_result(client, spawn())
    workers_dir = rbeed.rbeed_dir / "workers"
    settings = (workers_dir / f"{worker['id']}.env").read_text()
    await rbeed.acheck("stop", SERVICE)  # stops the worker; the next daemon's first is worker 1 again
    leftovers = {}
    for worker_id in (worker["id"], "tiny-cpu-9"):
        (workers_dir / f"{worker_id}.env").write_text(settings.replace(worker["id"], worker_id))
        await rbeed.acheck("start", unit_of(worker_id))
        leftovers[worker_id] = rbeed.main_pid(unit_of(worker_id))
    await rbeed.acheck("start", SERVICE)
    units = " ".join(sorted(map(unit_of, leftovers)))
    assert f"stopping worker units this rbeed did not start: {units}" in rbeed.logs()
    for worker_id, pid in leftovers.items():
        assert rbeed.show(unit_of(worker_id), "ActiveState") == "inactive"
        assert not pid_alive(pid)
    assert list(workers_dir.iterdir()) == []
    async with rbeed.client() as client:
        fresh = await job_result(client, spawn())
        assert fresh["id"] == worker["id"]
        assert fresh["pid"] == rbeed.main_pid(unit_of(worker["id"])) not in leftovers.values()
        assert (await job_result(client, SHORT | {"worker_id": fresh["id"]}))["completion_tokens"] == 3
    await delete_workers(rbeed)


# --- 6. idle exit ---------------------------------------------------------------------------


async def test_idle_exit_stops_the_service_and_the_socket_starts_it_again(rbeed):
    rbeed.configure(CONFIG.replace("[server]\n", "[server]\nidle_exit = 1\n"))
    async with rbeed.client() as client:
        [first] = await job_result(client, {"operation": "hive_list"})
    assert rbeed.show(SERVICE, "ActiveState") == "active"
    assert first["pid"] == rbeed.main_pid()
    await rbeed.wait_state(SERVICE, "inactive", "failed", timeout=10)
    assert (rbeed.show(SERVICE, "Result"), rbeed.show(SERVICE, "ExecMainStatus")) == ("success", "0")
    assert "idle for 1 s: exiting" in rbeed.logs()
    assert rbeed.show("rbeed.socket", "ActiveState") == "active"

    async with rbeed.client() as client:
        [second] = await job_result(client, {"operation": "hive_list"})
    assert second["pid"] == rbeed.main_pid() != first["pid"]


# --- 7. sd_notify ---------------------------------------------------------------------------


async def poll_status_text(rbeed, wanted: str, timeout: float = 5) -> None:
    status = ""
    with trio.move_on_after(timeout):
        while (status := rbeed.show(SERVICE, "StatusText")) != wanted:
            await trio.sleep(0.05)
        return
    raise AssertionError(f"StatusText {status!r}, not {wanted!r}")


async def test_status_text_tells_workers_and_running_jobs(rbeed, client):
    await poll_status_text(rbeed, "0 workers, 0 jobs running")
    worker = await job_result(client, spawn())
    async with job_events(client, LONG | {"worker_id": worker["id"]}) as (job_id, events):
        await read_events_until(events, is_token)
        await poll_status_text(rbeed, "1 worker, 1 job running")
        assert (await client.request("DELETE", f"/v1/jobs/{job_id}")).status == 200
        assert end_marker(await rest_of(events, timeout=5)) == "[CANCELLED]"
    await poll_status_text(rbeed, "1 worker, 0 jobs running")


async def test_the_watchdog_is_fed(rbeed):
    drop_in = rbeed.manager.unit_dir / f"{SERVICE}.d" / "zz-watchdog.conf"
    drop_in.write_text("[Service]\nWatchdogSec=1\n")
    try:
        rbeed.check("daemon-reload")
        rbeed.check("restart", SERVICE)
        assert rbeed.show(SERVICE, "WatchdogUSec") == "1s"
        main_pid = rbeed.main_pid()
        pings = {rbeed.show(SERVICE, "WatchdogTimestampMonotonic")}
        # Three watchdog periods: a missed ping would have the manager kill and restart rbeed.
        deadline = trio.current_time() + 3
        while trio.current_time() < deadline:
            assert (rbeed.show(SERVICE, "ActiveState"), rbeed.main_pid()) == ("active", main_pid)
            pings.add(rbeed.show(SERVICE, "WatchdogTimestampMonotonic"))
            await trio.sleep(0.1)
        assert rbeed.show(SERVICE, "NRestarts") == "0"
        assert len(pings) >= 5, pings  # pinged every 0.5 s
    finally:
        drop_in.unlink()
        rbeed.check("daemon-reload")
        rbeed.check("stop", SERVICE)


async def test_reload_rereads_the_config_in_the_same_process(rbeed):
    main_pid = rbeed.main_pid()
    rbeed.config.write_text(CONFIG.replace('"auto"', '"process"') + "[jobs]\nfinished_ttl = 60\n")
    # ExecReload= (rbeed reload) sends SIGHUP and returns once rbeed has reloaded: it returned at
    # once (kill -HUP), and the log had to be polled.
    rbeed.check("reload", SERVICE)
    assert f"reloaded {rbeed.config}: jobs.finished_ttl\n" in rbeed.logs()
    assert "not reloaded (restart needed): workers.backend" in rbeed.logs()
    assert (rbeed.show(SERVICE, "ActiveState"), rbeed.main_pid()) == ("active", main_pid)
    await poll_status_text(rbeed, "0 workers, 0 jobs running")

    # A config it cannot read fails the reload, as systemctl tells; rbeed runs on with the old one.
    rbeed.config.write_text(CONFIG + "[jobs]\nfinished_ttl = 'soon'\n")
    refused = rbeed.manager.systemctl("reload", SERVICE)
    assert refused.returncode != 0 and "reload failed" in refused.stderr + rbeed.logs()
    assert "reload failed, keeping the running config" in rbeed.logs() and "Expected `float`" in rbeed.logs()
    assert (rbeed.show(SERVICE, "ActiveState"), rbeed.main_pid()) == ("active", main_pid)
    rbeed.config.write_text(CONFIG)


# --- 8. both backends pass the same worker tests ---------------------------------------------


@pytest.fixture(scope="module")
def process_rbeed(tiny_model) -> Iterator[Daemon]:
    """rbeed with the process backend, outside the manager, configured like the one under it."""
    base = short_base()
    daemon = start_daemon(base, config=CONFIG.replace('"auto"', '"process"'),
                          env={"RBEED_WORKER_TOKEN_DELAY": TOKEN_DELAY})  # fmt: skip
    try:
        trio.run(register, daemon, tiny_model)
        yield daemon
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.stop(signal.SIGKILL)
        shutil.rmtree(base)


@dataclass
class Backend:
    name: str
    rbeed: Daemon | Installed

    def unit_state(self, worker_id: str) -> str | None:
        """ActiveState of the worker's unit; None under the process backend."""
        return self.rbeed.show(unit_of(worker_id), "ActiveState") if self.name == "systemd" else None


@pytest.fixture(params=["process", "systemd"])
def backend(request) -> Backend:
    return Backend(request.param, request.getfixturevalue("process_rbeed" if request.param == "process" else "rbeed"))


@pytest.fixture
async def any_client(backend) -> AsyncIterator[Client]:
    async with backend.rbeed.client() as client:
        yield client
    await delete_workers(backend.rbeed)


async def test_spawn_list_get_delete(backend, any_client):
    worker = await job_result(any_client, spawn())
    assert (worker["model"], worker["state"], worker["threads"]) == ("tiny", "ready", 1)
    assert worker["backend"] == backend.name
    assert pid_alive(worker["pid"])
    assert backend.unit_state(worker["id"]) in ("active", None)
    assert [steady(w) for w in await job_result(any_client, {"operation": "worker_list"})] == [steady(worker)]
    assert steady(await job_result(any_client, {"operation": "worker_get", "id": worker["id"]})) == steady(worker)
    assert worker["rss"] > 10 << 20  # the unit's main process, as the daemon sees it through /proc

    stopped = await job_result(any_client, {"operation": "worker_delete", "id": worker["id"]})
    assert (stopped["id"], stopped["state"]) == (worker["id"], "stopped")
    assert not pid_alive(worker["pid"])
    assert backend.unit_state(worker["id"]) in ("inactive", None)
    assert await job_result(any_client, {"operation": "worker_list"}) == []
    error = await job_error(any_client, {"operation": "worker_get", "id": worker["id"]})
    assert error == f"unknown worker {worker['id']!r}"


async def test_infer_streams_tokens_through_the_worker(backend, any_client):
    worker = await job_result(any_client, spawn())
    events = await run_job(any_client, SHORT | {"worker_id": worker["id"], "max_tokens": 5})
    assert end_marker(events) == "[DONE]"
    tokens = [json.loads(e.data) for e in events if is_token(e)]
    assert [t["i"] for t in tokens] == [0, 1, 2, 3, 4]
    assert all(t["t"] for t in tokens)
    result = result_of(events)
    assert (result["worker_id"], result["completion_tokens"], result["finish_reason"]) == (worker["id"], 5, "length")


async def test_delete_mid_stream_ends_the_job_with_an_error(backend, any_client):
    worker = await job_result(any_client, spawn())
    async with job_events(any_client, LONG | {"worker_id": worker["id"]}) as (_, events):
        await read_events_until(events, is_token)
        await job_result(any_client, {"operation": "worker_delete", "id": worker["id"]})
        rest = await rest_of(events, timeout=5)
    assert end_marker(rest) == f"[ERROR] worker {worker['id']} stopped"
    assert not pid_alive(worker["pid"])
    assert backend.unit_state(worker["id"]) in ("inactive", None)


async def test_kill_9_mid_stream_ends_the_job_with_worker_died_and_restarts_it(backend, any_client):
    worker = await job_result(any_client, spawn())
    async with job_events(any_client, LONG | {"worker_id": worker["id"]}) as (_, events):
        await read_events_until(events, is_token)
        assert worker["pid"] > 0  # never kill(0): that is our own process group
        os.kill(worker["pid"], signal.SIGKILL)
        rest = await rest_of(events, timeout=2)
    assert end_marker(rest) == f"[ERROR] worker {worker['id']} died (killed by SIGKILL)"
    assert (await job_result(any_client, {"operation": "worker_get", "id": worker["id"]}))["restarts"] == 1
    result = await job_result(any_client, SHORT | {"worker_id": worker["id"]})
    assert result["worker_id"] == worker["id"]
    restarted = await job_result(any_client, {"operation": "worker_get", "id": worker["id"]})
    assert restarted["pid"] != worker["pid"] and pid_alive(restarted["pid"])
    assert backend.unit_state(worker["id"]) in ("active", None)


# --- 9. chaos, with every worker a unit --------------------------------------------------------


async def test_chaos_keeps_every_rule_with_workers_as_units(rbeed, client, registered_model):
    await chaos.register_models(client, registered_model, registered_model.parent, spawn=True)

    async def connect(unix: bool) -> trio.abc.Stream:
        if unix:
            return await trio.open_unix_socket(str(rbeed.socket_path))
        return await trio.open_tcp_stream("127.0.0.1", rbeed.tcp_port)

    run = chaos.Chaos(lambda unix: rbeed.client(tcp=not unix), connect, lambda: rbeed.acheck("reload", SERVICE),
                      on_demand=False)  # fmt: skip
    try:
        await chaos.run(run, clients=4, actions=15)
    finally:
        await delete_workers(rbeed)
        await job_result(client, {"operation": "model_delete", "id": "tiny2"})
    assert "Traceback" not in rbeed.logs()
