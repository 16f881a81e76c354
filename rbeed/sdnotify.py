"""sd_notify(3) protocol and watchdog pings without libsystemd: datagrams to $NOTIFY_SOCKET."""

from __future__ import annotations

import logging
import os
import socket

import trio

__all__ = ["Notifier", "extend_timeout"]

log = logging.getLogger(__name__)

_ENV_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def extend_timeout(seconds: float) -> str:
    """The EXTEND_TIMEOUT_USEC= line asking the manager for `seconds` more to start or stop."""
    return f"EXTEND_TIMEOUT_USEC={round(seconds * 1_000_000)}"


class Notifier:
    """Sends state lines to the service manager; does nothing when there is no manager."""

    def __init__(
        self,
        address: str | None,
        *,
        watchdog_usec: int | None = None,
        watchdog_pid: int | None = None,
    ) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.watchdog_pid = watchdog_pid
        self._sockaddr = _sockaddr(address) if address else None

    @classmethod
    def from_env(cls, *, unset: bool = False) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID; `unset` removes them from os.environ
        so that child processes do not talk to our manager in our name."""
        environ = os.environ
        address = environ.get("NOTIFY_SOCKET") or None
        watchdog_usec = _positive_int(environ.get("WATCHDOG_USEC"), "WATCHDOG_USEC")
        watchdog_pid = _positive_int(environ.get("WATCHDOG_PID"), "WATCHDOG_PID")
        if unset:
            for name in _ENV_VARIABLES:
                environ.pop(name, None)
        return cls(address, watchdog_usec=watchdog_usec, watchdog_pid=watchdog_pid)

    @property
    def enabled(self) -> bool:
        return self._sockaddr is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two WATCHDOG=1 pings (half the manager's timeout), or None if the
        manager expects no pings from this process."""
        if not self.enabled or self.watchdog_usec is None:
            return None
        if self.watchdog_pid is not None and self.watchdog_pid != os.getpid():
            return None
        return self.watchdog_usec / 2_000_000

    def notify(self, *lines: str) -> bool:
        """Send `lines` ("READY=1", "STATUS=...") as one datagram; True if it was sent.
        Never blocks and never raises on a send error: the error is logged."""
        if self._sockaddr is None or not lines:
            return False
        # One assignment per line: a newline inside a value would start a bogus assignment.
        payload = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self._sockaddr)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    async def watchdog(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send WATCHDOG=1 every watchdog_interval seconds, forever; return at once when the
        manager wants no pings. Pinging from the event loop means a stuck loop misses pings."""
        interval = self.watchdog_interval
        if interval is None:
            task_status.started()
            return
        self.notify("WATCHDOG=1")
        task_status.started()
        while True:
            await trio.sleep(interval)
            self.notify("WATCHDOG=1")


def _sockaddr(address: str) -> str | bytes | None:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    if address.startswith("/"):
        return address
    log.warning("ignoring NOTIFY_SOCKET=%r: neither an absolute path nor @abstract", address)
    return None


def _positive_int(value: str | None, name: str) -> int | None:
    if not value:
        return None
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        log.warning("ignoring %s=%r: not a positive integer", name, value)
        return None
    return number
