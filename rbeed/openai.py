"""OpenAI-compatible routes (/v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings) and
llama-server's /tokenize and /detokenize, each request a job."""

from __future__ import annotations

import array
import base64
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Literal

import msgspec

from .compat import Refused, Reply, decode, no_limit, sampling, start_model_job
from .jobs import Job, JobFailed, JobRegistry
from .models import Model, Models
from .operations import Detokenize, Embed, Infer, Tokenize
from .server import Request, Response, StreamingResponse, json_response, only

_encode = msgspec.json.Encoder().encode


class _Part(msgspec.Struct):
    type: str
    text: str | None = None


class _Message(msgspec.Struct):
    role: str
    content: str | list[_Part] | None = None


class _StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _JsonSchema(msgspec.Struct):
    name: str = ""
    schema: dict | None = None
    strict: bool | None = None  # rbeed's grammar holds the output to the schema either way
    description: str | None = None


class _ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None

    @property
    def format(self) -> str | dict | None:
        """As infer's `format`."""
        if self.type != "json_schema":
            return "json" if self.type == "json_object" else None
        if self.json_schema is None or self.json_schema.schema is None:
            raise Refused(400, "response_format of type json_schema needs json_schema.schema", "response_format")
        return self.json_schema.schema


# Clients send many fields (user, metadata, ...): unknown ones are ignored, as OpenAI's server does;
# known ones rbeed cannot honour are refused by _unsupported rather than silently dropped.
class _Request(msgspec.Struct, kw_only=True):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # llama-server's and Ollama's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    keep_alive: float | None = None  # Ollama's extension, in seconds here
    n: int = 1
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repeat_penalty: float | None = None  # llama-server's extensions
    repeat_last_n: int | None = None
    min_p: float | None = None
    logit_bias: dict[str, float] | None = None  # by token id, as text: infer's checks them
    logprobs: bool | int | None = None
    tools: list | None = None
    response_format: _ResponseFormat | None = None  # for completions too, as llama-server takes it
    grammar: str | None = None  # GBNF: llama-server's extension


class _Completion(_Request):
    prompt: str | list[str]
    echo: bool = False
    suffix: str | None = None


class _Chat(_Request):
    messages: list[_Message]


class _Embedding(msgspec.Struct, kw_only=True):
    model: str
    input: str | list  # text, or texts; OpenAI's token arrays are refused
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


def _embed_fields(body: _Embedding, model: Model) -> dict:
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not all(isinstance(text, str) for text in inputs):
        raise Refused(400, "input must be text or a list of texts; token arrays are not supported", "input")
    return {"operation": "embed", "model": model.id, "input": inputs, "dimensions": body.dimensions}


class _Tokenize(msgspec.Struct, kw_only=True):
    """llama-server's /tokenize; `model` may be left out where the catalog holds one."""

    content: str
    model: str | None = None
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class _Detokenize(msgspec.Struct, kw_only=True):
    tokens: list[int]
    model: str | None = None


def _token_fields(body: _Tokenize | _Detokenize, model: Model) -> dict:
    if isinstance(body, _Detokenize):
        return {"operation": "detokenize", "model": model.id, "tokens": body.tokens}
    return {"operation": "tokenize", "model": model.id, "text": body.content, "add_special": body.add_special,
            "parse_special": body.parse_special, "with_pieces": body.with_pieces}  # fmt: skip


def _base64(vector: list[float]) -> str:
    """As OpenAI's base64 encoding: the float32s, little-endian."""
    floats = array.array("f", vector)
    if sys.byteorder == "big":
        floats.byteswap()
    return base64.b64encode(floats.tobytes()).decode()


# Infer's fields by the names an OpenAI client gave them, where they differ, for a 400's message.
_NAMES = {"format": "response_format", "text": "content"}


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> Response:
    """An error in OpenAI's shape, which its client libraries read."""
    error = {"message": message, "type": _kind(status), "param": param, "code": code}
    return Response(status, _encode({"error": error}))


def _kind(status: int) -> str:
    """OpenAI's error type for an HTTP status: the client's fault, or the server's."""
    return "server_error" if status >= 500 else "invalid_request_error"


def _unsupported(body: _Completion | _Chat) -> str | None:
    """The first field asking for something rbeed does not do."""
    asks = {
        "n": body.n != 1,
        "logprobs": body.logprobs not in (None, False), "tools": bool(body.tools),
    }  # fmt: skip
    if isinstance(body, _Completion):
        asks |= {"echo": body.echo, "suffix": bool(body.suffix)}
    return next((field for field, asked in asks.items() if asked), None)


