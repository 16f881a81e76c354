"""`rbeed`: the daemon's command line (`rbeed serve`, and `rbeed worker` run by the supervisor)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path

import trio

from . import __version__, config as configuration, log
from .activation import ActivationError, listen_fds

logger = logging.getLogger("rbeed")


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the daemon in the foreground")
    p.add_argument("--config", type=Path, help=f"TOML config file (default {configuration.DEFAULT_CONFIG_FILE} if present)")
    p.add_argument("--listen", action="append", metavar="HOST:PORT", help="TCP address to listen on (repeatable; default 127.0.0.1:8500)")
    p.add_argument("--no-tcp", action="store_true", help="listen on the Unix socket only")
    p.add_argument("--socket", metavar="PATH", help="Unix socket path")
    p.add_argument("--state-dir", metavar="DIR", help="where catalogs and models live")
    p.add_argument("--runtime-dir", metavar="DIR", help="where sockets and worker files live")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _reload_parser(sub) -> None:
    p = sub.add_parser("reload", help="make a running daemon re-read its config, and wait until it has (ExecReload=)")
    p.add_argument("pid", type=int, help="the daemon's pid ($MAINPID)")
    p.add_argument("--config", type=Path, help="the daemon's config file, if it was given one")
    p.add_argument("--runtime-dir", metavar="DIR", help="the daemon's runtime dir, if it was given one")
    p.add_argument("--timeout", type=float, default=90.0, help="seconds to wait (default 90)")


def reload(pid: int, record: Path, timeout: float) -> int:
    """SIGHUP the daemon and wait until its reload record changes: 0 once it reloaded, 1 if that
    failed (a config it could not read: it keeps the running one) or did not happen in time."""
    def read() -> str:
        try:
            return record.read_text()
        except FileNotFoundError:
            return ""

    before = read()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        logger.error("cannot signal pid %d: %s", pid, exc.strerror)
        return 1
    deadline = time.monotonic() + timeout
    # A bounded poll: the daemon says nothing else when it is done, and this process has no loop to be told in.
    while (now := read()) == before or not now.startswith(f"{pid} "):
        if time.monotonic() > deadline:
            logger.error("pid %d did not record a reload in %s within %g s", pid, record, timeout)
            return 1
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.error("pid %d exited before it recorded a reload", pid)
            return 1
        time.sleep(0.02)
    outcome = now.split(" ", 2)[2].strip()
    if outcome != "ok":
        logger.error("reload %s", outcome)
        return 1
    return 0


def overrides(args: argparse.Namespace) -> dict:
    """Flags given on the command line, as dotted config keys."""
    values = {
        "server.listen": [] if args.no_tcp else args.listen,
        "server.socket": args.socket,
        "state_dir": args.state_dir,
        "runtime_dir": args.runtime_dir,
    }
    return {key: value for key, value in values.items() if value is not None and (value or key == "server.listen")}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        from .worker import run as run_worker  # llama_cpp is only imported in worker processes

        return run_worker(argv[1:])
    parser = argparse.ArgumentParser(prog="rbeed", description="Serve local LLMs through one job API.")
    parser.add_argument("--version", action="version", version=f"rbeed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _reload_parser(sub)
    sub.add_parser("worker", help="run one llama.cpp worker (started by the daemon)")
    args = parser.parse_args(argv)
    if args.command == "reload":
        log.setup("info")
        try:
            flags = {"runtime_dir": args.runtime_dir} if args.runtime_dir else {}  # else the file's, if it has one
            runtime = configuration.load(args.config, flags).runtime_path
        except configuration.ConfigError:  # the daemon reads it too, and says why it keeps its config
            runtime = Path(args.runtime_dir) if args.runtime_dir else configuration.default_runtime_dir()
        return reload(args.pid, runtime / "reloaded", args.timeout)
    log.setup(args.log_level)
    flags = overrides(args)
    try:
        config = configuration.load(args.config, flags)
    except configuration.ConfigError as exc:
        logger.error("%s", exc)
        return 2
    from .daemon import serve

    try:
        # Before trio opens its epoll and wake-up fds: an fd the variables name that is not open
        # must stay unopened, to be told as such.
        inherited = listen_fds()
        trio.run(serve, config, args.config, flags, inherited)
    except OSError as exc:  # ours carry the whole message, the kernel's name their file
        logger.error("%s", exc.strerror if exc.filename is None and exc.strerror else exc)
        return 1
    except ActivationError as exc:
        logger.error("%s", exc)
        return 1
    except configuration.ConfigError as exc:  # one the daemon could judge only as it started
        logger.error("%s", exc)
        return 2
    return 0
