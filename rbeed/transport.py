"""Connected sockets as trio streams that skip the scheduler when the kernel needn't wait; the accept loop."""

from __future__ import annotations

import errno
import logging
import math
import socket
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("rbeed.server")

# A stream yields to the scheduler at least this often even when every call completes at once,
# so that a client pipelining requests cannot starve the other tasks or delay a cancellation.
_YIELD_EVERY = 16
_ACCEPT_PAUSE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# A connection that failed before we took it: take the next one (as trio's SocketListener does).
_ACCEPT_RETRY_ERRNOS = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ENETDOWN, errno.ENOPROTOOPT,
                        errno.EHOSTDOWN, errno.ENONET, errno.EHOSTUNREACH, errno.EOPNOTSUPP, errno.ENETUNREACH}


class SocketTransport(trio.abc.HalfCloseableStream):
    """A trio stream over a non-blocking socket.

    trio's SocketStream makes every call a full checkpoint: even a send the kernel takes at once
    costs a trip through the run loop. On a local request/response connection nearly every send
    and most receives complete at once, so this stream tries the syscall first and parks in
    wait_readable/wait_writable only when the kernel says it would block; it checkpoints every
    `_YIELD_EVERY` calls that did not park, before the syscall, so that a cancellation there
    loses no data. So, unlike trio's own streams, a call is not always a checkpoint: a
    cancellation lands at the next park, or within `_YIELD_EVERY` calls.

    A send that the peer lets make no progress for `write_timeout` seconds fails with
    BrokenResourceError: a client that stopped reading must not hold its connection forever.
    """

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        self.write_timeout = math.inf  # the server sets its clients' from [server] write_timeout
        self._unparked = 0
        self._eof_sent = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await self._maybe_yield()
        while True:
            try:
                data = self.socket.recv(max_bytes or 65536)
            except BlockingIOError:
                await self._wait(trio.lowlevel.wait_readable)
                continue
            except OSError as exc:
                raise self._error(exc) from exc
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        await self._maybe_yield()
        view = memoryview(data)
        while True:
            try:
                sent = self.socket.send(view)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise self._error(exc) from exc
            if sent == len(view):
                return
            view = view[sent:]
            with trio.move_on_after(self.write_timeout) as waiting:  # only on this slow path: a full buffer
                await self._wait(trio.lowlevel.wait_writable)
            if waiting.cancelled_caught:
                log.info("closing a connection: the peer read nothing for %g s", self.write_timeout)
                raise trio.BrokenResourceError(f"the peer read nothing for {self.write_timeout:g} s")

    async def _maybe_yield(self) -> None:
        """Checkpoint on every `_YIELD_EVERY`th call that did not park (a park resets the count)."""
        self._unparked += 1
        if self._unparked >= _YIELD_EVERY:
            self._unparked = 0
            await trio.lowlevel.checkpoint()

    def _error(self, exc: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
        if self.socket.fileno() == -1:
            return trio.ClosedResourceError("socket was already closed")
        return trio.BrokenResourceError(exc)

    async def _wait(self, wait: Callable[[socket.socket], Awaitable[None]]) -> None:
        if self.socket.fileno() == -1:
            raise trio.ClosedResourceError("socket was already closed")
        self._unparked = 0
        await wait(self.socket)

    async def wait_send_all_might_not_block(self) -> None:
        await self._wait(trio.lowlevel.wait_writable)

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._eof_sent or self.socket.fileno() == -1:
            return
        self._eof_sent = True
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise trio.BrokenResourceError(exc) from exc

    async def aclose(self) -> None:
        if self.socket.fileno() != -1:
            trio.lowlevel.notify_closing(self.socket)
            self.socket.close()
        await trio.lowlevel.checkpoint()


async def open_unix_transport(path: str) -> SocketTransport:
    """Connect to a Unix socket (trio.open_unix_socket) and return it as a SocketTransport."""
    stream = await trio.open_unix_socket(path)
    return SocketTransport(socket.socket(fileno=stream.socket.detach()))


async def accept_forever(sock: socket.socket, handle: Callable[[SocketTransport], Awaitable[None]],
                         nursery: trio.Nursery) -> None:  # fmt: skip
    """Accept connections on a listening socket until cancelled; each runs `handle` in `nursery`."""
    sock.setblocking(False)
    try:
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError as exc:
                if exc.errno in _ACCEPT_RETRY_ERRNOS:
                    continue
                if exc.errno not in _ACCEPT_PAUSE_ERRNOS:
                    raise
                # Out of descriptors or memory: wait for connections to close rather than spin.
                log.error("accept failed (%s); pausing 100 ms", exc)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(handle, SocketTransport(conn))
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()
