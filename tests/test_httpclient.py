"""Tests of rbeed.httpclient against real servers on 127.0.0.1 and Unix sockets."""

import re
import shutil
import socket
import ssl
import subprocess

import msgspec
import pytest
import trio

import rbeed.httpclient
from rbeed.httpclient import (
    Client,
    ConnectError,
    HTTPError,
    HTTPTimeout,
    ProtocolError,
    ServerSentEvent,
    SSEDecoder,
    StatusError,
)

from httpfixture import RecordedRequest, Reply, serve_files


async def echo(request: RecordedRequest) -> Reply:
    payload = {
        "method": request.method,
        "target": request.target,
        "headers": request.headers,
        "body": request.body.decode(),
    }
    return Reply(200, {"content-type": "application/json"}, msgspec.json.encode(payload))


async def hang(request: RecordedRequest) -> Reply:
    await trio.sleep_forever()
    raise AssertionError("unreachable")


async def test_keep_alive_serves_sequential_requests_on_one_connection():
    files = {"a": b"first body", "b": b"second body" * 1000}
    async with serve_files(files) as server, Client(server.base_url) as client:
        first = await client.request("GET", "/a")
        second = await client.request("GET", "/b")
        async with client.stream("GET", "/a") as third:
            assert await third.aread() == files["a"]
        head = await client.request("HEAD", "/b")
    assert (first.status, first.content) == (200, files["a"])
    assert (second.status, second.content) == (200, files["b"])
    assert (head.status, head.headers["content-length"], head.content) == (200, str(len(files["b"])), b"")
    assert server.connections == 1
    assert [r.connection for r in server.requests] == [1, 1, 1, 1]
    assert client.connections_opened == 1


async def test_concurrent_requests_on_one_client_use_parallel_connections():
    arrived = 0
    all_arrived = trio.Event()

    async def barrier(request: RecordedRequest) -> Reply:
        nonlocal arrived
        arrived += 1
        if arrived == 10:
            all_arrived.set()
        await all_arrived.wait()  # answers only once all ten requests are in flight together
        return await echo(request)

    async with serve_files() as server, Client(server.base_url) as client:
        server.routes["/health"] = barrier
        statuses = []

        async def check() -> None:
            statuses.append((await client.request("GET", "/health")).status)

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(10):
                    nursery.start_soon(check)
        assert (await client.request("GET", "/health")).status == 200
    assert statuses == [200] * 10
    assert server.connections == 10
    assert server.requests[-1].connection <= 10  # the last request reused a kept-alive connection


async def test_content_length_and_chunked_bodies_stream_identically():
    body = bytes(range(256)) * 2000  # 512000 bytes: several network reads
    async with serve_files({"plain": body, "chunked": body}) as server, Client(server.base_url) as client:
        server.chunked.add("chunked")
        for name in ("plain", "chunked"):
            async with client.stream("GET", f"/{name}") as response:
                chunks = [chunk async for chunk in response.aiter_bytes()]
            assert b"".join(chunks) == body
            assert len(chunks) > 1
            if name == "plain":
                assert response.headers["content-length"] == str(len(body))
            else:
                assert response.headers["transfer-encoding"] == "chunked"
        assert server.connections == 1  # both complete bodies left the connection reusable


async def test_unread_body_closes_the_connection_instead_of_draining_it():
    async with serve_files({"big": b"x" * 4_000_000, "small": b"ok"}) as server, Client(server.base_url) as client:
        async with client.stream("GET", "/big") as response:
            assert response.status == 200
        assert (await client.request("GET", "/small")).content == b"ok"
    assert server.connections == 2


