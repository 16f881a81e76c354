"""HTTP/1.1 client on h11 over trio streams (tcp, tls, unix sockets)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urljoin, urlsplit

import h11
import msgspec
import trio

__all__ = [
    "Client",
    "ConnectError",
    "ConnectTimeout",
    "HTTPError",
    "HTTPTimeout",
    "ProtocolError",
    "Response",
    "SSEDecoder",
    "ServerSentEvent",
    "StatusError",
]

USER_AGENT = "rbeed"
RECEIVE_SIZE = 256 * 1024
# Bounds on what a peer can make us hold: an answer read whole (stream a bigger one), and one
# line or event of an event stream.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
MAX_EVENT_BYTES = 64 * 1024 * 1024
MAX_HEAD_BYTES = 64 * 1024  # an answer's head: curl takes 100 KiB per header, servers send a few KiB
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


class HTTPError(Exception):
    """Base of every error raised by this module; str() is a readable one-liner."""


class ConnectError(HTTPError):
    """The connection (or the TLS handshake) could not be established."""


class HTTPTimeout(HTTPError):
    """Connecting, or one network read or write, took longer than its timeout."""


class ConnectTimeout(ConnectError, HTTPTimeout):
    """Connecting took longer than the connect timeout."""


class ProtocolError(HTTPError):
    """The peer broke HTTP/1.1 or dropped the connection in the middle of a message."""


class StatusError(HTTPError):
    """Raised by Response.raise_for_status() for 4xx/5xx answers."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str  # "http", "https" or "unix"
    host: str  # for unix: the socket path
    port: int

    def __str__(self) -> str:
        return f"unix:{self.host}" if self.scheme == "unix" else f"{self.scheme}://{self.host_header}"

    @property
    def host_header(self) -> str:
        if self.scheme == "unix":
            return "localhost"
        host = f"[{self.host}]" if ":" in self.host else self.host
        default_port = 443 if self.scheme == "https" else 80
        return host if self.port == default_port else f"{host}:{self.port}"


