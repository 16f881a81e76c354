"""The `rbee` CLI as a real subprocess: against the real daemon, and against a scripted job API server."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import os
import pty
import re
import shutil
import signal
import socket
import subprocess
import struct
import sys
import tempfile
import termios
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio

import tinymodel
from httpfixture import RecordedRequest, Reply, serve_files
from rbeed import cli
from rbeed.httpclient import ServerSentEvent
from support import ROOT, SLOW_HIVE, SLOW_JOB, Daemon, slow_hive_config, start_daemon

TIMEOUT = 30  # bound on any one CLI run; they take well under a second each


def cli_env(**extra: str) -> dict[str, str]:
    """The test's environment without the CLI's own variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in ("RBEE_URL", "RBEE_MODEL", "RBEE_API_KEY", "RUNTIME_DIRECTORY")}
    return env | {"PYTHONPATH": str(ROOT)} | extra


def argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "rbeed.cli", *args]


def rbee(daemon: Daemon | None, *args: str, env: dict[str, str] | None = None, stdin: str | None = None):
    """Run rbee to its end against the daemon's Unix socket (the daemon is another process)."""
    where = ("--socket", str(daemon.socket_path)) if daemon else ()
    return subprocess.run(argv(*where, *args), capture_output=True, text=True, input=stdin,
                          timeout=TIMEOUT, env=env or cli_env(), cwd=ROOT)  # fmt: skip


async def arbee(*args: str, env: dict[str, str] | None = None, stdin: bytes = b"") -> subprocess.CompletedProcess:
    """Run rbee to its end while this test's trio loop keeps serving (scripted servers)."""
    with trio.fail_after(TIMEOUT):
        done = await trio.run_process(argv(*args), capture_stdout=True, capture_stderr=True, check=False,
                                      env=env or cli_env(), cwd=ROOT, stdin=stdin)  # fmt: skip
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def fields_of(text: str) -> dict[str, str]:
    """`key: value` lines back into a dict (top level only)."""
    return dict(line.split(":", 1) for line in text.splitlines() if not line.startswith(" "))


def table_of(text: str) -> list[dict[str, str]]:
    """An aligned table back into rows keyed by header (cells hold no spaces in these tests)."""
    header, *rows = [line.split() for line in text.splitlines()]
    return [dict(zip(header, row)) for row in rows]


def stripped(fields: dict[str, str]) -> dict[str, str]:
    return {k.strip(): v.strip() for k, v in fields.items()}


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def slow_daemon(tmp_path):
    """A daemon whose remote hive_start narrates a line, then runs until cancelled."""
    d = start_daemon(tmp_path / "slow", config=slow_hive_config())
    yield d
    d.stop()


# -- against the real daemon ------------------------------------------------------------------


def test_hive_list_over_the_socket_tcp_and_rbee_url(shared_daemon):
    by_socket = rbee(shared_daemon, "hive", "list")
    by_url = rbee(None, "--url", shared_daemon.url, "hive", "list")
    by_env = rbee(None, "hive", "list", env=cli_env(RBEE_URL=shared_daemon.url))
    for done in (by_socket, by_url, by_env):
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0].split() == ["ID", "HOST", "PORT", "ONLINE", "VERSION"]
        rows = {row["ID"]: row for row in table_of(done.stdout)}
        assert rows["localhost"] == {"ID": "localhost", "HOST": "localhost", "PORT": "-", "ONLINE": "yes", "VERSION": "0.1.0"}
        assert re.search(r"^· \d+ hive\(s\)$", done.stderr, re.M), done.stderr


def test_hive_create_get_update_delete_round_trip(shared_daemon):
    # The new hive points at the daemon itself, so its health check answers.
    port = str(shared_daemon.port)
    created = rbee(shared_daemon, "hive", "create", "127.0.0.1", "--id", "peer", "--port", port, "--ssh-host", "box")
    assert created.returncode == 0, created.stderr
    assert stripped(fields_of(created.stdout)) == {
        "id": "peer", "host": "127.0.0.1", "port": port, "ssh_host": "box", "api_key": "no", "local": "no",
        "online": "yes", "version": "0.1.0",
    }  # fmt: skip
    assert f"· hive peer registered at 127.0.0.1:{port}\n" in created.stderr
    # Values line up after the longest key.
    assert "ssh_host: box\n" in created.stdout and "id:       peer\n" in created.stdout

    rows = {row["ID"]: row for row in table_of(rbee(shared_daemon, "hive", "list").stdout)}
    assert rows["peer"] == {"ID": "peer", "HOST": "127.0.0.1", "PORT": port, "ONLINE": "yes", "VERSION": "0.1.0"}

    updated = rbee(shared_daemon, "hive", "update", "peer", "--port", "9")  # nothing listens on port 9
    assert updated.returncode == 0, updated.stderr
    fields = stripped(fields_of(updated.stdout))
    assert (fields["port"], fields["online"], fields["ssh_host"]) == ("9", "no", "box")
    assert "connection refused" in fields["error"]
    assert "· hive peer updated: port\n" in updated.stderr

    got = rbee(shared_daemon, "hive", "get", "peer")
    assert stripped(fields_of(got.stdout))["port"] == "9"

    deleted = rbee(shared_daemon, "hive", "delete", "peer")
    assert (deleted.returncode, stripped(fields_of(deleted.stdout))) == (0, {"id": "peer", "deleted": "yes"})
    gone = rbee(shared_daemon, "hive", "get", "peer")
    assert (gone.returncode, gone.stdout) == (1, "")
    assert gone.stderr == "rbee: error: unknown hive 'peer'\n"


def test_json_prints_each_event_as_a_json_line(shared_daemon):
    for args in (["--json", "hive", "get", "localhost"], ["hive", "start", "--json"]):
        done = rbee(shared_daemon, *args)
        assert done.returncode == 0, done.stderr
        events = json_lines(done.stdout)
        assert events[-1] == {"id": len(events), "event": "end", "data": "[DONE]"}
        assert [e["id"] for e in events] == list(range(1, len(events) + 1))
        [result] = [e["data"] for e in events if e["event"] == "result"]
        assert result["id"] == "localhost" and result["local"] is True
        assert done.stderr == ""  # narration is an event like any other: on stdout, as JSON


def test_submit_sends_any_payload_and_a_refused_one_exits_2(shared_daemon):
    done = rbee(shared_daemon, "submit", '{"operation": "hive_get", "id": "localhost"}')
    assert done.returncode == 0, done.stderr
    assert stripped(fields_of(done.stdout))["id"] == "localhost"
    from_stdin = rbee(shared_daemon, "submit", "-", stdin='{"operation": "hive_list"}')
    assert from_stdin.returncode == 0 and from_stdin.stdout.startswith("ID "), from_stdin.stderr

    for payload, message in [
        ('{"operation": "nope"}', "Invalid value 'nope' - at `$.operation`; valid operations: hive_start"),
        ('{"operation": "hive_list", "extra": 1}', "Object contains unknown field `extra`"),
        ("{not json", "malformed JSON"),
    ]:
        refused = rbee(shared_daemon, "submit", payload)
        assert refused.returncode == 2, refused
        assert refused.stderr.startswith(f"rbee: error: {message}"), refused.stderr
        assert refused.stdout == ""
    # Options the daemon rejects are refused the same way, with the daemon's message.
    bad_port = rbee(shared_daemon, "hive", "create", "example.org", "--port", "70000")
    assert bad_port.returncode == 2 and "Expected `int` <= 65535 - at `$.port`" in bad_port.stderr


def test_a_failed_job_exits_1_with_its_message(shared_daemon):
    done = rbee(shared_daemon, "hive", "get", "nosuch")
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "rbee: error: unknown hive 'nosuch'\n")
    as_json = rbee(shared_daemon, "--json", "hive", "delete", "localhost")
    assert as_json.returncode == 1
    assert json_lines(as_json.stdout)[-1]["data"] == "[ERROR] hive 'localhost' is this daemon and cannot be deleted"
    assert as_json.stderr == "rbee: error: hive 'localhost' is this daemon and cannot be deleted\n"