async def test_post_json_over_unix_socket(tmp_path):
    async with serve_files(unix_path=tmp_path / "rbeed.sock") as server:
        server.routes["/v1/jobs"] = echo
        assert server.base_url == f"unix:{tmp_path / 'rbeed.sock'}"
        async with Client(server.base_url) as client:
            response = await client.request("POST", "/v1/jobs", json={"op": "infer", "n": 3}, headers={"X-Trace": "t1"})
            deleted = await client.request("DELETE", "/v1/jobs?id=7")
    echoed = response.json()
    assert response.status == 200
    assert echoed["method"] == "POST"
    assert msgspec.json.decode(echoed["body"]) == {"op": "infer", "n": 3}
    assert echoed["headers"]["host"] == "localhost"
    assert echoed["headers"]["content-type"] == "application/json"
    assert echoed["headers"]["x-trace"] == "t1"
    assert deleted.json()["method"] == "DELETE"
    assert deleted.json()["target"] == "/v1/jobs?id=7"
    assert server.connections == 1


SSE_STREAM = (
    b"\xef\xbb\xbf: comment, ignored\n"
    b"retry: 1500\n"
    b"data: first\n\n"
    b"event: token\r\nid: 7\r\ndata: line one\r\ndata:line two\r\ndata\r\n\r\n"
    b'event: done\rdata: {"ok": true}\r\r'
    b"data: caf\xc3\xa9 \xe2\x9c\x93\n\n"
    b"id\nevent: empty-data-is-not-dispatched\n\n"
    b"data: after id reset\n\n"
    b"data: unterminated, never dispatched"
)
SSE_EVENTS = [
    ServerSentEvent("message", "first", "", 1500),
    ServerSentEvent("token", "line one\nline two\n", "7"),
    ServerSentEvent("done", '{"ok": true}', "7"),
    ServerSentEvent("message", "caf\u00e9 \u2713", "7"),
    ServerSentEvent("message", "after id reset", ""),
]


def test_sse_decoder_is_independent_of_chunk_boundaries():
    whole = SSEDecoder().feed(SSE_STREAM)
    assert whole == SSE_EVENTS
    for split in range(1, len(SSE_STREAM)):
        decoder = SSEDecoder()
        events = decoder.feed(SSE_STREAM[:split]) + decoder.feed(SSE_STREAM[split:])
        assert events == SSE_EVENTS, f"split at {split}"
    decoder = SSEDecoder()
    assert [e for i in range(len(SSE_STREAM)) for e in decoder.feed(SSE_STREAM[i : i + 1])] == SSE_EVENTS


async def test_sse_stream_arrives_event_by_event(tmp_path):
    """Each event is read while the server still holds the rest of the stream back."""
    delivered = [trio.Event() for _ in SSE_EVENTS]
    pieces = [
        b"data: first\nre",
        b"try: 1500\n\n",
        b"event: token\r",
        b"\nid: 7\r\ndata: line one\r\ndata:line two\r\ndata\r\n\r\n",
    ]

    async def sse(request: RecordedRequest) -> Reply:
        async def body():
            for piece in pieces:
                yield piece
            await delivered[1].wait()
            yield b'event: done\rdata: {"ok": true}\r\r'

        return Reply(200, {"content-type": "text/event-stream"}, body())

    async with serve_files(unix_path=tmp_path / "s.sock") as server, Client(server.base_url, read_timeout=5) as client:
        server.routes["/events"] = sse
        received = []
        with trio.fail_after(5):
            async with client.stream("GET", "/events") as response:
                async for event in response.aiter_sse():
                    received.append(event)
                    delivered[len(received) - 1].set()
    assert received == SSE_EVENTS[:3]


async def test_read_timeout_while_waiting_for_the_response_head():
    async with serve_files() as server, Client(server.base_url, read_timeout=0.2) as client:
        server.routes["/hang"] = hang
        with (
            trio.fail_after(5),
            pytest.raises(HTTPTimeout, match=r"timed out after 0.2s waiting for http://127\.0\.0\.1"),
        ):
            await client.request("GET", "/hang")


async def test_read_timeout_when_the_body_stalls():
    async with serve_files({"slow": b"z" * 100_000}) as server, Client(server.base_url, read_timeout=0.2) as client:
        server.stall_after["slow"] = 1000
        received = bytearray()
        with trio.fail_after(5), pytest.raises(HTTPTimeout, match="timed out"):
            async with client.stream("GET", "/slow") as response:
                async for chunk in response.aiter_bytes():
                    received += chunk
        assert received == b"z" * 1000


