"""Real HTTP/1.1 file server for tests (h11 over trio, 127.0.0.1 or a Unix socket) with fault injection.

async with serve_files({"model.gguf": data}, digest_header="x-linked-etag") as server:
    server.drop_after["model.gguf"] = 1000      # next response closes the socket after 1000 body bytes
    url = server.url("model.gguf")
    ...
    assert server.requests[-1].headers["range"] == "bytes=1000-"
"""

from __future__ import annotations

import base64
import hashlib
import os
import pathlib
import re
import socket
import ssl
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import trio

PIECE_SIZE = 64 * 1024


def gguf_bytes(size: int) -> bytes:
    """Random content that passes the GGUF magic check."""
    return b"GGUF" + os.urandom(size - 4)


def corrupted(content: bytes) -> bytes:
    """What the server sends for a file in FileServer.corrupt: one byte in the middle flipped."""
    middle = len(content) // 2
    return content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1 :]


@dataclass
class RecordedRequest:
    method: str
    target: str
    headers: dict[str, str]  # lowercase names
    body: bytes
    connection: int  # serial number of the connection that carried it (1, 2, ...)


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    # bytes: sent with Content-Length; an async iterable: sent chunked, one chunk per item.
    body: bytes | AsyncIterable[bytes] = b""
    drop_after: int | None = None  # close the socket after this many body bytes
    stall_after: int | None = None  # stop sending, forever, after this many body bytes


Handler = Callable[[RecordedRequest], Awaitable[Reply]]


class FileServer:
    """Serves `files` as /<name>, plus `routes` (custom handlers) and `redirects` (302s).

    Fault knobs, per file name: drop_after (fires once), stall_after, corrupt (serve other
    bytes than the announced digest), ignore_range (answer 200 to Range), chunked, range_limit
    (a 206 holds at most that many bytes), last_modified (sent, and matched against If-Range
    unless in ignore_if_range).
    """

    def __init__(
        self, files: Mapping[str, bytes], digest_header: str | None, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.files = dict(files)
        self.ssl_context = ssl_context
        self.digest_header = digest_header  # etag, x-linked-etag, digest or repr-digest
        self.routes: dict[str, Handler] = {}
        self.redirects: dict[str, str] = {}  # path -> Location
        self.drop_after: dict[str, int] = {}
        self.stall_after: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.ignore_range: set[str] = set()
        self.ignore_if_range: set[str] = set()  # a range of whatever the file is now, as some servers send
        self.chunked: set[str] = set()
        self.range_limit: dict[str, int] = {}
        self.last_modified: dict[str, str] = {}
        self.requests: list[RecordedRequest] = []
        self.connections = 0
        self.base_url = ""

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    async def _accept_loop(self, listener: trio.SocketListener, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with listener, trio.open_nursery() as nursery:
            task_status.started()
            while True:
                stream = await listener.accept()
                self.connections += 1
                nursery.start_soon(self._serve_connection, stream, self.connections)

    async def _serve_connection(self, stream: trio.abc.Stream, number: int) -> None:
        if self.ssl_context is not None:
            stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
        conn = h11.Connection(h11.SERVER)
        try:
            while (request := await _read_request(conn, stream, number)) is not None:
                self.requests.append(request)
                reply = await self._dispatch(request)
                if request.method == "HEAD" and isinstance(reply.body, bytes):
                    reply.headers.setdefault("content-length", str(len(reply.body)))
                    reply.body = b""
                completed = await _send_reply(conn, stream, reply)
                if not completed or conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass  # the client went away or spoke nonsense: nothing left to serve
        finally:
            await trio.aclose_forcefully(stream)

    async def _dispatch(self, request: RecordedRequest) -> Reply:
        path = request.target.split("?", 1)[0]
        if path in self.routes:
            return await self.routes[path](request)
        if path in self.redirects:
            return Reply(302, {"location": self.redirects[path], "content-length": "0"})
        name = path.removeprefix("/")
        if name in self.files:
            return self._file_reply(name, request)
        return Reply(404, {"content-type": "text/plain"}, b"not found\n")

    def _file_reply(self, name: str, request: RecordedRequest) -> Reply:
        content = self.files[name]
        headers = {"content-type": "application/octet-stream", "accept-ranges": "bytes"}
        if self.digest_header:
            headers[self.digest_header] = _digest_value(self.digest_header, content)
        if name in self.corrupt:
            content = corrupted(content)
        status = 200
        range_match = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("range", ""))
        if name in self.last_modified:
            headers["last-modified"] = self.last_modified[name]
        if_range = request.headers.get("if-range")
        fresh = if_range in (None, self.last_modified.get(name)) or name in self.ignore_if_range
        if range_match and name not in self.ignore_range and fresh:
            first = int(range_match[1])
            last = min(int(range_match[2] or len(content) - 1), len(content) - 1)
            if name in self.range_limit:
                last = min(last, first + self.range_limit[name] - 1)
            if first >= len(content):
                headers["content-range"] = f"bytes */{len(content)}"
                return Reply(416, headers | {"content-length": "0"})
            status = 206
            headers["content-range"] = f"bytes {first}-{last}/{len(content)}"
            content = content[first : last + 1]
        body: bytes | AsyncIterable[bytes] = _aiter_pieces(content) if name in self.chunked else content
        return Reply(
            status,
            headers,
            body,
            drop_after=self.drop_after.pop(name, None),
            stall_after=self.stall_after.get(name),
        )


def _digest_value(header: str, content: bytes) -> str:
    digest = hashlib.sha256(content)
    if header in ("etag", "x-linked-etag"):
        return f'"{digest.hexdigest()}"'
    encoded = base64.b64encode(digest.digest()).decode()
    return f"sha-256=:{encoded}:" if header == "repr-digest" else f"sha-256={encoded}"


async def _aiter_pieces(content: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(content), PIECE_SIZE):
        yield content[start : start + PIECE_SIZE]


async def _read_request(conn: h11.Connection, stream: trio.abc.Stream, number: int) -> RecordedRequest | None:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(PIECE_SIZE))
        elif isinstance(event, h11.ConnectionClosed):
            return None
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            headers = {name.decode(): value.decode() for name, value in request.headers}
            return RecordedRequest(request.method.decode(), request.target.decode(), headers, bytes(body), number)


