"""Framing of daemon<->worker messages: round trips, partial and batched frames, limits."""

from __future__ import annotations

import struct

import pytest

from rbeed import wire

MESSAGES: list[wire.Message] = [
    wire.Generate(1, "Once upon a time", 64, 0.8, 0.95, 40, 0.05, 1.0, 0.0, 0.0),
    wire.Generate(2, "zwölf €", 0, 0.0, 1.0, 0, 0.0, 1.3, -0.5, 2.0, seed=2**40, stop=["\n", "."]),
    wire.Cancel(1),
    wire.Token(1, " cat"),
    wire.Token(1, "€"),
    wire.Done(1, 17, 64, "length", 1.25, 4321.5),
    wire.Failed(2, "prompt is 3000 tokens, the context holds 2048", refused=True),
]


def test_frame_is_length_prefixed_and_round_trips():
    for msg in MESSAGES:
        frame = wire.encode(msg)
        (size,) = struct.unpack(">I", frame[:4])
        assert size == len(frame) - 4
        assert wire.FrameDecoder().feed(frame) == [msg]


def test_byte_by_byte_and_many_frames_per_chunk():
    stream = b"".join(wire.encode(msg) for msg in MESSAGES)
    decoder = wire.FrameDecoder()
    received = []
    for i in range(len(stream)):
        received += decoder.feed(stream[i : i + 1])
    assert received == MESSAGES

    decoder = wire.FrameDecoder()
    assert decoder.feed(stream * 3) == MESSAGES * 3
    assert decoder.feed(b"") == []


def test_chunks_that_split_frames_anywhere():
    stream = b"".join(wire.encode(msg) for msg in MESSAGES)
    for cut in range(1, len(stream)):
        decoder = wire.FrameDecoder()
        assert decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) == MESSAGES


def test_oversized_frame_is_rejected_from_its_header():
    decoder = wire.FrameDecoder(max_frame_size=100)
    with pytest.raises(ValueError, match="exceeds the limit of 100"):
        decoder.feed(struct.pack(">I", 101))
    small = wire.FrameDecoder(max_frame_size=100)
    assert small.feed(wire.encode(wire.Token(3, "x" * 80))) == [wire.Token(3, "x" * 80)]
    with pytest.raises(ValueError):
        small.feed(wire.encode(wire.Token(3, "x" * 100)))


@pytest.mark.parametrize(
    "body",
    [b"\xc1", b"\x92\xa5Token\x01", b"\x93\xa7Unknown\x01\xa1x", b"\x93\xa5Token\xa1x\xa1x"],
)
def test_malformed_frame_raises_value_error(body):
    with pytest.raises(ValueError):
        wire.FrameDecoder().feed(struct.pack(">I", len(body)) + body)
