"""SocketTransport and accept_forever: the server's sockets, over real socket pairs and listeners."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from rbeed.transport import _YIELD_EVERY, SocketTransport, accept_forever


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    yield SocketTransport(ours), theirs
    ours.close()
    theirs.close()


async def test_calls_the_kernel_completes_at_once_still_let_other_tasks_run(pair):
    transport, peer = pair
    peer.sendall(b"x" * 4096)  # every receive below completes without waiting
    steps = 0

    async def other_task() -> None:
        nonlocal steps
        while True:
            steps += 1
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await trio.lowlevel.checkpoint()
        before = steps
        for _ in range(4 * _YIELD_EVERY):
            assert await transport.receive_some(1) == b"x"
            await transport.send_all(b"y")
        nursery.cancel_scope.cancel()
    # 8 * _YIELD_EVERY calls that never had to wait: the other task ran at least every _YIELD_EVERY.
    assert steps - before >= 7


async def test_a_cancellation_at_a_yield_loses_no_data(pair):
    # Each call below completes at once unless cancelled at the yield of every _YIELD_EVERY
    # calls: there it must raise before it moves any data, not after.
    transport, peer = pair
    chunks = [b"%03d" % i for i in range(4 * _YIELD_EVERY)]
    peer.sendall(b"".join(chunks))
    received, cancelled = [], 0
    while len(received) < len(chunks) and cancelled <= len(chunks):
        with trio.CancelScope() as scope:
            scope.cancel()
            received.append(await transport.receive_some(3))
        cancelled += scope.cancelled_caught
    assert received == chunks and cancelled >= 3

    sent, cancelled = [], 0
    for chunk in chunks:
        with trio.CancelScope() as scope:
            scope.cancel()
            await transport.send_all(chunk)
            sent.append(chunk)
        cancelled += scope.cancelled_caught
    assert cancelled >= 3
    assert peer.recv(65536) == b"".join(sent)


async def test_a_receive_waits_for_data_and_can_be_cancelled(pair):
    transport, peer = pair
    with trio.move_on_after(0.05) as timer:
        await transport.receive_some()
    assert timer.cancelled_caught
    async with trio.open_nursery() as nursery:
        received = []

        async def receive() -> None:
            received.append(await transport.receive_some())

        nursery.start_soon(receive)
        await trio.testing.wait_all_tasks_blocked()
        peer.sendall(b"hello")
    assert received == [b"hello"]


async def test_send_all_delivers_everything_in_order_to_a_slow_reader(pair):
    transport, peer = pair
    data = bytes(range(256)) * 40_000  # ~10 MB: far more than the socket buffers hold
    got = bytearray()

    async def read_slowly() -> None:
        while len(got) < len(data):
            await trio.lowlevel.wait_readable(peer)
            got.extend(peer.recv(65536))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_slowly)
            await transport.send_all(data)
    assert bytes(got) == data


async def test_eof_and_close(pair):
    transport, peer = pair
    await transport.send_eof()
    await transport.send_eof()  # idempotent
    assert peer.recv(10) == b""  # the peer sees our EOF
    with pytest.raises(trio.ClosedResourceError):
        await transport.send_all(b"late")
    peer.sendall(b"still open the other way")
    assert await transport.receive_some() == b"still open the other way"
    await transport.aclose()
    await transport.aclose()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await transport.receive_some()


async def test_a_reset_connection_is_a_broken_resource(pair):
    transport, peer = pair
    peer.close()
    assert await transport.receive_some() == b""  # EOF first
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first send may still be buffered before the kernel says EPIPE
            await transport.send_all(b"x" * 65536)


async def test_accept_forever_hands_each_connection_over_and_closes_the_listener_when_cancelled():
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    greeted = []

    async def handle(stream: SocketTransport) -> None:
        async with stream:
            greeted.append(await stream.receive_some())
            await stream.send_all(b"hi " + greeted[-1])

    async def client(name: bytes) -> bytes:
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(name)
            return await stream.receive_some()

    with trio.fail_after(5):
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(accept_forever, listener, handle, connections)
                assert await client(b"a") == b"hi a"
                assert await client(b"b") == b"hi b"
                accepting.cancel_scope.cancel()
    assert greeted == [b"a", b"b"]
    assert listener.fileno() == -1
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)
