"""The real `curl` as a client, over the Unix socket and over TCP."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import trio

from rbeed import __version__
from support import parse_sse

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")


def target(daemon, unix: bool) -> tuple[list[str], str]:
    """curl's connection options and the base URL for the daemon."""
    if unix:
        return ["--unix-socket", str(daemon.socket_path)], "http://localhost"
    return [], daemon.url


async def curl(*args: str) -> subprocess.CompletedProcess:
    with trio.fail_after(15):
        result = await trio.run_process(["curl", "--max-time", "10", *args], capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result


@pytest.mark.parametrize("unix", [True, False], ids=["unix", "tcp"])
async def test_submit_then_stream_a_job(shared_daemon, unix):
    options, base = target(shared_daemon, unix)
    created = json.loads((await curl("-sS", "-d", '{"operation":"hive_list"}', *options, f"{base}/v1/jobs")).stdout)
    assert created["sse_url"] == f"/v1/jobs/{created['job_id']}/stream"
    stream = await curl("-sN", *options, f"{base}{created['sse_url']}")
    events = parse_sse(stream.stdout.decode())
    assert [(e["id"], e["event"]) for e in events] == [("1", "narration"), ("2", "result"), ("3", "end")]
    assert json.loads(events[0]["data"]) == {"message": "1 hive(s)"}
    assert json.loads(events[1]["data"])[0]["version"] == __version__
    assert events[2]["data"] == "[DONE]"


async def test_http10_stream(shared_daemon):
    options, base = target(shared_daemon, unix=True)
    created = json.loads((await curl("-sS", "-0", "-d", '{"operation":"hive_list"}', *options, f"{base}/v1/jobs")).stdout)
    stream = await curl("-sN", "-0", *options, f"{base}{created['sse_url']}")
    assert [e["data"] for e in parse_sse(stream.stdout.decode())][-1] == "[DONE]"


async def test_two_urls_share_one_keep_alive_connection(shared_daemon):
    options, base = target(shared_daemon, unix=False)
    result = await curl("-sS", "-v", *options, f"{base}/health", f"{base}/health")
    assert result.stdout.count(b'"status":"ok"') == 2
    assert b"Re-using existing connection" in result.stderr, result.stderr.decode()


async def test_errors_are_json_with_the_right_status(shared_daemon, tmp_path):
    options, base = target(shared_daemon, unix=True)
    big = tmp_path / "big.json"
    big.write_bytes(b'{"operation": "hive_list"}'.ljust(1024 * 1024 + 1))
    cases = [
        (["-X", "DELETE", f"{base}/v1/jobs/job-nope"], 404, {}),
        (["-X", "PUT", f"{base}/v1/jobs"], 405, {"allow": "GET, POST"}),
        (["-d", '{"operation":"infer","model":"m","prompt":"p","top_p":2}', f"{base}/v1/jobs"], 400, {}),
        (["--data-binary", f"@{big}", f"{base}/v1/jobs"], 413, {}),  # curl sends Expect: 100-continue
    ]
    for args, status, headers in cases:
        result = await curl("-sS", "-i", *options, *args)
        head, _, body = result.stdout.decode().partition("\r\n\r\n")
        while head.startswith("HTTP/1.1 100"):  # an interim response, if the server sent one
            head, _, body = body.partition("\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} "), result.stdout
        assert set(json.loads(body)) == {"error"}, body
        lines = {line.split(":", 1)[0].lower(): line.split(":", 1)[1].strip() for line in head.split("\r\n")[1:]}
        for name, value in headers.items():
            assert lines[name] == value
