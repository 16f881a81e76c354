"""Hive operations: the catalog (persistent), /health probes of remote hives, start/stop commands."""

from __future__ import annotations

import json
import socket
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from rbeed import __version__
from rbeed import operations as ops
from rbeed.catalog import Catalog
from rbeed.config import HivesConfig, JobsConfig
from rbeed.hives import Hive, Hives
from rbeed.jobs import JobRegistry, JobState
from support import end_marker, narrations, result_of, run_job, start_daemon, submit

HEALTH_TIMEOUT = 0.5

# What a remote start/stop command might do, by host: print a line, fail with a status for "fails*".
HIVECTL = """\
echo "$2 on $1"
case "$1" in
  fails*) echo "unit rbeed.service not found" >&2; exit 3 ;;
esac
"""


@pytest.fixture(scope="module")
def hives_daemon(tmp_path_factory):
    base = tmp_path_factory.mktemp("hives")
    (base / "hivectl.sh").write_text(HIVECTL)
    config = f'[hives]\nhealth_timeout = {HEALTH_TIMEOUT}\nstart_command = "sh {base / "hivectl.sh"} {{ssh_host}} {{action}}"\n'
    d = start_daemon(base / "d", config=config)
    yield d
    assert d.stop() == 0, d.log()


def closed_port() -> int:
    """A loopback port nobody listens on (bound once, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@asynccontextmanager
async def fake_hive(reply: bytes | None):
    """A server on 127.0.0.1 answering every request with `reply`; None: accepts, never answers."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            received = b""
            while b"\r\n\r\n" not in received:
                if not (chunk := await stream.receive_some(4096)):
                    return
                received += chunk
            if reply is None:
                await trio.sleep_forever()
            await stream.send_all(reply)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, handle, listeners))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def assert_error(events, message: str) -> None:
    assert end_marker(events) == f"[ERROR] {message}", events
    assert not any("Traceback" in e.data or "internal error" in e.data for e in events)


# -- the catalog -------------------------------------------------------------------------------


async def test_localhost_is_always_listed_as_this_daemon(hives_daemon):
    async with hives_daemon.client() as client:
        listed = result_of(await run_job(client, {"operation": "hive_list"}))
        local = result_of(await run_job(client, {"operation": "hive_get", "id": "localhost"}))
    assert listed[0] == local
    assert local["id"] == "localhost" and local["local"] is True and local["online"] is True
    assert local["version"] == __version__ and local["pid"] == hives_daemon.proc.pid


async def test_create_get_update_list_delete(hives_daemon):
    port, other_port = closed_port(), closed_port()
    async with hives_daemon.client() as client:
        created = await run_job(client, {"operation": "hive_create", "id": "h-life", "host": "127.0.0.1", "port": port})
        got = result_of(await run_job(client, {"operation": "hive_get", "id": "h-life"}))
        updated = await run_job(client, {"operation": "hive_update", "id": "h-life", "port": other_port, "ssh_host": "ops@jump"})
        listed = result_of(await run_job(client, {"operation": "hive_list"}))
        deleted = await run_job(client, {"operation": "hive_delete", "id": "h-life"})
        after = await run_job(client, {"operation": "hive_get", "id": "h-life"})
        listed_after = result_of(await run_job(client, {"operation": "hive_list"}))
    assert narrations(created) == [f"hive h-life registered at 127.0.0.1:{port}"] and end_marker(created) == "[DONE]"
    record = result_of(created)
    assert record == {**got, "error": record["error"]}
    assert (record["id"], record["host"], record["port"], record["ssh_host"]) == ("h-life", "127.0.0.1", port, None)
    assert record["local"] is False and record["online"] is False
    assert narrations(updated) == ["hive h-life updated: port, ssh_host"]
    assert (result_of(updated)["port"], result_of(updated)["ssh_host"], result_of(updated)["host"]) == (other_port, "ops@jump", "127.0.0.1")
    assert [h for h in listed if h["id"] == "h-life"][0]["port"] == other_port
    assert narrations(deleted) == ["hive h-life deleted"] and result_of(deleted) == {"id": "h-life", "deleted": True}
    assert_error(after, "unknown hive 'h-life'")
    assert "h-life" not in [h["id"] for h in listed_after]