def _parse_url(url: str) -> tuple[_Origin, str]:
    """Split an http(s):// or unix: URL into its origin and request target."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed [ of an IPv6 address
        raise HTTPError(f"invalid URL {url!r}: {exc}") from None
    if parts.scheme == "unix":
        if parts.netloc:  # unix://run/x.sock would quietly drop "run"
            raise HTTPError(f"invalid URL {url!r}: write unix:/PATH or unix:///PATH")
        if not parts.path:
            raise HTTPError(f"invalid URL {url!r}: unix: needs a socket path")
        return _Origin("unix", parts.path, 0), "/"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HTTPError(f"invalid URL {url!r}: expected http://, https:// or unix:")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise HTTPError(f"invalid URL {url!r}: bad port") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Origin(parts.scheme, parts.hostname, port), target


def _redirect_target(origin: _Origin, target: str, location: str) -> tuple[_Origin, str]:
    """Where a Location header points; a relative one stays on the origin, even a Unix socket."""
    parts = urlsplit(location)
    if parts.scheme or parts.netloc:
        scheme = parts.scheme or origin.scheme
        if scheme not in ("http", "https"):  # never let a server point us at a local socket
            raise HTTPError(f"refusing to follow the redirect from {origin}{target} to {location!r}")
        return _parse_url(location if parts.scheme else f"{scheme}:{location}")
    joined = urlsplit(urljoin(f"http://localhost{target}", location))
    return origin, (joined.path or "/") + (f"?{joined.query}" if joined.query else "")


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    event: str = "message"
    data: str = ""
    id: str = ""  # the last event ID seen on the stream, as in the EventSource spec
    retry: int | None = None


_LINE_END = re.compile(rb"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


class SSEDecoder:
    """Sans-io text/event-stream parser (WHATWG HTML, 'Parsing an event stream').

    feed() accepts arbitrary byte chunks and returns the events completed by them;
    close() marks the end of the stream. A line or an event's data over `max_event_bytes` is a
    ProtocolError: the stream is not one we can use, and would hold our memory.
    """

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._buffer = bytearray()
        self._scanned = 0  # where the search for the next line end resumes: a long line is read once
        self._data_bytes = 0
        self._at_start = True
        self._data: list[str] = []
        self._event = ""
        self._last_id = ""
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        self._buffer += chunk
        if self._at_start:
            if _BOM.startswith(self._buffer):
                return []  # too short yet to tell whether the stream starts with a BOM
            self._at_start = False
            if self._buffer.startswith(_BOM):
                del self._buffer[: len(_BOM)]
        events: list[ServerSentEvent] = []
        pos = 0
        while (match := _LINE_END.search(self._buffer, max(pos, self._scanned))) is not None:
            # A CR at the very end may be the first half of a CRLF split across chunks.
            if match.group() == b"\r" and match.end() == len(self._buffer):
                break
            line = self._buffer[pos : match.start()].decode("utf-8", errors="replace")
            pos = match.end()
            if event := self._process_line(line):
                events.append(event)
        del self._buffer[:pos]
        self._scanned = max(len(self._buffer) - 1, 0)  # a held-back CR is searched again
        if len(self._buffer) > self._max:
            raise ProtocolError(f"an event stream line over {self._max} bytes")
        return events

    def close(self) -> list[ServerSentEvent]:
        """End of stream: a held-back final CR ends its line after all; a partial event is dropped."""
        events = self.feed(b"\n") if self._buffer.endswith(b"\r") else []
        self._buffer.clear()
        return events

    def _process_line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_bytes += len(value)
            if self._data_bytes > self._max:
                raise ProtocolError(f"an event stream event over {self._max} bytes")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        data, event, retry = self._data, self._event, self._retry
        self._data, self._event, self._retry, self._data_bytes = [], "", None, 0
        if not data:
            return None
        return ServerSentEvent(event or "message", "\n".join(data), self._last_id, retry)


class _Connection:
    """One h11 client connection over a trio stream; maps every failure to HTTPError."""

    def __init__(self, origin: _Origin, stream: trio.abc.Stream, io_timeout: float | None) -> None:
        self.origin = origin
        self.stream = stream
        self.io_timeout = io_timeout
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.reused = False
        self.received_in_cycle = 0
        self.peer_closed = False

    async def send_request(self, request: h11.Request, body: bytes | None) -> h11.Event:
        """Send the request; return the first event of the answer. A server may answer before it
        has read the whole body (a 413) and close: that answer is the result, not the broken pipe."""
        try:
            await self.send(request)
            if body:
                await self.send(h11.Data(data=body))
            await self.send(h11.EndOfMessage())
        except ProtocolError as exc:
            try:
                return await self.next_event()
            except ProtocolError:
                raise exc from None
        return await self.next_event()

    async def send(self, event: h11.Event) -> None:
        try:
            data = self.h11.send(event)
        except h11.LocalProtocolError as exc:
            raise HTTPError(f"invalid request to {self.origin}: {exc}") from None
        if data:
            try:
                with self._deadline("sending to"):
                    await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ProtocolError(f"connection to {self.origin} lost while sending: {_reason(exc)}") from exc

    async def next_event(self) -> h11.Event:
        while True:
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:  # h11's bound on a head still incomplete
                    raise self._head_too_big() from None
                if self.peer_closed:
                    raise ProtocolError(
                        f"connection closed by {self.origin} before the response was complete"
                    ) from None
                raise ProtocolError(f"bad response from {self.origin}: {exc}") from None
            if isinstance(event, (h11.Response, h11.InformationalResponse)):
                # h11 bounds only a head still incomplete after a read; one read can bring a whole big one.
                if sum(len(name) + len(value) + 4 for name, value in event.headers.raw_items()) > MAX_HEAD_BYTES:
                    raise self._head_too_big()
            if isinstance(event, h11.Event):
                return event
            if event is h11.PAUSED:  # a 101 answer to a request that asked for no Upgrade
                raise ProtocolError(f"{self.origin} switched protocols unexpectedly")
            try:
                with self._deadline("waiting for"):
                    data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ProtocolError(f"connection to {self.origin} lost: {_reason(exc)}") from exc
            self.received_in_cycle += len(data)
            self.peer_closed = not data
            self.h11.receive_data(data)  # type: ignore[arg-type]  # h11 takes any bytes-like

    def _head_too_big(self) -> ProtocolError:
        return ProtocolError(f"bad response from {self.origin}: its head is over {MAX_HEAD_BYTES} bytes")

    def next_buffered_event(self) -> h11.Event | None:
        """The next event that needs no I/O, or None."""
        try:
            event = self.h11.next_event()
        except h11.RemoteProtocolError:
            return None
        return event if isinstance(event, h11.Event) else None

    @contextlib.contextmanager
    def _deadline(self, doing: str) -> Iterator[None]:
        try:
            with trio.fail_after(_seconds(self.io_timeout)):
                yield
        except trio.TooSlowError:
            raise HTTPTimeout(f"timed out after {self.io_timeout:g}s {doing} {self.origin}") from None

    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def start_next_cycle(self) -> None:
        self.h11.start_next_cycle()
        self.reused = True
        self.received_in_cycle = 0

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def _seconds(timeout: float | None) -> float:
    return math.inf if timeout is None else timeout


def _reason(exc: BaseException) -> str:
    """A short reason for a low-level failure, e.g. 'connection refused'."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(sorted({_reason(inner) for inner in exc.exceptions}))
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    if exc.__cause__ is not None:
        return _reason(exc.__cause__)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


