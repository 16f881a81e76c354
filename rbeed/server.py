"""HTTP/1.1 on h11: listeners, the per-connection request loop, and the request/response types."""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from contextlib import contextmanager
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qsl

import h11
import msgspec
import trio

from . import __version__
from .config import ServerConfig
from .transport import SocketTransport, accept_forever

log = logging.getLogger("rbeed.server")

SERVER_HEADER = ("server", f"rbeed/{__version__}")
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
_encode = msgspec.json.Encoder().encode


# msgspec Structs rather than dataclasses: their __init__ is C, and a few of each are made per request.
class Request(msgspec.Struct):
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ", "
    body: bytes = b""
    local: bool = False  # came over a Unix socket, which file permissions guard
    loopback: bool = False  # came to a loopback address (127.0.0.1, ::1): from this machine only
    # For a route that reads its body as it comes (an upload): the next piece, b"" at its end.
    receive: Callable[[], Awaitable[bytes]] | None = None


class Response(msgspec.Struct):
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = []


Send = Callable[..., Awaitable[None]]  # send(data: bytes, last: bool = False)


class StreamingResponse(msgspec.Struct):
    """A response whose body `produce(send)` writes piece by piece (chunked on HTTP/1.1)."""

    status: int
    produce: Callable[[Send], Awaitable[None]]
    content_type: str = "text/event-stream"
    headers: list[tuple[str, str]] = []
    # Called when the peer closes its side mid-body; the body is cancelled either way.
    on_disconnect: Callable[[], None] | None = None


def json_response(status: int, value) -> Response:
    return Response(status, _encode(value))


def error_response(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, _encode({"error": message}), headers=headers or [])


def only(request: Request, *methods: str) -> Response | None:
    """None when the request's method is one of `methods` (HEAD goes with GET), else a 405."""
    if request.method in methods or (request.method == "HEAD" and "GET" in methods):
        return None
    allow = ", ".join(methods)
    return error_response(405, f"method {request.method} not allowed; allowed: {allow}", [("allow", allow)])


App = Callable[[Request], Awaitable[Response | StreamingResponse]]
ReadsBody = Callable[[Request], bool]  # whether the app reads this request's body itself (no body limit)
ShapeError = Callable[[Request, Response], Response]  # an error in the shape the request's clients read


class _ClientError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _PeerGone(Exception):
    pass


class ReadTimers:
    """The read deadlines of every open connection, enforced by one task.

    A request costs a float store here instead of a cancel scope with a deadline, which trio
    keeps in a heap; the price is precision: a deadline fires up to two ticks late, never early.
    """

    def __init__(self, config: ServerConfig):
        self._config = config
        self._connections: set[HTTPConnection] = set()
        self._added = trio.Event()
        self.closing = False  # shutting down: each response is its connection's last
        self._tick()

    def _tick(self) -> float:
        config = self._config  # read each tick: a reload may change the timeouts
        self.granularity = min(1.0, config.request_timeout / 10, config.keepalive_timeout / 10)
        now = trio.current_time()
        # A coarse clock for setting deadlines, a tick ahead so that its lag never fires one early.
        self.base = now + self.granularity
        return now

    def add(self, connection: HTTPConnection) -> None:
        if not self._connections:
            self._tick()  # the clock stood still while no connection was open
        self._connections.add(connection)
        self._added.set()

    def discard(self, connection: HTTPConnection) -> None:
        self._connections.discard(connection)

    def close_idle(self) -> None:
        """Shutting down: close the connections waiting for a request now, the others after their response."""
        self.closing = True
        for connection in self._connections:
            connection.close_if_idle()

    async def run(self) -> None:
        while True:
            if not self._connections:  # an idle daemon does not tick
                self._added = trio.Event()
                await self._added.wait()
            await trio.sleep(self.granularity)
            now = self._tick()
            for connection in self._connections:
                if connection.read_deadline <= now:
                    connection.timed_out()


