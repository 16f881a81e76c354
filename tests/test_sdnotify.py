"""Tests of rbeed.sdnotify: real datagram sockets, MockClock watchdog, a real systemd manager."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import trio

from rbeed.sdnotify import Notifier, extend_timeout

if TYPE_CHECKING:
    from user_systemd import UserSystemd


REPO = Path(__file__).resolve().parent.parent


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued on `sock` (all were sent synchronously before)."""
    sock.setblocking(False)
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096))
        except BlockingIOError:
            return messages


@pytest.fixture
def path_socket(tmp_path, monkeypatch):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    with sock:
        yield sock


def test_notify_sends_one_datagram_to_a_path(path_socket):
    notifier = Notifier.from_env()
    assert notifier.enabled
    assert notifier.notify("READY=1", "STATUS=listening on 127.0.0.1:8500")
    assert received(path_socket) == [b"READY=1\nSTATUS=listening on 127.0.0.1:8500"]


def test_notify_to_an_abstract_socket(monkeypatch):
    name = f"rbeed-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier.from_env().notify("STOPPING=1")
        assert received(sock) == [b"STOPPING=1"]


def test_newline_inside_a_line_cannot_start_another_assignment(path_socket):
    Notifier.from_env().notify("STATUS=load failed:\nREADY=1")
    assert received(path_socket) == [b"STATUS=load failed: READY=1"]


def test_without_notify_socket_everything_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = Notifier.from_env()
    assert not notifier.enabled
    assert notifier.notify("READY=1") is False
    assert notifier.watchdog_interval is None