class Response:
    """Status and headers of an answer; the body is streamed or read with aread()."""

    def __init__(self, conn: _Connection, event: h11.Response, method: str, url: str) -> None:
        self._conn = conn
        self.method = method
        self.url = url
        self.status: int = event.status_code
        self.reason: str = event.reason.decode("latin-1")
        self.headers: dict[str, str] = {}
        for name, value in event.headers:
            key = name.decode("latin-1")
            text = value.decode("latin-1")
            self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text
        self.history: list[Response] = []  # the redirects that led here, oldest first
        self.content: bytes | None = None
        self._iterated = False
        self._complete = False
        self._received = 0

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.method} {self.url}>"

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        if self._iterated:
            raise HTTPError(f"body of {self.method} {self.url} was already read")
        self._iterated = True
        while True:
            try:
                event = await self._conn.next_event()
            except ProtocolError as exc:
                of_total = f" of {self.headers['content-length']}" if "content-length" in self.headers else ""
                raise ProtocolError(f"{exc} (after {self._received}{of_total} body bytes)") from exc
            if isinstance(event, h11.Data):
                self._received += len(event.data)
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._complete = True
                return

    async def aread(self, limit: int = MAX_ANSWER_BYTES) -> bytes:
        """The whole body; one over `limit` bytes is a ProtocolError (stream those instead)."""
        if self.content is None:
            declared = self.headers.get("content-length", "").partition(",")[0].strip()
            if declared.isdigit() and int(declared) > limit:
                raise self._too_big(limit)
            chunks, size = [], 0
            async for chunk in self.aiter_bytes():
                chunks.append(chunk)
                if (size := size + len(chunk)) > limit:
                    raise self._too_big(limit)
            self.content = b"".join(chunks)
        return self.content

    def _too_big(self, limit: int) -> ProtocolError:
        return ProtocolError(f"the answer of {self.method} {self.url} is over {limit} bytes")

    async def aiter_sse(self) -> AsyncIterator[ServerSentEvent]:
        decoder = SSEDecoder()
        async for chunk in self.aiter_bytes():
            for event in decoder.feed(chunk):
                yield event
        for event in decoder.close():
            yield event

    def json(self) -> Any:
        if self.content is None:
            raise HTTPError(f"body of {self.method} {self.url} was not read (use aread())")
        try:
            return msgspec.json.decode(self.content)
        except msgspec.DecodeError as exc:
            raise ProtocolError(f"{self.method} {self.url}: invalid JSON body: {exc}") from None

    def raise_for_status(self) -> None:
        if self.status < 400:
            return
        try:
            reason = self.reason or HTTPStatus(self.status).phrase
        except ValueError:
            reason = ""
        message = f"{self.method} {self.url} -> {self.status} {reason}".rstrip()
        if self.content:
            message += ": " + self.content[:200].decode("utf-8", errors="replace").strip()
        raise StatusError(message, self.status)

    def _drain_buffered(self) -> None:
        """Finish the message if the rest of it is already buffered (no I/O)."""
        while not self._complete and (event := self._conn.next_buffered_event()) is not None:
            self._complete = isinstance(event, h11.EndOfMessage)


