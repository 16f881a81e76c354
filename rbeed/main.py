"""`rbeed`: the daemon's command line (`rbeed serve`, and `rbeed worker` run by the supervisor)."""

from __future__ import annotations

import argparse
import logging
import sys
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
    sub.add_parser("worker", help="run one llama.cpp worker (started by the daemon)")
    args = parser.parse_args(argv)
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