def test_unreachable_daemon_exits_3_naming_where_it_looked(tmp_path):
    missing = tmp_path / "nothing.sock"
    done = rbee(None, "--socket", str(missing), "hive", "list")
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.startswith(f"rbee: error: cannot reach the rbeed daemon at unix:{missing}: ")
    assert "no such file or directory" in done.stderr
    assert "systemctl start rbeed" in done.stderr and "rbeed serve" in done.stderr

    # Without --socket/--url/RBEE_URL: the daemon's default socket under $XDG_RUNTIME_DIR.
    default = rbee(None, "model", "list", env=cli_env(XDG_RUNTIME_DIR=str(tmp_path)))
    assert default.returncode == 3
    assert f"unix:{tmp_path / 'rbeed' / 'rbeed.sock'}" in default.stderr

    with socket.socket() as bound:  # bound, not listening: connections are refused
        bound.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{bound.getsockname()[1]}"
        refused = rbee(None, "--url", url, "hive", "list")
    assert refused.returncode == 3
    assert f"cannot reach the rbeed daemon at {url}" in refused.stderr and "connection refused" in refused.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to be another user whom the socket refuses")
def test_a_socket_that_refuses_the_user_names_its_group():
    # As rbeed.socket lays it out: a directory for the owner and group only (RuntimeDirectoryMode=0750),
    # in one that all may look into, holding the socket (SocketMode=0660).
    base = Path(tempfile.mkdtemp())  # under /tmp: pytest's own directories are closed to other users
    try:
        os.chmod(base, 0o755)
        (base / "rbeed").mkdir(mode=0o750)
        path = base / "rbeed" / "rbeed.sock"
        with socket.socket(socket.AF_UNIX) as listening:
            listening.bind(str(path))
            listening.listen()
            os.chmod(path, 0o660)
            # rbee as `nobody`, its modules loaded first (the interpreter need not be open to that user).
            code = ("import os, sys; from rbeed import cli; os.setgroups([]); os.setgid(65534); os.setuid(65534); "
                    f"sys.exit(cli.main(['--socket', {str(path)!r}, 'model', 'list']))")  # fmt: skip
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(),
                                  cwd=ROOT, timeout=60)  # fmt: skip
    finally:
        shutil.rmtree(base)
    assert done.returncode == 3, done
    assert done.stderr == (f"rbee: error: cannot reach the rbeed daemon at unix:{path}: permission denied\n"
                           "  hint: the socket is for group root: join it (`sudo usermod -aG root $USER`, then log in "
                           "again), or use sudo\n")  # fmt: skip


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["hive"], "the following arguments are required: ACTION"),
        (["hive", "get"], "the following arguments are required: ID"),
        (["--url", "http://a:1", "--socket", "/s", "hive", "list"], "argument --socket: not allowed with argument --url"),
        (["--url", "http://a:1", "hive", "list", "--socket", "/s"], "argument --socket: not allowed with argument --url"),
        (["--url", "ftp://host", "hive", "list"], "expected http://, https:// or unix:"),
        (["worker", "spawn", "m", "--worker", "tpu"], "invalid choice: 'tpu'"),
        (["infer", "hi", "--max-tokens", "many"], "invalid int value: 'many'"),
    ],
)
def test_usage_errors_exit_2(args, message, capsys):
    try:
        status = cli.main(args)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    assert status == 2
    assert message in capsys.readouterr().err


async def interrupt_slow_job(*args: str, signum: int = signal.SIGINT) -> str:
    """Run rbee on the slow hive_start job, Ctrl-C it (or send `signum`) once the job runs; its
    stderr (it exits 128 + signum: 130 for Ctrl-C)."""
    process = await trio.lowlevel.open_process(argv(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                               env=cli_env(), cwd=ROOT)  # fmt: skip
    try:
        with trio.fail_after(TIMEOUT):
            # "· $ <command>", then the first line the command printed: the job is running.
            seen = await read_until(process.stderr, lambda text: re.search(r"^· [^$].*\n", text, re.M))
            process.send_signal(signum)
            while chunk := await process.stderr.receive_some():
                seen += chunk.decode()
            assert await process.wait() == 128 + signum
    finally:
        process.kill()
    return seen


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["Ctrl-C", "SIGTERM", "SIGHUP"])
async def test_ctrl_c_cancels_the_job_and_exits_130(slow_daemon, signum):
    # SIGTERM (timeout(1)) and SIGHUP (a closed terminal) too: they left a download running on.
    created = await arbee("--socket", str(slow_daemon.socket_path), "submit", json.dumps(SLOW_HIVE))
    assert created.returncode == 0, created.stderr
    seen = await interrupt_slow_job("--socket", str(slow_daemon.socket_path), "hive", "start", SLOW_JOB["hive_id"],
                                    signum=signum)  # fmt: skip
    [job_id] = re.findall(r"^rbee: cancelled job (job-\S+)$", seen, re.M)

    async with slow_daemon.client() as client:
        jobs = (await client.request("GET", "/v1/jobs")).json()
        assert [job["job_id"] for job in jobs if job["operation"] == "hive_start"] == [job_id]
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as replay:
            events = [event async for event in replay.aiter_sse()]
        assert events[-1].data == "[CANCELLED]"
        status = (await client.request("GET", f"/v1/jobs/{job_id}")).json()
    assert status["state"] == "cancelled"


async def test_job_list_get_follow_detach_and_cancel(slow_daemon):
    where = ("--socket", str(slow_daemon.socket_path))
    assert (await arbee(*where, "submit", json.dumps(SLOW_HIVE))).returncode == 0
    async with slow_daemon.client() as client:
        job_id = (await client.request("POST", "/v1/jobs", json=SLOW_JOB)).json()["job_id"]

    queued = await arbee(*where, "job", "get", job_id)
    assert queued.returncode == 0, queued.stderr
    fields = stripped(fields_of(queued.stdout))
    assert (fields["job_id"], fields["operation"], fields["state"], fields["started_at"]) == (
        job_id, "hive_start", "queued", "-")  # fmt: skip
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", fields["created_at"])  # local time, not ISO UTC

    # Following a queued job starts it, as its first stream does; Ctrl-C only stops following.
    seen = await interrupt_slow_job(*where, "job", "follow", job_id)
    assert seen.splitlines()[-1] == f"rbee: stopped following job {job_id}"

    running = await arbee(*where, "job", "list", "--state", "running")
    assert running.returncode == 0, running.stderr
    header, *rows = running.stdout.splitlines()
    assert header.split() == ["ID", "OPERATION", "STATE", "CREATED", "ERROR"]
    assert [row.split()[:3] for row in rows] == [[job_id, "hive_start", "running"]]
    assert json.loads((await arbee(*where, "job", "list", "--state", "completed", "--json")).stdout) == [
        job for job in json.loads((await arbee(*where, "job", "list", "--json")).stdout) if job["state"] == "completed"
    ]  # fmt: skip

    # A second follower sees only what came after event 1, live, until someone cancels the job.
    follower = await trio.lowlevel.open_process(argv(*where, "job", "follow", job_id, "--after", "1", "--json"),
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
                                                cwd=ROOT)  # fmt: skip
    try:
        with trio.fail_after(TIMEOUT):
            out = await read_until(follower.stdout, lambda text: text.endswith("\n"))
            cancelled = await arbee(*where, "job", "cancel", job_id)
            assert (cancelled.returncode, cancelled.stderr) == (0, f"· cancelled job {job_id}\n")
            while chunk := await follower.stdout.receive_some():
                out += chunk.decode()
            err = await read_until(follower.stderr, lambda text: text.endswith("\n"))
            assert await follower.wait() == 130
    finally:
        follower.kill()
    events = json_lines(out)
    assert events[0]["id"] == 2 and events[0]["event"] == "narration"
    assert events[-1] == {"id": events[-1]["id"], "event": "end", "data": "[CANCELLED]"}
    assert err == f"rbee: job {job_id} was cancelled\n"

    again = await arbee(*where, "job", "cancel", job_id)
    assert (again.returncode, again.stderr) == (1, f"rbee: error: job {job_id} already cancelled\n")
    unknown = await arbee(*where, "job", "get", "job-nosuch")
    assert (unknown.returncode, unknown.stderr) == (1, "rbee: error: unknown job 'job-nosuch'\n")