class Client:
    """HTTP/1.1 client for one base URL, keeping idle connections alive per origin.

    base_url: "http://host:port[/prefix]", "https://host[/prefix]" or "unix:/path/to.sock".
    Request paths are joined to the base; an absolute http(s) URL is used as is.
    connect_timeout bounds connecting (and the TLS handshake); read_timeout bounds each
    network read or write (None disables it, e.g. for long-lived SSE streams).
    """

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout: float | None = 10.0,
        read_timeout: float | None = 30.0,
        headers: Mapping[str, str] | None = None,
        max_redirects: int = 5,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._base_origin, self._base_target = _parse_url(base_url)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.max_redirects = max_redirects
        self._ssl_context = ssl_context
        self._idle: dict[_Origin, _Connection] = {}
        self.connections_opened = 0

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, {}
        for conn in idle.values():
            await conn.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Send a request and read the whole answer into Response.content."""
        async with self.stream(method, path, json=json, body=body, headers=headers) as response:
            await response.aread()
        return response

    @contextlib.asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> AsyncIterator[Response]:
        """Send a request; yield the Response as soon as its headers arrived.

        GET and HEAD follow up to max_redirects redirects. Leaving the block early closes
        the connection instead of reading the rest of the body.
        """
        method = method.upper()
        if json is not None:
            body = msgspec.json.encode(json)
        request_headers = self.headers | {k.lower(): v for k, v in (headers or {}).items()}
        if json is not None:
            request_headers.setdefault("content-type", "application/json")
        origin, target = self._resolve(path)
        history: list[Response] = []
        while True:
            response = await self._exchange(origin, target, method, request_headers, body)
            location = response.headers.get("location")
            if method not in ("GET", "HEAD") or response.status not in REDIRECT_STATUSES or not location:
                break
            await self._release(response)
            history.append(response)
            if len(history) > self.max_redirects:
                raise HTTPError(f"too many redirects (more than {self.max_redirects}) from {history[0].url}")
            new_origin, target = _redirect_target(origin, target, location)
            if new_origin != origin:
                # Credentials are for the origin they were given for, not for a CDN.
                request_headers = {k: v for k, v in request_headers.items() if k not in ("authorization", "cookie")}
            origin = new_origin
        response.history = history
        try:
            yield response
        finally:
            await self._release(response)

    def _resolve(self, path: str) -> tuple[_Origin, str]:
        if "://" in path:
            return _parse_url(path)
        if not path:
            return self._base_origin, self._base_target
        prefix = "" if self._base_origin.scheme == "unix" else self._base_target.split("?")[0].rstrip("/")
        return self._base_origin, prefix + (path if path.startswith("/") else "/" + path)

    async def _exchange(
        self, origin: _Origin, target: str, method: str, headers: dict[str, str], body: bytes | None
    ) -> Response:
        """Send one request and read the answer's head, retrying once on a stale keep-alive connection."""
        headers = {"host": origin.host_header, "user-agent": USER_AGENT} | headers
        if body is not None or method in ("POST", "PUT", "PATCH"):
            headers["content-length"] = str(len(body or b""))
        try:
            request = h11.Request(method=method, target=target, headers=list(headers.items()))
        except UnicodeError:
            raise HTTPError(f"invalid request {method} {target!r}: a header or the target is not ASCII") from None
        except h11.LocalProtocolError as exc:
            # Not the value itself: a header may carry a secret (an API key).
            reason = "a header value holds characters HTTP does not allow" if "header value" in str(exc) else exc
            raise HTTPError(f"invalid request {method} {target!r}: {reason}") from None
        while True:
            conn = self._idle.pop(origin, None) or await self._connect(origin)
            try:
                event = await conn.send_request(request, body)
                while isinstance(event, h11.InformationalResponse):  # 100 Continue and friends
                    event = await conn.next_event()
            except ProtocolError:
                await conn.aclose()
                if conn.reused and conn.received_in_cycle == 0:
                    continue  # the server had closed this idle connection: retry on a fresh one
                raise
            except BaseException:
                await conn.aclose()
                raise
            assert isinstance(event, h11.Response)  # h11 yields nothing else before the head
            return Response(conn, event, method, f"{origin}{target}")

    async def _connect(self, origin: _Origin) -> _Connection:
        stream: trio.abc.Stream | None = None
        try:
            with trio.fail_after(_seconds(self.connect_timeout)):
                if origin.scheme == "unix":
                    stream = await trio.open_unix_socket(origin.host)
                else:
                    stream = await trio.open_tcp_stream(origin.host, origin.port)
                if origin.scheme == "https":
                    if self._ssl_context is None:
                        self._ssl_context = ssl.create_default_context()
                    stream = trio.SSLStream(
                        stream, self._ssl_context, server_hostname=origin.host, https_compatible=True
                    )
                    await stream.do_handshake()
        except trio.TooSlowError:
            await _close_quietly(stream)
            raise ConnectTimeout(f"timed out after {self.connect_timeout:g}s connecting to {origin}") from None
        except (OSError, trio.BrokenResourceError) as exc:
            await _close_quietly(stream)
            raise ConnectError(f"cannot connect to {origin}: {_reason(exc)}") from exc
        except UnicodeError:  # a name IDNA cannot encode: an empty label, one over 63 characters
            await _close_quietly(stream)
            raise ConnectError(f"cannot connect to {origin}: not a valid host name") from None
        except BaseException:
            await _close_quietly(stream)
            raise
        self.connections_opened += 1
        return _Connection(origin, stream, self.read_timeout)

    async def _release(self, response: Response) -> None:
        conn = response._conn
        response._drain_buffered()
        if response._complete and conn.reusable() and conn.origin not in self._idle:
            conn.start_next_cycle()
            self._idle[conn.origin] = conn
        else:
            await conn.aclose()


async def _close_quietly(stream: trio.abc.Stream | None) -> None:
    if stream is not None:
        await trio.aclose_forcefully(stream)