async def _send_reply(conn: h11.Connection, stream: trio.abc.Stream, reply: Reply) -> bool:
    """Send reply, applying its fault; False when the connection must be dropped."""
    headers = dict(reply.headers)
    if isinstance(reply.body, bytes):
        headers.setdefault("content-length", str(len(reply.body)))
        pieces: AsyncIterable[bytes] = _aiter_pieces(reply.body)
    else:
        headers["transfer-encoding"] = "chunked"
        pieces = reply.body
    await stream.send_all(conn.send(h11.Response(status_code=reply.status, headers=list(headers.items()))))
    cut = min((n for n in (reply.drop_after, reply.stall_after) if n is not None), default=None)
    sent = 0
    async for piece in pieces:
        if cut is not None:
            piece = piece[: cut - sent]
        if piece:
            await stream.send_all(conn.send(h11.Data(data=piece)))
            sent += len(piece)
        if cut is not None and sent >= cut:
            break
    if cut is not None and sent >= cut:
        if cut == reply.stall_after:
            await trio.sleep_forever()
        return False
    await stream.send_all(conn.send(h11.EndOfMessage()))
    return True


@asynccontextmanager
async def serve_files(
    files: Mapping[str, bytes] | pathlib.Path | None = None,
    *,
    unix_path: pathlib.Path | None = None,
    digest_header: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[FileServer]:
    """Run a FileServer on 127.0.0.1 (ephemeral port) or on unix_path, for the block's duration.

    With ssl_context (server side) it speaks HTTPS and its URLs name the host "localhost".
    """
    if isinstance(files, pathlib.Path):
        files = {p.name: p.read_bytes() for p in files.iterdir() if p.is_file()}
    server = FileServer(files or {}, digest_header, ssl_context)
    if unix_path is None:
        [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listener.socket.getsockname()[1]
        server.base_url = f"https://localhost:{port}" if ssl_context else f"http://127.0.0.1:{port}"
    else:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(unix_path))
        sock.listen()
        listener = trio.SocketListener(sock)
        server.base_url = f"unix:{unix_path}"
    async with trio.open_nursery() as nursery:
        await nursery.start(server._accept_loop, listener)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()
