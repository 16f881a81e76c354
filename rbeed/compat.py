"""What the OpenAI and Ollama routes share: turning a request into a job, and following its events."""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from functools import partial

import msgspec

from .jobs import Job, JobFailed, JobRegistry, RegistryFull
from .models import Model, Models
from .operations import MAX_TOKENS, TOO_DEEP, AnyOperation, Infer, OnWorker
from .server import StreamingResponse

# Infer's sampling fields that OpenAI's requests (with llama-server's extensions) and Ollama's
# options name as infer does.
SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty",
            "repeat_last_n", "seed")  # fmt: skip


def no_limit(model: Model) -> int | None:
    """max_tokens for a request that gives none: none, as llama-server's and Ollama's, unless the
    model's defaults set one (None: infer takes it from them)."""
    return None if model.defaults.max_tokens is not None else MAX_TOKENS


def sampling(source) -> dict:
    """The sampling fields a request gave, None for those it left to infer's defaults (a negative
    seed too: Ollama's default options and llama-server's way of asking for a random one)."""
    fields = {name: getattr(source, name) for name in SAMPLING}
    if isinstance(fields["seed"], int) and fields["seed"] < 0:
        fields["seed"] = None
    return fields


# Where msgspec's messages name a field, and infer's own checks (`format`: ...).
_FIELD = re.compile(r"(?:at|in) `\$\.([^`]*)`|missing required field `([^`]*)`|^`(\w+)`: ")


class Refused(Exception):
    """A request that cannot become a job: its HTTP status, and the field at fault if one is."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def invalid(exc: msgspec.ValidationError, names: dict[str, str] | None = None) -> Refused:
    """A 400 naming the field msgspec found at fault, by the name the client's API gives it."""
    message, names = str(exc), names or {}
    match = _FIELD.search(message)
    field = match and (match.group(1) or match.group(2) or match.group(3))
    head = field and re.match(r"[^.\[]*", field)[0]  # `stop` of `stop[0]`: renamed, its index kept
    if head in names:
        renamed = names[head] + field[len(head) :]
        message = message.replace(f"`$.{field}`", f"`$.{renamed}`").replace(f"`{field}`: ", f"`{renamed}`: ", 1)
        field = renamed
    return Refused(400, message, field)


def decode(body: bytes, kind: type):
    """The request's JSON as a `kind`; Refused (400) naming the field at fault.

    A null is taken for a field left out, as Go's encoding/json (Ollama) and OpenAI take it
    (clients send `"raw": null`, `"n": null`): at the top, in `options` and in each message; not
    in a JSON schema, where null is a value.
    """
    try:
        return msgspec.convert(_without_nulls(_json(body)), kind)
    except msgspec.ValidationError as exc:
        raise invalid(exc) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise Refused(400, f"malformed JSON: {exc}") from None
    except RecursionError:
        raise Refused(400, TOO_DEEP) from None


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _json(body: bytes):
    """The body's JSON value. A lone surrogate escape (`"\\ud83d"`, what JavaScript's
    JSON.stringify writes of a string cut mid-emoji) reads as U+FFFD, as Go's encoding/json
    (Ollama) reads it; msgspec refuses it."""
    try:
        return msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        if not _SURROGATE_ESCAPE.search(body):
            raise
        refused = exc
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except ValueError:  # malformed otherwise too: msgspec's message says where
        raise refused from None
    return _replaced_surrogates(value)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def _replaced_surrogates(value):
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_replaced_surrogates(item) for item in value]
    if isinstance(value, dict):
        return {_replaced_surrogates(key): _replaced_surrogates(item) for key, item in value.items()}
    return value


def _without_nulls(value):
    def given(fields):
        return {key: item for key, item in fields.items() if item is not None} if isinstance(fields, dict) else fields

    value = given(value)
    if isinstance(value, dict) and "options" in value:
        value["options"] = given(value["options"])
    if isinstance(value, dict) and isinstance(messages := value.get("messages"), list):
        value["messages"] = [given(message) for message in messages]
    return value


