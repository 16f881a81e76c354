"""Tests of rbeed.activation with real inherited fds in child processes, as systemd passes them."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rbeed.activation import ActivationError, listen_fds

REPO = Path(__file__).resolve().parent.parent

# What systemd does before exec: move the passed fds to 3, 4, ... and set LISTEN_PID to the pid
# that will call listen_fds() (exec keeps the pid). argv: N_FDS FD... -- COMMAND...
LAUNCHER = """
import os, sys
count = int(sys.argv[1])
sources = [int(fd) for fd in sys.argv[2:2 + count]]
for target, source in enumerate(sources, start=3):
    os.dup2(source, target)  # dup2 clears close-on-exec: the child inherits fds 3...
for source in sources:
    os.close(source)
os.environ['LISTEN_PID'] = str(os.getpid())
command = sys.argv[3 + count:]
os.execv(command[0], command)
"""

# Calls listen_fds() and reports what it got; each socket then accepts one connection and
# answers with its name, which proves the returned objects are the very listeners.
CHILD = """
import json, os, socket, sys
from rbeed.activation import ActivationError, listen_fds
try:
    inherited = listen_fds()
except ActivationError as exc:
    print(json.dumps({'error': str(exc), 'fd3_open': os.path.exists('/proc/self/fd/3'),
                      'env': sorted(k for k in os.environ if k.startswith('LISTEN_'))}))
    sys.exit(0)
report = {
    'sockets': [
        {'name': name, 'family': sock.family.name, 'fd': sock.fileno(),
         'address': sock.getsockname(), 'inheritable': sock.get_inheritable()}
        for name, sock in inherited
    ],
    'env': sorted(k for k in os.environ if k.startswith('LISTEN_')),
}
print(json.dumps(report), flush=True)
for name, sock in inherited:
    sock.settimeout(30)
    connection, _ = sock.accept()
    with connection:
        connection.sendall(name.encode())
"""


def high_fd(fd: int) -> int:
    """A close-on-exec duplicate of fd numbered >= 10, clear of the 3, 4, ... targets."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


def spawn(fds: list[int], env: dict[str, str], command: tuple[str, ...] = ("-c", CHILD)) -> subprocess.Popen[str]:
    """Python running `command` with `fds` passed as socket activation passes them."""
    passed = [high_fd(fd) for fd in fds]
    try:
        return subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(len(passed)), *map(str, passed), "--",
             sys.executable, *command],
            pass_fds=passed, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(REPO), **env},
        )
    finally:
        for fd in passed:
            os.close(fd)


def report_of(child: subprocess.Popen[str]) -> dict:
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line, child.communicate(timeout=30)[1]
    return json.loads(line)


@pytest.fixture
def tcp_listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


@pytest.fixture
def unix_listener(tmp_path) -> Iterator[socket.socket]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(tmp_path / "rbeed.sock"))
        sock.listen()
        yield sock


def test_named_tcp_and_unix_listeners_are_returned_in_fd_order(tcp_listener, unix_listener):
    child = spawn(
        [tcp_listener.fileno(), unix_listener.fileno()],
        {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "tcp:unix"},
    )
    try:
        report = report_of(child)
        assert report["env"] == []  # LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES unset
        tcp, unix = report["sockets"]
        assert (tcp["name"], tcp["family"], tcp["fd"]) == ("tcp", "AF_INET", 3)
        assert tuple(tcp["address"]) == tcp_listener.getsockname()
        assert (unix["name"], unix["family"], unix["fd"]) == ("unix", "AF_UNIX", 4)
        assert unix["address"] == unix_listener.getsockname()
        assert not tcp["inheritable"] and not unix["inheritable"]
        for listener, family in ((tcp_listener, socket.AF_INET), (unix_listener, socket.AF_UNIX)):
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.settimeout(30)
                client.connect(listener.getsockname())
                answer = client.recv(16)
            assert answer == (b"tcp" if family == socket.AF_INET else b"unix")
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()