async def test_create_defaults_the_port_and_derives_the_id_from_the_host(hives_daemon):
    async with hives_daemon.client() as client:
        created = result_of(await run_job(client, {"operation": "hive_create", "host": "127.0.0.2"}))
        await run_job(client, {"operation": "hive_delete", "id": "127.0.0.2"})
    assert (created["id"], created["port"], created["ssh_host"]) == ("127.0.0.2", 8500, None)


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("a..b", "host 'a..b' is not a name or an IP address: each part between dots must be 1 to 63 letters, "
                 "digits, - or _, starting and ending with a letter or digit"),  # fmt: skip
        ("x" * 64 + ".lan", "is not a name or an IP address: each part between dots"),
        # A host is ssh_host's default: ssh would take a leading dash for an option.
        ("-oProxyCommand", "Expected `str` matching regex '^[A-Za-z0-9:][A-Za-z0-9._:-]*"),
        ("_x", "Expected `str` matching regex"),  # its derived id, _x, would be no id
        ("::1::2", "host '::1::2' is not a name or an IP address"),
    ],
    ids=["empty-label", "long-label", "leading-dash", "leading-underscore", "bad-ipv6"],
)
async def test_a_host_that_could_not_be_reached_is_refused(hives_daemon, host, message):
    async with hives_daemon.client() as client:
        response = await client.request("POST", "/v1/jobs", json={"operation": "hive_create", "host": host})
    assert response.status == 400 and message in response.json()["error"], response.json()


async def test_an_empty_ssh_host_removes_it_and_start_uses_the_host_again(hives_daemon):
    async with hives_daemon.client() as client:
        await run_job(client, {"operation": "hive_create", "id": "jump", "host": "10.0.0.9", "port": closed_port(),
                               "ssh_host": "ops@bastion"})  # fmt: skip
        via_bastion = await run_job(client, {"operation": "hive_start", "hive_id": "jump"})
        updated = result_of(await run_job(client, {"operation": "hive_update", "id": "jump", "ssh_host": ""}))
        direct = await run_job(client, {"operation": "hive_start", "hive_id": "jump"})
        await run_job(client, {"operation": "hive_delete", "id": "jump"})
    assert "start on ops@bastion" in narrations(via_bastion)
    assert updated["ssh_host"] is None and "start on 10.0.0.9" in narrations(direct)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"operation": "hive_create", "id": "dup", "host": "127.0.0.1"}, "hive 'dup' already exists"),
        ({"operation": "hive_create", "id": "localhost", "host": "127.0.0.1"}, "hive 'localhost' already exists"),
        ({"operation": "hive_create", "host": "localhost"}, "hive 'localhost' already exists"),
        ({"operation": "hive_get", "id": "ghost"}, "unknown hive 'ghost'"),
        ({"operation": "hive_update", "id": "ghost", "port": 1}, "unknown hive 'ghost'"),
        ({"operation": "hive_delete", "id": "ghost"}, "unknown hive 'ghost'"),
        ({"operation": "hive_update", "id": "localhost", "port": 1}, "hive 'localhost' is this daemon and cannot be changed"),
        ({"operation": "hive_delete", "id": "localhost"}, "hive 'localhost' is this daemon and cannot be deleted"),
        ({"operation": "hive_start", "hive_id": "ghost"}, "unknown hive 'ghost'"),
        ({"operation": "hive_stop", "hive_id": "ghost"}, "unknown hive 'ghost'"),
    ],
    ids=["duplicate", "create-localhost", "create-localhost-by-host", "get-unknown", "update-unknown",
         "delete-unknown", "update-localhost", "delete-localhost", "start-unknown", "stop-unknown"],  # fmt: skip
)
async def test_refused_hive_operations_end_with_a_clear_error(hives_daemon, payload, message):
    async with hives_daemon.client() as client:
        first = await run_job(client, {"operation": "hive_create", "id": "dup", "host": "127.0.0.1", "port": closed_port()})
        assert end_marker(first) in ("[DONE]", "[ERROR] hive 'dup' already exists")
        events = await run_job(client, payload)
        job = (await client.request("GET", "/v1/jobs?state=failed")).json()[0]
    assert_error(events, message)
    assert (job["state"], job["error"]) == ("failed", message)


async def run_jobs_at_once(daemon, payloads: list[dict]) -> list[list]:
    """Submit every job, then stream them all at the same time, each on its own connection."""
    async with daemon.client() as client:
        job_ids = [await submit(client, payload) for payload in payloads]
    results: list[list] = [[] for _ in job_ids]

    async def follow(index: int) -> None:
        async with daemon.client() as own:
            async with own.stream("GET", f"/v1/jobs/{job_ids[index]}/stream") as response:
                results[index] = [event async for event in response.aiter_sse()]

    async with trio.open_nursery() as nursery:
        for index in range(len(job_ids)):
            nursery.start_soon(follow, index)
    return results