async def test_connect_timeout_when_the_listen_queue_is_full():
    with socket.socket() as listener, socket.socket() as queued:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        queued.connect(listener.getsockname())  # fills the accept queue: further SYNs are dropped
        host, port = listener.getsockname()
        async with Client(f"http://{host}:{port}", connect_timeout=0.2) as client:
            with (
                trio.fail_after(5),
                pytest.raises(HTTPTimeout, match=r"timed out after 0\.2s connecting to http://127\.0\.0\.1"),
            ):
                await client.request("GET", "/")


async def test_connection_refused_is_a_readable_connect_error():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connections are refused
        async with Client(f"http://127.0.0.1:{port}") as client:
            with pytest.raises(ConnectError) as caught:
                await client.request("GET", "/health")
    assert str(caught.value) == f"cannot connect to http://127.0.0.1:{port}: connection refused"


async def test_missing_unix_socket_is_a_connect_error(tmp_path):
    async with Client(f"unix:{tmp_path}/absent.sock") as client:
        with pytest.raises(ConnectError, match="no such file or directory"):
            await client.request("GET", "/")


async def test_redirects_relative_and_absolute_across_servers():
    async with serve_files({"file": b"payload"}) as cdn, serve_files() as hub:
        hub.redirects["/resolve"] = "/moved"  # relative
        hub.redirects["/moved"] = cdn.url("file")  # absolute, to another origin
        async with Client(hub.base_url) as client:
            response = await client.request("GET", "/resolve", headers={"Authorization": "Bearer secret"})
    assert (response.status, response.content) == (200, b"payload")
    assert [r.status for r in response.history] == [302, 302]
    assert response.url == cdn.url("file")
    assert [r.target for r in hub.requests] == ["/resolve", "/moved"]
    assert all(r.headers["authorization"] == "Bearer secret" for r in hub.requests)
    assert "authorization" not in cdn.requests[0].headers  # credentials stay with their origin


async def test_relative_redirect_over_unix_socket_stays_on_the_socket(tmp_path):
    async with serve_files({"new": b"here"}, unix_path=tmp_path / "s.sock") as server:
        server.redirects["/dir/old"] = "../new"
        server.redirects["/evil"] = "unix:/run/other.sock"
        async with Client(server.base_url) as client:
            response = await client.request("GET", "/dir/old?x=1")
            with pytest.raises(
                HTTPError, match=r"refusing to follow the redirect from unix:.*/evil to 'unix:/run/other\.sock'"
            ):
                await client.request("GET", "/evil")
    assert (response.status, response.content) == (200, b"here")
    assert [r.target for r in server.requests] == ["/dir/old?x=1", "/new", "/evil"]


async def test_redirect_loop_stops_after_max_redirects():
    async with serve_files() as server, Client(server.base_url, max_redirects=5) as client:
        server.redirects["/loop"] = "/loop"
        with pytest.raises(HTTPError, match=r"too many redirects \(more than 5\)"):
            await client.request("GET", "/loop")
    assert len(server.requests) == 6


async def test_post_does_not_follow_redirects():
    async with serve_files() as server, Client(server.base_url) as client:
        server.redirects["/jobs"] = "/elsewhere"
        response = await client.request("POST", "/jobs", body=b"{}")
    assert (response.status, response.headers["location"]) == (302, "/elsewhere")
    assert len(server.requests) == 1


async def test_connection_dropped_mid_body_is_a_protocol_error():
    async with serve_files({"f": b"q" * 10_000}) as server, Client(server.base_url) as client:
        server.drop_after["f"] = 4000
        with pytest.raises(
            ProtocolError,
            match=r"^connection closed by http://127\.0\.0\.1:\d+ before the response was complete "
            r"\(after 4000 of 10000 body bytes\)$",
        ):
            await client.request("GET", "/f")
        assert (await client.request("GET", "/f")).content == b"q" * 10_000  # fault fires once


