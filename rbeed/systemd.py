"""Workers as systemd units: instances of the rbeed-worker@.service template, driven by systemctl."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from .backends import LaunchSpec, WorkerStartError, describe_exit, remove_leftover_files, worker_options
from .config import WorkersConfig

log = logging.getLogger("rbeed.workers")

TEMPLATE = "rbeed-worker@{}.service"
EXIT_NOTICE_TIMEOUT = 5.0  # seconds the manager may take to reap a worker that exited


def systemd_reachable() -> bool:
    """True when a systemd manager started us and systemctl can reach it."""
    if not os.environ.get("INVOCATION_ID") or shutil.which("systemctl") is None:
        return False
    if os.environ.get("MANAGERPID"):  # set only for services of a user manager
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        return bool(runtime) and Path(runtime, "systemd", "private").exists()
    return Path("/run/systemd/system").is_dir()


def template_runtime_dir() -> Path:
    """%t/rbeed of the manager that started us: where the worker template reads its settings."""
    under_user_manager = bool(os.environ.get("MANAGERPID"))
    return Path(os.environ.get("XDG_RUNTIME_DIR", "") if under_user_manager else "/run") / "rbeed"


def _systemctl() -> list[str]:
    return ["systemctl", "--user"] if os.environ.get("MANAGERPID") else ["systemctl"]


async def systemctl(*args: str, check: bool = True) -> str:
    result = await trio.run_process([*_systemctl(), *args], capture_stdout=True, capture_stderr=True, check=False)
    if check and result.returncode != 0:
        message = result.stderr.decode(errors="replace").strip() or f"exit status {result.returncode}"
        raise WorkerStartError(f"systemctl {' '.join(args)}: {message}")
    return result.stdout.decode(errors="replace")


async def unit_properties(unit: str, *names: str) -> dict[str, str]:
    output = await systemctl("show", unit, *(f"--property={name}" for name in names), check=False)
    return dict(line.partition("=")[::2] for line in output.splitlines() if "=" in line)


class UnitHandle:
    def __init__(self, unit: str):
        self.unit = unit
        self.pid: int | None = None
        self.invocation = ""  # InvocationID of the run that ready() saw start

    async def ready(self) -> None:
        # systemctl start returns once the Type=notify worker sent READY=1, or the unit failed.
        result = await trio.run_process([*_systemctl(), "start", self.unit], capture_stderr=True, check=False)
        props = await unit_properties(self.unit, "MainPID", "InvocationID", "StatusText", "Result", "ActiveState",
                                      "ExecMainCode", "ExecMainStatus")  # fmt: skip
        if result.returncode != 0 or props.get("ActiveState") != "active":
            status = props.get("StatusText", "")
            if status.startswith("failed"):  # the worker's own word (STATUS=)
                raise WorkerStartError(status.removeprefix("failed: "))
            if (outcome := props.get("Result", "unknown")) in _DIED:
                raise WorkerStartError(f"worker {_exit_of(props)} while loading")
            said = result.stderr.decode(errors="replace").strip()
            if outcome == "success" and "canceled" in said:  # its start job: a stop came first (rbeed's, propagated)
                raise WorkerStartError(f"unit {self.unit} was stopped while loading")
            if outcome == "success":  # it never ran: no such unit, access denied
                raise WorkerStartError(f"systemctl start {self.unit}: {said or f'exit status {result.returncode}'}")
            raise WorkerStartError(f"unit {self.unit} failed to start ({outcome})")
        self.pid = int(props["MainPID"]) or None
        self.invocation = props["InvocationID"]

    async def wait(self) -> str:
        """Return once the unit's main process has exited, however it was stopped."""
        if self.pid is None:
            return "never started"
        try:
            pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:
            pass
        else:
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
        return await self._exit_reason()

    async def _exit_reason(self) -> str:
        """How the main process ended, in the process backend's words ("killed by SIGKILL"), once
        the manager has noticed (a bounded poll: the pidfd fires before the manager reaps)."""
        names = ("MainPID", "InvocationID", "Result", "ExecMainCode", "ExecMainStatus")
        props = await unit_properties(self.unit, *names)
        with trio.move_on_after(EXIT_NOTICE_TIMEOUT):
            while props.get("MainPID") == str(self.pid):
                await trio.sleep(0.02)
                props = await unit_properties(self.unit, *names)
        if props.get("MainPID") == str(self.pid):
            return f"unit {self.unit} lost its main process"
        result = props.get("Result", "")
        # A unit that ended well is soon garbage-collected, its exit status with it (a new
        # InvocationID then); a failed one stays until reset-failed.
        if props.get("InvocationID") != self.invocation or result == "success":
            return f"unit {self.unit} stopped"
        how = _exit_of(props)
        return how if result in _DIED else f"{how} ({result})"


