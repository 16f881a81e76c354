"""The job API over real sockets: create, validate, stream, resume, gaps, list, cancel, expiry."""

from __future__ import annotations

import json
import re
import uuid
from contextlib import asynccontextmanager

import msgspec
import pytest
import trio

from rbeed import __version__
from rbeed import operations as ops
from rbeed.api import JobAPI
from rbeed.config import JobsConfig
from rbeed.jobs import JobRegistry, JobState
from rbeed.ollama import _Generate, _Reply
from rbeed.server import Request
from support import (
    SLOW_HIVE,
    SLOW_JOB,
    end_marker,
    is_narration,
    parse_sse,
    read_events_until,
    result_of,
    run_job,
    slow_hive_config,
    start_daemon,
    submit,
)

KEEPALIVE = 0.2  # [server] sse_keepalive of the api daemon
TTL = 2.0  # [jobs] unstreamed_ttl and finished_ttl of the small daemon: room for a few exchanges

OPERATIONS = {
    "hive_start": {},
    "hive_stop": {},
    "hive_list": {},
    "hive_get": {"id": "localhost"},
    "hive_create": {"host": "example.org"},
    "hive_update": {"id": "h1"},
    "hive_delete": {"id": "h1"},
    "worker_spawn": {"model": "m"},
    "worker_list": {},
    "worker_get": {"id": "w1"},
    "worker_delete": {"id": "w1"},
    "model_download": {"model": "hf:owner/repo/file.gguf"},
    "model_list": {},
    "model_get": {"id": "m"},
    "model_copy": {"id": "m", "to": "n"},
    "model_delete": {"id": "m"},
    "infer": {"model": "m", "prompt": "hi"},
    "embed": {"model": "m", "input": "hi"},  # beyond the seed's 16: Ollama's and OpenAI's embeddings
    "tokenize": {"model": "m", "text": "hi"},  # and llama-server's /tokenize, /detokenize
    "detokenize": {"model": "m", "tokens": [1]},
}


@pytest.fixture(scope="module")
def api_daemon(tmp_path_factory):
    d = start_daemon(tmp_path_factory.mktemp("api"), config=slow_hive_config(f"[server]\nsse_keepalive = {KEEPALIVE}\n"))
    yield d
    assert d.stop() == 0, d.log()


@pytest.fixture(scope="module")
def small_daemon(tmp_path_factory):
    """Tiny replay buffer and TTLs; its remote hive_start prints six lines, then runs until cancelled."""
    config = (
        '[hives]\nstart_command = "sh -c \'for i in 1 2 3 4 5 6; do echo line $i; done; exec sleep 30\'"\n'
        f"[jobs]\nevent_buffer = 4\nunstreamed_ttl = {TTL}\nfinished_ttl = {TTL}\n"
    )
    d = start_daemon(tmp_path_factory.mktemp("small"), config=config)
    yield d
    assert d.stop() == 0, d.log()


async def slow_job(client) -> str:
    """A queued hive_start of the "slow" hive (registered on first use)."""
    events = await run_job(client, SLOW_HIVE)
    assert end_marker(events) in ("[DONE]", "[ERROR] hive 'slow' already exists"), events
    return await submit(client, SLOW_JOB)


async def status_of(client, job_id: str) -> dict:
    response = await client.request("GET", f"/v1/jobs/{job_id}")
    assert response.status == 200, response.content
    return response.json()


# -- creating jobs -----------------------------------------------------------------------------


async def test_health(shared_daemon):
    async with shared_daemon.client() as client:
        response = await client.request("GET", "/health")
    assert response.status == 200 and response.json() == {"status": "ok", "version": __version__}


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain", "application/x-www-form-urlencoded", "image/png"])
async def test_create_answers_201_with_a_uuid4_job_id_and_its_stream_url_whatever_the_content_type(shared_daemon, content_type):
    headers = {"content-type": content_type} if content_type else {}
    async with shared_daemon.client() as client:
        response = await client.request("POST", "/v1/jobs", body=b'{"operation": "hive_list"}', headers=headers)
        assert response.status == 201, response.content
        reply = response.json()
        assert set(reply) == {"job_id", "sse_url"}
        job_id = reply["job_id"]
        assert job_id.startswith("job-") and uuid.UUID(job_id.removeprefix("job-")).version == 4
        assert str(uuid.UUID(job_id.removeprefix("job-"))) == job_id.removeprefix("job-")
        assert reply["sse_url"] == f"/v1/jobs/{job_id}/stream"
        assert (await status_of(client, job_id))["operation"] == "hive_list"