async def test_stale_keep_alive_connection_is_replaced_transparently():
    async with serve_files({"f": b"data"}) as server, Client(server.base_url) as client:
        server.drop_after["f"] = 4  # the whole body, then the server closes the idle connection
        assert (await client.request("GET", "/f")).content == b"data"
        assert (await client.request("GET", "/f")).content == b"data"
    assert server.connections == 2
    assert client.connections_opened == 2


async def test_error_status_is_returned_and_raise_for_status_explains_it():
    async with serve_files() as server, Client(server.base_url) as client:
        response = await client.request("GET", "/missing")
    assert response.status == 404
    with pytest.raises(StatusError, match=r"GET http://127\.0\.0\.1:\d+/missing -> 404 Not Found: not found") as caught:
        response.raise_for_status()
    assert caught.value.status == 404


async def test_base_url_path_prefix_and_absolute_urls():
    async with serve_files() as server:
        server.routes["/api/v1/x"] = echo
        server.routes["/other"] = echo
        async with Client(server.base_url + "/api/v1") as client:
            assert (await client.request("GET", "/x")).json()["target"] == "/api/v1/x"
            assert (await client.request("GET", server.base_url + "/other?a=1")).json()["target"] == "/other?a=1"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-days", "1",
         "-keyout", directory / "key.pem", "-out", directory / "cert.pem"],
        check=True, capture_output=True,
    )  # fmt: skip
    return directory / "cert.pem", directory / "key.pem"


async def test_https_verifies_the_server_certificate(tls_files):
    cert, key = tls_files
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    async with serve_files({"f": b"secret"}, ssl_context=server_context) as server:
        async with Client(server.base_url, ssl_context=ssl.create_default_context(cafile=cert)) as client:
            response = await client.request("GET", "/f")
            assert (await client.request("GET", "/f")).content == b"secret"
        async with Client(server.base_url) as untrusting:  # system CAs only
            with pytest.raises(ConnectError, match="TLS: certificate verify failed"):
                await untrusting.request("GET", "/f")
    assert response.url.startswith("https://localhost:")
    assert (response.status, response.content) == (200, b"secret")
    assert server.requests[0].headers["host"] == server.base_url.removeprefix("https://")


# -- what a peer can make us hold ------------------------------------------------------------


def test_sse_decoder_bounds_a_line_and_an_event_and_reads_a_long_line_once():
    decoder = SSEDecoder(max_event_bytes=1 << 20)
    with pytest.raises(ProtocolError, match=r"^an event stream line over 1048576 bytes$"):
        for _ in range(65):  # no line end, ever: past 1 MiB in 16 KiB pieces
            decoder.feed(b"x" * 16384)
    decoder = SSEDecoder(max_event_bytes=1000)
    with pytest.raises(ProtocolError, match=r"^an event stream event over 1000 bytes$"):
        for _ in range(100):  # short lines, no blank one to end the event
            decoder.feed(b"data: " + b"y" * 50 + b"\n")
    # Each piece of a long line is searched once: the per-feed cost does not grow with the line.
    # Counted through the line-end search itself, not timed.
    decoder, searched = SSEDecoder(), []
    real = rbeed.httpclient._LINE_END

    class Counting:
        def search(self, buffer, pos):
            searched.append(len(buffer) - pos)
            return real.search(buffer, pos)

    rbeed.httpclient._LINE_END = Counting()
    try:
        for _ in range(100):
            decoder.feed(b"z" * 1000)
        events = decoder.feed(b"\ndata: end\n\n")
    finally:
        rbeed.httpclient._LINE_END = real
    assert max(searched) < 2000 and [e.data for e in events] == ["end"]


