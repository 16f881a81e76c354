"""Daemon<->worker framing: 4-byte big-endian length prefix + msgpack tagged-union messages."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import msgspec

__all__ = [
    "MAX_FRAME_SIZE",
    "EMBEDDINGS_ONLY",
    "NO_CHAT_TEMPLATE",
    "Cancel",
    "Done",
    "Embed",
    "Embedded",
    "Embedding",
    "Failed",
    "FrameDecoder",
    "Generate",
    "Message",
    "Token",
    "Tokenize",
    "Tokenized",
    "encode",
    "unknown_token",
]

MAX_FRAME_SIZE = 16 * 1024 * 1024
# A Generate with messages for a model without a chat template fails with this (the daemon
# refuses it before loading a worker when the model's metadata says so).
NO_CHAT_TEMPLATE = "the model has no chat template: send a `prompt` instead of `messages`"
# A Generate for an encoder (BERT and its kind) fails with this (the daemon refuses it first when
# the model's metadata says that its attention is not causal).
EMBEDDINGS_ONLY = "the model is an encoder (such as BERT): it makes embeddings only, not text; use embed"

_HEADER = struct.Struct(">I")


def unknown_token(field: str, tokens: Iterable[int] | None, vocab_size: int, model: str) -> str | None:
    """Why `tokens` (a request's `field`) name one past `model`'s vocabulary, if they do (the daemon
    checks from the catalog's vocab_size before any worker loads; the worker again, for a record
    without one)."""
    if tokens and (beyond := [token for token in tokens if token >= vocab_size]):
        return f"{field}: token {min(beyond)} is not one of {model} (ids 0 to {vocab_size - 1})"
    return None


class _Frame(msgspec.Struct, tag_field="type", array_like=True, gc=False):
    pass


# daemon -> worker


class Generate(_Frame, tag="Generate"):
    id: int
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    presence_penalty: float
    frequency_penalty: float
    seed: int | None = None
    stop: list[str] = []
    messages: list[tuple[str, str]] | None = None  # (role, content): the worker applies the chat template
    grammar: str | None = None  # GBNF that the output must follow
    logit_bias: dict[int, float] | None = None  # added to these tokens' logits
    repeat_last_n: int = 64  # the tokens the penalties look back over; -1: the whole context


class Embed(_Frame, tag="Embed"):
    """Embed each input: the mean (or the model's own pooling) of its tokens' last hidden states."""

    id: int
    inputs: list[str]
    truncate: bool = True  # an input longer than the context is cut to it; else it fails
    normalize: bool = True  # to unit length (after `dimensions`)
    dimensions: int | None = None  # keep the first N


class Tokenize(_Frame, tag="Tokenize"):
    """The model's tokens for `text`, or (`text` None) the given `tokens`: answered by Tokenized."""

    id: int
    text: str | None = None
    tokens: list[int] = []
    add_special: bool = False  # the BOS (and EOS) that the vocabulary puts around a prompt
    parse_special: bool = True  # `<start_of_turn>` in the text is that one token, not its letters


class Cancel(_Frame, tag="Cancel"):
    id: int


# worker -> daemon


class Token(_Frame, tag="Token"):
    id: int
    text: str


class Done(_Frame, tag="Done"):
    """End of a generation; finish_reason is "length", "stop" or "cancelled"."""

    id: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    ttft_ms: float
    tokens_per_s: float
    cached_tokens: int = 0  # prompt tokens the context held from the previous job, not evaluated again


class Embedding(_Frame, tag="Embedding"):
    """One input's vector, in the order of the inputs: a frame each keeps frames small."""

    id: int
    vector: list[float]


class Embedded(_Frame, tag="Embedded"):
    """The end of an Embed: every input's Embedding was sent."""

    id: int
    prompt_tokens: int


class Tokenized(_Frame, tag="Tokenized"):
    """The tokens and the bytes each stands for (special tokens written out)."""

    id: int
    tokens: list[int]
    pieces: list[bytes]


class Failed(_Frame, tag="Failed"):
    id: int
    error: str
    refused: bool = False  # the request's own fault (its prompt, messages or tokens): a 400, not a 500


Message = Generate | Embed | Tokenize | Cancel | Token | Done | Embedding | Embedded | Tokenized | Failed

_encoder = msgspec.msgpack.Encoder()


def encode(msg: Message) -> bytes:
    """One complete frame holding `msg`."""
    body = _encoder.encode(msg)
    return _HEADER.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get back whole messages.

    Raises ValueError for a frame announcing more than `max_frame_size` bytes or a
    body that is not a valid message; the stream cannot be resynchronised after that.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        self._max_frame_size = max_frame_size
        self._decoder = msgspec.msgpack.Decoder(Message)
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        buffer = self._buffer
        buffer += data
        messages: list[Message] = []
        start = 0
        available = len(buffer)
        with memoryview(buffer) as view:
            while available - start >= 4:
                (size,) = _HEADER.unpack_from(view, start)
                if size > self._max_frame_size:
                    raise ValueError(
                        f"frame of {size} bytes exceeds the limit of {self._max_frame_size}"
                    )
                end = start + 4 + size
                if end > available:
                    break
                messages.append(self._decoder.decode(view[start + 4 : end]))
                start = end
        if start:
            del buffer[:start]
        return messages
