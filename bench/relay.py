"""Relay benchmark: the daemon's CPU per streamed token, against relays with less structure.

A sender process writes `--tokens` rbeed.wire Token frames, one every `--gap` seconds, to a relay
process, which hands them on to a reader process; the relay's own CPU time (user + system) per
token is the figure. Relays, alternated run by run:

- blocking: recv() then sendall() in a loop, no framing: the floor of a Python relay.
- trio: one trio task, SocketTransport.receive_some() then send_all(): the floor of trio.
- trio+channel: a task reading the sender and a task writing the reader, joined by a memory
  channel: the floor of rbeed's structure, where a job's events reach its streams that way.
- rbeed: rbeed's own code path. The reader POSTs an infer job and GETs its stream from rbeed's
  HTTP connection, JobAPI and JobRegistry; the job's handler decodes the sender's frames with
  wire.FrameDecoder and emits a token event per frame, as a worker's serve task does.

    python bench/relay.py [--rounds 5] [--tokens 4000] [--gap 0.0005] [--relays trio,rbeed]

In the real daemon the tokens come from a worker whose llama.cpp threads evict the caches
between tokens, which multiplies these figures (see bench/RESULTS.md); this measures the code.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rbeed import wire  # noqa: E402
from rbeed.api import JobAPI  # noqa: E402
from rbeed.config import JobsConfig, ServerConfig  # noqa: E402
from rbeed.jobs import JobRegistry  # noqa: E402
from rbeed.server import HTTPConnection  # noqa: E402
from rbeed.transport import SocketTransport  # noqa: E402

INFER = b'{"operation":"infer","model":"bench","prompt":"relay"}'


def send_tokens(sock: socket.socket, tokens: int, gap: float) -> None:
    for i in range(tokens):
        time.sleep(gap)
        sock.sendall(wire.encode(wire.Token(1, f" word{i % 10}")))
    sock.sendall(wire.encode(wire.Done(1, 1, tokens, "length", 1.0, 1.0)))
    sock.shutdown(socket.SHUT_WR)


def read_until(sock: socket.socket, buffer: bytearray, marker: bytes) -> bytearray:
    while marker not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before {marker!r}")
        buffer += data
    return buffer


def read_stream(sock: socket.socket, http: bool) -> None:
    if not http:
        while sock.recv(65536):
            pass
        return
    sock.sendall(b"POST /v1/jobs HTTP/1.1\r\nhost: bench\r\ncontent-length: %d\r\n\r\n%s" % (len(INFER), INFER))
    head = read_until(sock, bytearray(), b"}")
    job_id = head[head.index(b'"job_id":"') + 10 :].split(b'"')[0]
    sock.sendall(b"GET /v1/jobs/%s/stream HTTP/1.1\r\nhost: bench\r\n\r\n" % job_id)
    body = read_until(sock, bytearray(), b"0\r\n\r\n")
    if b"data: [DONE]" not in body:
        raise RuntimeError(f"stream did not end with [DONE]: {bytes(body[-200:])!r}")


def relay_blocking(source: socket.socket, sink: socket.socket) -> None:
    while data := source.recv(65536):
        sink.sendall(data)
    sink.shutdown(socket.SHUT_WR)


async def relay_trio(source: socket.socket, sink: socket.socket) -> None:
    inbound, outbound = SocketTransport(source), SocketTransport(sink)
    while data := await inbound.receive_some(65536):
        await outbound.send_all(data)
    await outbound.send_eof()


async def relay_trio_channel(source: socket.socket, sink: socket.socket) -> None:
    inbound, outbound = SocketTransport(source), SocketTransport(sink)
    send, receive = trio.open_memory_channel[bytes](256)

    async def read() -> None:
        async with send:
            while data := await inbound.receive_some(65536):
                send.send_nowait(data)

    async def write() -> None:
        async for data in receive:
            await outbound.send_all(data)
        await outbound.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        nursery.start_soon(write)


async def relay_rbeed(source: socket.socket, sink: socket.socket) -> None:
    inbound = SocketTransport(source)

    async def emit_frames(job, operation) -> None:
        decoder, count = wire.FrameDecoder(), 0
        while data := await inbound.receive_some(1 << 16):
            for message in decoder.feed(data):
                if type(message) is wire.Token:
                    job.emit("token", {"t": message.text, "i": count})
                    count += 1

    registry = JobRegistry(JobsConfig(), emit_frames)
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        await HTTPConnection(SocketTransport(sink), JobAPI(registry), ServerConfig()).run()
        nursery.cancel_scope.cancel()


RELAYS = {"blocking": relay_blocking, "trio": relay_trio, "trio+channel": relay_trio_channel, "rbeed": relay_rbeed}


def run_once(name: str, tokens: int, gap: float) -> float:
    """CPU seconds per token of one relay process over one run."""
    to_relay, from_sender = socket.socketpair()
    to_reader, from_relay = socket.socketpair()
    read_fd, write_fd = os.pipe()
    relay = os.fork()
    if relay == 0:
        to_relay.close()
        from_relay.close()
        before = resource.getrusage(resource.RUSAGE_SELF)
        if name == "blocking":
            relay_blocking(from_sender, to_reader)
        else:
            trio.run(RELAYS[name], from_sender, to_reader)
        after = resource.getrusage(resource.RUSAGE_SELF)
        os.write(write_fd, repr(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime).encode())
        os._exit(0)
    reader = os.fork()
    if reader == 0:
        to_relay.close()
        read_stream(from_relay, http=name == "rbeed")
        os._exit(0)
    from_sender.close()
    to_reader.close()
    from_relay.close()
    os.close(write_fd)
    send_tokens(to_relay, tokens, gap)
    to_relay.close()
    for pid in (relay, reader):
        _, status = os.waitpid(pid, 0)
        if status:
            raise RuntimeError(f"{name}: a child exited with status {status}")
    with os.fdopen(read_fd) as result:
        return float(result.read()) / tokens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--gap", type=float, default=0.0005, help="seconds between tokens (default 0.0005)")
    parser.add_argument("--relays", default=",".join(RELAYS), help=f"comma-separated subset of {', '.join(RELAYS)}")
    args = parser.parse_args()
    names = args.relays.split(",")
    if unknown := set(names) - set(RELAYS):
        parser.error(f"unknown relays: {', '.join(sorted(unknown))}")
    results: dict[str, list[float]] = {name: [] for name in names}
    for round_no in range(args.rounds):
        for name in names[round_no % len(names) :] + names[: round_no % len(names)]:
            results[name].append(run_once(name, args.tokens, args.gap))
    floor = statistics.median(results["blocking"]) if "blocking" in results else None
    print(f"{args.tokens} tokens, one every {args.gap * 1e3:g} ms, {args.rounds} rounds; relay CPU per token:")
    print(f"{'relay':14s} {'median us':>9s} {'(min-max)':>13s}  vs blocking")
    for name, values in results.items():
        median = statistics.median(values)
        ratio = f"{median / floor:6.2f}x" if floor else ""
        print(f"{name:14s} {median * 1e6:9.1f} {min(values) * 1e6:6.1f}-{max(values) * 1e6:<6.1f}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
