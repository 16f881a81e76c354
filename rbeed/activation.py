"""Listening sockets inherited through systemd socket activation (LISTEN_FDS protocol)."""

from __future__ import annotations

import os
import socket
import stat

__all__ = ["ActivationError", "listen_fds"]

SD_LISTEN_FDS_START = 3
_ENV_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class ActivationError(ValueError):
    """The inherited file descriptors are not what socket activation promised."""


def listen_fds(unset: bool = True) -> list[tuple[str, socket.socket]]:
    """Return (name, socket) for each listening stream socket passed to this process, in fd
    order, starting at fd 3; [] when none were passed to *this* pid. Names come from
    LISTEN_FDNAMES (FileDescriptorName=), "unknown" without it. The sockets are close-on-exec.
    With `unset`, LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES are removed from os.environ in every case,
    so that children do not believe the fds are theirs. Raises ActivationError, leaving every
    fd open and untouched, if the variables are malformed or an fd is not a listening stream
    socket."""
    environ = os.environ
    pid_value = environ.get("LISTEN_PID")
    count_value = environ.get("LISTEN_FDS")
    names_value = environ.get("LISTEN_FDNAMES")
    if unset:
        for name in _ENV_VARIABLES:
            environ.pop(name, None)

    if not pid_value or not count_value:
        return []
    if _parse_int("LISTEN_PID", pid_value) != os.getpid():
        return []
    count = _parse_int("LISTEN_FDS", count_value)
    if count == 0:
        return []
    if count > (most := os.sysconf("SC_OPEN_MAX") - SD_LISTEN_FDS_START):
        raise ActivationError(f"LISTEN_FDS={count} is more than the {most} fds this process may have")
    names = names_value.split(":") if names_value is not None else ["unknown"] * count
    if len(names) != count:
        raise ActivationError(f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}")

    inherited: list[tuple[str, socket.socket]] = []
    try:
        for offset, name in enumerate(names):
            inherited.append((name, _listening_socket(SD_LISTEN_FDS_START + offset, name)))
    except ActivationError:
        for _, sock in inherited:
            sock.detach()  # hand the fd back untouched rather than closing it
        raise
    for _, sock in inherited:
        sock.set_inheritable(False)
    return inherited


def _listening_socket(fd: int, name: str) -> socket.socket:
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise ActivationError(f"inherited fd {fd} ({name!r}) is not open: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise ActivationError(f"inherited fd {fd} ({name!r}) is not a socket")
    sock = socket.socket(fileno=fd)
    try:
        if sock.type != socket.SOCK_STREAM:
            kind = getattr(sock.type, "name", sock.type)
            raise ActivationError(f"inherited fd {fd} ({name!r}) is a {kind} socket, not SOCK_STREAM")
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ActivationError(
                f"inherited fd {fd} ({name!r}) is a stream socket that is not listening"
            )
    except BaseException:
        sock.detach()
        raise
    return sock


def _parse_int(variable: str, value: str) -> int:
    # Digits only, as sd_listen_fds(3) reads them: int() would take " 1", "+1" and "1_0".
    if not (value.isascii() and value.isdigit()):
        raise ActivationError(f"{variable}={value!r} is not a non-negative integer")
    return int(value)
