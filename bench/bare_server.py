"""Reference server for bench/control_plane.py: bare trio + h11 answering the job API with canned bytes.

It is the ceiling of rbeed's own stack (trio, h11, one task per connection): no JobRegistry, no
msgspec decoding, no routing beyond the method. `POST /v1/jobs` gets a 201 with a canned
`{"job_id": ..., "sse_url": ...}` body, and any GET gets the bytes of rbeed's hive_list stream
(narration, result, end [DONE]) as two chunks of a chunked body. Each response is written with one
send_all, or with --write-per-event one send_all per h11 event as h11's example server does (the
POST then takes three writes and the GET four; rbeed writes one and one). The connection loop
has the shape of h11's example server.

With --jobs it is the floor of rbeed's structure instead: each GET runs its canned events as a
job, a task of a server-wide nursery in a cancel scope of its own, and reads them from a memory
channel as rbeed's streams do (one wait, then what is there without a checkpoint per event),
writing the head with the events in one write, as rbeed does for a job this short.
What rbeed costs beyond this is its own code: routing, decoding, the registry, the operation.

    python bench/bare_server.py --listen 127.0.0.1:0 --socket /tmp/bare.sock [--write-per-event] [--jobs]

Readiness as `rbeed serve` reports it: with NOTIFY_SOCKET set, the datagram
"READY=1\\nSTATUS=listening on 127.0.0.1:PORT, unix:PATH".
"""

from __future__ import annotations

import argparse
import itertools
import os
import socket

import h11
import trio

_SERVER = ("server", "rbeed/0.1.0")


def _stream_chunks() -> tuple[bytes, bytes]:
    """The two writes of rbeed's hive_list stream: the narration, then the result and the end."""
    record = (b'[{"id":"localhost","host":"localhost","port":null,"ssh_host":null,"local":true,'
              b'"online":true,"version":"0.1.0","pid":%d}]' % os.getpid())  # fmt: skip
    return (
        b'id: 1\nevent: narration\ndata: {"message":"1 hive(s)"}\n\n',
        b"id: 2\nevent: result\ndata: %s\n\nid: 3\nevent: end\ndata: [DONE]\n\n" % record,
    )


async def _canned_job(chunks: tuple[bytes, bytes], events: trio.MemorySendChannel) -> None:
    """The --jobs floor: a job's share of rbeed's structure, with canned content."""
    with trio.CancelScope(), events:  # what DELETE would cancel
        events.send_nowait(chunks[0])
        events.send_nowait(chunks[1])


class Connection:
    def __init__(self, stream: trio.SocketStream, chunks: tuple[bytes, bytes], ids: itertools.count,
                 write_per_event: bool, jobs: trio.Nursery | None = None):  # fmt: skip
        self.stream = stream
        self.write_per_event = write_per_event
        self.jobs = jobs
        self.conn = h11.Connection(h11.SERVER)
        self.chunks = chunks
        self.ids = ids

    async def next_event(self):
        while (event := self.conn.next_event()) is h11.NEED_DATA:
            self.conn.receive_data(await self.stream.receive_some(65536))
        return event

    async def send(self, *events) -> None:
        if self.write_per_event:
            for event in events:
                await self.stream.send_all(self.conn.send(event))
        else:
            await self.stream.send_all(b"".join(self.conn.send(event) for event in events))

    async def answer(self, request: h11.Request) -> None:
        while not isinstance(await self.next_event(), h11.EndOfMessage):
            pass  # the body is not looked at
        if request.method == b"POST":
            job_id = b"job-00000000-0000-4000-8000-%012x" % next(self.ids)
            body = b'{"job_id":"%s","sse_url":"/v1/jobs/%s/stream"}' % (job_id, job_id)
            headers = [_SERVER, ("content-type", "application/json"), ("location", b"/v1/jobs/" + job_id),
                       ("content-length", str(len(body)))]  # fmt: skip
            await self.send(h11.Response(status_code=201, headers=headers), h11.Data(data=body), h11.EndOfMessage())
        elif self.jobs is None:
            headers = [_SERVER, ("content-type", "text/event-stream"), ("cache-control", "no-cache")]
            await self.send(
                h11.Response(status_code=200, headers=headers),
                *(h11.Data(data=chunk) for chunk in self.chunks),
                h11.EndOfMessage(),
            )
        else:
            # The job runs as a task of a server-wide nursery, in a cancel scope of its own, and its
            # events reach the stream through a memory channel, as in rbeed's JobRegistry.
            headers = [_SERVER, ("content-type", "text/event-stream"), ("cache-control", "no-cache")]
            send_channel, receive_channel = trio.open_memory_channel(256)
            self.jobs.start_soon(_canned_job, self.chunks, send_channel)
            with receive_channel:
                batch = [await receive_channel.receive()]
                while True:
                    try:
                        batch.append(receive_channel.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
            await self.send(h11.Response(status_code=200, headers=headers), h11.Data(data=b"".join(batch)),
                            h11.EndOfMessage())  # fmt: skip

    async def serve(self) -> None:
        try:
            while True:
                event = await self.next_event()
                if not isinstance(event, h11.Request):
                    return  # ConnectionClosed (or junk: a benchmark client never sends any)
                await self.answer(event)
                if self.conn.our_state is h11.MUST_CLOSE:
                    return
                self.conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await self.stream.aclose()


def _notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)


async def main(listen: str, socket_path: str, write_per_event: bool, jobs: bool = False) -> None:
    host, _, port = listen.rpartition(":")
    tcp = socket.create_server((host, int(port)), backlog=socket.SOMAXCONN)
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(socket_path)
    unix.listen(socket.SOMAXCONN)
    chunks, ids = _stream_chunks(), itertools.count(1)

    async def handle(stream: trio.SocketStream) -> None:
        await Connection(stream, chunks, ids, write_per_event, job_nursery).serve()

    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in (tcp, unix)]
    bound_host, bound_port = tcp.getsockname()[:2]
    _notify(f"READY=1\nSTATUS=listening on {bound_host}:{bound_port}, unix:{socket_path}")
    try:
        async with trio.open_nursery() as job_nursery:
            if not jobs:
                job_nursery = None
            await trio.serve_listeners(handle, listeners)
    finally:
        os.unlink(socket_path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:0", help="TCP HOST:PORT")
    parser.add_argument("--socket", required=True, help="Unix socket path")
    parser.add_argument("--write-per-event", action="store_true", help="one send_all per h11 event")
    parser.add_argument("--jobs", action="store_true",
                        help="run each stream as a job (task, cancel scope, memory channel): the structure's floor")
    args = parser.parse_args()
    try:
        trio.run(main, args.listen, args.socket, args.write_per_event, args.jobs)
    except KeyboardInterrupt:
        pass