async def test_job_follow_replays_a_finished_job_and_exits_with_its_end(shared_daemon):
    where = ("--socket", str(shared_daemon.socket_path))
    async with shared_daemon.client() as client:
        listed, failed = [(await client.request("POST", "/v1/jobs", json=payload)).json()["job_id"]
                          for payload in ({"operation": "hive_list"}, {"operation": "hive_get", "id": "nope"})]
        for job_id in (listed, failed):
            async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as stream:
                ends = [event.data async for event in stream.aiter_sse() if event.event == "end"]
            assert len(ends) == 1

    replay = await arbee(*where, "job", "follow", listed)
    assert replay.returncode == 0, replay.stderr
    assert replay.stdout == (await arbee(*where, "hive", "list")).stdout and "localhost" in replay.stdout
    # After its last event nothing is left to replay: the job's status gives its end.
    past_end = await arbee(*where, "job", "follow", listed, "--after", "3", "--json")
    assert (past_end.returncode, past_end.stdout, past_end.stderr) == (0, "", "")
    for after in ((), ("--after", "1")):
        done = await arbee(*where, "job", "follow", failed, *after)
        assert (done.returncode, done.stderr) == (1, "rbee: error: unknown hive 'nope'\n")


async def read_until(stream: trio.abc.ReceiveStream, found: Callable[[str], object]) -> str:
    seen = ""
    while not found(seen):
        chunk = await stream.receive_some()
        if not chunk:
            raise AssertionError(f"stream ended; read so far: {seen!r}")
        seen += chunk.decode()
    return seen


@pytest.mark.parametrize(
    ("args", "operation", "error"),
    [
        (["model", "download", "/nonexistent/x.gguf", "--sha256", "ab" * 32], "model_download", "No such file"),
        (["model", "get", "nosuch"], "model_get", "unknown model 'nosuch'"),
        (["model", "delete", "nosuch"], "model_delete", "unknown model 'nosuch'"),
        (["model", "list", "--hive", "elsewhere"], "model_list", "unknown hive 'elsewhere'"),
        (["worker", "spawn", "nosuch", "--worker", "cpu", "--device", "0", "--ctx-size", "0"], "worker_spawn",
         "unknown model 'nosuch'"),
        (["worker", "get", "nosuch"], "worker_get", "unknown worker 'nosuch'"),
        (["worker", "delete", "nosuch"], "worker_delete", "unknown worker 'nosuch'"),
        (["worker", "list", "--hive", "elsewhere"], "worker_list", "unknown hive 'elsewhere'"),
        (["infer", "hi", "--model", "nosuch", "--max-tokens", "3", "--temperature", "0.5", "--top-p", "0.9",
          "--top-k", "5", "--seed", "7", "--stop", ".", "--stop", "!", "--device", "cpu", "--no-stream",
          "--keep-alive", "0", "--raw"], "infer", "unknown model 'nosuch'"),  # fmt: skip
    ],
)
def test_model_worker_and_infer_payloads_are_accepted_and_their_errors_reported(shared_daemon, args, operation, error):
    done = rbee(shared_daemon, "--json", *args)
    assert done.returncode == 1, done
    end = json_lines(done.stdout)[-1]
    assert end["event"] == "end" and end["data"].startswith("[ERROR] ") and error in end["data"], end
    assert done.stderr == f"rbee: error: {end['data'].removeprefix('[ERROR] ')}\n"