def test_names_default_to_unknown(tcp_listener):
    child = spawn([tcp_listener.fileno()], {"LISTEN_FDS": "1"})
    try:
        (only,) = report_of(child)["sockets"]
        assert only["name"] == "unknown"
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize(
    ("make_fd", "message"),
    [
        ("pipe", "inherited fd 3 ('bad') is not a socket"),
        ("datagram", "inherited fd 3 ('bad') is a SOCK_DGRAM socket, not SOCK_STREAM"),
        ("not_listening", "inherited fd 3 ('bad') is a stream socket that is not listening"),
    ],
)
def test_fds_other_than_listening_stream_sockets_are_rejected(make_fd, message, tmp_path):
    with contextlib.ExitStack() as cleanup:
        if make_fd == "pipe":
            read_end, write_end = os.pipe()
            cleanup.callback(os.close, read_end)
            cleanup.callback(os.close, write_end)
            fd = read_end
        else:
            kind = socket.SOCK_DGRAM if make_fd == "datagram" else socket.SOCK_STREAM
            sock = cleanup.enter_context(socket.socket(socket.AF_UNIX, kind))
            sock.bind(str(tmp_path / "s"))
            fd = sock.fileno()
        child = spawn([fd], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "bad"})
        report = report_of(child)
        assert child.wait(timeout=30) == 0
    assert report["error"] == message
    assert report["fd3_open"]  # a rejected fd is left open, not closed behind the caller's back
    assert report["env"] == []


def test_a_later_bad_fd_leaves_the_earlier_good_ones_open(tcp_listener):
    read_end, write_end = os.pipe()
    try:
        child = spawn([tcp_listener.fileno(), read_end], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "tcp:x"})
        report = report_of(child)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert report["error"] == "inherited fd 4 ('x') is not a socket"
    assert report["fd3_open"]


def test_fdnames_must_match_the_count(tcp_listener):
    child = spawn([tcp_listener.fileno()], {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "tcp:unix"})
    assert report_of(child)["error"] == "LISTEN_FDNAMES has 2 names for LISTEN_FDS=1"


# In-process: these return or raise before touching any fd.

def test_fds_meant_for_another_pid_are_ignored_and_the_variables_unset(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "tcp:unix")
    assert listen_fds() == []
    assert {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"}.isdisjoint(os.environ)


def test_unset_false_keeps_the_variables(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds(unset=False) == []
    assert os.environ["LISTEN_FDS"] == "1"


def test_no_variables_no_sockets(monkeypatch):
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert listen_fds() == []


@pytest.mark.parametrize(("pid", "fds"), [("ours", "two"), ("ours", "-1"), ("x", "1"), ("ours", " 1"), ("ours", "1_0"),
                                          ("+ours", "1")])
def test_malformed_variables_raise(monkeypatch, pid, fds):
    monkeypatch.setenv("LISTEN_PID", pid.replace("ours", str(os.getpid())))
    monkeypatch.setenv("LISTEN_FDS", fds)
    with pytest.raises(ActivationError, match="is not a non-negative integer"):
        listen_fds()
    assert "LISTEN_FDS" not in os.environ


def test_a_count_past_the_fd_table_is_refused_before_anything_is_made_of_it(monkeypatch):
    # ["unknown"] * count: 10**15 was a MemoryError, 3*10**7 a quarter of a gigabyte first.
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "1000000000000000")
    with pytest.raises(ActivationError, match=r"^LISTEN_FDS=1000000000000000 is more than the \d+ fds this process may have$"):
        listen_fds()


def test_the_daemon_reads_its_fds_before_it_opens_any_file(tcp_listener, tmp_path):
    # Its lock files took the free numbers first: an fd 4 that was never passed was "not a socket".
    serve = ("-m", "rbeed", "serve", "--state-dir", str(tmp_path / "state"), "--runtime-dir", str(tmp_path / "run"))
    child = spawn([tcp_listener.fileno()], {"LISTEN_FDS": "2", "LISTEN_FDNAMES": "tcp:x\ny"}, serve)
    _, stderr = child.communicate(timeout=30)
    assert child.returncode == 1, stderr
    assert stderr.rstrip().endswith("inherited fd 4 ('x\\ny') is not open: Bad file descriptor"), stderr


def test_zero_fds_for_us_is_an_empty_list(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "0")
    assert listen_fds() == []
