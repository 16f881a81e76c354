"""Operations for a remote hive: two real daemons, one forwarding to the other over TCP."""

from __future__ import annotations

import functools
import json
import re
from contextlib import asynccontextmanager

import pytest
import trio

from httpfixture import serve_files
from rbeed import operations
from rbeed.forward import remote_payload
from rbeed.httpclient import Client, HTTPError
from rbeed.jobclient import JobClient, StreamLost
from support import (
    end_marker,
    job_error,
    job_events,
    job_result,
    rest_of,
    run_job,
    running_daemon,
)

# Long enough generations on the hive to be cancelled mid-stream.
HIVE_ENV = {"RBEED_WORKER_TOKEN_DELAY": "0.02"}
FORWARDED = re.compile(r"forwarded to hive (\S+) \((\S+)\) as (job-[0-9a-f-]+)$")


@pytest.fixture
def daemons():
    """(the daemon clients talk to, a second daemon registered with it as hive `h2`)."""
    with running_daemon(env=HIVE_ENV) as hive, running_daemon() as queen:
        yield queen, hive


async def register(queen, hive, port: int | None = None) -> None:
    async with queen.client() as client:
        record = await job_result(client, {"operation": "hive_create", "id": "h2", "host": "127.0.0.1",
                                           "port": port or hive.port})  # fmt: skip
    assert record["online"] is True, record


def remote_id_of(events) -> str:
    first = json.loads(events[0].data)
    assert events[0].event == "narration" and (match := FORWARDED.match(first["message"])), events[0]
    assert first["remote_job_id"] == match[3] and first["hive_id"] == match[1] == "h2"
    return match[3]


async def remote_events(hive, job_id: str) -> list:
    """The hive's own record of a job's events, replayed from its buffer."""
    async with hive.client() as client, client.stream("GET", f"/v1/jobs/{job_id}/stream") as response:
        assert response.status == 200
        return await rest_of(response.aiter_sse(), 10)


def kinds_and_data(events) -> list[tuple[str, object]]:
    return [(e.event, json.loads(e.data)) for e in events if e.event != "end"]


async def test_operations_run_on_the_hive_and_relay_its_events(daemons, tiny_model):
    queen, hive = daemons
    await register(queen, hive)
    async with queen.client() as client:
        with trio.fail_after(30):
            events = await run_job(client, {"operation": "model_download", "hive_id": "h2", "model": str(tiny_model)})
        assert end_marker(events) == "[DONE]", events
        remote = await remote_events(hive, remote_id_of(events))
        # Every event of the hive's job, in order, once; then the same end.
        assert kinds_and_data(events[1:]) == kinds_and_data(remote)
        assert [e.event for e in remote[:2]] == ["narration", "progress"] and remote[-1].data == "[DONE]"

        assert await job_result(client, {"operation": "model_list"}) == []  # nothing landed here
        [listed] = await job_result(client, {"operation": "model_list", "hive_id": "h2"})
        assert listed["id"] == "tiny" and (hive.state_dir / "models" / listed["file"]).is_file()

        infer = {"operation": "infer", "model": "tiny", "prompt": "The cat", "max_tokens": 12, "seed": 7}
        with trio.fail_after(60):
            forwarded = await run_job(client, {**infer, "hive_id": "h2"})
        [worker] = await job_result(client, {"operation": "worker_list", "hive_id": "h2"})
        assert worker["model"] == "tiny" and await job_result(client, {"operation": "worker_list"}) == []
        # Counted here and there: the label keeps a fleet's sum from counting it twice.
        metrics = (await client.request("GET", "/metrics")).content.decode()
        assert 'rbeed_jobs_finished_total{operation="infer",hive="h2",state="completed"} 1\n' in metrics
        assert 'operation="infer",hive="localhost"' not in metrics
    async with hive.client() as direct:
        with trio.fail_after(60):
            local = await run_job(direct, infer)
    text = "".join(json.loads(e.data)["t"] for e in forwarded if e.event == "token")
    assert text and text == "".join(json.loads(e.data)["t"] for e in local if e.event == "token")
    result = json.loads(next(e.data for e in forwarded if e.event == "result"))
    assert result["worker_id"] == worker["id"] and result["completion_tokens"] == 12


def test_a_forwarded_payload_holds_only_the_fields_given():
    # A hive of an older rbeed refuses fields it does not know (format, the penalties ...): it
    # takes every job that sets none of them.
    given = {"operation": "infer", "model": "m", "prompt": "p", "hive_id": "h2", "temperature": 0.8, "seed": 1}
    sent = json.loads(remote_payload(operations.decode(json.dumps(given).encode())))
    assert sent == {"operation": "infer", "model": "m", "prompt": "p", "temperature": 0.8, "seed": 1}
    listing = operations.decode(b'{"operation": "model_list", "hive_id": "h2"}')
    assert json.loads(remote_payload(listing)) == {"operation": "model_list"}  # the hive's own: localhost


