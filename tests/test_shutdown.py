"""SIGTERM/SIGINT: stop accepting, drain running jobs for shutdown_grace, end streams, exit 0."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import asynccontextmanager

import pytest
import trio

from support import (
    SLOW_HIVE,
    SLOW_JOB,
    end_marker,
    is_narration,
    job_result,
    open_stream,
    read_events_until,
    run_job,
    short_base,
    slow_hive_config,
    start_daemon,
    submit,
    until_pending,
    until_stopped,
)
from rbeed.httpclient import Client

GRACE = 2  # room for the six exchanges that must see the job still running


async def until_draining(client) -> None:
    """Ask for new jobs on an open connection until the daemon refuses: the signal was handled."""
    with trio.fail_after(5):
        while (response := await client.request("POST", "/v1/jobs", body=b"{}")).status == 400:
            pass
    assert response.status == 503 and response.json() == {"error": "daemon shutting down"}


async def assert_not_accepting(daemon) -> None:
    for unix in (False, True):
        with pytest.raises(OSError), trio.fail_after(5):
            await open_stream(daemon, unix)


@asynccontextmanager
async def draining_mid_job(daemon, narration: str):
    """A slow job streamed up to `narration`, then SIGTERM: yields the rest of its events once
    the daemon drains (a second connection, kept open, sees new jobs refused)."""
    async with daemon.client() as client, daemon.client() as other:
        await run_job(client, SLOW_HIVE)
        job_id = await submit(client, SLOW_JOB)
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
            events = response.aiter_sse()
            with trio.fail_after(10):
                await read_events_until(events, is_narration(narration))
                await other.request("GET", "/health")
                daemon.proc.send_signal(signal.SIGTERM)
                await until_draining(other)
            yield events


def wait_exit(daemon, within: float) -> float:
    start = time.monotonic()
    assert daemon.proc.wait(within) == 0, daemon.log()
    return time.monotonic() - start


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_drains_then_cancels_running_jobs_and_exits_0(tmp_path, signum):
    daemon = start_daemon(tmp_path / "d", config=slow_hive_config(f"[server]\nshutdown_grace = {GRACE}\n"))
    try:
        async with daemon.client() as client, daemon.client() as other:
            await run_job(client, SLOW_HIVE)
            running, queued = await submit(client, SLOW_JOB), await submit(client, SLOW_JOB)
            assert (daemon.state_dir / "rbeed.sqlite3-wal").exists()  # the catalog is open
            async with client.stream("GET", f"/v1/jobs/{running}/stream") as response:
                events = response.aiter_sse()
                with trio.fail_after(10):
                    await read_events_until(events, is_narration("starting 127.0.0.1 start"))
                assert (await other.request("GET", "/health")).status == 200  # a connection kept open
                daemon.proc.send_signal(signum)
                signalled = time.monotonic()
                await until_draining(other)
                await assert_not_accepting(daemon)
                assert (await other.request("GET", f"/v1/jobs/{queued}")).json()["state"] == "cancelled"
                assert (await other.request("GET", f"/v1/jobs/{running}")).json()["state"] == "running"
                with trio.fail_after(GRACE + 5):
                    rest = [event async for event in events]
        assert [json.loads(e.data)["message"] for e in rest if e.event == "narration"] == ["daemon shutting down"]
        assert end_marker(rest) == "[CANCELLED]"
        assert time.monotonic() - signalled >= GRACE  # the job had its grace period
        wait_exit(daemon, within=5)
    finally:
        daemon.stop()
    assert not daemon.socket_path.exists()
    assert not (daemon.state_dir / "rbeed.sqlite3-wal").exists()  # the catalog was closed cleanly


async def test_a_job_finishing_within_the_grace_period_ends_done(tmp_path):
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    # Held open read-write: the job's `read` never blocks on open, and our write never blocks.
    holder = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    command = f"sh -c 'echo waiting; read line < {fifo}; echo got $line'"
    daemon = start_daemon(tmp_path / "d", config=f'[server]\nshutdown_grace = 30\n[hives]\nstart_command = "{command}"\n')
    try:
        async with draining_mid_job(daemon, "waiting") as events:
            os.write(holder, b"go\n")
            with trio.fail_after(10):
                rest = [event async for event in events]
        messages = [json.loads(e.data)["message"] for e in rest if e.event == "narration"]
        assert messages == ["got go"] and end_marker(rest) == "[DONE]"
        assert wait_exit(daemon, within=5) < 5  # no waiting out the 30 s grace once nothing runs
    finally:
        os.close(holder)
        daemon.stop()


async def test_a_second_signal_cancels_at_once(tmp_path):
    daemon = start_daemon(tmp_path / "d", config=slow_hive_config("[server]\nshutdown_grace = 30\n"))
    try:
        async with draining_mid_job(daemon, "starting 127.0.0.1 start") as events:
            daemon.proc.send_signal(signal.SIGTERM)
            with trio.fail_after(10):
                rest = [event async for event in events]
        assert end_marker(rest) == "[CANCELLED]"
        wait_exit(daemon, within=5)
    finally:
        daemon.stop()


async def test_an_idle_daemon_exits_0_promptly_and_removes_its_socket(tmp_path):
    daemon = start_daemon(tmp_path / "d")
    async with daemon.client() as client:
        assert (await client.request("GET", "/health")).status == 200  # a keep-alive connection stays open
        daemon.proc.send_signal(signal.SIGINT)
        # Closed at once, that connection does not hold the exit for the second given to streams
        # (here ~0.1 s in all).
        assert wait_exit(daemon, within=5) < 1
    assert not daemon.socket_path.exists()
    assert "rbeed stopped" in daemon.log() and "Traceback" not in daemon.log()


def test_rbeed_reload_returns_once_the_daemon_has_reloaded_and_fails_when_it_could_not():
    base = short_base()
    daemon = start_daemon(base, config="[jobs]\nfinished_ttl = 600\n")
    config = base / "rbeed.toml"

    def reload(*flags: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "rbeed", "reload", str(daemon.proc.pid), "--config", str(config),
                   "--timeout", "20", *flags]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    try:
        # The runtime dir from the file: a None for the absent flag wrote over it.
        config.write_text(f"runtime_dir = '{daemon.runtime_dir}'\n[jobs]\nfinished_ttl = 30\n")
        done = reload()
        assert done.returncode == 0, done.stderr
        config.write_text("[jobs]\nfinished_ttl = 60\n")
        done = reload("--runtime-dir", str(daemon.runtime_dir))
        assert done.returncode == 0, done.stderr
        assert f"reloaded {config}: jobs.finished_ttl" in daemon.log()  # when it returned: no wait
        # A config that does not parse: this command cannot read it either, and signals all the same.
        config.write_text("[jobs]\nfinished_ttl = 'soon'\n")
        refused = reload("--runtime-dir", str(daemon.runtime_dir))
        assert refused.returncode == 1
        assert "reload failed, keeping the running config: " in refused.stderr
        assert "Expected `float`, got `str` - at `$.jobs.finished_ttl`" in refused.stderr
        gone = subprocess.run([sys.executable, "-m", "rbeed", "reload", "999999999"], capture_output=True, text=True)
        assert gone.returncode == 1 and "cannot signal pid 999999999" in gone.stderr
        # Not a daemon (SIGHUP ends it): told at once, not after the timeout.
        with subprocess.Popen(["sleep", "60"]) as sleeper:
            threading.Thread(target=sleeper.wait, daemon=True).start()  # reaped as it dies, no zombie
            command = [sys.executable, "-m", "rbeed", "reload", str(sleeper.pid), "--runtime-dir", str(daemon.runtime_dir)]
            died = subprocess.run(command, capture_output=True, text=True, timeout=15)
        assert died.returncode == 1 and f"pid {sleeper.pid} exited before it recorded a reload" in died.stderr
        assert daemon.stop() == 0
    finally:
        daemon.stop(signal.SIGKILL)
        shutil.rmtree(base)


async def test_signals_that_come_while_the_workers_stop_are_handled_not_fatal(tmp_path, tiny_model):
    # Stopping a worker may take stop_grace (one that ignores SIGTERM). A SIGTERM or SIGHUP then
    # killed the daemon: its signal handling ended with its services, before the workers stopped.
    daemon = start_daemon(short_base(), config="[workers]\nstop_grace = 3\n")
    try:
        async with daemon.client() as client:
            await job_result(client, {"operation": "model_download", "model": str(tiny_model)})
            worker = await job_result(client, {"operation": "worker_spawn", "model": "tiny", "threads": 1})
        os.kill(worker["pid"], signal.SIGSTOP)  # its SIGTERM stays pending
        await until_stopped(worker["pid"])
        daemon.proc.send_signal(signal.SIGTERM)
        await until_pending(worker["pid"], signal.SIGTERM)
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.proc.send_signal(signal.SIGTERM)
        assert wait_exit(daemon, within=10) >= 2  # it waited out the worker's stop_grace
        log = daemon.log()
        assert "ignored SIGTERM for 3 s: SIGKILL" in log and log.rstrip().endswith("rbeed stopped")
        assert not daemon.socket_path.exists()
    finally:
        daemon.stop()
        shutil.rmtree(daemon.socket_path.parent)
    with pytest.raises(ProcessLookupError):
        os.kill(worker["pid"], 0)


async def test_a_daemon_leaves_the_socket_a_later_one_bound_at_its_path(tmp_path):
    # A socket path outside the runtime dir, which no lock guards: a daemon started while the
    # first drains binds it again (the first's is stale), and the first must not remove it at exit.
    shared = tmp_path / "shared.sock"
    first = start_daemon(tmp_path / "a", "--socket", str(shared), config=slow_hive_config("[server]\nshutdown_grace = 30\n"))
    first.socket_path = shared
    second = None
    try:
        async with draining_mid_job(first, "starting 127.0.0.1 start") as events:
            second = start_daemon(tmp_path / "b", "--socket", str(shared))
            first.proc.send_signal(signal.SIGTERM)  # the second: at once
            with trio.fail_after(10):
                assert end_marker([event async for event in events]) == "[CANCELLED]"
            wait_exit(first, within=5)
        async with Client(f"unix:{shared}") as client:
            assert (await client.request("GET", "/health")).status == 200
    finally:
        first.stop()
        if second is not None:
            second.stop()
