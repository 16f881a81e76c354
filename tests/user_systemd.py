"""Pytest fixture `user_systemd`: a real systemd user manager, for hosts where systemd is not PID 1."""

# Needs root: the manager runs in a private mount namespace (an overlay on /run, a tmpfs on
# /run/systemd, /dev/kmsg bound to a FIFO that carries its log) and in one cgroup directory of
# its own, /sys/fs/cgroup/unified/<name> (or /sys/fs/cgroup/<name> on a pure cgroup2 host).
# Only the manager's own process is moved into that directory; no other process's cgroup is
# ever touched. The directory is removed when the fixture ends.
#
# Facts (systemd 252): ready in 0.2-0.4 s; units run as root and see the private /run, so
# sockets belong under $XDG_RUNTIME_DIR; there is no journal (use StandardOutput=append:FILE);
# NOTIFY_SOCKET is $XDG_RUNTIME_DIR/systemd/notify; no memory/cpu controllers, so MemoryMax=
# and friends are accepted but not enforced. The base directory lives in /dev/shm rather than
# /tmp: a unit with PrivateTmp=yes gets its own /tmp and could not reach the notify socket.

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

__all__ = ["RBEED_UNITS", "UserSystemd", "install_rbeed_units", "start_user_systemd", "user_systemd"]

SYSTEMD = Path("/lib/systemd/systemd")
REPO = Path(__file__).resolve().parent.parent
RBEED_UNITS = ["rbeed.service", "rbeed.socket", "rbeed-tcp.socket", "rbeed-worker@.service"]
READY_POLLS = 1000  # x 10 ms
STOP_WAIT_S = 10.0

# Runs as `sh -ec SCRIPT sh CGROUP_DIR BASE`: joins the cgroup, then execs into a private mount
# namespace where it prepares /run and /dev/kmsg and finally execs the manager (same pid).
_LAUNCHER = r"""
echo $$ > "$1/cgroup.procs"
exec unshare --mount --propagation private sh -ec '
  [ -d /sys/fs/cgroup/unified ] && mount --bind /sys/fs/cgroup/unified /sys/fs/cgroup
  mount -t overlay overlay -o "lowerdir=/run,upperdir=$1/ovl/up,workdir=$1/ovl/wk" /run
  mkdir -p /run/systemd && mount -t tmpfs -o mode=755 tmpfs /run/systemd
  mkdir -p /run/systemd/system /run/systemd/inaccessible && cd /run/systemd/inaccessible
  mkdir -m 0 dir; install -m 0 /dev/null reg; mkfifo -m 0 fifo; mknod -m 0 chr c 0 0; mknod -m 0 blk b 0 0
  "$2" -c "import socket, sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])" sock; chmod 0 sock; cd /
  mount --bind "$1/kmsg.fifo" /dev/kmsg
  exec /lib/systemd/systemd --user --log-target=kmsg --log-level="${SYSD_LOG_LEVEL:-info}"
' sh "$2" "$3"
"""