async def test_failures_there_and_on_the_way_name_the_hive(daemons):
    queen, hive = daemons
    await register(queen, hive)
    async with queen.client() as client:
        assert await job_error(client, {"operation": "model_list", "hive_id": "nope"}) == "unknown hive 'nope'"
        message = await job_error(client, {"operation": "infer", "hive_id": "h2", "model": "absent", "prompt": "x"})
        assert message == "hive h2: unknown model 'absent' (known: none)"
        # A hive nothing answers for: the job fails at once, naming the hive and the address.
        await job_result(client, {"operation": "hive_create", "id": "gone", "host": "127.0.0.1", "port": 9})
        message = await job_error(client, {"operation": "worker_list", "hive_id": "gone"})
        assert message.startswith("hive gone: cannot connect to http://127.0.0.1:9: "), message


async def test_cancelling_or_leaving_the_job_here_cancels_it_on_the_hive(daemons, tiny_model):
    queen, hive = daemons
    await register(queen, hive)
    content = tiny_model.read_bytes()
    async with queen.client() as client, serve_files({"m.gguf": content}) as server:
        # A download, which goes on when its reader leaves: only the DELETE sent on can stop it.
        server.stall_after["m.gguf"] = len(content) // 2
        download = {"operation": "model_download", "hive_id": "h2", "model": server.url("m.gguf")}
        async with job_events(client, download) as (job_id, events):
            seen = [await anext(events)]
            remote_id = remote_id_of(seen)
            while seen[-1].event != "progress":  # the hive has the source open
                seen.append(await anext(events))
            async with queen.client() as other:
                assert (await other.request("DELETE", f"/v1/jobs/{job_id}")).status == 200
            assert end_marker(await rest_of(events, 10)) == "[CANCELLED]"
        assert end_marker(await remote_events(hive, remote_id)) == "[CANCELLED]"

        # An infer whose last reader here goes away.
        await job_result(client, {"operation": "model_download", "hive_id": "h2", "model": str(tiny_model)})
        infer = {"operation": "infer", "hive_id": "h2", "model": "tiny", "prompt": "Once", "max_tokens": 2000}
        async with job_events(client, infer) as (job_id, events):
            remote_id = remote_id_of([await anext(events)])
            assert (await anext(events)).event in ("narration", "token")
    remote = await remote_events(hive, remote_id)
    assert end_marker(remote) == "[CANCELLED]" and len(remote) < 2000


class CuttingProxy:
    """A TCP relay to `port` that cuts the first job stream through it right after event 1, and
    notes the Last-Event-ID and the query of every stream request."""

    def __init__(self, port: int):
        self.port = port
        self.streams: list[str | None] = []
        self.queries: list[str] = []
        self.cut = False

    async def serve(self, nursery: trio.Nursery) -> int:
        [listener] = await nursery.start(functools.partial(trio.serve_tcp, self.relay, 0, host="127.0.0.1"))
        return listener.socket.getsockname()[1]

    async def relay(self, client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", self.port) as server:
            streaming = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.requests, client, server, streaming)
                await self.responses(server, client, streaming)
                nursery.cancel_scope.cancel()

    async def requests(self, client, server, streaming: trio.Event) -> None:
        unread = b""  # what the client sent after the last stream request's head: a head may come in pieces
        async for data in client:
            unread += data
            while match := re.search(rb"GET /v1/jobs/\S+/stream(\S*) HTTP/1.1\r\n((?:.+\r\n)*)\r\n", unread):
                last = re.search(rb"(?im)^last-event-id: *(\S+)", match[2])
                self.streams.append(last and last[1].decode())
                self.queries.append(match[1].decode())
                streaming.set()
                unread = unread[match.end() :]
            await server.send_all(data)

    async def responses(self, server, client, streaming: trio.Event) -> None:
        seen = b""
        async for data in server:
            if streaming.is_set() and not self.cut:
                seen += data
                if (start := seen.find(b"id: 1\n")) >= 0 and (end := seen.find(b"\n\n", start)) >= 0:
                    self.cut = True
                    await client.send_all(data[: len(data) - (len(seen) - end - 2)])
                    return  # closing both connections mid-response
            await client.send_all(data)


class HoldingProxy(CuttingProxy):
    """A TCP relay to `port` that holds back the hive's answer to the first job created through it
    until `release` is set."""

    def __init__(self, port: int):
        super().__init__(port)
        self.job_id = ""
        self.held, self.release = trio.Event(), trio.Event()

    async def responses(self, server, client, streaming: trio.Event) -> None:
        async for data in server:
            if not self.job_id and (match := re.search(rb'"job_id": *"([^"]+)"', data)):
                self.job_id = match[1].decode()
                self.held.set()
                await self.release.wait()
            await client.send_all(data)