class HTTPConnection:
    """One client connection: h11's state machine over a trio stream, one request at a time.

    Reads are timed by `timers` (no timeouts without one): the connection's whole life runs in
    one cancel scope that the timer task cancels when a read overruns its deadline.
    """

    def __init__(self, stream: trio.abc.Stream, app: App, config: ServerConfig, timers: ReadTimers | None = None,
                 *, local: bool = False, loopback: bool = False, reads_body: ReadsBody | None = None,
                 shape_error: ShapeError | None = None):  # fmt: skip
        self.stream = stream
        self.local, self.loopback = local, loopback
        self.app = app
        self.reads_body = reads_body
        self.shape_error = shape_error
        self.request: Request | None = None  # the one being read or answered: its errors' shape
        self.config = config
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=config.max_header_bytes)
        self.timers = timers or ReadTimers(config)  # one of our own never ticks: no timeouts
        self.read_deadline = math.inf
        self._scope = trio.CancelScope()
        self._expired = False

    def timed_out(self) -> None:
        self._expired = True
        self._scope.cancel()

    def close_if_idle(self) -> None:
        conn = self.conn
        if conn.their_state is h11.IDLE and conn.our_state is h11.IDLE and not conn.trailing_data[0]:
            self._scope.cancel()

    async def run(self) -> None:
        self.timers.add(self)
        try:
            with self._scope:
                await self._serve()
            if self._expired and (self.conn.their_state is not h11.IDLE or self.conn.trailing_data[0]):
                await self._send_error(408, "request timed out")  # an idle client is closed quietly
        except* (_PeerGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # raised bare, or grouped by the nursery of a streaming response
        except* Exception:
            # A bug in one connection must not take the daemon down with it.
            log.exception("connection crashed")
        finally:
            self.timers.discard(self)
            with trio.move_on_after(1) as cleanup:
                cleanup.shield = True
                await self._close()

    async def _serve(self) -> None:
        # A new connection gets the request timeout to send its first request; between requests
        # a keep-alive client may sit idle up to the keep-alive timeout. Once a head has come, its
        # body must follow within the request timeout. Only reads are timed: a deadline that fired
        # while a response is being written would cut it short after h11 has counted it as sent.
        timers = self.timers
        self.read_deadline = timers.base + self.config.request_timeout
        while True:
            self.request = None
            try:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    event = await self._next_event()
                if isinstance(event, h11.ConnectionClosed):
                    return
                self.read_deadline = timers.base + self.config.request_timeout
                request = await self._read_request(event)
            except h11.RemoteProtocolError as exc:
                await self._send_error(exc.error_status_hint, f"bad request: {exc}")
                return
            except _ClientError as exc:
                await self._send_error(exc.status, str(exc))
                return
            self.read_deadline = math.inf
            response = await self._call_app(request)
            # A client awaiting 100 Continue has not sent the body an app left unread, and will not.
            unread = request.receive is not None and not self.conn.they_are_waiting_for_100_continue
            if request.method == "HEAD":
                await self._send_head_only(response)
            elif isinstance(response, StreamingResponse):
                await self._send_streaming(response)
            else:
                await self._send_complete(response)
            if unread:
                await self._discard_body()
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is not h11.DONE or timers.closing:
                return
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return
            self.read_deadline = timers.base + self.config.keepalive_timeout

    async def _call_app(self, request: Request) -> Response | StreamingResponse:
        try:
            return await self.app(request)
        except _PeerGone:
            raise
        except _ClientError as exc:  # from a body the app was reading
            return self._error(exc.status, str(exc), [("connection", "close")])
        except Exception:
            log.exception("handler for %s %s crashed", request.method, request.path)
            return self._error(500, "internal error")

    # -- reading ----------------------------------------------------------------------------

    async def _next_event(self):
        while (event := self.conn.next_event()) is h11.NEED_DATA:
            data = await self.stream.receive_some(65536)
            if data and self.conn.their_state is h11.IDLE:
                # A head has begun: it has the request timeout from here, not what is left of the
                # keep-alive (a client dribbling heads would hold the connection that long).
                self.read_deadline = min(self.read_deadline, self.timers.base + self.config.request_timeout)
            # b"" is the peer's EOF: h11 turns it into ConnectionClosed or a protocol error.
            self.conn.receive_data(data)
        return event

    async def _read_request(self, event) -> Request:
        if type(event) is not h11.Request:
            raise _ClientError(400, "expected a request")
        if not event.http_version.startswith(b"1."):  # h11 parses any version, HTTP/2's preface too
            raise _ClientError(505, f"HTTP/{event.http_version.decode()} not supported: this server speaks HTTP/1.1")
        headers: dict[str, str] = {}
        # h11 bounds only a head still incomplete after a read; one read can bring a whole big one.
        head_size = len(event.target)
        for name, value in event.headers.raw_items():
            head_size += len(name) + len(value) + 4
            key = name.lower().decode("latin-1")
            if key in headers:
                headers[key] += ", " + value.decode("latin-1")
            else:
                headers[key] = value.decode("latin-1")
        if head_size > self.config.max_header_bytes:
            raise _ClientError(431, f"request head over {self.config.max_header_bytes} bytes")
        if "transfer-encoding" in headers and "content-length" in headers:
            # h11 would let Transfer-Encoding win; the mix is a request-smuggling pattern (RFC 9112 6.1).
            raise _ClientError(400, "bad request: both Content-Length and Transfer-Encoding")
        path, _, query = event.target.decode("latin-1").partition("?")
        query_fields = dict(parse_qsl(query)) if query else {}
        request = self.request = Request(event.method.decode("ascii"), path, query_fields, headers,
                                         local=self.local, loopback=self.loopback)  # fmt: skip
        if self.reads_body is not None and self.reads_body(request):
            request.receive = self._receive
            return request
        limit = self.config.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise _ClientError(413, f"request body over {limit} bytes")
        chunks = []
        size = 0
        while data := await self._receive():
            size += len(data)
            if size > limit:
                raise _ClientError(413, f"request body over {limit} bytes")
            chunks.append(data)
        request.body = b"".join(chunks)
        return request

    async def _discard_body(self) -> None:
        """Read what an app left of its body once its answer is sent, up to a body's worth within
        the request timeout: most clients send the whole body before they read the answer, and the
        connection can then serve the next request. Past either, the connection closes."""
        left = self.config.max_body_bytes
        self.read_deadline = self.timers.base + self.config.request_timeout  # for it all, not per piece
        try:
            while left >= 0 and (data := await self._receive()):
                left -= len(data)
        except _ClientError:
            pass
        finally:
            self.read_deadline = math.inf

    async def _receive(self) -> bytes:
        """The request body's next piece, b"" at its end; the first call sends 100 Continue if asked for."""
        if self.conn.they_are_waiting_for_100_continue:
            deadline, self.read_deadline = self.read_deadline, math.inf  # a write is never timed
            await self._send(h11.InformationalResponse(status_code=100, headers=[SERVER_HEADER], reason=b"Continue"))
            self.read_deadline = deadline
        if self.conn.their_state is not h11.SEND_BODY:
            return b""
        # An app reading its body is given the request timeout for each piece; the time it takes
        # between pieces (writing them out) is not counted.
        by_piece = self.read_deadline == math.inf
        if by_piece:
            self.read_deadline = self.timers.base + self.config.request_timeout
        try:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                event = await self._next_event()
        except h11.RemoteProtocolError as exc:
            raise _ClientError(exc.error_status_hint, f"bad request: {exc}") from None
        finally:
            if by_piece:
                self.read_deadline = math.inf
        kind = type(event)
        if kind is h11.Data:
            return event.data
        if kind is h11.EndOfMessage:
            return b""
        raise _PeerGone()  # ConnectionClosed: h11 has no other event mid-body

    # -- writing ----------------------------------------------------------------------------

    async def _send(self, *events) -> None:
        send = self.conn.send
        data = b"".join([send(event) or b"" for event in events])
        if data:
            await self.stream.send_all(data)

    def _head(self, status: int, content_type: str, headers: list[tuple[str, str]], length: int | None):
        all_headers = [SERVER_HEADER, ("content-type", content_type), *headers]
        if self.timers.closing and ("connection", "close") not in headers:
            all_headers.append(("connection", "close"))
        if length is not None and status != 204:  # which has no body, nor its length (RFC 9110 8.6)
            all_headers.append(("content-length", str(length)))
        return h11.Response(status_code=status, headers=all_headers, reason=_REASONS.get(status, b""))

    async def _send_complete(self, response: Response) -> None:
        head = self._head(response.status, response.content_type, response.headers, len(response.body))
        await self._send(head, h11.Data(data=response.body), h11.EndOfMessage())

    async def _send_head_only(self, response: Response | StreamingResponse) -> None:
        # h11 frames every answer to HEAD as bodiless: a stream is not even started.
        length = len(response.body) if isinstance(response, Response) else None
        await self._send(self._head(response.status, response.content_type, response.headers, length), h11.EndOfMessage())

    async def _send_streaming(self, response: StreamingResponse) -> None:
        # The head waits for the first piece of body, and the last piece (send(..., last=True))
        # carries the end of the message: a short stream costs one write, like a whole response.
        # Until that first piece, `produce` may still change the response's status and type.
        head_sent = False

        async def send(data: bytes, last: bool = False) -> None:
            nonlocal head_sent
            events = [h11.Data(data=data), *([h11.EndOfMessage()] if last else [])]
            if not head_sent:
                head_sent = True
                events.insert(0, self._streaming_head(response))
            await self._send(*events)

        disconnected = False
        try:
            if response.on_disconnect is None:
                await response.produce(send)
            else:
                async with trio.open_nursery() as nursery:

                    async def watch_peer() -> None:
                        nonlocal disconnected
                        # Notice a client that goes away while we wait for the next event, not at
                        # the next write. Bytes it pipelines meanwhile are kept for the next cycle,
                        # up to a request's worth: past that it is left to wait, as TCP makes it.
                        room = self.config.max_header_bytes + self.config.max_body_bytes
                        while data := await self.stream.receive_some(65536):
                            self.conn.receive_data(data)
                            if (room := room - len(data)) < 0:
                                return
                        disconnected = True
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(watch_peer)
                    await response.produce(send)
                    nursery.cancel_scope.cancel()
        except BaseException:
            self.conn.send_failed()
            if response.on_disconnect is not None:
                response.on_disconnect()
            raise
        if disconnected:
            self.conn.send_failed()
            response.on_disconnect()
            raise _PeerGone()
        if not head_sent:
            await self._send(self._streaming_head(response), h11.EndOfMessage())
        elif self.conn.our_state is h11.SEND_BODY:
            await self._send(h11.EndOfMessage())

    def _streaming_head(self, response: StreamingResponse) -> h11.Response:
        headers = [("cache-control", "no-cache"), *response.headers]
        return self._head(response.status, response.content_type, headers, None)

    def _error(self, status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
        response = error_response(status, message, headers)
        if self.shape_error is not None and self.request is not None:
            response = self.shape_error(self.request, response)
        return response

    async def _send_error(self, status: int, message: str) -> None:
        # Only while a response can still be started; afterwards all we can do is close.
        if self.conn.our_state not in {h11.IDLE, h11.SEND_RESPONSE}:
            return
        try:
            await self._send_complete(self._error(status, message, [("connection", "close")]))
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _close(self) -> None:
        try:
            if isinstance(self.stream, trio.abc.HalfCloseableStream):
                await self.stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        await self.stream.aclose()


# -- listeners --------------------------------------------------------------------------------


def parse_listen(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen wants HOST:PORT, got {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def bind_tcp(address: str) -> socket.socket:
    host, port = parse_listen(address)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with _naming(address, sock):
        sock.bind((host, port))
    sock.listen(socket.SOMAXCONN)
    return sock


@contextmanager
def _naming(address: object, sock: socket.socket):
    """A failed bind says which address it was (the kernel's error does not)."""
    try:
        yield
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None


def bind_unix(path: Path, mode: int) -> socket.socket:
    """Bind a Unix socket; a stale socket file is replaced, a live one is an error."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink()  # stale: nobody listens
        else:
            raise OSError(errno.EADDRINUSE, f"another daemon is listening on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        with _naming(path, sock):
            sock.bind(str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    sock.listen(socket.SOMAXCONN)
    return sock


def _loopback(sock: socket.socket) -> bool:
    """Whether a TCP connection came to a loopback address (an IPv4 one mapped into IPv6 too)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    address = ipaddress.ip_address(sock.getsockname()[0].partition("%")[0])
    return (getattr(address, "ipv4_mapped", None) or address).is_loopback


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    return f"{name[0]}:{name[1]}" if sock.family == socket.AF_INET else f"[{name[0]}]:{name[1]}"


async def serve_listeners(
    sockets: list[socket.socket], app: App, config: ServerConfig, connection_nursery: trio.Nursery,
    *, on_count: Callable[[int], None] | None = None, reads_body: ReadsBody | None = None,
    shape_error: ShapeError | None = None, task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept on every socket until cancelled; connections live in `connection_nursery`.

    `on_count(+1)` / `on_count(-1)` is called as each connection opens and closes.
    Keeping connections in a nursery of their own lets shutdown stop accepting first and let
    open streams end with a marker before they are cancelled. Started, it gives the connections'
    ReadTimers, whose close_idle() ends them once their jobs have.
    """

    timers = ReadTimers(config)

    async def handle(stream: SocketTransport) -> None:
        if on_count is not None:
            on_count(+1)
        stream.write_timeout = config.write_timeout
        try:
            local = stream.socket.family == socket.AF_UNIX
            await HTTPConnection(stream, app, config, timers, local=local, loopback=_loopback(stream.socket),
                                 reads_body=reads_body, shape_error=shape_error).run()
        finally:
            if on_count is not None:
                on_count(-1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        for sock in sockets:
            nursery.start_soon(accept_forever, sock, handle, connection_nursery)
        task_status.started(timers)
