"""Configuration: defaults, the TOML file, command-line overrides and the paths derived from them."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Annotated, Literal

import msgspec

DEFAULT_CONFIG_FILE = Path("/etc/rbeed/rbeed.toml")

YEAR = 365 * 86400.0  # a bound on durations: TOML's inf would overflow where they become microseconds
Seconds = Annotated[float, msgspec.Meta(ge=0, le=YEAR)]
Interval = Annotated[float, msgspec.Meta(gt=0, le=YEAR)]
# CPU numbers below 10000 (Linux builds for at most 8192): a range is a set built in memory.
# As systemd reads them (checked here: set-property would refuse them only as a worker starts);
# their ranges are checked in WorkersConfig.
MemoryMax = Annotated[str, msgspec.Meta(pattern=r"^(infinity|[0-9]{1,20}(\.[0-9]{1,6})?[KMGTPE]?|[0-9]{1,3}(\.[0-9]{1,2})?%)\Z")]
CPUQuota = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,6}(\.[0-9]{1,2})?%\Z")]
_SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}
CPUList = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,4}(-[0-9]{1,4})?(,[0-9]{1,4}(-[0-9]{1,4})?)*\Z")]
Positive = Annotated[int, msgspec.Meta(ge=1)]
# HOST:PORT with a port that fits 16 bits (HOST may be empty, or an IPv6 address in brackets).
ListenAddress = Annotated[str, msgspec.Meta(
    pattern=r"^.*:([0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])\Z"
)]  # fmt: skip


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(Section):
    listen: list[ListenAddress] = msgspec.field(default_factory=lambda: ["127.0.0.1:8500"])
    socket: str | None = None  # None: derived from the environment (see default_socket_path)
    socket_mode: Annotated[int, msgspec.Meta(ge=0, le=0o777)] = 0o660
    max_body_bytes: Positive = 1024 * 1024
    max_header_bytes: Positive = 16 * 1024
    request_timeout: Interval = 30.0  # receiving one request's head and body
    keepalive_timeout: Interval = 75.0  # idle connection between requests
    write_timeout: Interval = 60.0  # a response the client reads nothing of for this long is cut off
    sse_keepalive: Interval = 15.0  # comment line on an idle event stream
    shutdown_grace: Seconds = 10.0  # how long SIGTERM waits for running jobs
    idle_exit: Seconds = 0.0  # socket activation: exit after this long with nothing to do; 0 = never
    origins: list[str] = []  # web pages that may call the daemon, besides this machine's and apps' (`*` wildcards)


class JobsConfig(Section):
    unstreamed_ttl: Seconds = 600.0  # a job nobody streamed is dropped after this
    finished_ttl: Seconds = 600.0  # a finished job stays for status and replay this long
    event_buffer: Positive = 4096  # events kept per job for replay
    max_jobs: Positive = 10_000  # jobs held at once (all states); more is 503
    max_unstreamed_bytes: Positive = 64 * 1024 * 1024  # request bodies of jobs not yet streamed; more is 503
    max_finished_bytes: Positive = 64 * 1024 * 1024  # events finished jobs keep; past it the oldest go before their TTL


class HivesConfig(Section):
    health_timeout: Seconds = 2.0
    start_command: str = "systemctl --host {ssh_host} {action} rbeed.service"


class ModelsConfig(Section):
    hf_base: str = "https://huggingface.co/{owner}/{repo}/resolve/main/{path}"
    download_retries: Annotated[int, msgspec.Meta(ge=0)] = 5  # attempts in a row without new bytes
    download_retry_delay: Seconds = 1.0  # before the first retry; doubles up to 30 s

    def __post_init__(self) -> None:
        try:
            url = self.hf_base.format(owner="o", repo="r", path="p")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"hf_base {self.hf_base!r} is unusable: {exc!r} (it may name {{owner}}, "
                             "{repo} and {path})") from None  # fmt: skip
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"hf_base {self.hf_base!r} is not an http(s):// URL")


class WorkersConfig(Section):
    backend: Literal["auto", "process", "systemd"] = "auto"
    threads: Annotated[int, msgspec.Meta(ge=0)] = 0  # total worker threads across workers; 0 = number of cores
    n_ctx: Positive = 2048
    n_batch: Positive = 32  # small batches let a cancel land during prompt processing
    queue_size: Annotated[int, msgspec.Meta(ge=0)] = 8  # jobs waiting per worker
    keep_alive: Annotated[float, msgspec.Meta(ge=-1, le=YEAR)] = 300.0  # idle seconds before an on-demand worker stops; -1 = never
    load_timeout: Seconds = 120.0
    stop_grace: Seconds = 5.0  # SIGTERM → SIGKILL
    cancel_timeout: Seconds = 30.0  # a worker that has not ended a cancelled generation by then is restarted
    restart: Literal["on-failure", "no"] = "on-failure"
    max_restarts: Annotated[int, msgspec.Meta(ge=0)] = 3
    restart_backoff: Seconds = 1.0  # doubled on each restart in a row
    cpu_affinity: CPUList | None = None  # CPUs every worker may run on, e.g. "0-3,6"; None = all
    memory_max: MemoryMax | None = None  # systemd backend: MemoryMax= of each worker unit
    cpu_quota: CPUQuota | None = None  # systemd backend: CPUQuota= of each worker unit

    def __post_init__(self) -> None:
        for part in (self.cpu_affinity or "").split(","):
            if "-" in part and int((ends := part.split("-"))[0]) > int(ends[1]):
                raise ValueError(f"cpu_affinity {self.cpu_affinity!r}: the range {part} runs backwards")
        if (memory := self.memory_max) and memory != "infinity":
            if memory.endswith("%"):
                fits = 0 < float(memory[:-1]) <= 100
            else:
                number, suffix = (memory[:-1], memory[-1]) if memory[-1].isalpha() else (memory, "")
                fits = 1 <= float(number) * _SIZE_SUFFIXES[suffix] < 1 << 64
            if not fits:
                raise ValueError(f"memory_max {memory!r} is out of range: more than 0, below 16E, at most 100%")
        if self.cpu_quota and not float(self.cpu_quota[:-1]) > 0:
            raise ValueError(f"cpu_quota {self.cpu_quota!r} is out of range: more than 0%")


class Config(Section):
    state_dir: str | None = None
    runtime_dir: str | None = None
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    jobs: JobsConfig = msgspec.field(default_factory=JobsConfig)
    hives: HivesConfig = msgspec.field(default_factory=HivesConfig)
    models: ModelsConfig = msgspec.field(default_factory=ModelsConfig)
    workers: WorkersConfig = msgspec.field(default_factory=WorkersConfig)

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir) if self.state_dir else default_state_dir()

    @property
    def runtime_path(self) -> Path:
        return Path(self.runtime_dir) if self.runtime_dir else default_runtime_dir()

    @property
    def socket_path(self) -> Path:
        return Path(self.server.socket) if self.server.socket else self.runtime_path / "rbeed.sock"


def parse_cpu_list(text: str) -> set[int]:
    """`0-3,6` → {0, 1, 2, 3, 6} (the cpuset list format of taskset and systemd's CPUAffinity=)."""
    cpus: set[int] = set()
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


class ConfigError(Exception):
    """The config file or a flag holds something rbeed cannot use."""


def read_secret(env: str, credential: str) -> str | None:
    """A secret from $`env`, else from the credential `credential` (systemd's LoadCredential=).

    None when neither is set; OSError when the credential exists but cannot be read.
    """
    value = os.environ.get(env, "").strip()
    if not value and (directory := os.environ.get("CREDENTIALS_DIRECTORY")):
        try:
            value = Path(directory, credential).read_text().strip()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OSError(f"cannot read the credential {credential}: {exc.strerror or exc}") from None
    return value or None


def _first_dir(variable: str) -> Path | None:
    # systemd passes e.g. STATE_DIRECTORY as a colon-separated list; the first entry is ours.
    value = os.environ.get(variable)
    return Path(value.split(":")[0]) if value else None


def default_state_dir() -> Path:
    if path := _first_dir("STATE_DIRECTORY"):
        return path
    if xdg := os.environ.get("XDG_STATE_HOME"):
        return Path(xdg) / "rbeed"
    return Path.home() / ".local" / "state" / "rbeed"


def default_runtime_dir() -> Path:
    if path := _first_dir("RUNTIME_DIRECTORY"):
        return path
    if xdg := os.environ.get("XDG_RUNTIME_DIR"):
        return Path(xdg) / "rbeed"
    return shared_tmp_dir()


def shared_tmp_dir() -> Path:
    """The runtime dir without XDG_RUNTIME_DIR (ssh without pam_systemd, cron): in $TMPDIR or
    /tmp, which every user may write, so it is used only if it is this user's alone (not_private)."""
    return Path(os.environ.get("TMPDIR") or "/tmp") / f"rbeed-{os.getuid()}"


def not_private(path: Path) -> str | None:
    """Why `path` is not a directory only this user can write (another could plant a socket or
    a symlink in it), None if it is one or is not there yet."""
    try:
        status = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(status.st_mode):
        return "not a directory" + (" (a symlink)" if stat.S_ISLNK(status.st_mode) else "")
    if status.st_uid != os.getuid():
        return f"owned by uid {status.st_uid}"
    if status.st_mode & 0o022:
        return f"writable by others (mode {stat.S_IMODE(status.st_mode):04o})"
    return None


def load(path: Path | None, overrides: dict | None = None) -> Config:
    """Read the TOML file (the default one only if it exists), then apply flag overrides.

    `overrides` maps dotted keys ("server.listen", "state_dir") to values from the command line.
    """
    explicit = path is not None
    path = path or DEFAULT_CONFIG_FILE
    raw: dict = {}
    if explicit or path.exists():
        try:
            raw = msgspec.toml.decode(path.read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
    for dotted, value in (overrides or {}).items():
        *sections, key = dotted.split(".")
        node = raw
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: `{section}` is not a table ([{section}])")
        node[key] = value
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        # A value from a flag is the command line's fault, not the file's (which may not exist).
        flagged = any(f"`$.{dotted}`" in str(exc) or f"`$.{dotted}[" in str(exc) for dotted in overrides or {})
        raise ConfigError(f"{'the command line' if flagged else path}: {exc}") from None