async def test_a_job_cancelled_here_while_the_hive_makes_it_is_cancelled_there(daemons):
    queen, hive = daemons
    proxy = HoldingProxy(hive.port)
    async with trio.open_nursery() as nursery:
        await register(queen, hive, port=await proxy.serve(nursery))
        async with queen.client() as client, queen.client() as other:
            async with job_events(client, {"operation": "model_list", "hive_id": "h2"}) as (job_id, events):
                with trio.fail_after(10):
                    await proxy.held.wait()
                assert (await other.request("DELETE", f"/v1/jobs/{job_id}")).status == 200
                proxy.release.set()
                assert end_marker(await rest_of(events, 10)) == "[CANCELLED]"
        nursery.cancel_scope.cancel()
    # Not cancelled, it waited there unstreamed for its TTL (600 s).
    async with hive.client() as direct:
        assert (await direct.request("GET", f"/v1/jobs/{proxy.job_id}")).json()["state"] == "cancelled"


async def test_a_dropped_stream_is_resumed_from_its_last_event(daemons, tiny_model):
    queen, hive = daemons
    proxy = CuttingProxy(hive.port)
    async with trio.open_nursery() as nursery:
        await register(queen, hive, port=await proxy.serve(nursery))
        async with queen.client() as client:
            with trio.fail_after(30):
                events = await run_job(client, {"operation": "model_download", "hive_id": "h2",
                                                "model": str(tiny_model)})  # fmt: skip
        nursery.cancel_scope.cancel()
    assert end_marker(events) == "[DONE]", events
    assert proxy.cut and proxy.streams == [None, "1"] and proxy.queries == ["", ""]
    remote = await remote_events(hive, remote_id_of(events))
    assert len(remote) >= 4 and kinds_and_data(events[1:]) == kinds_and_data(remote)
    assert "tiny" in {m["id"] for m in await hive_models(hive)}


async def test_a_dropped_infer_stream_is_resumed_not_cancelled_there(daemons, tiny_model):
    # An infer ends when its last reader leaves: the relay asks the hive to wait for it a while.
    queen, hive = daemons
    async with hive.client() as direct:
        await job_result(direct, {"operation": "model_download", "model": str(tiny_model)})
    proxy = CuttingProxy(hive.port)
    infer = {"operation": "infer", "model": "tiny", "prompt": "Once", "max_tokens": 40, "seed": 3}
    async with trio.open_nursery() as nursery:
        await register(queen, hive, port=await proxy.serve(nursery))
        async with queen.client() as client:
            with trio.fail_after(60):
                events = await run_job(client, {**infer, "hive_id": "h2"})
        nursery.cancel_scope.cancel()
    assert end_marker(events) == "[DONE]", events
    assert proxy.cut and proxy.streams == [None, "1"] and proxy.queries == ["?resume_within=20"] * 2
    remote = await remote_events(hive, remote_id_of(events))
    assert kinds_and_data(events[1:]) == kinds_and_data(remote)
    result = json.loads(next(e.data for e in events if e.event == "result"))
    assert result["completion_tokens"] == sum(e.event == "token" for e in events) >= 2


async def hive_models(hive) -> list:
    async with hive.client() as client:
        return await job_result(client, {"operation": "model_list"})



@asynccontextmanager
async def fake_daemon(answer):
    """A server on 127.0.0.1 that answers each request with `answer(head)`, then closes."""

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            while b"\r\n\r\n" not in head:
                head += await stream.receive_some(65536)
            await stream.send_all(answer(head))

    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(functools.partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        yield JobClient(Client(f"http://127.0.0.1:{listener.socket.getsockname()[1]}"), request_timeout=5,
                        reconnect_delay=0.01, reconnects=3)  # fmt: skip
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("body", [b'{"job_id": 123}', b'{"job_id": null}', b'{"job_id": ""}', b'["job-1"]'])
async def test_a_created_job_without_a_job_id_is_an_unexpected_answer(body):
    answer = b"HTTP/1.1 201 Created\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    async with fake_daemon(lambda head: answer) as jobs:
        with pytest.raises(HTTPError, match=r"^unexpected answer to POST /v1/jobs: "):
            await jobs.create(b'{"operation": "hive_list"}')


async def test_a_daemon_that_replays_the_same_event_is_given_up_on_and_relayed_once():
    stream = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\nid: 1\nevent: narration\ndata: {}\n\n"
    heads: list[bytes] = []

    def answer(head: bytes) -> bytes:
        heads.append(head)
        if not head.startswith(b"GET /v1/jobs/job-1/stream "):  # its status: still running
            return b'HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n{"state": "running"}'
        return stream  # then closes, whatever Last-Event-ID asked for

    relayed = []
    async with fake_daemon(answer) as jobs:
        with trio.fail_after(5), pytest.raises(StreamLost, match="the stream ended before the job did"):
            await jobs.follow("job-1", relayed.append)
    assert [e.id for e in relayed] == ["1"]
    assert len([h for h in heads if h.startswith(b"GET /v1/jobs/job-1/stream ")]) == 4  # the first, 3 reconnects