def test_model_download_list_infer_and_worker_commands_on_a_real_model(daemon, tmp_path):
    model_path = tinymodel.write_tiny_model(tmp_path / "tiny.gguf")
    downloaded = rbee(daemon, "model", "download", str(model_path))
    assert downloaded.returncode == 0, downloaded.stderr
    fields = stripped(fields_of(downloaded.stdout))
    assert (fields["id"], fields["size"]) == ("tiny", "475.0 KiB")
    assert "  architecture:     llama\n" in downloaded.stdout  # metadata, indented under its key
    # stderr is no terminal: progress comes as plain lines
    assert re.search(r"^· 100%  0\.5/0\.5 MiB  [\d.]+ MiB/s  done$", downloaded.stderr, re.M), downloaded.stderr

    # A relative path is the user's, not the daemon's: rbee sends it made absolute.
    again = subprocess.run(argv("--socket", str(daemon.socket_path), "--json", "model", "download", "tiny.gguf"),
                           capture_output=True, text=True, timeout=TIMEOUT, env=cli_env(), cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr
    [result] = [line["data"] for line in json_lines(again.stdout) if line["event"] == "result"]
    assert (result["id"], result["source"]) == ("tiny", str(model_path))

    listed = rbee(daemon, "model", "list").stdout.splitlines()
    assert listed[0].split() == ["ID", "SIZE", "QUANT", "ARCH", "PARAMS"]
    assert listed[1].split() == ["tiny", "475.0", "KiB", "ALL_F32", "llama", "118K"]

    # No --model and no RBEE_MODEL: the only model there is.
    inferred = rbee(daemon, "infer", "Once upon a time", "--seed", "3", "--max-tokens", "6")
    assert inferred.returncode == 0, inferred.stderr
    assert len(inferred.stdout) > 1 and inferred.stdout.endswith("\n") and inferred.stdout.count("\n") == 1
    assert re.search(r"^· 6 tokens, ttft \d+ ms, [\d.]+ tok/s, finish: length$", inferred.stderr, re.M), inferred.stderr
    again = rbee(daemon, "infer", "Once upon a time", "--seed", "3", "--max-tokens", "6", "--no-stream",
                 env=cli_env(RBEE_MODEL="tiny"))  # fmt: skip
    assert again.stdout == inferred.stdout  # same seed, same text, whether streamed or not
    short = rbee(daemon, "infer", "-m", "tiny", "-n", "6", "--seed", "3", "Once upon a time")  # llama-cli's flags
    assert short.stdout == inferred.stdout, short.stderr

    [worker] = table_of(rbee(daemon, "worker", "list").stdout)
    assert (worker["MODEL"], worker["DEVICE"], worker["STATE"]) == ("tiny", "cpu", "ready")
    deleted = rbee(daemon, "worker", "delete", worker["ID"])
    assert deleted.returncode == 0 and stripped(fields_of(deleted.stdout))["id"] == worker["ID"]
    copied = rbee(daemon, "model", "copy", "tiny", "Tiny.Two")
    assert copied.returncode == 0 and stripped(fields_of(copied.stdout))["id"] == "tiny.two", copied.stderr
    assert copied.stderr == "· model tiny copied as tiny.two (a hard link to its file: no space used)\n"
    assert [line.split()[0] for line in rbee(daemon, "model", "list").stdout.splitlines()] == ["ID", "tiny", "tiny.two"]
    assert rbee(daemon, "model", "delete", "tiny.two").returncode == 0
    removed = rbee(daemon, "model", "delete", "tiny")
    assert removed.returncode == 0 and stripped(fields_of(removed.stdout)) == {"id": "tiny", "deleted": "yes"}


# -- against a scripted job API: exact payloads, token streaming, reconnects, the progress bar --


def sse(event_id: int | None, event: str, data) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {text}\n\n".encode()


Script = Callable[[RecordedRequest], Reply]  # what one job's stream answers


class ScriptedAPI:
    """POST /v1/jobs records each payload and answers job-1, job-2, ...; each job's stream plays `scripts`."""

    def __init__(self, server, scripts: list[Script]):
        self.server = server
        self.scripts = scripts
        self.payloads: list[dict] = []
        server.routes["/v1/jobs"] = self._create

    async def _create(self, request: RecordedRequest) -> Reply:
        self.payloads.append(json.loads(request.body))
        job_id = f"job-{len(self.payloads)}"
        script = self.scripts[len(self.payloads) - 1]

        async def stream(request: RecordedRequest) -> Reply:
            return script(request)

        self.server.routes[f"/v1/jobs/{job_id}/stream"] = stream
        body = json.dumps({"job_id": job_id, "sse_url": f"/v1/jobs/{job_id}/stream"}).encode()
        return Reply(201, {"content-type": "application/json"}, body)

    @property
    def url(self) -> str:
        return self.server.base_url


def events_reply(body: bytes | AsyncIterator[bytes], **faults) -> Reply:
    return Reply(200, {"content-type": "text/event-stream"}, body, **faults)


def play(*events: bytes) -> Script:
    return lambda request: events_reply(b"".join(events))


RESULT = {"model": "m", "prompt_tokens": 3, "completion_tokens": 2, "finish_reason": "stop",
          "ttft_ms": 12.5, "tokens_per_s": 40.0}  # fmt: skip


async def test_infer_prints_tokens_as_they_arrive_and_sends_every_option():
    release = trio.Event()

    async def tokens() -> AsyncIterator[bytes]:
        yield sse(1, "narration", {"message": "loading m"}) + sse(2, "token", {"t": "Hel", "i": 0})
        await release.wait()  # the rest comes only once the test saw "Hel" on rbee's stdout
        yield sse(3, "token", {"t": "lo", "i": 1}) + sse(4, "result", RESULT) + sse(5, "end", "[DONE]")

    async with serve_files() as server:
        api = ScriptedAPI(server, [lambda request: events_reply(tokens())])
        process = await trio.lowlevel.open_process(
            argv("--url", api.url, "infer", "Say hi", "--model", "m", "--max-tokens", "3", "--temperature", "0",
                 "--top-p", "0.5", "--top-k", "2", "--min-p", "0.1", "--repeat-penalty", "1.1", "--presence-penalty",
                 "0.5", "--frequency-penalty", "-0.5", "--repeat-last-n", "8", "--seed", "9", "--stop", "\n", "--stop", "END", "--device",
                 "cuda:1", "--worker-id", "w-1", "-c", "4096", "--keep-alive", "-1", "--hive", "localhost", "--raw",
                 "--format", '{"enum": ["Hello"]}', "--logit-bias", "12=-100", "--logit-bias", "7=2.5",
                 "--logit-bias", "012=-50"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(), cwd=ROOT,
        )  # fmt: skip
        try:
            with trio.fail_after(TIMEOUT):
                first = await read_until(process.stdout, lambda text: "Hel" in text)
                assert first == "Hel" and process.poll() is None
                release.set()
                rest = await read_until(process.stdout, lambda text: text.endswith("\n"))
                stderr = await read_until(process.stderr, lambda text: "tok/s" in text)
                assert await process.wait() == 0
        finally:
            process.kill()
    assert first + rest == "Hello\n"
    assert stderr == "· loading m\n· 2 tokens, ttft 12 ms, 40.0 tok/s, finish: stop\n"
    assert api.payloads == [{
        "operation": "infer", "prompt": "Say hi", "model": "m", "max_tokens": 3, "temperature": 0.0, "top_p": 0.5,
        "top_k": 2, "min_p": 0.1, "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.5, "repeat_last_n": 8, "seed": 9, "stop": ["\n", "END"], "device": "cuda:1", "worker_id": "w-1", "n_ctx": 4096, "keep_alive": -1.0,
        "hive_id": "localhost", "format": {"enum": ["Hello"]}, "logit_bias": {"12": -50.0, "7": 2.5},
    }]  # fmt: skip


@pytest.mark.parametrize("given", ["x=1", "12", "12=", "-1=5", "12=much", "\u00b2=1", "12=nan", "12=inf"])
def test_a_logit_bias_that_is_not_id_equals_bias_is_a_usage_error(given):
    with pytest.raises(argparse.ArgumentTypeError, match=f"{given!r} is not ID=BIAS"):
        cli._bias(given)


def test_format_is_json_or_a_schema_inline_or_from_a_file(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "boolean"}')
    assert [cli._format(given) for given in ("json", '{"enum": [1]}', f"@{schema}")] == [
        "json", {"enum": [1]}, {"type": "boolean"}]  # fmt: skip
    for given, error in [("xml", "not json, a JSON Schema or @FILE holding one: "), ("[1]", "a JSON Schema is an object"),
                         (f"@{tmp_path}/none.json", "No such file or directory")]:  # fmt: skip
        with pytest.raises(argparse.ArgumentTypeError, match=error):
            cli._format(given)


def test_a_history_message_is_given_inline_or_from_a_file(tmp_path, capsys):
    (tmp_path / "answer.txt").write_text("Forty-two.\nAsk again.\n")
    args = ["model", "copy", "m", "n", "--message", "user", f"@{tmp_path}/none.txt"]
    with pytest.raises(SystemExit) as exit_:
        cli.make_parser().parse_args(args)
    assert exit_.value.code == 2 and "argument --message: cannot read " in capsys.readouterr().err
    args[-2:] = ["user", "Why?", "--message", "assistant", f"@{tmp_path}/answer.txt"]
    assert cli.make_parser().parse_args(args).messages == [
        {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Forty-two.\nAsk again.\n"}]


async def test_grammar_is_gbnf_given_inline_or_from_a_file(tmp_path):
    source = tmp_path / "answer.gbnf"
    source.write_text('root ::= "yes" | "no"\n')
    with pytest.raises(argparse.ArgumentTypeError, match="No such file or directory"):
        cli._text(f"@{tmp_path}/none.gbnf")
    answer = play(sse(1, "result", RESULT | {"text": "yes"}), sse(2, "end", "[DONE]"))
    async with serve_files() as server:
        api = ScriptedAPI(server, [answer, answer])
        for given in (f"@{source}", 'root ::= "yes"'):
            done = await arbee("--url", server.base_url, "infer", "p", "-m", "m", "--raw", "--grammar", given)
            assert (done.returncode, done.stdout) == (0, "yes\n"), done.stderr
    assert [payload["grammar"] for payload in api.payloads] == ['root ::= "yes" | "no"\n', 'root ::= "yes"']


def model_record(model_id: str, template: bool = False) -> dict:
    return {"id": model_id, "metadata": {"architecture": "llama", "chat_template": template}}


async def test_infer_finds_its_model_and_whether_to_chat():
    listing = lambda *records: play(sse(1, "result", list(records)), sse(2, "end", "[DONE]"))  # noqa: E731
    found = lambda record: play(sse(1, "result", record), sse(2, "end", "[DONE]"))  # noqa: E731
    answer = play(sse(1, "result", RESULT | {"text": "whole text"}), sse(2, "end", "[DONE]"))
    async with serve_files() as server:
        from_env = ScriptedAPI(server, [found(model_record("env-model")), answer])
        done = await arbee("--url", server.base_url, "infer", "p", "--no-stream", env=cli_env(RBEE_MODEL="env-model"))
        assert (done.returncode, done.stdout) == (0, "whole text\n"), done.stderr
        assert from_env.payloads == [{"operation": "model_get", "id": "env-model"},
                                     {"operation": "infer", "prompt": "p", "stream": False, "model": "env-model"}]  # fmt: skip

        only = ScriptedAPI(server, [listing(model_record("solo")), answer])
        done = await arbee("--url", server.base_url, "infer", "p")
        assert done.returncode == 0, done.stderr
        assert only.payloads == [{"operation": "model_list"}, {"operation": "infer", "prompt": "p", "model": "solo"}]

        # A model with a chat template gets PROMPT as a user's message, as `ollama run` sends it.
        templated = ScriptedAPI(server, [found(model_record("m", template=True)), answer,
                                         listing(model_record("solo", template=True)), answer])  # fmt: skip
        done = await arbee("--url", server.base_url, "infer", "Hi!", "--model", "m", "--hive", "h")
        assert done.returncode == 0, done.stderr
        done = await arbee("--url", server.base_url, "infer", "Hi!", "--hive", "h")
        assert done.returncode == 0, done.stderr
        hi = [{"role": "user", "content": "Hi!"}]
        assert templated.payloads == [
            {"operation": "model_get", "id": "m", "hive_id": "h"},
            {"operation": "infer", "messages": hi, "model": "m", "hive_id": "h"},
            {"operation": "model_list", "hive_id": "h"},  # the models of the hive asked about
            {"operation": "infer", "messages": hi, "model": "solo", "hive_id": "h"},
        ]  # fmt: skip

        missing = ScriptedAPI(server, [play(sse(1, "end", "[ERROR] unknown model 'm' (known: a)"))])
        done = await arbee("--url", server.base_url, "infer", "p", "--model", "m")
        assert (done.returncode, done.stderr) == (1, "rbee: error: unknown model 'm' (known: a)\n")
        assert missing.payloads == [{"operation": "model_get", "id": "m"}]  # and no infer

        # --raw, --chat and --system say it themselves: no lookup.
        from_stdin = ScriptedAPI(server, [answer])
        done = await arbee("--url", server.base_url, "infer", "-", "--model", "m", "--raw", stdin="Notes:\n- one\n".encode())
        assert (done.returncode, done.stdout) == (0, "whole text\n"), done.stderr
        assert from_stdin.payloads == [{"operation": "infer", "prompt": "Notes:\n- one\n", "model": "m"}]

        piped = ScriptedAPI(server, [answer])  # no PROMPT at all: a pipe is read, as `ollama run m < file` does
        done = await arbee("--url", server.base_url, "infer", "--model", "m", "--raw", stdin=b"Piped.")
        assert (done.returncode, piped.payloads[0]["prompt"]) == (0, "Piped."), done.stderr

        chats = ScriptedAPI(server, [answer, answer])
        for options in (["--chat"], ["--system", "Be brief."]):
            done = await arbee("--url", server.base_url, "infer", "Hi!", "--model", "m", *options)
            assert done.returncode == 0, done.stderr
        assert [payload["messages"] for payload in chats.payloads] == [
            hi, [{"role": "system", "content": "Be brief."}, *hi],
        ]
        assert all(payload.keys() == {"operation", "model", "messages"} for payload in chats.payloads)
        contradicted = ScriptedAPI(server, [])
        done = await arbee("--url", server.base_url, "infer", "Hi!", "--model", "m", "--raw", "--system", "Be brief.")
        assert (done.returncode, done.stderr) == (
            2, "rbee: error: --system goes through the chat template: it cannot go with --raw\n")  # fmt: skip
        assert contradicted.payloads == []

        several = ScriptedAPI(server, [listing(model_record("a"), model_record("b"))])
        done = await arbee("--url", server.base_url, "infer", "p")
        assert done.returncode == 2
        assert "the daemon has 2 models (a, b): pick one with --model" in done.stderr
        assert several.payloads == [{"operation": "model_list"}]


async def test_a_conversation_on_the_real_daemon_survives_ctrl_c(tmp_path, tiny_model):
    daemon = start_daemon(tmp_path / "d", env={"RBEED_WORKER_TOKEN_DELAY": "0.02"})  # a stream long enough to stop
    try:
        assert rbee(daemon, "model", "download", str(tiny_model)).returncode == 0
        args = ("--socket", str(daemon.socket_path), "infer", "-n", "500", "--temperature", "0")
        async with on_a_terminal(*args) as (process, terminal):
            with trio.fail_after(TIMEOUT):
                await read_until(terminal, PROMPTED.search)
                await terminal.send_all(b"Once upon a time\n")
                await read_until(terminal, lambda text: re.search(r"Once upon a time\r\n\S", text))  # a token
                process.send_signal(signal.SIGINT)  # what Ctrl-C does
                stopped = await read_until(terminal, PROMPTED.search)
                # The DELETE, or the daemon seeing the stream close (which ends an infer), comes first.
                assert re.search(r"(^|\n)rbee: (cancelled job job-\S+|job job-\S+ already cancelled)\r\n>>> $",
                                 stopped), stopped
                await terminal.send_all(b"Hello\n")  # the worker serves the next prompt at once
                served = await read_until(terminal, PROMPTED.search)
                assert re.search(r"\r\n· \d+ tokens, ttft \d+ ms.*, finish: (length|stop)\r\n>>> $", served), served
                await terminal.send_all(b"\x04")  # Ctrl-D
                assert await process.wait() == 0
        jobs = json.loads(rbee(daemon, "--json", "job", "list").stdout)
        assert [(job["operation"], job["state"]) for job in jobs] == [
            ("infer", "completed"), ("infer", "cancelled"), ("model_list", "completed"), ("model_download", "completed")
        ]  # fmt: skip
    finally:
        daemon.stop()


@contextlib.asynccontextmanager
async def on_a_terminal(*args: str, env: dict[str, str] | None = None):
    """rbee with a pty as its stdin, stdout and stderr: the process, and the terminal's other end."""
    main_fd, terminal_fd = pty.openpty()
    process = await trio.lowlevel.open_process(argv(*args), stdin=terminal_fd, stdout=terminal_fd, stderr=terminal_fd,
                                               env=cli_env(TERM="dumb", NO_COLOR="1", **(env or {})), cwd=ROOT)  # fmt: skip
    os.close(terminal_fd)
    terminal = trio.lowlevel.FdStream(main_fd)
    try:
        yield process, terminal
    finally:
        process.kill()
        await terminal.aclose()


PROMPTED = re.compile(r"(^|\n)>>> $")  # rbee waits for the next prompt


async def test_infer_on_a_terminal_without_prompt_is_a_conversation():
    replies = [play(sse(1, "token", {"t": text, "i": 0}), sse(2, "result", RESULT), sse(3, "end", end))
               for text, end in [("Hello!", "[DONE]"), ("Oops", "[ERROR] worker w died"), ("Sure.", "[DONE]"),
                                 ("Hi.", "[DONE]")]]  # fmt: skip
    async with serve_files() as server:
        api = ScriptedAPI(server, [play(sse(1, "result", [{"id": "solo"}]), sse(2, "end", "[DONE]")), *replies])
        async with on_a_terminal("--url", server.base_url, "infer", "--system", "Be brief.") as (process, terminal):
            with trio.fail_after(TIMEOUT):
                await read_until(terminal, PROMPTED.search)
                for typed, shown in [(b"Hi\n", "Hello!\r\n"), (b"again\n", "rbee: error: worker w died"),
                                     (b'"""Two\nlines"""\n', "Sure.\r\n"),
                                     (b"/clear\n", "the conversation starts again"), (b"Fresh\n", "Hi.\r\n")]:  # fmt: skip
                    await terminal.send_all(typed)
                    seen = await read_until(terminal, PROMPTED.search)
                    assert shown in seen, seen
                await terminal.send_all(b"/bye\n")
                assert await process.wait() == 0
    system = {"role": "system", "content": "Be brief."}
    assert api.payloads[0] == {"operation": "model_list"}  # chosen once, for the whole session
    assert [payload.pop("messages") for payload in api.payloads[1:]] == [
        [system, {"role": "user", "content": "Hi"}],
        [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "again"}],
        # The failed turn is not part of the conversation.
        [system, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Two\nlines"}],
        [system, {"role": "user", "content": "Fresh"}],  # after /clear
    ]  # fmt: skip
    assert api.payloads[1:] == [{"operation": "infer", "model": "solo"}] * 4


async def test_commands_send_the_payloads_of_their_operations():
    cases = [
        (["hive", "create", "h.example", "--id", "h", "--port", "9000", "--ssh-host", "admin@h"],
         {"operation": "hive_create", "host": "h.example", "id": "h", "port": 9000, "ssh_host": "admin@h"}),
        (["hive", "update", "h", "--host", "h2"], {"operation": "hive_update", "id": "h", "host": "h2"}),
        (["hive", "start"], {"operation": "hive_start"}),
        (["hive", "stop", "h"], {"operation": "hive_stop", "hive_id": "h"}),
        (["model", "download", "hf:o/r/m.gguf", "--sha256", "AB" * 32, "--hive", "h"],
         {"operation": "model_download", "model": "hf:o/r/m.gguf", "sha256": "AB" * 32, "hive_id": "h"}),
        (["model", "download", "/m/x.gguf", "--id", "y"], {"operation": "model_download", "model": "/m/x.gguf", "id": "y"}),
        (["model", "download", "/m/z.gguf", "--system", "", "--top-k", "1"],
         {"operation": "model_download", "model": "/m/z.gguf", "system": "", "defaults": {"top_k": 1}}),
        (["model", "get", "m"], {"operation": "model_get", "id": "m"}),
        (["model", "copy", "m", "n", "--hive", "h"], {"operation": "model_copy", "id": "m", "to": "n", "hive_id": "h"}),
        (["model", "copy", "m", "m", "--system", "Be brief.", "--temperature", "0", "-n", "9", "--stop", "a",
          "--stop", "b", "-c", "512"],
         {"operation": "model_copy", "id": "m", "to": "m", "system": "Be brief.",
          "defaults": {"temperature": 0.0, "max_tokens": 9, "stop": ["a", "b"], "n_ctx": 512}}),
        (["model", "copy", "m", "n", "--stop", "a", "--no-stop"], {"operation": "model_copy", "id": "m", "to": "n",
                                                                  "defaults": {"stop": []}}),
        (["model", "copy", "m", "o", "--no-stop", "--stop", "a"], {"operation": "model_copy", "id": "m", "to": "o",
                                                                  "defaults": {"stop": ["a"]}}),
        (["model", "copy", "m", "p", "--message", "user", "Who?", "--message", "assistant", "Me."],
         {"operation": "model_copy", "id": "m", "to": "p",
          "messages": [{"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Me."}]}),
        (["model", "download", "/m/q.gguf", "--no-messages"], {"operation": "model_download", "model": "/m/q.gguf",
                                                               "messages": []}),
        (["worker", "spawn", "m", "--worker", "cuda", "--device", "1"],
         {"operation": "worker_spawn", "model": "m", "worker": "cuda", "device": 1}),
        (["worker", "delete", "w", "--hive", "h"], {"operation": "worker_delete", "id": "w", "hive_id": "h"}),
    ]  # fmt: skip
    done_script = play(sse(1, "result", {}), sse(2, "end", "[DONE]"))
    async with serve_files() as server:
        api = ScriptedAPI(server, [done_script] * len(cases))
        async with trio.open_nursery() as nursery:
            for args, _ in cases:
                nursery.start_soon(arbee, "--url", server.base_url, *args)
    assert sorted(api.payloads, key=json.dumps) == sorted((payload for _, payload in cases), key=json.dumps)


async def test_a_dropped_stream_is_resumed_from_the_last_event_id():
    first_part = sse(1, "narration", {"message": "one"}) + sse(2, "narration", {"message": "two"})
    rest = sse(3, "result", {"id": "localhost"}) + sse(4, "end", "[DONE]")
    streams: list[RecordedRequest] = []

    def script(request: RecordedRequest) -> Reply:
        streams.append(request)
        if len(streams) == 1:  # the connection breaks after two events (Content-Length promised more)
            return events_reply(first_part + rest, drop_after=len(first_part))
        return events_reply(rest if request.headers.get("last-event-id") == "2" else first_part + rest)

    async with serve_files() as server:
        ScriptedAPI(server, [script])
        done = await arbee("--url", server.base_url, "hive", "get", "localhost")
    assert done.returncode == 0, done.stderr
    assert [r.headers.get("last-event-id") for r in streams] == [None, "2"]
    assert done.stderr == "· one\n· two\n"  # nothing shown twice
    assert done.stdout == "id: localhost\n"


async def test_a_stream_that_keeps_dropping_is_given_up():
    def script(request: RecordedRequest) -> Reply:
        return events_reply(sse(1, "narration", {"message": "one"}) + b"id: 2\nevent: narr", drop_after=30)

    async with serve_files() as server:
        ScriptedAPI(server, [script])
        done = await arbee("--url", server.base_url, "hive", "list")
    assert done.returncode == 1
    assert "rbee: error: lost the event stream of job job-1: " in done.stderr


async def test_download_progress_is_a_bar_on_a_terminal():
    mib = 1024 * 1024
    progress = [sse(i, "progress", {"done": done * mib, "total": 8 * mib, "rate": 2 * mib}) for i, done in
                enumerate((1, 2, 8), start=1)]  # fmt: skip
    script = play(sse(None, "narration", {"message": "fetching x"}), *progress,
                  sse(4, "result", {"id": "m", "size": 8 * mib}), sse(5, "end", "[DONE]"))  # fmt: skip
    async def download_on_a_terminal(term: str) -> tuple[str, str]:
        main_fd, terminal_fd = pty.openpty()
        fcntl.ioctl(terminal_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))  # 60 columns
        async with serve_files() as server:
            ScriptedAPI(server, [script])
            try:
                with trio.fail_after(TIMEOUT):
                    process = await trio.lowlevel.open_process(
                        argv("--url", server.base_url, "model", "download", "x"), stdout=subprocess.PIPE,
                        stderr=terminal_fd, env=cli_env(TERM=term), cwd=ROOT,
                    )  # fmt: skip
                    os.close(terminal_fd)
                    stdout = await read_until(process.stdout, lambda text: "size" in text)
                    assert await process.wait() == 0
                    return stdout, await trio.to_thread.run_sync(read_terminal, main_fd)
            finally:
                os.close(main_fd)

    # A dumb terminal cannot erase a line: plain lines, as on a pipe, and no colors.
    stdout, terminal = await download_on_a_terminal("dumb")
    assert "\x1b" not in terminal
    assert terminal.startswith("· fetching x\r\n") and terminal.endswith("  8.0/8.0 MiB  2.0 MiB/s  done\r\n")
    stdout, terminal = await download_on_a_terminal("xterm")
    assert stdout == "id:   m\nsize: 8.0 MiB\n"
    # Drawn in place with \r: the first report, then the complete one (the second came within 0.1 s).
    assert terminal.startswith("\x1b[2m·\x1b[0m fetching x\r\n\r\x1b[K 12% [")  # narration: a dim prefix
    assert "]  1.0/8.0 MiB  2.0 MiB/s  ETA 0:04" in terminal
    assert terminal.endswith("\r\x1b[K100% [" + "#" * (terminal.rindex("]") - terminal.rindex("[") - 1)
                             + "]  8.0/8.0 MiB  2.0 MiB/s  done\r\n")  # fmt: skip


def read_terminal(fd: int) -> str:
    """All a pty's other end has written, up to its close (EIO on Linux)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


# -- the renderers, on sample data ------------------------------------------------------------

MIB = 1024 * 1024


def test_progress_text_shows_percentage_mib_rate_and_eta():
    half = {"done": 50 * MIB, "total": 100 * MIB, "rate": 10 * MIB}
    assert cli.progress_text(half) == " 50%  50.0/100.0 MiB  10.0 MiB/s  ETA 0:05"
    bar = cli.progress_text(half, width=70)
    assert bar == " 50% [" + "#" * 10 + "." * 11 + "]  50.0/100.0 MiB  10.0 MiB/s  ETA 0:05"
    # The bar keeps its length (and the numbers their column) as the numbers change width.
    for done, rate in ((0, 0), (99, 9999), (100, 9999)):
        line = cli.progress_text({"done": done * MIB, "total": 100 * MIB, "rate": rate * MIB}, width=70)
        assert line.index("]") == bar.index("]") and len(line) <= 70, line
    assert cli.progress_text({"done": 3 * MIB, "total": None, "rate": MIB}) == "3.0 MiB  1.0 MiB/s"
    assert cli.progress_text({"done": 0, "total": 7200 * MIB, "rate": MIB}).endswith("ETA 2:00:00")
    assert cli.progress_text({"done": 0, "total": MIB, "rate": 0}).endswith("ETA --:--")
    # Fields beyond done/total/rate (the daemon may add some) lead the line as a label.
    assert cli.progress_text({"file": "m.gguf", "done": MIB, "total": 2 * MIB}) == "m.gguf  50%  1.0/2.0 MiB  ETA --:--"
    assert cli.progress_text({"done": MIB, "total": 2 * MIB}, width=20) == " 50%  1.0/2.0 MiB  E"  # no room for a bar


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_bar_redraws_in_place_at_most_ten_times_a_second():
    stream, clock = io.StringIO(), FakeClock()
    display = cli.ProgressDisplay(stream, tty=True, width=61, clock=clock)
    for now, done in [(0.0, 1), (0.05, 2), (0.11, 3), (0.15, 4)]:
        clock.now = now
        display.update({"done": done * MIB, "total": 10 * MIB, "rate": MIB})
    assert stream.getvalue().count("\r\x1b[K") == 2 and "3.0/10.0 MiB" in stream.getvalue()
    display.clear()  # narration is about to be printed: the bar goes, and comes back on the next report
    display.update({"done": 5 * MIB, "total": 10 * MIB, "rate": MIB})
    assert stream.getvalue().endswith("\r\x1b[K\r\x1b[K 50% [######.......]  5.0/10.0 MiB  1.0 MiB/s  ETA 0:05")
    clock.now = 0.16
    display.update({"done": 6 * MIB, "total": 10 * MIB, "rate": MIB})
    display.finish()  # the held-back report is shown, and the line ended
    assert stream.getvalue().endswith("\r\x1b[K 60% [#######......]  6.0/10.0 MiB  1.0 MiB/s  ETA 0:04\n")


def test_progress_without_a_terminal_is_an_occasional_plain_line():
    stream, clock = io.StringIO(), FakeClock()
    display = cli.ProgressDisplay(stream, tty=False, clock=clock)
    for now in range(0, 12):
        clock.now = float(now)
        display.update({"done": now * MIB, "total": 12 * MIB, "rate": MIB})
    display.update({"done": 12 * MIB, "total": 12 * MIB, "rate": MIB})
    display.finish()
    assert stream.getvalue().splitlines() == [
        "·   0%  0.0/12.0 MiB  1.0 MiB/s  ETA 0:12",
        "·  41%  5.0/12.0 MiB  1.0 MiB/s  ETA 0:07",
        "·  83%  10.0/12.0 MiB  1.0 MiB/s  ETA 0:02",
        "· 100%  12.0/12.0 MiB  1.0 MiB/s  done",
    ]


def test_tables_of_hives_workers_and_models():
    hives = [
        {"id": "localhost", "host": "localhost", "port": None, "online": True, "version": "0.1.0", "pid": 1},
        {"id": "gpu-box", "host": "10.0.0.7", "port": 8500, "online": False, "error": "refused"},
    ]
    assert cli.render_result("hive_list", hives) == (
        "ID         HOST       PORT  ONLINE  VERSION\n"
        "localhost  localhost  -     yes     0.1.0\n"
        "gpu-box    10.0.0.7   8500  no      -"
    )
    workers = [{"id": "gemma-cpu-1", "model": "gemma", "device": "cpu", "state": "ready", "pid": 4242,
                "threads": 1, "n_ctx": 2048, "started_at": 1.0, "queued": 0, "stops_at": None, "rss": 384_827_392},
               {"id": "gemma-cpu-2", "model": "gemma", "device": "cpu", "state": "ready", "pid": 4243,
                "threads": 1, "n_ctx": 32768, "started_at": 1.0, "queued": 0, "stops_at": 1_800_000_000.0,
                "rss": None}]  # fmt: skip
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(1_800_000_000))
    assert cli.render_result("worker_list", workers) == (
        "ID           MODEL  DEVICE  STATE  PID   THREADS  CTX    MEMORY     UNTIL\n"
        "gemma-cpu-1  gemma  cpu     ready  4242  1        2048   367.0 MiB  -\n"
        f"gemma-cpu-2  gemma  cpu     ready  4243  1        32768  -          {until}"
    )
    models = [
        {"id": "gemma", "size": 253_114_368, "metadata": {"quantization": "Q4_K_M", "architecture": "gemma3",
                                                          "parameters": 268_098_176}},
        {"id": "llama", "size": 7 * 1024**3, "metadata": {"file_type": 1, "architecture": "llama",
                                                          "parameters": 6_738_415_616}},
        {"id": "bare", "size": 512},
    ]  # fmt: skip
    assert cli.render_result("model_list", models) == (
        "ID     SIZE       QUANT   ARCH    PARAMS\n"
        "gemma  241.4 MiB  Q4_K_M  gemma3  268M\n"
        "llama  7.0 GiB    1       llama   6.7B\n"
        "bare   512 B      -       -       -"
    )
    # Lists of other operations: every key, in first-seen order.
    assert cli.render_result(None, [{"a": 1}, {"b": [1, 2]}]) == "A  B\n1  -\n-  [1,2]"
    assert cli.render_result("worker_list", []) == "ID  MODEL  DEVICE  STATE  PID  THREADS  CTX  MEMORY  UNTIL"


def test_objects_render_as_aligned_key_value_lines():
    record = {"id": "tiny", "size": 486400, "added_at": 0, "ok": True, "error": None,
              "metadata": {"architecture": "llama", "parameters": 117824}, "tags": ["a"]}  # fmt: skip
    epoch = cli.format_field("added_at", 0)
    assert re.fullmatch(r"19(69|70)-\d\d-\d\d \d\d:\d\d:\d\d", epoch)
    assert cli.render_result("model_get", record) == (
        "id:       tiny\n"
        "size:     475.0 KiB\n"
        f"added_at: {epoch}\n"
        "ok:       yes\n"
        "error:    -\n"
        "metadata:\n"
        "  architecture: llama\n"
        "  parameters:   118K\n"
        'tags:     ["a"]'
    )
    assert cli.render_result("x", {}) == "{}"
    assert cli.render_result("x", 3.5) == "3.5"


def console() -> tuple[cli.Console, io.StringIO, io.StringIO]:
    out, err = io.StringIO(), io.StringIO()
    return cli.Console(out, err, color=False, tty=False, width=80), out, err


def event(event_id: int | None, name: str, data) -> ServerSentEvent:
    return ServerSentEvent(name, data if isinstance(data, str) else json.dumps(data), str(event_id or ""))


def test_human_view_of_gaps_unknown_events_and_an_interrupted_generation():
    terminal, out, err = console()
    clock = FakeClock()
    view = cli.HumanView(terminal, "infer", clock=clock)
    clock.now = 0.25
    view.event(event(1, "token", {"t": "a", "i": 0}))
    view.event(event(None, "gap", {"missed_from": 2, "missed_to": 9}))
    clock.now = 0.75
    view.event(event(10, "token", {"t": "b", "i": 9}))
    view.event(event(11, "thinking", {"what": 1}))
    assert view.infer_stats({}) == "2 tokens, ttft 250 ms, 2.0 tok/s"  # measured when the daemon gives no figures
    reused = RESULT | {"prompt_tokens": 40, "cached_tokens": 37}
    assert view.infer_stats(reused) == "2 tokens, ttft 12 ms (37 of 40 prompt tokens cached), 40.0 tok/s, finish: stop"
    view.event(event(12, "end", "[ERROR] worker died"))
    assert out.getvalue() == "ab\n"  # the tokens' line is ended; no stats for a failed generation
    assert err.getvalue() == "· some events were lost to the daemon's replay buffer (ids 2-9)\n· thinking: {\"what\":1}\n"


def test_json_view_decodes_json_data_and_keeps_the_rest_as_text():
    terminal, out, _ = console()
    view = cli.JsonView(terminal)
    for item in [event(1, "token", {"t": "x", "i": 0}), event(None, "gap", {"missed_from": 1, "missed_to": 1}),
                 event(2, "result", [1]), event(3, "end", "[CANCELLED]")]:  # fmt: skip
        view.event(item)
    assert json_lines(out.getvalue()) == [
        {"id": 1, "event": "token", "data": {"t": "x", "i": 0}},
        {"id": None, "event": "gap", "data": {"missed_from": 1, "missed_to": 1}},
        {"id": 2, "event": "result", "data": [1]},
        {"id": 3, "event": "end", "data": "[CANCELLED]"},
    ]
    assert view.result == [1]


def test_human_bytes_and_counts():
    assert [cli.human_bytes(n) for n in (0, 1023, 1024, 1536 * MIB, None)] == ["0 B", "1023 B", "1.0 KiB", "1.5 GiB", "-"]
    assert [cli.human_count(n) for n in (999, 1500, 268_098_176, 7_241_732_096, "n/a")] == ["999", "1.5K", "268M", "7.2B", "n/a"]


def test_the_daemon_address_comes_from_flags_then_env_then_the_default(monkeypatch, tmp_path):
    parse = cli.make_parser().parse_args
    monkeypatch.setenv("RBEE_URL", "http://env:1")
    assert cli.daemon_address(parse(["--url", "http://flag:2", "hive", "list"])) == "http://flag:2"
    assert cli.daemon_address(parse(["hive", "list", "--socket", "rel.sock"])) == f"unix:{os.path.abspath('rel.sock')}"
    assert cli.daemon_address(parse(["hive", "list"])) == "http://env:1"
    monkeypatch.delenv("RBEE_URL")
    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert cli.daemon_address(parse(["hive", "list"])) == f"unix:{tmp_path}/rbeed/rbeed.sock"
    # With the system service's socket there, one's own is taken only while a daemon listens on it.
    system = tmp_path / "run" / "rbeed.sock"
    own = tmp_path / "rbeed" / "rbeed.sock"
    monkeypatch.setattr(cli, "SYSTEM_SOCKET", system)
    for path in (system, own):
        path.parent.mkdir()
        with socket.socket(socket.AF_UNIX) as gone:  # the file a killed daemon leaves
            gone.bind(str(path))
    assert cli.daemon_address(parse(["hive", "list"])) == f"unix:{system}"
    own.unlink()
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(own))
        listener.listen()
        assert cli.daemon_address(parse(["hive", "list"])) == f"unix:{own}"


def test_a_daemon_socket_in_tmp_is_taken_only_from_a_directory_that_is_ones_own(monkeypatch, tmp_path):
    # Without XDG_RUNTIME_DIR the default is $TMPDIR/rbeed-UID, which another user could make first,
    # with a listener of theirs in it that would get every prompt.
    parse = cli.make_parser().parse_args
    for name in ("RBEE_URL", "RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(cli, "SYSTEM_SOCKET", system := tmp_path / "system.sock")
    own = tmp_path / f"rbeed-{os.getuid()}"
    own.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(own / "rbeed.sock"))
        listener.listen()
        assert cli.daemon_address(parse(["hive", "list"])) == f"unix:{own}/rbeed.sock"
        own.chmod(0o777)
        assert cli.daemon_address(parse(["hive", "list"])) == f"unix:{system}"
        own.chmod(0o700)
        if os.getuid() == 0:  # made by another user
            os.chown(own, 1234, -1)
            assert cli.daemon_address(parse(["hive", "list"])) == f"unix:{system}"


# -- input rbee cannot send, answers it cannot use, output it cannot write ----------------------


def test_a_body_over_the_daemons_limit_gets_its_413_not_a_broken_pipe(shared_daemon):
    done = rbee(shared_daemon, "submit", "-", stdin='{"operation": "hive_list", "x": "' + "a" * 1_500_000 + '"}')
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("rbee: error: the daemon refused the job: request body over 1048576 bytes"), done.stderr


def test_input_that_is_not_utf8_is_a_usage_error():
    prompt = subprocess.run([*argv("--url", "http://127.0.0.1:9", "infer", "-m", "m", "--raw", "-")], input=b"caf\xe9",
                            capture_output=True, timeout=TIMEOUT, env=cli_env(), cwd=ROOT)  # fmt: skip
    assert (prompt.returncode, prompt.stderr) == (2, b"rbee: error: standard input is not UTF-8 text (at byte 3)\n")
    argument = subprocess.run([*argv("--url", "http://127.0.0.1:9", "tokenize", "-m", "m"), b"\xff"],
                              capture_output=True, timeout=TIMEOUT, env=cli_env(), cwd=ROOT)  # fmt: skip
    assert argument.returncode == 2 and argument.stderr.endswith(b"error: argument text: not UTF-8 text\n")


@pytest.mark.parametrize("value", ["inf", "nan", "1e999"])
def test_a_number_option_must_be_finite(value):
    done = rbee(None, "--url", "http://127.0.0.1:9", "infer", "p", "-m", "m", "--temperature", value)
    assert done.returncode == 2 and done.stderr.endswith(f"argument --temperature: {value!r} is not a finite number\n")


async def test_what_a_daemon_sends_is_shown_with_its_control_characters_escaped():
    title = "\x1b]0;PWNED\x07\x1b[2J"
    async with serve_files() as server:
        ScriptedAPI(server, [play(sse(1, "narration", {"message": f"loading {title}"}),
                                  sse(2, "result", {"name": title, "size": 1}), sse(3, "end", "[DONE]"))])  # fmt: skip
        done = await arbee("--url", server.base_url, "submit", '{"operation": "model_get"}')
    assert "\x1b" not in done.stdout + done.stderr and "\x07" not in done.stdout + done.stderr
    assert "loading \\x1b]0;PWNED\\x07\\x1b[2J" in done.stderr
    assert fields_of(done.stdout)["name"].strip() == "\\x1b]0;PWNED\\x07\\x1b[2J"


@pytest.mark.parametrize("event", [
    sse(1, "token", {"t": 5, "i": 0}), sse(1, "gap", {"from": 1}), sse(1, "progress", {"done": 1, "total": 1e308, "rate": 1e-308}),
], ids=["token-not-text", "gap-without-ids", "progress-overflow"])  # fmt: skip
async def test_an_event_rbee_cannot_use_ends_it_with_an_error_not_a_traceback(event):
    async with serve_files() as server:
        ScriptedAPI(server, [play(event, sse(2, "end", "[DONE]"))])
        done = await arbee("--url", server.base_url, "infer", "p", "-m", "m", "--raw")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("rbee: error: the daemon sent an event rbee cannot use ("), done.stderr


async def test_output_the_locale_cannot_encode_is_escaped_and_a_full_disk_is_an_error():
    async with serve_files() as server:
        ScriptedAPI(server, [play(sse(1, "token", {"t": "caf\u00e9 \u2603", "i": 0}), sse(2, "end", "[DONE]"))] * 2)
        ascii_only = await arbee("--url", server.base_url, "infer", "p", "-m", "m", "--raw",
                                 env=cli_env(PYTHONIOENCODING="ascii"))  # fmt: skip
        assert (ascii_only.returncode, ascii_only.stdout) == (0, "caf\\xe9 \\u2603\n"), ascii_only.stderr
        with open("/dev/full", "w") as full:
            done = await trio.run_process(argv("--url", server.base_url, "infer", "p", "-m", "m", "--raw"), stdout=full,
                                          capture_stderr=True, check=False, env=cli_env(), cwd=ROOT)  # fmt: skip
    assert (done.returncode, done.stderr.decode()) == (1, "rbee: error: cannot write to standard output: no space left on device\n")


def test_a_relative_path_with_a_colon_is_a_path_when_the_file_is_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli._source("a:b.gguf") == "a:b.gguf"  # not there: taken for a URL, which the daemon refuses
    (tmp_path / "a:b.gguf").write_bytes(b"GGUF")
    assert cli._source("a:b.gguf") == str(tmp_path / "a:b.gguf")
    assert cli._source("hf:org/repo") == "hf:org/repo"


@pytest.mark.parametrize("value", ["-5", "x", "1.5"])
def test_job_follow_after_takes_an_event_id(value):
    done = rbee(None, "--url", "http://127.0.0.1:9", "job", "follow", "job-1", "--after", value)
    assert done.returncode == 2 and done.stderr.endswith(f"argument --after: {value!r} is not an event id (0, 1, 2 ...)\n")