async def test_watchdog_returns_at_once_when_disabled(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    with trio.fail_after(1):
        await Notifier.from_env().watchdog()


def test_send_errors_are_logged_not_raised(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level(logging.WARNING, logger="rbeed.sdnotify"):
        assert Notifier.from_env().notify("READY=1") is False
    assert "nobody-listens" in caplog.text


def test_relative_notify_socket_is_ignored(monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/notify")
    with caplog.at_level(logging.WARNING, logger="rbeed.sdnotify"):
        notifier = Notifier.from_env()
    assert not notifier.enabled
    assert "relative/notify" in caplog.text


def test_from_env_unsets_only_when_asked(path_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    kept = Notifier.from_env()
    assert os.environ.get("NOTIFY_SOCKET") == kept.address
    taken = Notifier.from_env(unset=True)
    assert {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}.isdisjoint(os.environ)
    # ...but the notifier still knows where to send and how often to ping
    assert taken.address == kept.address
    assert taken.watchdog_interval == 2.0
    assert taken.notify("READY=1")
    assert received(path_socket) == [b"READY=1"]


def test_extend_timeout_line():
    assert extend_timeout(2.5) == "EXTEND_TIMEOUT_USEC=2500000"
    assert extend_timeout(90) == "EXTEND_TIMEOUT_USEC=90000000"


async def test_watchdog_pings_at_half_the_timeout(path_socket, monkeypatch, autojump_clock):
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # manager's timeout 2 s: ping every 1 s
    notifier = Notifier.from_env()
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        await nursery.start(notifier.watchdog)
        assert received(path_socket) == [b"WATCHDOG=1"]  # the first ping comes before started()
        await trio.sleep(4.5)
        nursery.cancel_scope.cancel()
    assert trio.current_time() - start == pytest.approx(4.5)
    assert received(path_socket) == [b"WATCHDOG=1"] * 4  # at t = 1, 2, 3, 4


async def test_watchdog_pings_when_watchdog_pid_is_ours(path_socket, monkeypatch, autojump_clock):
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    async with trio.open_nursery() as nursery:
        await nursery.start(Notifier.from_env().watchdog)
        await trio.sleep(1.25)
        nursery.cancel_scope.cancel()
    assert received(path_socket) == [b"WATCHDOG=1"] * 3  # t = 0, 0.5, 1.0


async def test_watchdog_pid_of_another_process_means_no_pings(path_socket, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    notifier = Notifier.from_env()
    assert notifier.watchdog_interval is None
    with trio.fail_after(1):
        await notifier.watchdog()  # returns at once
    assert received(path_socket) == []


# --- against a real systemd user manager -------------------------------------------------

def python_unit(manager: UserSystemd, unit: str, script: str, service: str = "") -> None:
    """Install a Type=notify unit running `script` with this interpreter, the repo importable."""
    path = manager.base / f"{unit}.py"
    path.write_text(textwrap.dedent(script))
    manager.install_unit(unit, textwrap.dedent(f"""\
        [Service]
        Type=notify
        NotifyAccess=main
        Environment=PYTHONPATH={REPO}
        ExecStart={sys.executable} {path}
        TimeoutStartSec=60
        """) + textwrap.dedent(service))


def wait_for_property(manager: UserSystemd, unit: str, prop: str, wanted: set[str], polls: int = 500) -> str:
    """Poll `systemctl show` (a real external state) until `prop` is one of `wanted`."""
    value = ""
    for _ in range(polls):
        value = manager.show(unit, prop)
        if value in wanted:
            return value
    raise AssertionError(f"{unit} {prop}={value!r}, expected one of {sorted(wanted)}")


@pytest.mark.systemd
def test_start_returns_only_after_ready(user_systemd):
    gate = user_systemd.runtime_dir / f"gate-{uuid.uuid4().hex}"
    os.mkfifo(gate)
    unit = "rbeed-notify-smoke.service"
    python_unit(user_systemd, unit, f"""
        from rbeed.sdnotify import Notifier
        import signal
        notifier = Notifier.from_env(unset=True)
        open('{gate}').read()
        notifier.notify('READY=1', 'STATUS=serving')
        signal.pause()
        """)
    start = subprocess.Popen(
        ["systemctl", "--user", "start", unit], env=user_systemd.env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        # The process runs and is blocked on the gate: the unit is activating, start still waits.
        wait_for_property(user_systemd, unit, "ActiveState", {"activating"})
        assert user_systemd.show(unit, "SubState") == "start"
        assert start.poll() is None
        with open(gate, "w") as release:
            release.write("go")
        assert start.wait(timeout=30) == 0, start.stderr.read()
    finally:
        if start.poll() is None:
            start.kill()
    assert user_systemd.systemctl("is-active", unit).stdout.strip() == "active"
    assert user_systemd.show(unit, "StatusText") == "serving"
    stop = user_systemd.systemctl("stop", unit)
    assert stop.returncode == 0, stop.stderr
    assert user_systemd.systemctl("is-active", unit).stdout.strip() == "inactive"


@pytest.mark.systemd
def test_status_text_survives_a_failed_start(user_systemd):
    # rbeed surfaces worker load failures this way: STATUS= then exit, read after the failure.
    unit = "rbeed-notify-fails.service"
    python_unit(user_systemd, unit, """
        from rbeed.sdnotify import Notifier
        import sys
        Notifier.from_env().notify('STATUS=failed: model file missing')
        sys.exit(3)
        """)
    start = user_systemd.systemctl("start", unit)
    assert start.returncode != 0
    assert user_systemd.show(unit, "ActiveState") == "failed"
    assert user_systemd.show(unit, "ExecMainStatus") == "3"
    assert user_systemd.show(unit, "StatusText") == "failed: model file missing"
    # reset-failed unloads the unit, and the text with it
    assert user_systemd.systemctl("reset-failed", unit).returncode == 0
    assert user_systemd.show(unit, "StatusText") == ""


@pytest.mark.systemd
def test_watchdog_keeps_a_trio_service_alive_and_a_silent_one_is_killed(user_systemd):
    pinging, silent = "rbeed-watchdog-pings.service", "rbeed-watchdog-silent.service"
    python_unit(user_systemd, pinging, """
        from rbeed.sdnotify import Notifier
        import trio
        notifier = Notifier.from_env(unset=True)
        async def main():
            async with trio.open_nursery() as nursery:
                await nursery.start(notifier.watchdog)
                notifier.notify('READY=1')
        trio.run(main)
        """, "WatchdogSec=1\n")
    python_unit(user_systemd, silent, """
        from rbeed.sdnotify import Notifier
        import signal
        Notifier.from_env().notify('READY=1')
        signal.pause()
        """, "WatchdogSec=1\n")
    for unit in (pinging, silent):
        start = user_systemd.systemctl("start", unit)
        assert start.returncode == 0, start.stderr
    try:
        # Each ping moves WatchdogTimestamp; wait for three pings (about 1.5 s of real time).
        seen = {user_systemd.show(pinging, "WatchdogTimestampMonotonic")}
        for _ in range(2000):
            if len(seen) == 4:
                break
            seen.add(user_systemd.show(pinging, "WatchdogTimestampMonotonic"))
        assert len(seen) == 4, seen
        assert user_systemd.show(pinging, "ActiveState") == "active"
        wait_for_property(user_systemd, silent, "Result", {"watchdog"}, polls=2000)
    finally:
        user_systemd.systemctl("stop", pinging, silent)
        user_systemd.systemctl("reset-failed", silent)