_DIED = ("exit-code", "signal", "core-dump")  # Result= of a unit whose main process ended it


def _exit_of(props: dict[str, str]) -> str:
    """ "exited with status 1", "killed by SIGKILL": its main process's end, from ExecMain*."""
    code, status = int(props.get("ExecMainCode") or 0), int(props.get("ExecMainStatus") or 0)
    return describe_exit(status if code == os.CLD_EXITED else -status)


def _quoted(value: str) -> str:
    """A value for an EnvironmentFile=, which reads backslashes, quotes and `$` as a shell would."""
    return '"' + "".join(f"\\{char}" if char in '\\"`$' else char for char in value) + '"'


class SystemdBackend:
    """Each worker is `rbeed-worker@<id>.service`; its settings go in `<runtime>/workers/<id>.env`."""

    name = "systemd"

    def __init__(self, runtime_dir: Path, config: WorkersConfig):
        self.dir = runtime_dir / "workers"
        self.config = config

    async def remove_leftovers(self) -> None:
        """Stop the worker units running when the daemon starts, and remove their files. A crash of
        rbeed.service stops its units (StopPropagatedFrom=), but not one of a daemon run outside it;
        and `systemctl start` of a unit already running would leave it as it is, so that this
        daemon would take that process, with its old model and options, for its new worker."""
        pattern, running = TEMPLATE.format("*"), "--state=active,activating,reloading"
        output = await systemctl("list-units", "--plain", "--no-legend", running, pattern, check=False)
        if units := [line.split()[0] for line in output.splitlines() if line.strip()]:
            log.warning("stopping worker units this rbeed did not start: %s", " ".join(units))
            await systemctl("stop", "--job-mode=ignore-dependencies", *units, check=False)
        remove_leftover_files(self.dir)

    def _environment(self, spec: LaunchSpec) -> str:
        options = " ".join(worker_options(spec, self.config))
        values = {"RBEED_MODEL": spec.model_path, "RBEED_SOCKET": spec.socket_path, "RBEED_DEVICE": spec.device,
                  "RBEED_THREADS": spec.threads, "RBEED_WORKER_OPTS": options}  # fmt: skip
        return "".join(f"{key}={_quoted(str(value))}\n" for key, value in values.items())

    @contextlib.asynccontextmanager
    async def launch(self, spec: LaunchSpec) -> AsyncIterator[UnitHandle]:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        env_file = self.dir / f"{spec.id}.env"
        env_file.write_text(self._environment(spec))
        unit = TEMPLATE.format(spec.id)
        # Unset limits are reset too: --runtime settings outlive the unit, and the next worker with
        # this id (ids restart at each daemon start) would inherit them.
        limits = f"MemoryMax={self.config.memory_max or 'infinity'}", f"CPUQuota={self.config.cpu_quota or ''}"
        try:
            await systemctl("reset-failed", unit, check=False)
            await systemctl("set-property", "--runtime", unit, *limits)
            yield UnitHandle(unit)
        finally:
            with trio.CancelScope(shield=True):
                await self._stop(unit)
                await systemctl("reset-failed", unit, check=False)
            env_file.unlink(missing_ok=True)
            spec.socket_path.unlink(missing_ok=True)

    async def _stop(self, unit: str) -> None:
        """Stop the unit: SIGTERM, then SIGKILL after stop_grace, as the process backend does (its
        TimeoutStopSec= would take rbeed's whole stop time)."""
        # A stop of rbeed.service queues the worker's stop behind its own (Before=, in the unit):
        # joining that job as is would wait for us to exit.
        stop = "stop", "--job-mode=ignore-dependencies", unit
        with trio.move_on_after(self.config.stop_grace) as waiting:
            try:
                await systemctl(*stop)
            except WorkerStartError as exc:
                log.error("%s; the worker runs on, with its threads, until it is stopped by hand", exc)
        if waiting.cancelled_caught:
            log.warning("worker unit %s ignored SIGTERM for %g s: SIGKILL", unit, self.config.stop_grace)
            await systemctl("kill", "--signal=SIGKILL", unit, check=False)
            await systemctl(*stop, check=False)  # joins the stop job under way: it ends as the processes die