@dataclass
class UserSystemd:
    """A running user manager; talk to it with systemctl() or with `env` in subprocesses."""

    base: Path
    cgroup: Path
    env: dict[str, str]
    manager: subprocess.Popen[bytes] | None = None
    log_reader: subprocess.Popen[bytes] | None = None
    _stopped: bool = field(default=False, repr=False)

    @property
    def runtime_dir(self) -> Path:
        return self.base / "run"

    @property
    def unit_dir(self) -> Path:
        return self.base / "cfg" / "systemd" / "user"

    @property
    def log_path(self) -> Path:
        return self.base / "manager.log"

    def log(self) -> str:
        parts = [self.base / "launcher.log", self.log_path]
        return "\n".join(p.read_text(errors="replace") for p in parts if p.exists())

    def systemctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`systemctl --user ARGS` against this manager; never raises on a non-zero exit."""
        return subprocess.run(
            ["systemctl", "--user", *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )

    def install_unit(self, name: str, text: str) -> Path:
        """Write a unit file and daemon-reload."""
        path = self.unit_dir / name
        path.write_text(text)
        reload = self.systemctl("daemon-reload")
        assert reload.returncode == 0, reload.stderr
        return path

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def stop(self) -> None:
        """SIGTERM the manager and wait; SIGKILL (cgroup.kill) if it hangs; remove its cgroup."""
        if self._stopped:
            return
        self._stopped = True
        if self.manager is not None and self.manager.poll() is None:
            self.manager.send_signal(signal.SIGTERM)
            try:
                self.manager.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                kill_file = self.cgroup / "cgroup.kill"
                try:
                    kill_file.write_text("1")  # the manager and everything it started
                except OSError:
                    self.manager.kill()
                self.manager.wait(STOP_WAIT_S)
        if self.log_reader is not None:
            # The FIFO reader drains the log and ends with the last writer; it hangs on only if
            # the manager never opened the FIFO.
            try:
                self.log_reader.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.log_reader.kill()
                self.log_reader.wait()
        _remove_cgroup_tree(self.cgroup)


def start_user_systemd(base_parent: str | None = None) -> UserSystemd:
    """Start a user manager; raises RuntimeError (with its log) if it does not come up.
    pytest.skip() is the fixture's business, not this function's."""
    missing = [tool for tool in ("systemctl", "unshare", "mount", "mkfifo") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"missing tools: {', '.join(missing)}")
    if base_parent is None:
        base_parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    base = Path(tempfile.mkdtemp(prefix="rbeed-user-systemd.", dir=base_parent))
    for sub in ("run", "cfg/systemd/user", "data", "state", "cache", "ovl/up", "ovl/wk"):
        (base / sub).mkdir(parents=True)
    (base / "run").chmod(0o700)
    os.mkfifo(base / "kmsg.fifo")

    cgroup_root = Path("/sys/fs/cgroup/unified")
    if not cgroup_root.is_dir():
        cgroup_root = Path("/sys/fs/cgroup")
    cgroup = cgroup_root / f"rbeed-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "WATCHDOG_"))}
    for key in ("DBUS_SESSION_BUS_ADDRESS", "NOTIFY_SOCKET"):
        env.pop(key, None)
    env.update(
        XDG_RUNTIME_DIR=str(base / "run"),
        XDG_CONFIG_HOME=str(base / "cfg"),
        XDG_DATA_HOME=str(base / "data"),
        XDG_STATE_HOME=str(base / "state"),
        XDG_CACHE_HOME=str(base / "cache"),
    )
    instance = UserSystemd(base=base, cgroup=cgroup, env=env)
    try:
        cgroup.mkdir()
        with open(base / "manager.log", "ab") as log_file:
            instance.log_reader = subprocess.Popen(["cat", str(base / "kmsg.fifo")], stdout=log_file)
        python = shutil.which("python3") or "/usr/bin/python3"
        with open(base / "launcher.log", "wb") as launcher_log:
            instance.manager = subprocess.Popen(
                ["sh", "-ec", _LAUNCHER, "sh", str(cgroup), str(base), python],
                stdin=subprocess.DEVNULL, stdout=launcher_log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )
        _wait_running(instance)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        instance.stop()
        log = instance.log()
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"systemd --user did not start: {exc}\n{log}") from None
    return instance


def _wait_running(instance: UserSystemd) -> None:
    assert instance.manager is not None
    state = ""
    for _ in range(READY_POLLS):
        state = instance.systemctl("show", "-p", "SystemState", "--value", timeout=5).stdout.strip()
        if state == "running":
            return
        try:
            # The pause between two polls doubles as the check that the manager is still alive.
            code = instance.manager.wait(timeout=0.01)
        except subprocess.TimeoutExpired:
            continue
        raise RuntimeError(f"manager exited with status {code}")
    raise RuntimeError(f"manager not running after {READY_POLLS} polls (SystemState={state!r})")


def _remove_cgroup_tree(cgroup: Path) -> None:
    if not cgroup.is_dir():
        return
    for dirpath, _, _ in sorted(os.walk(cgroup), key=lambda entry: -entry[0].count("/")):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (private mount namespace and a cgroup of its own)"
    if not SYSTEMD.exists():
        return f"{SYSTEMD} is missing (systemd not installed)"
    return None


@pytest.fixture(scope="session")
def user_systemd() -> Iterator[UserSystemd]:
    reason = _skip_reason()
    if reason:
        pytest.skip(f"user systemd manager: {reason}")
    try:
        instance = start_user_systemd()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        yield instance
    finally:
        instance.stop()
        shutil.rmtree(instance.base, ignore_errors=True)


def install_rbeed_units(manager: UserSystemd, exec_start: str, log: Path, tcp_port: int, *,
                        serve_args: str = "", worker_env: str = "") -> None:  # fmt: skip
    """Install systemd/'s units into `manager` as install.sh would, `ExecStart=/usr/bin/rbeed `
    becoming `exec_start`, with drop-ins for what a user manager cannot do (User=, SocketUser=)
    and for the test's plumbing: the interpreter, its venv and the repo bound back into the
    sandbox, logs appended to `log`, the TCP socket on `tcp_port`. Everything else, the sandbox
    included, is the shipped file."""
    # They may live under /tmp (PrivateTmp=) or a home (ProtectHome=); below a home that takes
    # ProtectHome=tmpfs.
    needed = sorted({sys.prefix, sys.base_prefix, str(REPO)})
    in_home = any(Path(p).is_relative_to(h) for p in needed for h in ("/home", "/root", "/run/user"))
    plumbing = textwrap.dedent(f"""\
        [Unit]
        # tests start and stop rbeed far more often than the default 5 starts in 10 s
        StartLimitIntervalSec=0
        [Service]
        User=
        Group=
        Environment=PYTHONPATH={REPO} PYTHONUNBUFFERED=1
        BindReadOnlyPaths={" ".join("-" + p for p in needed)}
        # On the system manager %t is /run, which ProtectSystem=strict makes read-only; this
        # user manager's %t is below /dev/shm, which it leaves writable. Restore the former.
        ReadOnlyPaths=%t
        {"ProtectHome=tmpfs" if in_home else ""}
        StandardOutput=append:{log}
        StandardError=append:{log}
        """)
    drop_ins = {
        "rbeed.service": plumbing,
        "rbeed-worker@.service": plumbing + (f"Environment={worker_env}\n" if worker_env else ""),
        "rbeed.socket": "[Socket]\nSocketUser=\nSocketGroup=\n",
        "rbeed-tcp.socket": f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{tcp_port}\n",
    }
    for unit in RBEED_UNITS:
        text = re.sub(r"(?m)^(ExecStart|ExecReload)=/usr/bin/rbeed ", rf"\1={exec_start} ", (REPO / "systemd" / unit).read_text())
        if serve_args:
            text = text.replace(f"ExecStart={exec_start} serve", f"ExecStart={exec_start} serve {serve_args}")
        (manager.unit_dir / unit).write_text(text)
        drop_in_dir = manager.unit_dir / f"{unit}.d"
        shutil.rmtree(drop_in_dir, ignore_errors=True)  # another test module's
        drop_in_dir.mkdir()
        (drop_in_dir / "test.conf").write_text(drop_ins[unit])
    reload = manager.systemctl("daemon-reload")
    assert reload.returncode == 0, reload.stderr