async def test_an_answer_read_whole_is_bounded():
    async def endless(request: RecordedRequest) -> Reply:
        async def body():
            while True:
                yield b"a" * 65536

        return Reply(200, {}, body())

    async def declared(request: RecordedRequest) -> Reply:
        return Reply(200, {"content-length": str(17 << 20)}, stall_after=0, body=b"")

    async with serve_files() as server, Client(server.base_url, read_timeout=5) as client:
        server.routes["/endless"] = endless
        with pytest.raises(ProtocolError, match=r"^the answer of GET http://127\.0\.0\.1:\d+/endless is over 16777216 bytes$"):
            await client.request("GET", "/endless")
        async with client.stream("GET", "/endless") as response:
            with pytest.raises(ProtocolError, match=r"is over 100 bytes$"):
                await response.aread(limit=100)


async def test_an_answer_head_is_bounded_however_it_arrives():
    async def headed(request: RecordedRequest) -> Reply:
        size = int(request.target.rpartition("/")[2])
        return Reply(200, {"x-big": "b" * size}, b"ok")

    async with serve_files() as server, Client(server.base_url, read_timeout=5) as client:
        for size in (40_000, 100_000):
            server.routes[f"/head/{size}"] = headed
        # Past h11's 16 KiB for a head still incomplete after a read, as a real server may send one.
        assert (await client.request("GET", "/head/40000")).content == b"ok"
        # A whole head in one read passes h11's own bound.
        with pytest.raises(ProtocolError, match=r"^bad response from http://127\.0\.0\.1:\d+: its head is over 65536 bytes$"):
            await client.request("GET", "/head/100000")


async def test_an_answer_sent_before_the_whole_body_was_read_is_the_result_not_a_broken_pipe(tmp_path):
    # As rbeed answers a body over its limit: 413 at once, then it closes.
    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            while b"\r\n\r\n" not in (await stream.receive_some(65536)):
                pass
            message = b'{"error": "request body over 1048576 bytes"}'
            await stream.send_all(b"HTTP/1.1 413 Content Too Large\r\ncontent-type: application/json\r\n"
                                  b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(message), message))  # fmt: skip

    for unix in (False, True):
        async with trio.open_nursery() as nursery:
            if unix:
                sock = trio.socket.socket(trio.socket.AF_UNIX)
                await sock.bind(str(tmp_path / "s.sock"))
                sock.listen()
                listener = trio.SocketListener(sock)
                url = f"unix:{tmp_path / 's.sock'}"
            else:
                [listener] = await trio.open_tcp_listeners(0, host="127.0.0.1")
                url = f"http://127.0.0.1:{listener.socket.getsockname()[1]}"
            nursery.start_soon(trio.serve_listeners, handle, [listener])
            async with Client(url, read_timeout=5) as client:
                response = await client.request("POST", "/v1/jobs", body=b"a" * (8 << 20))
            assert (response.status, response.json()) == (413, {"error": "request body over 1048576 bytes"})
            nursery.cancel_scope.cancel()


async def test_a_header_that_http_cannot_carry_is_an_error_that_does_not_show_it():
    async with serve_files() as server:
        for key in ("secret\nx", "ключ"):
            async with Client(server.base_url, headers={"authorization": f"Bearer {key}"}) as client:
                with pytest.raises(HTTPError) as caught:
                    await client.request("GET", "/")
            assert key not in str(caught.value) and str(caught.value).startswith("invalid request GET '/': ")


@pytest.mark.parametrize(("url", "problem"), [
    ("http://[::1", "Invalid IPv6 URL"), ("unix://run/x.sock", "write unix:/PATH or unix:///PATH"),
])  # fmt: skip
def test_an_unusable_url_is_an_http_error(url, problem):
    with pytest.raises(HTTPError, match=rf"^invalid URL {re.escape(repr(url))}: {re.escape(problem)}$"):
        Client(url)


async def test_a_host_name_idna_cannot_encode_is_a_connect_error():
    async with Client("http://a..b:80") as client:
        with pytest.raises(ConnectError, match=r"^cannot connect to http://a\.\.b: not a valid host name$"):
            await client.request("GET", "/")