def test_there_are_the_16_operations_and_embed_and_hive_id_defaults_to_localhost():
    assert sorted(ops.NAMES) == sorted(OPERATIONS)
    for name, fields in OPERATIONS.items():
        operation = ops.decode(json.dumps({"operation": name, **fields}).encode())
        assert operation.name == name
        if name not in ("hive_list", "hive_get", "hive_create", "hive_update", "hive_delete"):
            assert operation.hive_id == "localhost", name


async def test_every_operation_is_accepted(shared_daemon):
    async with shared_daemon.client() as client:
        for name, fields in OPERATIONS.items():
            job_id = await submit(client, {"operation": name, **fields})
            status = await status_of(client, job_id)
            assert (status["operation"], status["state"]) == (name, "queued")


def _infer(**fields) -> dict:
    return {"operation": "infer", "model": "m", "prompt": "p", **fields}


BAD_PAYLOADS = [
    (b"{", ["malformed JSON"]),
    (b"", ["malformed JSON"]),
    (b'{"operation": "hive_list"} trailing', ["malformed JSON"]),
    (b'{"operation": "hive_l\xa9"}', ["malformed JSON", "not valid UTF-8"]),  # msgspec raises UnicodeDecodeError
    (b'{"operation": "infer", "model": "m", "prompt": "\xff\xfe"}', ["malformed JSON"]),
    (b"[]", ["Expected `object`, got `array`"]),
    (b'{"operation": "infer", "format": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, ["JSON nested too deeply"]),
    ({}, ["missing required field `operation`", "valid operations: "] + list(OPERATIONS)),
    ({"operation": "nope"}, ["'nope'", "$.operation", "valid operations: "] + list(OPERATIONS)),
    ({"operation": 5}, ["Expected `str`", "$.operation", "valid operations: "]),
    (_infer(max_tokens=0), [">= 1", "at `$.max_tokens`"]),
    (_infer(seed=2**32 - 1), ["<= 4294967294", "at `$.seed`"]),  # llama.cpp's "random"
    (_infer(max_tokens="10"), ["Expected `int | null`, got `str`", "at `$.max_tokens`"]),
    (_infer(max_tokens=1.5), ["Expected `int | null`, got `float`", "at `$.max_tokens`"]),
    (_infer(temperature=-0.1), [">= 0", "at `$.temperature`"]),
    (_infer(top_p=-0.1), [">= 0", "at `$.top_p`"]),
    (_infer(top_p=1.01), ["<= 1", "at `$.top_p`"]),
    (_infer(top_k=-1), [">= 0", "at `$.top_k`"]),
    (_infer(min_p=1.5), ["<= 1", "at `$.min_p`"]),
    (_infer(repeat_penalty=0), ["> 0", "at `$.repeat_penalty`"]),
    (_infer(presence_penalty=2.5), ["<= 2", "at `$.presence_penalty`"]),
    (_infer(frequency_penalty=-3), [">= -2", "at `$.frequency_penalty`"]),
    (_infer(stop=["ok", ""]), ["at `$.stop[1]`"]),
    (_infer(format="xml"), ["'xml'", "at `$.format`"]),
    (_infer(format=["json"]), ["Expected `str | object | null`, got `array`", "at `$.format`"]),
    (_infer(format={"type": "decimal"}), ["`format`: cannot make a grammar of this JSON Schema", "'decimal'"]),
    (_infer(format={"type": "string", "pattern": "^a{2000}$"}), ["`format`: pattern", "beyond 1000"]),
    (_infer(format={"items": {"type": "array", "maxItems": 10**9}}), ["`format`: maxItems 1000000000 goes beyond 1000"]),
    (_infer(format={"properties": {"age": {"type": "integer", "minimum": 0}}}), ["cannot hold the output to 'minimum'"]),
    (_infer(grammar=""), ["length >= 1", "at `$.grammar`"]),
    (_infer(grammar="root ::= answer"), ["`grammar`: Undefined rule identifier 'answer'"]),
    (_infer(grammar='root ::= "a"{3,1}'), ["`grammar`: repetition {3,1}: the most is fewer than the least"]),
    (_infer(grammar='root ::= "a"', format="json"), ["give `format` or `grammar`, not both"]),
    (_infer(prompt=None), ["give `prompt` (text to continue) or `messages` (a chat)"]),
    (_infer(prompt=5), ["Expected `str | null`, got `int`", "at `$.prompt`"]),
    (_infer(messages=[{"role": "user", "content": "hi"}]), ["give `prompt` or `messages`, not both"]),
    (_infer(prompt=None, messages=[]), ["length >= 1", "at `$.messages`"]),
    (_infer(prompt=None, messages=[{"role": "bot", "content": "hi"}]), ["'bot'", "at `$.messages[0].role`"]),
    (_infer(prompt=None, messages=[{"role": "user"}]), ["missing required field `content`", "at `$.messages[0]`"]),
    (_infer(prompt=None, messages=[{"role": "user", "content": "x", "name": "n"}]), ["unknown field `name`"]),
    ({"operation": "infer", "prompt": "p"}, ["missing required field `model`"]),
    ({"operation": "embed", "model": "m"}, ["missing required field `input`"]),
    ({"operation": "embed", "model": "m", "input": ["a", ""]}, ["length >= 1", "at `$.input[1]`"]),
    ({"operation": "embed", "model": "m", "input": ["a", 5]}, ["Expected `str`, got `int`", "at `$.input[1]`"]),
    ({"operation": "embed", "model": "m", "input": "a", "dimensions": 0}, [">= 1", "at `$.dimensions`"]),
    ({"operation": "embed", "model": "m", "input": ["a"] * 2049}, ["length <= 2048", "at `$.input`"]),
    ({"operation": "hive_list", "bogus": 1}, ["unknown field `bogus`"]),
    (_infer(options={"x": 1}), ["unknown field `options`"]),
    ({"operation": "hive_get", "id": "../x"}, ["at `$.id`"]),
    ({"operation": "model_get", "id": "../../etc/passwd"}, ["at `$.id`"]),
    ({"operation": "model_delete", "id": "a/b"}, ["at `$.id`"]),
    ({"operation": "model_copy", "id": "m", "to": "../m"}, ["at `$.to`"]),
    ({"operation": "model_copy", "id": "m"}, ["missing required field `to`"]),
    ({"operation": "model_copy", "id": "m", "to": "n", "defaults": {"temperature": -1}}, ["at `$.defaults.temperature`"]),
    ({"operation": "model_copy", "id": "m", "to": "n", "defaults": {"num_predict": 3}}, ["unknown field `num_predict`"]),
    ({"operation": "model_copy", "id": "m", "to": "n", "system": 7}, ["Expected `str | null`", "at `$.system`"]),
    ({"operation": "hive_create", "host": "h", "id": ".hidden"}, ["at `$.id`"]),
    ({"operation": "hive_create", "host": "h/../x"}, ["at `$.host`"]),
    # They would make no URL: forwarding a job to the hive failed with an internal error.
    ({"operation": "hive_create", "host": "[[::1]]"}, ["at `$.host`"]),
    ({"operation": "hive_update", "id": "h", "host": "::::"}, ["host '::::' is not a name or an IP address"]),
    ({"operation": "hive_update", "id": "h", "ssh_host": "-oProxyCommand"}, ["at `$.ssh_host`"]),  # not an option
    ({"operation": "hive_create", "host": "h", "port": 70000}, ["<= 65535", "at `$.port`"]),
    ({"operation": "hive_start", "hive_id": "../.."}, ["at `$.hive_id`"]),
    ({"operation": "worker_spawn", "model": "../m"}, ["at `$.model`"]),
    ({"operation": "worker_list", "hive_id": ""}, ["at `$.hive_id`"]),
]


@pytest.mark.parametrize(("payload", "expected"), BAD_PAYLOADS, ids=range(len(BAD_PAYLOADS)))
async def test_a_bad_payload_gets_400_naming_the_problem_and_the_field(shared_daemon, payload, expected):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    async with shared_daemon.client() as client:
        response = await client.request("POST", "/v1/jobs", body=body)
    assert response.status == 400 and response.headers["content-type"] == "application/json"
    message = response.json()["error"]
    for part in expected:
        assert part in message, (part, message)


async def test_a_full_registry_answers_503():
    registry = JobRegistry(JobsConfig(max_jobs=1), handler=None)
    api = JobAPI(registry)
    request = Request("POST", "/v1/jobs", {}, {}, b'{"operation": "hive_list"}')
    assert (await api(request)).status == 201
    refused = await api(request)
    assert refused.status == 503 and msgspec.json.decode(refused.body) == {"error": "1 jobs queued or running; try again later"}


async def test_a_post_past_the_unstreamed_byte_budget_answers_503_naming_it():
    body = b'{"operation": "hive_list"}'
    api = JobAPI(JobRegistry(JobsConfig(max_unstreamed_bytes=2 * len(body) + 1), handler=None))
    request = Request("POST", "/v1/jobs", {}, {}, body)
    assert [(await api(request)).status for _ in range(2)] == [201, 201]
    refused = await api(request)
    assert refused.status == 503 and msgspec.json.decode(refused.body) == {
        "error": f"jobs not yet streamed hold {2 * len(body)} bytes of payload; stream or delete them, or try again later"}


# -- streaming ---------------------------------------------------------------------------------


async def test_a_job_runs_only_once_streamed(shared_daemon):
    async with shared_daemon.client() as client:
        job_id = await submit(client, {"operation": "hive_list"})
        before = await status_of(client, job_id)
        await run_job(client, {"operation": "hive_list"})  # other jobs run meanwhile; ours waits
        assert (await status_of(client, job_id))["state"] == "queued"
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
            events = [event async for event in response.aiter_sse()]
        after = await status_of(client, job_id)
    assert set(before) == {"job_id", "operation", "state", "error", "created_at", "started_at", "finished_at"}
    assert (before["job_id"], before["operation"], before["state"]) == (job_id, "hive_list", "queued")
    assert before["started_at"] is None and before["finished_at"] is None and before["error"] is None
    assert end_marker(events) == "[DONE]" and result_of(events)[0]["id"] == "localhost"
    assert after["state"] == "completed" and after["created_at"] == before["created_at"]
    assert before["created_at"] <= after["started_at"] <= after["finished_at"]


async def test_events_have_ids_names_and_one_json_data_line(shared_daemon):
    async with shared_daemon.client() as client:
        job_id = await submit(client, {"operation": "hive_list"})
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
            assert response.headers["content-type"] == "text/event-stream"
            raw = (await response.aread()).decode()
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and all(blocks[:-1])
    for number, block in enumerate(blocks[:-1], start=1):
        id_line, event_line, data_line = block.split("\n")  # exactly three lines each
        assert id_line == f"id: {number}" and event_line.startswith("event: ") and data_line.startswith("data: ")
        if event_line != "event: end":
            json.loads(data_line.removeprefix("data: "))
    assert blocks[-2].endswith("event: end\ndata: [DONE]")


async def test_a_failed_job_ends_with_the_error_and_reports_it(shared_daemon):
    async with shared_daemon.client() as client:
        job_id = await submit(client, {"operation": "hive_get", "id": "nowhere"})
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
            events = [event async for event in response.aiter_sse()]
        status = await status_of(client, job_id)
    assert end_marker(events) == "[ERROR] unknown hive 'nowhere'"
    assert (status["state"], status["error"]) == ("failed", "unknown hive 'nowhere'")


async def test_another_stream_replays_the_kept_events_and_last_event_id_skips(shared_daemon):
    async with shared_daemon.client() as client:
        job_id = await submit(client, {"operation": "hive_list"})
        url = f"/v1/jobs/{job_id}/stream"
        bodies = []
        for headers in ({}, {}, {"last-event-id": "1"}, {"last-event-id": "3"}, {"last-event-id": "99"}):
            async with client.stream("GET", url, headers=headers) as response:
                assert response.status == 200
                bodies.append((await response.aread()).decode())
        bad = await client.request("GET", url, headers={"last-event-id": "one"})
        # Past what int() reads (4,300 digits): refused before the job starts, which no stream would then end.
        unread = await submit(client, {"operation": "hive_list"})
        huge = await client.request("GET", f"/v1/jobs/{unread}/stream", headers={"last-event-id": "9" * 4301})
        assert huge.status == 400 and "Last-Event-ID must be an event id, got '99999" in huge.json()["error"]
        assert (await status_of(client, unread))["state"] == "queued"
    first, replay, after_1, after_3, after_99 = (parse_sse(body) for body in bodies)
    assert [e["id"] for e in first] == ["1", "2", "3"] and replay == first
    assert after_1 == first[1:] and after_3 == [] and after_99 == []
    assert bad.status == 400 and "Last-Event-ID" in bad.json()["error"]


async def test_unknown_jobs_are_404(shared_daemon):
    async with shared_daemon.client() as client:
        for method, path in (("GET", "/v1/jobs/job-x"), ("GET", "/v1/jobs/job-x/stream"), ("DELETE", "/v1/jobs/job-x")):
            response = await client.request(method, path)
            assert response.status == 404 and response.json() == {"error": "unknown job 'job-x'"}


async def test_resume_with_last_event_id_replays_then_follows_live_events(api_daemon):
    async with api_daemon.client() as client, api_daemon.client() as second, api_daemon.client() as third:
        job_id = await slow_job(client)
        url = f"/v1/jobs/{job_id}/stream"
        async with client.stream("GET", url) as first_response:
            first = first_response.aiter_sse()
            with trio.fail_after(10):
                seen = await read_events_until(first, is_narration("starting 127.0.0.1 start"))
            assert [e.id for e in seen] == ["1", "2"] and json.loads(seen[0].data)["message"].startswith("$ sh -c")
            async with second.stream("GET", url, headers={"last-event-id": "1"}) as second_response:
                resumed = second_response.aiter_sse()
                with trio.fail_after(10):
                    replayed = await read_events_until(resumed, is_narration("starting 127.0.0.1 start"))
                    cancel = await third.request("DELETE", f"/v1/jobs/{job_id}")
                    first_rest = [event async for event in first]
                    resumed_rest = [event async for event in resumed]
    assert [e.id for e in replayed] == ["2"] and replayed[0].data == seen[1].data
    assert cancel.status == 200 and cancel.json()["job_id"] == job_id
    assert end_marker(first_rest) == end_marker(resumed_rest) == "[CANCELLED]"
    assert first_rest[-1].id == resumed_rest[-1].id == "3"


async def test_an_idle_stream_gets_keep_alive_comments(api_daemon):
    async with api_daemon.client() as client, api_daemon.client() as other:
        job_id = await slow_job(client)
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
            chunks = response.aiter_bytes()
            received = b""
            with trio.fail_after(10):
                while b'"message":"starting 127.0.0.1 start"' not in received:
                    received += await chunks.__anext__()
                idle_from = trio.current_time()
                idle = b""
                while idle.count(b": keep-alive\n\n") < 2:
                    idle += await chunks.__anext__()
                idle_for = trio.current_time() - idle_from
                await other.request("DELETE", f"/v1/jobs/{job_id}")
                async for chunk in chunks:
                    received += chunk
    assert idle.replace(b": keep-alive\n\n", b"") == b""  # nothing else while the job is quiet
    assert idle_for >= 2 * KEEPALIVE * 0.75
    assert parse_sse(received.decode())[-1]["data"] == "[CANCELLED]"


@asynccontextmanager
async def streamed_to_line_6(client):
    """A small_daemon slow job streamed until its last line (then quiet): (job id, stream url, events)."""
    job_id = await slow_job(client)
    url = f"/v1/jobs/{job_id}/stream"
    async with client.stream("GET", url) as response:
        with trio.fail_after(10):
            yield job_id, url, await read_events_until(response.aiter_sse(), is_narration("line 6"))


async def test_a_stream_with_nothing_to_say_yet_still_gets_its_head_at_once(small_daemon):
    # The head waits for the first event, or a tenth of a second; not for the 15 s keep-alive.
    async with small_daemon.client() as client, small_daemon.client() as resumed, small_daemon.client() as other:
        async with streamed_to_line_6(client) as (job_id, url, seen):
            with trio.fail_after(2):
                async with resumed.stream("GET", url, headers={"Last-Event-ID": seen[-1].id}) as quiet:
                    assert quiet.status == 200 and quiet.headers["content-type"] == "text/event-stream"
                    await other.request("DELETE", f"/v1/jobs/{job_id}")
                    rest = [event async for event in quiet.aiter_sse()]
    assert [event.data for event in rest] == ["[CANCELLED]"]


async def test_a_late_reader_gets_a_gap_for_events_out_of_the_buffer(small_daemon):
    async with small_daemon.client() as client, small_daemon.client() as late, small_daemon.client() as other:
        async with streamed_to_line_6(client) as (job_id, url, live):
            assert [e.id for e in live] == [str(n) for n in range(1, 8)]  # "$ command", line 1..6
            bodies = {}
            for after in ("0", "1", "2", "3", "5"):
                async with late.stream("GET", url, headers={"last-event-id": after}) as replay:
                    with trio.fail_after(10):
                        bodies[after] = await read_events_until(replay.aiter_sse(), is_narration("line 6"))
            await other.request("DELETE", f"/v1/jobs/{job_id}")
    # Buffer of 4: ids 4..7 are kept.
    for after, missed_from in (("0", 1), ("1", 2), ("2", 3)):
        gap, *events = bodies[after]
        assert gap.event == "gap" and json.loads(gap.data) == {"missed_from": missed_from, "missed_to": 3}
        assert [e.id for e in events] == ["4", "5", "6", "7"]
    assert [e.id for e in bodies["3"]] == ["4", "5", "6", "7"]
    assert [e.id for e in bodies["5"]] == ["6", "7"]


# -- listing, cancelling, expiry ---------------------------------------------------------------


async def test_list_is_newest_first_and_filters_by_state(shared_daemon):
    async with shared_daemon.client() as client:
        done = await submit(client, {"operation": "hive_list"})
        async with client.stream("GET", f"/v1/jobs/{done}/stream") as response:
            await response.aread()
        created = [await submit(client, {"operation": "hive_list"}) for _ in range(3)]
        everything = (await client.request("GET", "/v1/jobs")).json()
        queued = (await client.request("GET", "/v1/jobs?state=queued")).json()
        completed = (await client.request("GET", "/v1/jobs?state=completed")).json()
        bad = await client.request("GET", "/v1/jobs?state=sleeping")
    ids = [job["job_id"] for job in everything]
    assert ids.index(created[2]) < ids.index(created[1]) < ids.index(created[0]) < ids.index(done)
    assert all(set(job) == {"job_id", "operation", "state", "error", "created_at", "started_at", "finished_at"} for job in everything)
    assert {job["state"] for job in queued} == {"queued"} and set(created) <= {job["job_id"] for job in queued}
    assert {job["state"] for job in completed} == {"completed"} and done in {job["job_id"] for job in completed}
    assert bad.status == 400
    assert "'sleeping'" in bad.json()["error"] and "queued, running, completed, failed, cancelled" in bad.json()["error"]


async def test_delete_cancels_a_queued_job(shared_daemon):
    async with shared_daemon.client() as client:
        job_id = await submit(client, {"operation": "hive_list"})
        response = await client.request("DELETE", f"/v1/jobs/{job_id}")
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as stream:
            events = [event async for event in stream.aiter_sse()]
        again = await client.request("DELETE", f"/v1/jobs/{job_id}")
    assert response.status == 200 and response.json()["state"] == "cancelled"
    assert [(e.id, e.event, e.data) for e in events] == [("1", "end", "[CANCELLED]")]
    assert again.status == 409 and again.json() == {"error": f"job {job_id} already cancelled"}


async def test_delete_cancels_a_running_job_and_its_stream_ends_cancelled(api_daemon):
    async with api_daemon.client() as client, api_daemon.client() as other:
        job_id = await slow_job(client)
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
            events = response.aiter_sse()
            with trio.fail_after(10):
                await read_events_until(events, is_narration("starting 127.0.0.1 start"))
                assert (await status_of(other, job_id))["state"] == "running"
                cancel = await other.request("DELETE", f"/v1/jobs/{job_id}")
                rest = [event async for event in events]
        status = await status_of(other, job_id)
    assert cancel.status == 200 and end_marker(rest) == "[CANCELLED]"
    assert status["state"] == "cancelled" and status["finished_at"] is not None


async def test_the_journal_gets_a_line_per_finished_job_but_not_for_lists_and_gets(shared_daemon):
    async with shared_daemon.client() as client:

        async def finish(payload: dict) -> str:
            job_id = await submit(client, payload)
            async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
                await response.aread()
            return job_id

        created = await finish({"operation": "hive_create", "id": "journal", "host": "127.0.0.1"})
        listed = await finish({"operation": "hive_list"})
        failed = await finish({"operation": "hive_get", "id": "absent"})
        deleted = await finish({"operation": "hive_delete", "id": "journal"})
        cancelled = await submit(client, {"operation": "hive_delete", "id": "journal"})
        assert (await client.request("DELETE", f"/v1/jobs/{cancelled}")).status == 200
    log = shared_daemon.log()  # each line is written before its job's end event goes out
    assert re.search(rf"INFO rbeed.jobs: job {created} \(hive_create\) completed after \d+\.\d\d s$", log, re.M), log
    assert re.search(rf"INFO rbeed.jobs: job {deleted} \(hive_delete\) completed after \d+\.\d\d s$", log, re.M), log
    assert re.search(
        rf"WARNING rbeed.jobs: job {failed} \(hive_get\) failed after \d+\.\d\d s: unknown hive 'absent'$", log, re.M
    ), log
    assert re.search(rf"INFO rbeed.jobs: job {cancelled} \(hive_delete\) cancelled$", log, re.M), log
    assert listed not in log


async def test_delete_of_a_finished_job_is_409(shared_daemon):
    async with shared_daemon.client() as client:
        job_id = await submit(client, {"operation": "hive_list"})
        async with client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
            await response.aread()
        refused = await client.request("DELETE", f"/v1/jobs/{job_id}")
        status = await status_of(client, job_id)
    assert refused.status == 409 and refused.json() == {"error": f"job {job_id} already completed"}
    assert status["state"] == "completed"


async def test_unstreamed_and_finished_jobs_expire_after_their_ttl(small_daemon):
    async with small_daemon.client() as client:
        created = trio.current_time()  # before the daemon creates the job: a lower bound
        unstreamed = await submit(client, {"operation": "hive_list"})
        finished = await submit(client, {"operation": "hive_list"})
        ended = trio.current_time()  # the job ends after this: its stream only starts it
        async with client.stream("GET", f"/v1/jobs/{finished}/stream") as response:
            await response.aread()
        assert (await status_of(client, unstreamed))["state"] == "queued"
        assert (await status_of(client, finished))["state"] == "completed"
        gone_at = {}
        with trio.fail_after(TTL + 10):
            while len(gone_at) < 2:  # every round trip is a real request: no sleeping
                for job_id in (unstreamed, finished):
                    if job_id not in gone_at and (await client.request("GET", f"/v1/jobs/{job_id}")).status == 404:
                        gone_at[job_id] = trio.current_time()
        stream = await client.request("GET", f"/v1/jobs/{unstreamed}/stream")
    assert gone_at[unstreamed] - created >= TTL * 0.9
    assert gone_at[finished] - ended >= TTL * 0.9
    assert stream.status == 404


async def test_an_answer_whose_reader_fell_behind_the_replay_buffer_ends_and_cancels_its_infer():
    far_ahead = trio.Event()

    async def generate_forever(job, operation) -> None:
        while True:
            job.emit("token", {"t": "a", "i": 0})
            if job.last_event_id == 1000:
                far_ahead.set()
            await trio.sleep(0)

    registry = JobRegistry(JobsConfig(event_buffer=8), generate_forever)
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        job = registry.create(ops.Infer(model="m", prompt="p"))
        registry.start(job)
        reply = _Reply(job, msgspec.convert({"model": "m", "prompt": "p"}, _Generate), registry)
        sent = []

        async def send(data: bytes, last: bool = False) -> None:
            sent.append(data)
            if len(sent) == 1:  # a client that reads nothing for a while: the job goes on without it
                await far_ahead.wait()

        with trio.fail_after(5):
            await reply.response.produce(send)
            assert re.fullmatch(rb'\{"error":"\d+ events were lost to a slow reader"\}\n', sent[-1]), sent[-1]
            # Nobody reads its output any more: it must not run on to its token limit.
            while not job.finished:
                await registry.changed.wait()
        assert job.state is JobState.CANCELLED
        nursery.cancel_scope.cancel()