def start_model_job(registry: JobRegistry, models: Models, model_id: str, fields_for: Callable[[Model], dict],
                    names: dict[str, str] | None = None, kind: type[OnWorker] = Infer) -> Job:  # fmt: skip
    """Create and start the job on a model (infer, embed, tokenize, detokenize) that
    `fields_for(model)` describes (None values left out).

    Refused says why not; `names` maps the operation's field names to the request's, for a 400's
    message.
    """
    try:
        model = models.lookup(model_id)  # first: `llama3:8b` is unknown here, not a bad request
    except JobFailed as exc:  # unknown (404), or being deleted (409)
        raise Refused(exc.status, str(exc), "model", "model_not_found" if exc.status == 404 else None) from None
    fields = fields_for(model)
    try:
        operation = msgspec.convert({key: value for key, value in fields.items() if value is not None}, kind)
    except msgspec.ValidationError as exc:
        raise invalid(exc, names) from None
    except RecursionError:
        raise Refused(400, TOO_DEEP) from None
    if refused := model.refusal(operation):
        field, why = refused
        raise Refused(400, why, (names or {}).get(field, field))
    return start_job(registry, operation)


def start_job(registry: JobRegistry, operation: AnyOperation) -> Job:
    """Create and start a job for `operation`; Refused (503) while the registry is full."""
    try:
        job = registry.create(operation)
    except RegistryFull as exc:
        raise Refused(exc.status, str(exc)) from None
    registry.start(job)
    return job


def failure(job: Job, marker: str) -> tuple[int, str]:
    """The HTTP status and message of a job's end marker other than [DONE]."""
    if marker == "[CANCELLED]":  # by DELETE, or as the daemon shuts down
        return 503, "job cancelled" + (f": {job.error}" if job.error else "")
    return job.error_status, marker.removeprefix("[ERROR] ")


class Reply:
    """One request's answer, written from its job's events in the encoding a subclass gives.

    A failure before the first piece is an HTTP error; after it, the head is gone and the error
    ends the body.
    """

    def __init__(self, job: Job, registry: JobRegistry, content_type: str):
        self.job = job
        self.started = False  # the first piece (and with it the head) went out
        self.result: dict = {}
        # A client that goes away cancels an infer, as an SSE reader's does; a download goes on.
        on_disconnect = partial(registry.reader_left, job) if job.cancel_on_disconnect else None
        self.response = StreamingResponse(200, self._produce, content_type, on_disconnect=on_disconnect)

    def piece(self, text: str) -> bytes:
        """A streamed token."""
        raise NotImplementedError

    def other(self, name: str, data: bytes) -> bytes | None:
        """What to send for an event that is not a token, a result or the end, if anything."""
        return None

    def finish(self) -> bytes:
        """What follows the last token, once the job is done: its result is in `self.result`."""
        raise NotImplementedError

    def error(self, status: int, message: str) -> bytes:
        """The body of a failed job's answer, or while `self.started`, the last piece of the body."""
        raise NotImplementedError

    async def _produce(self, send) -> None:
        with self.job.reading():
            await follow(self.job, partial(self._handle, send))
        if self.response.on_disconnect is not None:  # ended before its job: its events were lost to a slow reader
            self.response.on_disconnect()

    async def _handle(self, send, name: str, data: bytes) -> None:
        if name == "token":
            piece = self.piece(msgspec.json.decode(data)["t"])
            self.started = True
            await send(piece)
        elif name == "result":
            self.result = msgspec.json.decode(data)
        elif name == "end" and data == b"[DONE]":
            await send(self.finish(), last=True)
        elif name == "end":
            status, message = failure(self.job, data.decode())
            if not self.started:
                self.response.status, self.response.content_type = status, "application/json"
            await send(self.error(status, message), last=True)
        elif (piece := self.other(name, data)) is not None:
            self.started = True
            await send(piece)


def _parse(rendered: bytes) -> tuple[str, bytes]:
    """(name, data) of an event the registry rendered as `id: N\\nevent: NAME\\ndata: DATA\\n\\n`."""
    _, name, data = rendered.split(b"\n", 3)[:3]
    return name[7:].decode(), data[6:]


async def follow(job: Job, handle: Callable[[str, bytes], Awaitable[None]]) -> None:
    """Hand each of the job's events, from its first to its end, to `handle(name, data)`."""
    after = 0
    while True:
        backlog, gap, feed = job.subscribe(after)
        if gap is not None:  # this reader's client was too slow for the replay buffer
            await handle("end", b"[ERROR] %d events were lost to a slow reader" % (gap[1] - gap[0] + 1))
            return
        for event_id, rendered in backlog:
            after = event_id
            await handle(*_parse(rendered))
        if feed is None:
            return
        with feed:
            async for event_id, rendered in feed:
                if event_id:  # 0: a keep-alive or a nudge, which only SSE readers need
                    after = event_id
                    await handle(*_parse(rendered))


async def end_of(job: Job) -> str:
    """The job's end marker, once it has ended."""
    marker = ""

    async def keep(name: str, data: bytes) -> None:
        nonlocal marker
        if name == "end":
            marker = data.decode()

    await follow(job, keep)
    return marker