async def test_concurrent_creates_or_deletes_of_one_id_succeed_once(hives_daemon):
    create = {"operation": "hive_create", "id": "twin", "host": "127.0.0.1", "port": closed_port()}
    created = await run_jobs_at_once(hives_daemon, [create] * 4)
    deleted = await run_jobs_at_once(hives_daemon, [{"operation": "hive_delete", "id": "twin"}] * 3)
    assert sorted(map(end_marker, created)) == ["[DONE]"] + ["[ERROR] hive 'twin' already exists"] * 3
    assert sorted(map(end_marker, deleted)) == ["[DONE]"] + ["[ERROR] unknown hive 'twin'"] * 2


async def test_the_catalog_survives_a_restart(tmp_path):
    base = tmp_path / "d"
    daemon = start_daemon(base)
    try:
        async with daemon.client() as client:
            await run_job(client, {"operation": "hive_create", "id": "kept", "host": "10.0.0.7", "port": 8600, "ssh_host": "ops"})
            await run_job(client, {"operation": "hive_create", "id": "dropped", "host": "10.0.0.8"})
            await run_job(client, {"operation": "hive_update", "id": "kept", "port": 8601})
            await run_job(client, {"operation": "hive_delete", "id": "dropped"})
    finally:
        assert daemon.stop() == 0
    daemon = start_daemon(base)
    try:
        async with daemon.client() as client:
            listed = result_of(await run_job(client, {"operation": "hive_list"}))
    finally:
        assert daemon.stop() == 0
    assert [(h["id"], h["host"], h["port"], h["ssh_host"]) for h in listed] == [
        ("localhost", "localhost", None, None),
        ("kept", "10.0.0.7", 8601, "ops"),
    ]


# -- health of remote hives ---------------------------------------------------------------------


async def test_a_second_real_daemon_is_online_with_its_version(hives_daemon, shared_daemon):
    async with hives_daemon.client() as client:
        payload = {"operation": "hive_create", "id": "peer", "host": "127.0.0.1", "port": shared_daemon.port}
        created = result_of(await run_job(client, payload))
        got = result_of(await run_job(client, {"operation": "hive_get", "id": "peer"}))
        listed = result_of(await run_job(client, {"operation": "hive_list"}))
        await run_job(client, {"operation": "hive_delete", "id": "peer"})
    for record in (created, got, [h for h in listed if h["id"] == "peer"][0]):
        assert record["online"] is True and record["version"] == __version__ and "error" not in record


async def test_a_dead_port_is_offline_with_an_error(hives_daemon):
    port = closed_port()
    async with hives_daemon.client() as client:
        await run_job(client, {"operation": "hive_create", "id": "dead", "host": "127.0.0.1", "port": port})
        got = result_of(await run_job(client, {"operation": "hive_get", "id": "dead"}))
        await run_job(client, {"operation": "hive_delete", "id": "dead"})
    assert got["online"] is False and "version" not in got
    assert got["error"] == f"cannot connect to http://127.0.0.1:{port}: connection refused"


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 0\r\n\r\n", "/health answered 500"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]", "/health answered 200 but not with a JSON object"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnope", "invalid JSON body"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "bad response"),
    ],
    ids=["500", "json-array", "not-json", "not-http"],
)
async def test_a_hive_answering_nonsense_is_offline_with_an_error(hives_daemon, reply, error):
    async with fake_hive(reply) as port, hives_daemon.client() as client:
        await run_job(client, {"operation": "hive_create", "id": "odd", "host": "127.0.0.1", "port": closed_port()})
        await run_job(client, {"operation": "hive_update", "id": "odd", "port": port})
        got = await run_job(client, {"operation": "hive_get", "id": "odd"})
        listed = await run_job(client, {"operation": "hive_list"})
        await run_job(client, {"operation": "hive_delete", "id": "odd"})
    assert end_marker(got) == end_marker(listed) == "[DONE]"
    for record in (result_of(got), [h for h in result_of(listed) if h["id"] == "odd"][0]):
        assert record["online"] is False and error in record["error"], record


async def test_health_probes_run_concurrently_and_time_out(hives_daemon):
    async with fake_hive(None) as port, hives_daemon.client() as client:
        await run_jobs_at_once(hives_daemon, [{"operation": "hive_create", "id": f"mute{n}", "host": "127.0.0.1", "port": port} for n in range(3)])
        start = trio.current_time()
        with trio.fail_after(HEALTH_TIMEOUT * 2.8):  # one after another would take 3 × 0.5 s
            listed = result_of(await run_job(client, {"operation": "hive_list"}))
        took = trio.current_time() - start
        for n in range(3):
            await run_job(client, {"operation": "hive_delete", "id": f"mute{n}"})
    mute = [h for h in listed if h["id"].startswith("mute")]
    assert len(mute) == 3 and took >= HEALTH_TIMEOUT * 0.9
    for record in mute:
        assert record["online"] is False and record["error"] == f"no answer within {HEALTH_TIMEOUT:g} s"