def _text_of(message: _Message, index: int) -> dict[str, str]:
    """The message as infer takes it: one of its roles, and the content as one string."""
    role = "system" if message.role == "developer" else message.role
    if role not in ("system", "user", "assistant"):
        raise Refused(400, f"role {message.role!r} is not supported; use system, user or assistant",
                      f"messages[{index}].role")  # fmt: skip
    if isinstance(message.content, list):
        if any(part.type != "text" or part.text is None for part in message.content):
            raise Refused(400, "only text content parts are supported", f"messages[{index}].content")
        return {"role": role, "content": "".join(part.text for part in message.content)}
    return {"role": role, "content": message.content or ""}


def _token_ids(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    """OpenAI's logit_bias, keyed by token ids written as text, as infer takes it."""
    try:
        return None if logit_bias is None else {int(token): bias for token, bias in logit_bias.items()}
    except ValueError:
        raise Refused(400, "logit_bias keys must be token ids: integers, as text", "logit_bias") from None


def _infer_fields(body: _Completion | _Chat, model: Model) -> dict:
    if field := _unsupported(body):
        raise Refused(400, f"{field} is not supported by rbeed", field)
    limit = body.max_tokens if body.max_tokens is not None else body.max_completion_tokens
    fields = {
        "operation": "infer", "model": model.id, "stream": body.stream,
        # Without a limit, llama-server and Ollama generate until the end of text or a full context.
        "max_tokens": no_limit(model) if limit is None else limit,
        **sampling(body), "keep_alive": body.keep_alive,
        "format": body.response_format and body.response_format.format, "grammar": body.grammar,
        "stop": [body.stop] if isinstance(body.stop, str) else body.stop, "logit_bias": _token_ids(body.logit_bias),
    }  # fmt: skip
    if isinstance(body, _Chat):
        fields["messages"] = [_text_of(message, i) for i, message in enumerate(body.messages)]
    elif isinstance(body.prompt, list) and len(body.prompt) != 1:
        raise Refused(400, "give one prompt per request", "prompt")
    else:
        fields["prompt"] = body.prompt[0] if isinstance(body.prompt, list) else body.prompt
    return fields


class _Reply(Reply):
    """One request's answer, translated from its job's events into OpenAI's objects."""

    def __init__(self, job: Job, body: _Completion | _Chat, registry: JobRegistry):
        super().__init__(job, registry, "text/event-stream" if body.stream else "application/json")
        self.model, self.chat, self.stream = body.model, isinstance(body, _Chat), body.stream
        self.usage_wanted = body.stream_options is not None and body.stream_options.include_usage
        self.created = int(time.time())

    def _object(self, choice: dict, usage: bool = False) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if self.stream and self.chat else "")
        answer = {"id": self.job.id, "object": kind, "created": self.created, "model": self.model,
                  "choices": [{"index": 0, **choice, "logprobs": None}]}  # fmt: skip
        if usage:
            prompt, completion = self.result.get("prompt_tokens", 0), self.result.get("completion_tokens", 0)
            answer["usage"] = {"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion}  # fmt: skip
        return answer

    def _choice(self, text: str | None, finish: str | None) -> dict:
        if not self.chat:
            return {"text": text or "", "finish_reason": finish}
        if not self.stream:
            return {"message": {"role": "assistant", "content": text}, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if not self.started else {}
        return {"delta": delta | ({"content": text} if text is not None else {}), "finish_reason": finish}

    def piece(self, text: str) -> bytes:
        return b"data: %s\n\n" % _encode(self._object(self._choice(text, None)))

    def finish(self) -> bytes:
        finish = self.result.get("finish_reason")
        if not self.stream:
            return _encode(self._object(self._choice(self.result.get("text", ""), finish), usage=True))
        pieces = [self._object(self._choice(None, finish))]
        if self.usage_wanted:
            pieces.append(self._object({}, usage=True) | {"choices": []})
        return b"".join(b"data: %s\n\n" % _encode(piece) for piece in pieces) + b"data: [DONE]\n\n"

    def error(self, status: int, message: str) -> bytes:
        if self.started:  # in the stream, with no [DONE] after it
            return b"data: %s\n\n" % _encode({"error": {"message": message, "type": _kind(status)}})
        return _error(status, message).body


class _JsonReply(Reply):
    """An answer given whole, as one JSON object, once the job is done."""

    def __init__(self, job: Job, body: msgspec.Struct, registry: JobRegistry):
        super().__init__(job, registry, "application/json")

    def error(self, status: int, message: str) -> bytes:
        return _error(status, message).body


class _EmbeddingReply(_JsonReply):
    """An embed job's answer as OpenAI's list of embeddings."""

    def __init__(self, job: Job, body: _Embedding, registry: JobRegistry):
        super().__init__(job, body, registry)
        self.model, self.encoding = body.model, body.encoding_format

    def finish(self) -> bytes:
        vectors, tokens = self.result.get("embeddings", []), self.result.get("prompt_tokens", 0)
        data = [{"object": "embedding", "index": i, "embedding": _base64(v) if self.encoding == "base64" else v}
                for i, v in enumerate(vectors)]  # fmt: skip
        return _encode({"object": "list", "data": data, "model": self.model,
                        "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip


class _TokensReply(_JsonReply):
    """A tokenize or detokenize job's answer as llama-server's."""

    def finish(self) -> bytes:
        result = self.result
        if "text" in result:
            return _encode({"content": result["text"]})
        tokens = result.get("tokens", [])
        if "pieces" in result:
            tokens = [{"id": token, "piece": piece} for token, piece in zip(tokens, result["pieces"])]
        return _encode({"tokens": tokens})


class OpenAIAPI:
    """The routes that clients of OpenAI's API (and of llama-server, Ollama's /v1) expect.

    Each completion is an `infer` job, listed and cancellable like any other under /v1/jobs; its
    `id` is the job's id.
    """

    def __init__(self, registry: JobRegistry, models: Models, accepting: Callable[[], bool]):
        self.registry = registry
        self.models = models
        self.accepting = accepting
        self.routes = {
            "/v1/models": self._list_models,
            "/v1/models/": self._get_model,
            "/v1/completions": partial(self._complete, _Completion),
            "/v1/chat/completions": partial(self._complete, _Chat),
            "/v1/embeddings": self._embed,
            "/tokenize": partial(self._tokens, Tokenize),
            "/detokenize": partial(self._tokens, Detokenize),
        }
        # Errors on these routes, and on any other under /v1/ but the job API's, in OpenAI's shape.
        self.error_shapes = dict.fromkeys([*self.routes, "/v1/"], shaped)

    async def _list_models(self, request: Request) -> Response:
        if refusal := only(request, "GET"):
            return refusal
        return json_response(200, {"object": "list", "data": [_model(m) for m in self.models.catalog.list()]})

    async def _get_model(self, request: Request) -> Response:
        if refusal := only(request, "GET"):
            return refusal
        try:
            model = self.models.lookup(request.path.rpartition("/")[2])
        except JobFailed as exc:
            return _model_not_found(exc)
        return json_response(200, _model(model))

    async def _complete(self, kind: type[_Completion | _Chat], request: Request) -> Response | StreamingResponse:
        return await self._start(request, kind, _infer_fields, _Reply)

    async def _embed(self, request: Request) -> Response | StreamingResponse:
        return await self._start(request, _Embedding, _embed_fields, _EmbeddingReply, Embed)

    async def _tokens(self, operation: type[Tokenize | Detokenize], request: Request) -> Response | StreamingResponse:
        kind = _Tokenize if operation is Tokenize else _Detokenize
        return await self._start(request, kind, _token_fields, _TokensReply, operation)

    def _only_model(self) -> str:
        """The model a request that names none is for: the catalog's only one."""
        ids = [model.id for model in self.models.catalog.list()]
        if len(ids) != 1:
            raise Refused(400, f"give the model: {', '.join(ids) or 'none is downloaded'}", "model")
        return ids[0]

    async def _start(self, request: Request, kind: type, fields_for, reply: type[Reply],
                     operation: type = Infer) -> Response | StreamingResponse:  # fmt: skip
        """The job that a POST of a `kind` asks for, answered by a `reply`; OpenAI's error else."""
        if refusal := only(request, "POST"):
            return refusal
        if not self.accepting():
            return _error(503, "daemon shutting down")
        try:
            body = decode(request.body, kind)
            model = self._only_model() if body.model is None else body.model
            job = start_model_job(self.registry, self.models, model, partial(fields_for, body), _NAMES, operation)
        except Refused as exc:
            return _error(exc.status, str(exc), exc.param, exc.code)
        return reply(job, body, self.registry).response


def _model(model: Model) -> dict:
    return {"id": model.id, "object": "model", "created": int(model.added_at), "owned_by": "rbeed"}


def _model_not_found(exc: JobFailed) -> Response:
    return _error(404, str(exc), "model", "model_not_found")


def shaped(response: Response) -> Response:
    """An error another layer gave as {"error": MESSAGE} (the API key's 401, a 404, a 405, a 413), in
    OpenAI's shape: its client libraries show the message only from there."""
    if response.status < 400:
        return response
    try:
        message = msgspec.json.decode(response.body).get("error")
    except (msgspec.DecodeError, AttributeError):
        return response
    if not isinstance(message, str):  # in OpenAI's shape already
        return response
    return msgspec.structs.replace(response, body=_error(response.status, message).body)
