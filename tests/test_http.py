"""The HTTP/1.1 server: listeners, config, framing, limits, timeouts and hostile clients."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from rbeed import __version__
from rbeed.config import ServerConfig
from rbeed.server import HTTPConnection, ReadTimers, Response, StreamingResponse
from support import (
    RawConnection,
    error_of,
    exchange,
    logged,
    open_stream,
    parse_response,
    parse_sse,
    run_daemon_to_exit,
    start_daemon,
    submit,
)

MiB = 1024 * 1024
TIMEOUT = 0.5  # [server] request_timeout, keepalive_timeout and write_timeout of the timeouts daemon


@pytest.fixture(scope="module")
def timeouts_daemon(tmp_path_factory):
    config = f"[server]\nrequest_timeout = {TIMEOUT}\nkeepalive_timeout = {TIMEOUT}\nwrite_timeout = {TIMEOUT}\n"
    d = start_daemon(tmp_path_factory.mktemp("timeouts"), config=config)
    yield d
    assert d.stop() == 0, d.log()


def post(target: str, body: bytes, *headers: str) -> bytes:
    head = [f"POST {target} HTTP/1.1", "Host: x", *headers]
    if not any(h.lower().startswith(("content-length", "transfer-encoding")) for h in headers):
        head.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def padded_job(size: int) -> bytes:
    """A valid hive_list payload of exactly `size` bytes (JSON allows trailing whitespace)."""
    body = b'{"operation": "hive_list"}'
    return body + b" " * (size - len(body))


def chunked(body: bytes, piece: int = 64 * 1024) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + piece]), body[i : i + piece]) for i in range(0, len(body), piece))
    return out + b"0\r\n\r\n"


# -- listeners and configuration ---------------------------------------------------------------


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
async def test_health_answers_on_tcp_and_on_the_unix_socket(shared_daemon, unix):
    status, headers, body = parse_response(await exchange(shared_daemon, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", unix=unix))
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {"status": "ok", "version": __version__}


def test_unix_socket_has_mode_0660(shared_daemon):
    mode = shared_daemon.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660


async def test_listen_is_repeatable_and_flags_override_the_config_file(tmp_path):
    config = f'[server]\nlisten = ["127.0.0.1:1"]\nsocket = "{tmp_path / "from-config.sock"}"\n'
    daemon = start_daemon(tmp_path / "d", "--listen", "127.0.0.1:0", config=config)
    try:
        status = next(line for line in daemon.notifications[-1].splitlines() if line.startswith("STATUS="))
        tcp = [part for part in status.removeprefix("STATUS=listening on ").split(", ") if not part.startswith("unix:")]
        ports = {int(address.rsplit(":", 1)[1]) for address in tcp}
        assert len(tcp) == 2 and len(ports) == 2 and 1 not in ports, status  # both --listen, not the file's
        assert not (tmp_path / "from-config.sock").exists() and daemon.socket_path.exists()
        for port in ports:
            daemon.port = port
            assert parse_response(await exchange(daemon, b"GET /health HTTP/1.0\r\n\r\n"))[0] == 200
    finally:
        assert daemon.stop() == 0, daemon.log()


@pytest.mark.parametrize(
    ("config", "names"),
    [
        ("[server]\nbogus_key = 1\n", ["bogus_key"]),
        ("[surver]\nlisten = []\n", ["surver"]),
        ('[server]\nrequest_timeout = "soon"\n', ["$.server.request_timeout"]),
        ("[jobs]\nevent_buffer = 0\n", ["$.jobs.event_buffer"]),
        ('[server]\nlisten = ["no port here"]\n', ["$.server.listen[0]"]),
        ("[server\nlisten = \n", ["rbeed.toml"]),
        ("server = 5\n", ["`server` is not a table ([server])"]),  # with the flags' server.socket
        ('[server]\nlisten = ["127.0.0.1:8500\\n"]\n', ["$.server.listen[0]"]),
    ],
    ids=["unknown-key", "unknown-section", "wrong-type", "out-of-range", "bad-listen", "bad-toml", "not-a-table",
         "newline"],
)
def test_a_bad_config_file_exits_2_naming_the_key(tmp_path, config, names):
    result = run_daemon_to_exit(tmp_path, config=config)
    assert result.returncode == 2, result
    for name in names:
        assert name in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_config_file_that_is_not_utf8_exits_2_and_a_reload_of_one_keeps_the_daemon(tmp_path):
    (tmp_path / "latin1.toml").write_bytes(b'[server]\nlisten = ["caf\xe9:1"]\n')
    result = run_daemon_to_exit(tmp_path, "--config", str(tmp_path / "latin1.toml"))
    assert result.returncode == 2 and "latin1.toml: 'utf-8' codec can't decode byte 0xe9" in result.stderr
    assert "Traceback" not in result.stderr

    daemon = start_daemon(tmp_path / "live", config="[jobs]\nfinished_ttl = 60\n")
    try:
        (tmp_path / "live" / "rbeed.toml").write_bytes(b"[jobs]\nfinished_ttl = 6\xe9\n")
        daemon.proc.send_signal(signal.SIGHUP)
        trio.run(logged, daemon, r"reload failed, keeping the running config: .*rbeed.toml: 'utf-8' codec")
        assert daemon.proc.poll() is None
        assert parse_response(trio.run(exchange, daemon, b"GET /health HTTP/1.0\r\n\r\n"))[0] == 200
    finally:
        assert daemon.stop() == 0, daemon.log()


def test_a_bad_listen_flag_exits_2(tmp_path):
    result = run_daemon_to_exit(tmp_path, "--listen", "127.0.0.1:0", "--listen", "8500")
    assert result.returncode == 2 and "$.server.listen[1]" in result.stderr, result
    assert "Traceback" not in result.stderr


def test_a_missing_config_file_exits_2(tmp_path):
    result = run_daemon_to_exit(tmp_path, "--listen", "127.0.0.1:0", "--config", str(tmp_path / "absent.toml"))
    assert result.returncode == 2 and "absent.toml" in result.stderr, result


async def test_a_stale_socket_file_is_replaced(tmp_path):
    path = tmp_path / "d" / "rbeed.sock"
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))  # bound, never listening: what a crashed daemon leaves
    daemon = start_daemon(tmp_path / "d")
    try:
        assert parse_response(await exchange(daemon, b"GET /health HTTP/1.0\r\n\r\n", unix=True))[0] == 200
    finally:
        assert daemon.stop() == 0
    assert not path.exists()


async def test_a_live_socket_is_an_error_and_stays_with_its_owner(shared_daemon, tmp_path):
    result = run_daemon_to_exit(tmp_path, "--listen", "127.0.0.1:0", "--socket", str(shared_daemon.socket_path))
    assert result.returncode != 0 and "another daemon is listening on" in result.stderr, result
    assert str(shared_daemon.socket_path) in result.stderr and "Traceback" not in result.stderr
    assert parse_response(await exchange(shared_daemon, b"GET /health HTTP/1.0\r\n\r\n", unix=True))[0] == 200


@pytest.mark.parametrize("shared", ["--state-dir", "--runtime-dir"])
async def test_a_second_daemon_on_the_same_directories_is_refused(shared_daemon, tmp_path, shared):
    taken = {"--state-dir": shared_daemon.state_dir, "--runtime-dir": shared_daemon.runtime_dir}[shared]
    result = run_daemon_to_exit(tmp_path, "--listen", "127.0.0.1:0", shared, str(taken))
    what = shared.strip("-").replace("-", " ")
    assert result.returncode == 1, result
    assert (f"{what} {taken.resolve()} is in use by another rbeed (pid {shared_daemon.proc.pid}): stop that one, "
            f"or give this one its own with {shared}") in result.stderr
    assert "Traceback" not in result.stderr and "Errno" not in result.stderr
    assert not (tmp_path / "rbeed.sock").exists()  # refused before binding anything
    assert parse_response(await exchange(shared_daemon, b"GET /health HTTP/1.0\r\n\r\n", unix=True))[0] == 200


def serve_in_shared_tmp(tmp_path, *args: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`rbeed serve` without XDG_RUNTIME_DIR, so with its runtime dir in $TMPDIR (here, one of
    the test's); expected to exit. Its result, and that runtime dir."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    drop = ("XDG_RUNTIME_DIR", "RUNTIME_DIRECTORY", "NOTIFY_SOCKET")
    env = {key: value for key, value in os.environ.items() if key not in drop} | {"TMPDIR": str(tmpdir)}
    command = [sys.executable, "-m", "rbeed", "serve", "--state-dir", str(tmp_path / "state"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=30, env=env), tmpdir / f"rbeed-{os.getuid()}"


@pytest.mark.parametrize("made", ["writable", "symlink", "foreign"])
def test_a_runtime_dir_in_tmp_that_is_not_ones_own_is_refused(tmp_path, made):
    # Made first by another user, it held a lock file linked to one of ours: the daemon truncated
    # it and wrote its pid there; and a socket of theirs would get our clients' prompts.
    runtime = tmp_path / "tmp" / f"rbeed-{os.getuid()}"
    runtime.parent.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "rbeed.lock").write_text("precious")
    if made == "symlink":
        runtime.symlink_to(elsewhere)
        why = "not a directory (a symlink)"
    else:
        runtime.mkdir(mode=0o700)
        (runtime / "rbeed.lock").symlink_to(elsewhere / "rbeed.lock")
        if made == "writable":
            runtime.chmod(0o777)
            why = "writable by others (mode 0777)"
        elif os.getuid() == 0:
            os.chown(runtime, 1234, -1)
            why = "owned by uid 1234"
        else:
            pytest.skip("giving a directory to another user needs root")
    result, _ = serve_in_shared_tmp(tmp_path, "--no-tcp")
    assert result.returncode == 1, result.stderr
    assert f"runtime dir {runtime} is {why}: another user may have made it; remove it" in result.stderr
    assert (elsewhere / "rbeed.lock").read_text() == "precious"


def test_a_runtime_dir_in_tmp_is_made_private_and_its_lock_is_never_a_link(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result, runtime = serve_in_shared_tmp(tmp_path, "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1 and "Address already in use" in result.stderr  # once its dirs were claimed
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    # Any runtime dir: a lock file that is a symlink is refused, not followed.
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (runtime / "rbeed.lock").unlink()
    (runtime / "rbeed.lock").symlink_to(victim)
    result, _ = serve_in_shared_tmp(tmp_path, "--no-tcp")
    assert result.returncode == 1 and "Too many levels of symbolic links" in result.stderr, result.stderr
    assert victim.read_text() == "precious"


def test_a_taken_tcp_port_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = "127.0.0.1:%d" % taken.getsockname()[1]
        result = run_daemon_to_exit(tmp_path, "--listen", address)
    assert result.returncode == 1, result
    assert f"cannot listen on {address}: Address already in use" in result.stderr, result.stderr


def test_a_file_in_the_way_of_the_socket_is_an_error(tmp_path):
    (tmp_path / "rbeed.sock").write_text("not a socket")
    result = run_daemon_to_exit(tmp_path, "--listen", "127.0.0.1:0")
    assert result.returncode != 0 and "exists and is not a socket" in result.stderr, result
    assert (tmp_path / "rbeed.sock").read_text() == "not a socket"


# -- HTTP/1.1 features -------------------------------------------------------------------------


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
async def test_keep_alive_serves_sequential_and_pipelined_requests_on_one_connection(shared_daemon, unix):
    conn = await RawConnection.open(shared_daemon, unix)
    async with conn.stream:
        with trio.fail_after(10):
            assert (await conn.request("GET", "/health"))[0] == 200
            assert (await conn.request("GET", "/v1/jobs/job-none"))[0] == 404
            # Both requests in one write: the answers come back in order.
            await conn.stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + post("/v1/jobs", b"{}"))
            rest = b""
            while rest.count(b"HTTP/1.1 ") < 2 or not rest.endswith(b"}"):
                rest += await conn.stream.receive_some(65536)
    first, second = rest.split(b"HTTP/1.1 400", 1)
    assert parse_response(first)[0] == 200 and b"valid operations" in second


async def test_event_stream_is_chunked_and_the_connection_is_reused_after_it(shared_daemon):
    conn = await RawConnection.open(shared_daemon)
    async with conn.stream:
        with trio.fail_after(10):
            status, _, body = await conn.request("POST", "/v1/jobs", body=b'{"operation":"hive_list"}')
            sse_url = json.loads(body)["sse_url"]
            await conn.send("GET", sse_url)
            head = await conn.head()
            headers = dict((k.decode(), v.decode()) for k, v in head.headers)
            events = parse_sse((await conn.body()).decode())
            assert (await conn.request("GET", "/health"))[0] == 200
    assert status == 201 and head.status_code == 200
    assert headers["transfer-encoding"] == "chunked" and "content-length" not in headers
    assert headers["content-type"] == "text/event-stream" and headers["cache-control"] == "no-cache"
    assert [e["event"] for e in events] == ["narration", "result", "end"] and events[-1]["data"] == "[DONE]"


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
async def test_http10_client_gets_a_response_and_a_close(shared_daemon, unix):
    raw = await exchange(shared_daemon, b"GET /health HTTP/1.0\r\n\r\n", unix=unix)  # returns at close
    status, headers, body = parse_response(raw)
    assert raw.startswith(b"HTTP/1.1 200 ") and status == 200 and json.loads(body)["status"] == "ok"
    async with shared_daemon.client() as client:
        job_id = await submit(client, {"operation": "hive_list"})
    raw = await exchange(shared_daemon, f"GET /v1/jobs/{job_id}/stream HTTP/1.0\r\n\r\n".encode(), unix=unix)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower()  # HTTP/1.0: the body ends at the close
    assert [e["data"] for e in parse_sse(body.decode())][-1] == "[DONE]"


async def test_expect_100_continue_is_answered_before_the_body_is_sent(shared_daemon):
    body = b'{"operation":"hive_list"}'
    with trio.fail_after(10):
        async with await open_stream(shared_daemon, unix=False) as stream:
            await stream.send_all(post("/v1/jobs", b"", f"Content-Length: {len(body)}", "Expect: 100-continue"))
            interim = b""
            while b"\r\n\r\n" not in interim:
                interim += await stream.receive_some(65536)
            assert interim.startswith(b"HTTP/1.1 100 Continue\r\n") and interim.endswith(b"\r\n\r\n"), interim
            await stream.send_all(body)
            final = b""
            while not final.endswith(b"}"):
                final += await stream.receive_some(65536)
    status, _, reply = parse_response(final, method="POST")
    assert status == 201 and json.loads(reply)["job_id"].startswith("job-")


async def test_expect_100_continue_with_a_body_over_the_limit_gets_413_instead(shared_daemon):
    raw = await exchange(shared_daemon, post("/v1/jobs", b"", f"Content-Length: {MiB + 1}", "Expect: 100-continue"))
    assert not raw.startswith(b"HTTP/1.1 100")
    status, message = error_of(raw)
    assert status == 413 and str(MiB) in message


# -- limits ------------------------------------------------------------------------------------


async def send_while_reading(daemon, request: bytes, pieces: int = 1) -> bytes:
    """Send `request` (in `pieces` writes) while reading the reply until the server closes.

    The server may answer and close before it has read everything (413, 431): a send that then
    fails is expected; the reply is what counts.
    """
    reply = b""
    with trio.fail_after(10):
        async with await open_stream(daemon, unix=False) as stream:

            async def send() -> None:
                step = len(request) // pieces + 1
                try:
                    for start in range(0, len(request), step):
                        await stream.send_all(request[start : start + step])
                except trio.BrokenResourceError:
                    pass

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while chunk := await stream.receive_some(65536):
                    reply += chunk
    return reply


@pytest.mark.parametrize("pieces", [1, 8], ids=["one-write", "in-pieces"])
async def test_huge_headers_get_431(shared_daemon, pieces):
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Big: " + b"a" * (40 * 1024) + b"\r\n\r\n"
    assert error_of(await send_while_reading(shared_daemon, request, pieces))[0] == 431


async def test_many_headers_adding_up_over_the_limit_get_431(shared_daemon):
    headers = b"".join(b"X-H%d: %s\r\n" % (number, b"v" * 100) for number in range(200))
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + headers + b"\r\n"
    assert error_of(await exchange(shared_daemon, request))[0] == 431


async def test_a_body_of_exactly_the_limit_is_accepted(shared_daemon):
    for request in (post("/v1/jobs", padded_job(MiB)), post("/v1/jobs", chunked(padded_job(MiB)), "Transfer-Encoding: chunked")):
        status, _, body = parse_response(await exchange(shared_daemon, request + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert status == 201, body


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_over_the_limit_gets_413_and_a_close(shared_daemon, framing):
    body = padded_job(MiB + 1)
    if framing == "chunked":
        request = post("/v1/jobs", chunked(body), "Transfer-Encoding: chunked")
    else:
        request = post("/v1/jobs", body)
    reply = await send_while_reading(shared_daemon, request)
    status, message = error_of(reply)
    assert status == 413 and message == f"request body over {MiB} bytes"


# -- framing and routing errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        post("/v1/jobs", b"zz\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding: chunked"),
        post("/v1/jobs", b"2\r\n{}\r\n0\r\n\r\n", "Content-Length: 12", "Transfer-Encoding: chunked"),
        post("/v1/jobs", b"{}", "Content-Length: 2", "Content-Length: 3"),
        post("/v1/jobs", b"{}", "Content-Length: two"),
        b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /health\r\n\r\n",
        b"GET /health HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64) + b"\r\n\r\n",  # TLS hello
    ],
    ids=["bad-chunk-size", "length-and-chunked", "two-lengths", "length-not-a-number", "header-without-colon",
         "http09", "no-host", "tls-hello"],  # fmt: skip
)
async def test_malformed_framing_gets_400_and_a_close(shared_daemon, request_bytes):
    status, message = error_of(await exchange(shared_daemon, request_bytes))
    assert status == 400 and message.startswith("bad request"), message


@pytest.mark.parametrize("request_bytes", [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET /health HTTP/3.0\r\nHost: x\r\n\r\n"],
                         ids=["http2-preface", "http3"])
async def test_a_request_of_another_major_version_gets_505(shared_daemon, request_bytes):
    status, message = error_of(await exchange(shared_daemon, request_bytes))
    assert status == 505 and message.endswith("not supported: this server speaks HTTP/1.1"), message


async def test_unknown_path_is_404_and_a_wrong_method_405_with_allow(shared_daemon):
    async with shared_daemon.client() as client:
        job_id = await submit(client, {"operation": "hive_list"})
        cases = [
            ("GET", "/nope", 404, None),
            ("GET", "/v1/jobs/", 404, None),
            ("GET", "/v1/jobs/x/stream/more", 404, None),
            ("POST", "/health", 405, "GET"),
            ("PUT", "/v1/jobs", 405, "GET, POST"),
            ("POST", f"/v1/jobs/{job_id}", 405, "GET, DELETE"),
            ("DELETE", f"/v1/jobs/{job_id}/stream", 405, "GET"),
            ("PATCH", "/v1/jobs/unknown", 405, "GET, DELETE"),
        ]
        for method, path, status, allow in cases:
            response = await client.request(method, path, body=b"" if method in ("POST", "PUT", "PATCH") else None)
            assert response.status == status, (method, path, response.content)
            assert set(response.json()) == {"error"} and response.headers["content-type"] == "application/json"
            assert response.headers.get("allow") == allow, (method, path)
        assert (await client.request("GET", f"/v1/jobs/{job_id}")).json()["state"] == "queued"


async def test_head_gets_the_head_without_a_body_and_starts_nothing(shared_daemon):
    async with shared_daemon.client() as client:
        job_id = await submit(client, {"operation": "hive_list"})
        for path in ("/health", f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/stream"):
            response = await client.request("HEAD", path)
            assert response.status == 200 and response.content == b"", (path, response.content)
        assert (await client.request("GET", f"/v1/jobs/{job_id}")).json()["state"] == "queued"


# -- timeouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "partial",
    [b"GET /health HTTP/1.1\r\nHost: x\r\n", post("/v1/jobs", b'{"oper', "Content-Length: 25")],
    ids=["head", "body"],
)
async def test_a_request_not_finished_within_request_timeout_gets_408(timeouts_daemon, partial):
    with trio.fail_after(TIMEOUT + 5):
        async with await open_stream(timeouts_daemon, unix=False) as stream:
            await stream.send_all(partial)
            reply = b""
            while chunk := await stream.receive_some(65536):  # the server closes after the 408
                reply += chunk
    status, message = error_of(reply)
    assert status == 408 and message == "request timed out"


async def test_an_idle_keep_alive_connection_is_closed(timeouts_daemon):
    conn = await RawConnection.open(timeouts_daemon)
    async with conn.stream:
        with trio.fail_after(TIMEOUT + 5):
            assert (await conn.request("GET", "/health"))[0] == 200
            start = trio.current_time()
            assert await conn.at_eof()  # closed without a word: no 408 for an idle client
    assert trio.current_time() - start >= TIMEOUT * 0.8


async def test_a_client_that_reads_nothing_of_a_large_response_is_cut_off(timeouts_daemon):
    async with timeouts_daemon.client() as client:
        for _ in range(2500):  # then GET /v1/jobs answers with more than twice what a Unix socket buffers
            await submit(client, {"operation": "hive_list"})
        whole = len((await client.request("GET", "/v1/jobs")).content)
    assert whole > 2 * int(open("/proc/sys/net/core/wmem_default").read())
    sock = trio.socket.socket(socket.AF_UNIX)
    with sock:
        await sock.connect(str(timeouts_daemon.socket_path))
        await sock.send(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n\r\n")
        await logged(timeouts_daemon, r"closing a connection: the peer read nothing for 0.5 s$")
        reply = b""
        with trio.fail_after(5):
            while chunk := await sock.recv(65536):  # what was on its way, then the end
                reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert len(reply) < whole


# -- hostile clients ---------------------------------------------------------------------------


async def _abrupt_close(daemon, data: bytes) -> None:
    """Send `data`, then reset the connection (SO_LINGER 0) instead of closing it."""
    sock = trio.socket.socket()
    await sock.connect((daemon.host, daemon.port))
    await sock.send(data)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_nothing_a_client_sends_crashes_the_daemon_or_leaks_a_traceback(shared_daemon):
    async with shared_daemon.client() as client:
        job_id = await submit(client, {"operation": "hive_list"})
    stream_path = f"/v1/jobs/{job_id}/stream".encode()
    garbage = [
        b"",
        b"\x00\xff\xfe" * 3000,
        os.urandom(100_000),
        b"GET / HTTP/1.1\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Le",
        post("/v1/jobs", b'{"operation"', "Content-Length: 100"),
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
        b"GET /he\x00alth HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Latin: \xff\xfe\xe9\r\n\r\n",
        b"GET /v1/jobs?state=%ff%00&state=x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /v1/jobs?%%%=&&== HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET http://elsewhere/health HTTP/1.1\r\nHost: x\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        b"GET " + stream_path + b" HTTP/1.1\r\nHost: x\r\nLast-Event-ID: \xb2\r\n\r\n",
        b"GET " + stream_path + b" HTTP/1.1\r\nHost: x\r\nLast-Event-ID: -1\r\n\r\n",
        b"GET " + stream_path + b" HTTP/1.1\r\nHost: x\r\nLast-Event-ID: 99999999999999999999999\r\n\r\n",
        post("/v1/jobs", b"", "Content-Length: -1"),
        post("/v1/jobs", b"", "Content-Length: 99999999999999999999999999"),
        post("/v1/jobs", b"", "Transfer-Encoding: gzip"),
        b"\r\n\r\n\r\n",
        b"GET " + b"/a" * 40_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        post("/v1/jobs", b"\xff\xfe\x00\x01"),
        post("/v1/jobs", b"[" * 500_000),
        post("/v1/jobs", b'{"operation":"hive_get","id":"\\ud800"}'),
        post("/v1/jobs", b'{"operation":"infer","model":"m","prompt":"p","max_tokens":1e999}'),
        post("/v1/jobs", b'{"operation":"hive_list"}' * 2),
        post("/v1/jobs", b'{"operation":"hive_list","operation":"hive_get"}'),
        post("/v1/jobs", b"\xef\xbb\xbf" + b'{"operation":"hive_list"}'),
    ]

    async def throw(data: bytes, unix: bool) -> None:
        reply = b""
        with trio.fail_after(15):
            async with await open_stream(shared_daemon, unix) as stream:
                try:
                    await stream.send_all(data)
                    await stream.send_eof()  # a half request stays half
                    while chunk := await stream.receive_some(65536):
                        reply += chunk
                except trio.BrokenResourceError:
                    pass  # reset by the server after an error reply: fine
        if b"Traceback" in reply or b'File "' in reply:
            faults.append((data[:80], reply))
        elif reply:
            status, headers, body = parse_response(reply)
            if status == 500 or (status >= 400 and set(json.loads(body)) != {"error"}):
                faults.append((data[:80], status, body))

    faults: list[tuple] = []
    async with trio.open_nursery() as nursery:
        for data in garbage:
            for unix in (False, True):
                nursery.start_soon(throw, data, unix)
        for data in garbage[:6]:
            nursery.start_soon(_abrupt_close, shared_daemon, data)
    assert faults == []
    async with shared_daemon.client() as client:
        response = await client.request("GET", "/health")
    assert response.status == 200 and response.json()["status"] == "ok"
    log = shared_daemon.log()
    assert "Traceback" not in log and "crashed" not in log, log


# -- in process: the connection loop on a memory stream ----------------------------------------


async def test_a_client_leaving_mid_stream_is_no_crash(caplog):
    """The peer closes while an event stream is being written: the connection just ends."""
    server_stream, client_stream = trio.testing.memory_stream_pair()
    writing = trio.Event()

    async def produce(send) -> None:
        while True:
            await send(b": tick\n\n")
            writing.set()
            await trio.sleep(0)

    async def app(request):
        return StreamingResponse(200, produce)

    caplog.set_level(logging.DEBUG, logger="rbeed")
    connection = HTTPConnection(server_stream, app, ServerConfig())
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run)
            await client_stream.send_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await client_stream.receive_some()).startswith(b"HTTP/1.1 200 ")
            await writing.wait()
            await client_stream.aclose()
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []


async def test_a_crashing_handler_gets_500_without_details(caplog):
    server_stream, client_stream = trio.testing.memory_stream_pair()

    async def app(request) -> Response:
        raise KeyError("secret internals")

    connection = HTTPConnection(server_stream, app, ServerConfig())
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run)
            await client_stream.send_all(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := await client_stream.receive_some():
                reply += chunk
    assert error_of(reply) == (500, "internal error") and b"secret" not in reply
    assert "handler for GET /x crashed" in caplog.text  # the details go to the log only


async def _read_all(stream) -> bytes:
    reply = b""
    while chunk := await stream.receive_some():
        reply += chunk
    return reply


async def test_a_next_head_on_a_kept_alive_connection_has_the_request_timeout_once_it_begins(autojump_clock):
    # The keep-alive timeout bounds the wait for a next request, not how long its head may take:
    # a client dribbling heads held each connection for the keep-alive (75 s) instead of 30 s.
    config = ServerConfig(request_timeout=1.0, keepalive_timeout=60.0)
    timers = ReadTimers(config)

    async def app(request) -> Response:
        return Response(200, b"{}")

    server_stream, client_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        nursery.start_soon(HTTPConnection(server_stream, app, config, timers).run)
        await client_stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        await trio.sleep(10)  # idle, well within the keep-alive (the autojump clock's seconds)
        began = trio.current_time()
        await client_stream.send_all(b"GET /health HTTP/1.1\r\nHo")
        reply = await _read_all(client_stream)
        closed = trio.current_time()
        nursery.cancel_scope.cancel()
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.count(b"HTTP/1.1 408 Request Timeout\r\n") == 1
    assert closed - began <= 1.0 + 3 * timers.granularity


async def test_an_app_that_reads_its_body_gets_it_piece_by_piece_past_the_body_limit():
    """An upload route reads its body as it comes: no body limit, 100 Continue only once it reads."""
    server_stream, client_stream = trio.testing.memory_stream_pair()
    pieces: list[bytes] = []
    reading = trio.Event()

    async def app(request) -> Response:
        if request.method == "GET":
            return Response(200, b"{}")
        assert request.body == b""
        reading.set()
        while data := await request.receive():
            pieces.append(data)
        assert await request.receive() == b""  # the end stays the end
        return Response(201, b"%d" % sum(map(len, pieces)))

    body = bytes(range(256)) * 40  # 10240 bytes, ten times the limit
    connection = HTTPConnection(server_stream, app, ServerConfig(max_body_bytes=1000),
                                reads_body=lambda request: request.method == "POST")  # fmt: skip
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run)
            await client_stream.send_all(post("/upload", b"", "Transfer-Encoding: chunked", "Expect: 100-continue"))
            interim = await client_stream.receive_some()
            assert interim.startswith(b"HTTP/1.1 100 Continue\r\n") and reading.is_set(), interim
            await client_stream.send_all(chunked(body, piece=4096))
            await client_stream.send_all(b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = await _read_all(client_stream)
    assert b"".join(pieces) == body and len(pieces) == 3
    first, second = reply.split(b"HTTP/1.1 ")[1:]
    assert parse_response(b"HTTP/1.1 " + first, method="POST")[::2] == (201, b"10240")
    assert parse_response(b"HTTP/1.1 " + second)[::2] == (200, b"{}")  # the connection served the next request


UNREAD = {
    "within a body's worth: read and dropped": (post("/up", b"x" * 1000), True),
    "over it: closed": (post("/up", b"x" * 1001), False),
    "not sent, 100 Continue awaited: closed": (post("/up", b"", "Content-Length: 10", "Expect: 100-continue"), False),
}


@pytest.mark.parametrize(("request_bytes", "served"), UNREAD.values(), ids=UNREAD.keys())
async def test_a_body_an_app_leaves_unread_is_dropped_up_to_the_body_limit_else_the_connection_closes(
        request_bytes, served):  # fmt: skip
    server_stream, client_stream = trio.testing.memory_stream_pair()

    async def app(request) -> Response:
        return Response(409, b'{"error": "have it"}') if request.method == "POST" else Response(200, b"{}")

    connection = HTTPConnection(server_stream, app, ServerConfig(max_body_bytes=1000),
                                reads_body=lambda request: request.method == "POST")  # fmt: skip
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run)
            await client_stream.send_all(request_bytes + b"GET /next HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = await _read_all(client_stream)
    assert error_of(reply.split(b"HTTP/1.1 200 ")[0]) == (409, "have it")
    assert reply.count(b"HTTP/1.1 200 ") == served and b"HTTP/1.1 100 " not in reply


async def test_an_app_reading_its_body_gives_each_piece_the_request_timeout_and_a_dropped_body_all_of_it(
        autojump_clock):  # fmt: skip
    """Read by the app, a body may take longer than request_timeout in all (an upload of GBs) as
    long as no piece is late; what the app left unread must all come within it, after its answer."""
    config = ServerConfig(request_timeout=1.0, max_body_bytes=1000)
    timers = ReadTimers(config)
    received: list[tuple[float, bytes]] = []

    async def app(request) -> Response:
        if request.path == "/refuse":
            return Response(401, b'{"error": "no"}')
        while data := await request.receive():
            received.append((trio.current_time(), data))
        return Response(201, b"{}")

    async def trickle(path: str) -> tuple[bytes, float]:
        """Send 8 pieces 0.6 s apart (4.8 s in all); the reply, and when the server closed."""
        server_stream, client_stream = trio.testing.memory_stream_pair()
        connection = HTTPConnection(server_stream, app, config, timers, reads_body=lambda request: True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(connection.run)
            await client_stream.send_all(post(path, b"", "Content-Length: 8"))

            async def send_pieces() -> None:
                for _ in range(8):
                    await trio.sleep(0.6)
                    await client_stream.send_all(b"x")

            nursery.start_soon(send_pieces)
            reply = await _read_all(client_stream)
            closed = trio.current_time()
            nursery.cancel_scope.cancel()
        return reply, closed

    async with trio.open_nursery() as nursery:
        nursery.start_soon(timers.run)
        began = trio.current_time()
        reply, _ = await trickle("/upload")
        assert parse_response(reply, method="POST")[0] == 201 and len(received) == 8
        assert received[-1][0] - began >= 4.8  # four times request_timeout in all
        began = trio.current_time()
        reply, closed = await trickle("/refuse")
        assert error_of(reply) == (401, "no")  # at once, then the drop of its body is cut off
        assert 1.0 <= closed - began <= 1.0 + 3 * timers.granularity
        nursery.cancel_scope.cancel()


async def test_a_body_that_stalls_while_an_app_reads_it_gets_408(timeouts_daemon):
    # The blob upload route reads its body itself; each piece must come within request_timeout.
    with trio.fail_after(10):
        async with await open_stream(timeouts_daemon, unix=True) as stream:
            await stream.send_all(post(f"/api/blobs/sha256:{'0' * 64}", b"", "Content-Length: 100") + b"GGUF")
            reply = await _read_all(stream)
    assert error_of(reply) == (408, "request timed out")
    assert list((timeouts_daemon.state_dir / "blobs").iterdir()) == []  # its part is gone


async def test_at_shutdown_idle_keep_alive_connections_close_at_once_and_busy_ones_after_their_response():
    timers = ReadTimers(ServerConfig())
    release = trio.Event()

    async def app(request) -> Response:
        if request.path == "/slow":
            await release.wait()
        return Response(200, b"{}")

    idle_server, idle = trio.testing.memory_stream_pair()
    busy_server, busy = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(HTTPConnection(idle_server, app, ServerConfig(), timers).run)
            nursery.start_soon(HTTPConnection(busy_server, app, ServerConfig(), timers).run)
            await idle.send_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            first = await idle.receive_some()
            await busy.send_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            await trio.testing.wait_all_tasks_blocked()
            timers.close_idle()
            assert await idle.receive_some() == b""  # closed without waiting for a request
            release.set()
            last = await _read_all(busy)
    assert parse_response(first)[::2] == (200, b"{}") and b"connection: close" not in first.lower()
    status, headers, body = parse_response(last)
    assert (status, body, headers["connection"]) == (200, b"{}", "close")