# -- start and stop ----------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["start", "stop"])
async def test_local_start_and_stop_say_this_daemon_is_the_local_hive(hives_daemon, action):
    async with hives_daemon.client() as client:
        events = await run_job(client, {"operation": f"hive_{action}"})
    assert narrations(events) == [f"hive localhost is this daemon (pid {hives_daemon.proc.pid}); it is running"]
    assert result_of(events) == {"id": "localhost", "action": action, "running": True, "local": True}
    assert end_marker(events) == "[DONE]"


@pytest.mark.parametrize("action", ["start", "stop"])
async def test_remote_start_and_stop_narrate_the_command_output(hives_daemon, action):
    async with hives_daemon.client() as client:
        await run_job(client, {"operation": "hive_create", "id": "box", "host": "127.0.0.1", "port": closed_port(), "ssh_host": "box.lan"})
        events = await run_job(client, {"operation": f"hive_{action}", "hive_id": "box"})
        plain = await run_job(client, {"operation": "hive_create", "id": "plain", "host": "127.0.0.9", "port": closed_port()})
        plain_events = await run_job(client, {"operation": f"hive_{action}", "hive_id": "plain"})
        for hive_id in ("box", "plain"):
            await run_job(client, {"operation": "hive_delete", "id": hive_id})
    told = [json.loads(e.data) for e in events if e.event == "narration"]
    assert told[0]["message"].startswith("$ sh ") and told[0]["message"].endswith(f"hivectl.sh box.lan {action}")
    assert told[1:] == [{"message": f"{action} on box.lan", "stream": "output"}]
    assert result_of(events) == {"id": "box", "action": action, "local": False} and end_marker(events) == "[DONE]"
    assert end_marker(plain) == "[DONE]" and narrations(plain_events)[1:] == [f"{action} on 127.0.0.9"]  # ssh_host: the host


async def test_a_failing_command_ends_with_its_exit_status(hives_daemon):
    async with hives_daemon.client() as client:
        await run_job(client, {"operation": "hive_create", "id": "bad", "host": "127.0.0.1", "port": closed_port(), "ssh_host": "fails.lan"})
        events = await run_job(client, {"operation": "hive_stop", "hive_id": "bad"})
        await run_job(client, {"operation": "hive_delete", "id": "bad"})
    assert narrations(events)[1:] == ["stop on fails.lan", "unit rbeed.service not found"]  # stderr too
    assert "result" not in [e.event for e in events]
    assert_error(events, "stop of hive bad failed: command exited with status 3")


async def test_a_missing_command_binary_is_a_clear_error(tmp_path):
    daemon = start_daemon(tmp_path / "d", config='[hives]\nstart_command = "/nonexistent/rbee-hivectl {action} {ssh_host}"\n')
    try:
        async with daemon.client() as client:
            await run_job(client, {"operation": "hive_create", "id": "far", "host": "127.0.0.1", "port": closed_port()})
            events = await run_job(client, {"operation": "hive_start", "hive_id": "far"})
    finally:
        assert daemon.stop() == 0
    assert narrations(events) == ["$ /nonexistent/rbee-hivectl start 127.0.0.1"]
    assert_error(events, "cannot run /nonexistent/rbee-hivectl: No such file or directory")


@pytest.mark.parametrize("command", ["ssh {user}@{ssh_host} {action}", "echo {", "echo {0}", "sh -c 'unbalanced", "", "   "])
async def test_an_unusable_start_command_is_a_clear_error(tmp_path, command):
    """In process: a config mistake in [hives] start_command fails the job, naming the setting."""
    catalog = Catalog(tmp_path / "catalog.sqlite3", "hives", Hive)
    await catalog.open()
    try:
        await catalog.put("far", Hive("far", "127.0.0.1", closed_port()))
        registry = JobRegistry(JobsConfig(), Hives(catalog, HivesConfig(start_command=command)).start)
        async with trio.open_nursery() as nursery:
            await nursery.start(registry.run)
            job = registry.create(ops.HiveStart(hive_id="far"))
            registry.start(job)
            with trio.fail_after(5):
                while not job.finished:
                    await registry.changed.wait()
            nursery.cancel_scope.cancel()
    finally:
        await catalog.close()
    assert job.state is JobState.FAILED
    assert job.error.startswith(f"[hives] start_command {command!r} is unusable: "), job.error
