"""Ollama-compatible routes (/api/generate, /api/chat, /api/embed, /api/tags, /api/show, /api/create, ...)."""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import msgspec

from . import __version__
from .blobs import BlobError, sha256_of
from .compat import (
    SAMPLING, Refused, Reply, decode, end_of, failure, invalid, no_limit, sampling, start_job, start_model_job,
)
from .jobs import Job, JobFailed, JobRegistry
from .models import Model, Models, model_id, resolve_source
from .operations import MAX_TOKENS, Embed, History, ModelCopy, ModelDelete, ModelDownload, Settings
from .server import Request, Response, StreamingResponse, error_response, json_response, only
from .workers import Supervisor

_encode = msgspec.json.Encoder().encode


# Ollama warns of options it does not know and goes on; so does rbeed with those it does not
# apply (num_thread, num_keep, ...), which clients send with their defaults.
class _Options(msgspec.Struct):
    num_predict: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_last_n: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    num_ctx: int | None = None


class _Message(msgspec.Struct):
    role: str
    content: str = ""
    images: list | None = None
    tool_calls: list | None = None


class _ModelRequest(msgspec.Struct, kw_only=True):
    model: str
    options: _Options = msgspec.field(default_factory=_Options)
    keep_alive: float | str | None = None  # seconds, or a duration such as "5m"; seconds once decoded


class _Request(_ModelRequest):
    stream: bool = True
    format: str | dict | None = None
    tools: list | None = None
    think: bool | str | None = None


class _Generate(_Request):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    images: list | None = None
    suffix: str | None = None
    template: str | None = None
    context: list | None = None


class _Chat(_Request):
    messages: list[_Message] = []


class _Embed(_ModelRequest):
    input: str | list[str] = ""  # "" or []: only load the model
    truncate: bool = True
    dimensions: int | None = None


class _Embeddings(_ModelRequest):
    """The older /api/embeddings: one prompt, its vector as pooled (not unit length)."""

    prompt: str = ""


class _Named(msgspec.Struct):
    model: str = ""
    name: str = ""  # the older name of `model`

    @property
    def given(self) -> str:
        if not (self.model or self.name):
            raise Refused(400, "model is required", "model")
        return self.model or self.name


class _Copy(msgspec.Struct):
    source: str
    destination: str


class _Create(_Named):
    """`ollama create`, from a model rbeed has or a GGUF uploaded to /api/blobs: Ollama's fields
    for what else it is made of are refused."""

    from_: str = msgspec.field(default="", name="from")
    system: str | None = None
    parameters: dict | None = None
    stream: bool = True
    files: dict | None = None
    adapters: dict | None = None
    template: str | None = None
    messages: History | None = None
    license: str | list | None = None
    quantize: str | None = None
    modelfile: str | None = None  # the older API's


class _Pull(_Named):
    stream: bool = True
    insecure: bool = False  # rbeed's downloads check certificates always


# Why a create cannot be made of these (the others: not supported).
_UNMADE = {
    "adapters": "adapters (LoRA) are not supported by rbeed",
    "modelfile": "modelfile (the older API) is not supported by rbeed: give from or files, system and parameters",
}

# What /api/pull takes as a model to fetch, besides the id of one it has.
_SOURCES = ("hf:", "http://", "https://", "file:", "/")


# Infer's settings by Ollama's names (its options, and a Modelfile's PARAMETERs).
_OPTIONS = {name: name for name in (*SAMPLING, "stop")} | {"max_tokens": "num_predict", "n_ctx": "num_ctx"}
# Infer's fields by the names an Ollama client gave them, for a 400's message.
_NAMES = {name: f"options.{option}" for name, option in _OPTIONS.items()} | {"prompt": "prompt", "messages": "messages"}
_EMBED_NAMES = {"n_ctx": "options.num_ctx"}
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: float | str | None) -> float | None:
    """Ollama's keep_alive (seconds, or a Go duration such as "5m" or "1h30m") as infer's: -1 keeps."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        sign, text = (-1, text[1:]) if text.startswith("-") else (1, text.removeprefix("+"))
        if re.fullmatch(r"\d+(\.\d*)?", text):  # a bare number is seconds
            value = sign * float(text)
        elif text and _DURATION.sub("", text) == "":
            value = sign * sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(text))
        else:
            raise Refused(400, f"keep_alive {value!r} is not a duration such as 300, \"5m\" or \"1h\"", "keep_alive")
    return -1.0 if value < 0 else float(value)


def _unsupported(body: _Generate | _Chat) -> str | None:
    """The first field asking for something rbeed does not do."""
    asks = {"tools": bool(body.tools), "think": body.think not in (None, False)}
    if isinstance(body, _Generate):
        asks |= {"images": bool(body.images), "suffix": bool(body.suffix), "template": bool(body.template),
                 "context": bool(body.context)}  # fmt: skip
    else:
        for i, message in enumerate(body.messages):
            asks |= {f"messages[{i}].images": bool(message.images), f"messages[{i}].tool_calls": bool(message.tool_calls)}
    return next((field for field, asked in asks.items() if asked), None)


def _is_load(body: _Generate | _Chat) -> bool:
    """A request with nothing to answer: Ollama loads the model (or with keep_alive 0, unloads it)."""
    if isinstance(body, _Generate):
        return not body.prompt and not body.system
    return not body.messages


def _infer_fields(body: _Generate | _Chat, model: Model) -> dict:
    if field := _unsupported(body):
        raise Refused(400, f"{field} is not supported by rbeed", field)
    options = body.options
    predict = options.num_predict
    fields = {
        "operation": "infer", "model": model.id, "stream": body.stream,
        # Ollama's default, -1, and -2 go on until the end of text or a full context.
        "max_tokens": no_limit(model) if predict is None else MAX_TOKENS if predict < 0 else predict,
        **sampling(options), "stop": options.stop, "n_ctx": options.num_ctx, "keep_alive": body.keep_alive,
        "format": None if body.format == "" else body.format,  # "" is Ollama's none; {} a schema (any JSON)
    }  # fmt: skip
    if _is_load(body):
        # A load is an infer of one token, its text dropped: the worker is loaded as for any job.
        # The prompt is a space, which every vocabulary has a token for ("" may have none).
        return fields | {"prompt": " ", "max_tokens": 1, "stream": False}
    if isinstance(body, _Chat):
        for i, message in enumerate(body.messages):
            if message.role not in ("system", "user", "assistant"):
                raise Refused(400, f"role {message.role!r} is not supported; use system, user or assistant",
                              f"messages[{i}].role")  # fmt: skip
        return fields | {"messages": [{"role": m.role, "content": m.content} for m in body.messages]}
    # As Ollama does, a prompt goes through the model's template unless raw; a model without
    # one (a base model) continues the prompt as it is.
    if body.raw or model.without_chat_template:
        if body.system and not body.raw:
            raise Refused(400, "the model has no chat template to put `system` in", "system")
        return fields | {"prompt": body.prompt}
    system = [{"role": "system", "content": body.system}] if body.system else []
    return fields | {"messages": [*system, {"role": "user", "content": body.prompt}]}


def _embed_fields(body: _Embed | _Embeddings, model: Model) -> dict:
    if isinstance(body, _Embeddings):
        inputs, more = [body.prompt] if body.prompt else [], {"normalize": False}
    else:
        inputs = ([body.input] if body.input else []) if isinstance(body.input, str) else body.input
        more = {"truncate": body.truncate, "dimensions": body.dimensions}
    return {"operation": "embed", "model": model.id, "input": inputs, "n_ctx": body.options.num_ctx,
            "keep_alive": body.keep_alive, **more}  # fmt: skip


def _timestamp(seconds: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if seconds is None else seconds, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _parameter_size(count: int | None) -> str:
    if not count:
        return ""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= scale:
            return f"{count / scale:.2f}".rstrip("0").rstrip(".") + suffix
    return str(count)


def _details(model: Model) -> dict:
    meta = model.metadata
    family = meta.get("architecture") or ""
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family] if family else None,
            "parameter_size": _parameter_size(meta.get("parameters")),
            "quantization_level": meta.get("quantization") or ""}  # fmt: skip


def _tag(model: Model) -> dict:
    return {"name": model.id, "model": model.id, "modified_at": _timestamp(model.added_at), "size": model.size,
            "digest": model.sha256, "details": _details(model)}  # fmt: skip


def _parameters(defaults: Settings) -> list[tuple[str, str]]:
    """A model's defaults as a Modelfile's PARAMETERs: Ollama's names, a line per stop string."""
    lines = []
    for name, option in _OPTIONS.items():
        value = getattr(defaults, name)
        values = value if isinstance(value, list) else [] if value is None else [value]
        lines += [(option, _encode(item).decode() if isinstance(item, str) else str(item)) for item in values]
    return lines


def _modelfile(model: Model, path: Path, parameters: list[tuple[str, str]]) -> str:
    """What `ollama show --modelfile` prints: what the model is made of, in a Modelfile."""
    lines = [f"# Modelfile of rbeed's model {model.id}", f"FROM {path}"]
    if model.system:
        lines.append(f'SYSTEM """{model.system}"""')
    lines += [f"PARAMETER {name} {value}" for name, value in parameters]
    lines += [f'MESSAGE {message.role} """{message.content}"""' for message in model.messages]
    return "\n".join(lines) + "\n"


def _settings(parameters: dict) -> Settings:
    """A create's `parameters` (Ollama's names) as infer's settings; Refused for those rbeed does not apply."""
    fields = {}
    by_option = {option: name for name, option in _OPTIONS.items()}
    for option, value in parameters.items():
        if option not in by_option:
            raise Refused(400, f"parameter {option!r} is not supported by rbeed; it applies "
                               f"{', '.join(by_option)}", f"parameters.{option}")  # fmt: skip
        if option == "num_predict" and isinstance(value, int) and value < 0:
            value = MAX_TOKENS  # -1 and -2: until the end of text or a full context
        fields[by_option[option]] = [value] if option == "stop" and isinstance(value, str) else value
    try:
        return msgspec.convert(fields, Settings)
    except msgspec.ValidationError as exc:
        raise invalid(exc, {name: f"parameters.{option}" for name, option in _OPTIONS.items()}) from None


def _line(model: str, chat: bool, stream: bool, text: str, **more) -> bytes:
    """One object of a reply (a piece of the text, or with `done` its end); streamed, a line."""
    answer = {"model": model, "created_at": _timestamp()}
    if chat:
        answer["message"] = {"role": "assistant", "content": text}
    else:
        answer["response"] = text
    return _encode(answer | {"done": False} | more) + (b"\n" if stream else b"")


class _Lines(Reply):
    """A reply in Ollama's encoding: streamed, a line of JSON per piece; else one object."""

    def __init__(self, job: Job, stream: bool, registry: JobRegistry):
        super().__init__(job, registry, "application/x-ndjson" if stream else "application/json")
        self.stream = stream

    def error(self, status: int, message: str) -> bytes:
        # A line of its own in a stream already begun; else the whole body.
        return _encode({"error": message}) + (b"\n" if self.started else b"")


class _Reply(_Lines):
    """A generation's answer, translated from its infer job's events."""

    def __init__(self, job: Job, body: _Generate | _Chat, registry: JobRegistry):
        super().__init__(job, body.stream, registry)
        self.model, self.chat = body.model, isinstance(body, _Chat)
        self.load = _is_load(body)
        self.unload = self.load and body.keep_alive == 0
        self.began = time.perf_counter()

    def piece(self, text: str) -> bytes:
        return _line(self.model, self.chat, self.stream, text)

    def finish(self) -> bytes:
        result = self.result
        if self.load:
            return _line(self.model, self.chat, self.stream, "", done=True, done_reason="unload" if self.unload else "load")
        completion, rate = result.get("completion_tokens", 0), result.get("tokens_per_s") or 0
        return _line(
            self.model, self.chat, self.stream, "" if self.stream else result.get("text", ""), done=True,
            done_reason=result.get("finish_reason"), total_duration=int((time.perf_counter() - self.began) * 1e9),
            load_duration=int(result.get("load_ms", 0) * 1e6),
            prompt_eval_count=result.get("prompt_tokens", 0), prompt_eval_duration=int(result.get("ttft_ms", 0) * 1e6),
            eval_count=completion, eval_duration=_eval_nanoseconds(completion, rate, result.get("ttft_ms", 0)),
        )  # fmt: skip


def _eval_nanoseconds(completion: int, rate: float, ttft_ms: float) -> int:
    """The time from the first token to the last (the rate is measured between tokens). One token
    has no such time: its own is the time to it, as clients divide eval_count by eval_duration."""
    if rate:
        return int((completion - 1) / rate * 1e9)
    return int(ttft_ms * 1e6) if completion else 0


class _EmbedReply(_Lines):
    """An embedding's answer, from its embed job: /api/embed's object, or /api/embeddings' older one."""

    def __init__(self, job: Job, registry: JobRegistry, model: str, older: bool):
        super().__init__(job, False, registry)
        self.model, self.older = model, older
        self.began = time.perf_counter()

    def finish(self) -> bytes:
        vectors = self.result.get("embeddings", [])
        if self.older:
            return _encode({"embedding": vectors[0] if vectors else []})
        took = int((time.perf_counter() - self.began) * 1e9)
        return _encode({"model": self.model, "embeddings": vectors, "total_duration": took,
                        "load_duration": int(self.result.get("load_ms", 0) * 1e6),
                        "prompt_eval_count": self.result.get("prompt_tokens", 0)})  # fmt: skip


class _StatusReply(_Lines):
    """A pull's or a create's answer, from its job: Ollama's status lines, progress as `completed` of `total`."""

    def __init__(self, job: Job, stream: bool, registry: JobRegistry, model: str):
        super().__init__(job, stream, registry)
        self.model = model

    def _status(self, **fields) -> bytes:
        line = _encode({key: value for key, value in fields.items() if value is not None})
        return line + (b"\n" if self.stream else b"")

    def other(self, name: str, data: bytes) -> bytes | None:
        if not self.stream:
            return None
        event = msgspec.json.decode(data)
        if name == "progress":
            return self._status(status=f"pulling {self.model}", total=event.get("total"), completed=event["done"])
        return self._status(status=event["message"]) if name == "narration" else None

    def finish(self) -> bytes:
        return self._status(status="success")


class OllamaAPI:
    """The routes that tools written for Ollama use (its client libraries, chat front ends).

    Each generation is an `infer` job, listed and cancellable under /v1/jobs. Models are named by
    their rbeed ids; `ID:latest` is taken for `ID`, as Ollama names an untagged model.
    """

    def __init__(self, registry: JobRegistry, models: Models, supervisor: Supervisor, accepting: Callable[[], bool]):
        self.registry, self.models, self.supervisor, self.accepting = registry, models, supervisor, accepting
        self.routes = {
            "/api/version": partial(self._read, lambda: {"version": __version__}),
            "/api/tags": partial(self._read, lambda: {"models": [_tag(m) for m in self.models.catalog.list()]}),
            "/api/ps": partial(self._read, self._running),
            "/api/show": self._show,
            "/api/pull": self._pull,
            "/api/delete": self._delete,
            "/api/copy": self._copy,
            "/api/create": self._create,
            "/api/blobs/": self._blob,
            "/api/generate": partial(self._generate, _Generate),
            "/api/chat": partial(self._generate, _Chat),
            "/api/embed": partial(self._embed, _Embed),
            "/api/embeddings": partial(self._embed, _Embeddings),
        }
        self.uploads = {"/api/blobs/"}  # the routes that read their body as it comes

    async def _read(self, answer: Callable[[], dict], request: Request) -> Response:
        return only(request, "GET") or json_response(200, answer())

    def _running(self) -> dict:
        models = []
        forever = time.time() + 10 * 365 * 86400  # as Ollama shows a model kept for good, and one kept longer
        for worker in self._loaded():
            if (model := self.models.catalog.get(worker.model)) is None:
                continue
            record = worker.record()
            stops = record.stops_at or (forever if record.keep_alive == -1 else None)
            models.append(_tag(model) | {"size": record.rss or 0, "size_vram": 0, "context_length": worker.n_ctx,
                                         "expires_at": _timestamp(min(stops, forever)) if stops else None})  # fmt: skip
        return {"models": models}

    def _loaded(self) -> list:
        """The workers that hold their model: not those on their way out."""
        return [w for w in self.supervisor.workers.values() if w.live and not w.closing]

    @staticmethod
    def _decode(request: Request, kind: type[_ModelRequest]) -> _ModelRequest:
        """The request, its model id without Ollama's `:latest` and its keep_alive in seconds."""
        body = decode(request.body, kind)
        body.model, body.keep_alive = body.model.removesuffix(":latest"), keep_alive_seconds(body.keep_alive)
        return body

    def _named_model(self, request: Request) -> Model:
        """The model that the request's `model` (or `name`) names; Refused (404) when unknown."""
        return self._model(decode(request.body, _Named).given, "model")

    def _model(self, name: str, field: str) -> Model:
        try:
            return self.models.lookup(name.removesuffix(":latest"))
        except JobFailed as exc:
            raise Refused(exc.status, str(exc), field) from None

    async def _show(self, request: Request) -> Response:
        if refusal := only(request, "POST"):
            return refusal
        try:
            model = self._named_model(request)
        except Refused as exc:
            return error_response(exc.status, str(exc))
        meta = model.metadata
        info = {"general.architecture": meta.get("architecture"), "general.parameter_count": meta.get("parameters"),
                "general.file_type": meta.get("file_type")}  # fmt: skip
        for key in ("context_length", "embedding_length", "vocab_size"):
            if meta.get("architecture") and meta.get(key):
                info[f"{meta['architecture']}.{key}"] = meta[key]
        # As Ollama tells them apart: an encoder, or a model whose GGUF sets a pooling, is for embeddings.
        embedder = model.is_encoder or meta.get("pooling") not in (None, "none")
        parameters = _parameters(model.defaults)
        answer = {"modelfile": _modelfile(model, self.models.path_of(model), parameters),
                  "parameters": "\n".join(f"{name:<30} {value}" for name, value in parameters),
                  "details": _details(model), "model_info": info,
                  "capabilities": ["embedding" if embedder else "completion"],
                  "modified_at": _timestamp(model.added_at)}  # fmt: skip
        if model.messages:
            answer["messages"] = model.messages
        return json_response(200, answer | ({"system": model.system} if model.system else {}))

    async def _generate(self, kind: type[_Generate | _Chat], request: Request) -> Response | StreamingResponse:
        if refusal := only(request, "POST") or self._closed():
            return refusal
        try:
            body = self._decode(request, kind)
            if _is_load(body) and body.keep_alive == 0:
                model = self.models.lookup(body.model)  # an unknown model is a 404 here too
                if not any(self.models.same_file(w.model, model) for w in self._loaded()):
                    line = _line(body.model, kind is _Chat, body.stream, "", done=True, done_reason="unload")
                    return Response(200, line, "application/x-ndjson" if body.stream else "application/json")
            job = start_model_job(self.registry, self.models, body.model, partial(_infer_fields, body), _NAMES)
        except (Refused, JobFailed) as exc:  # JobFailed: the model is unknown (404) or being deleted (409)
            return error_response(exc.status, str(exc))
        return _Reply(job, body, self.registry).response

    async def _embed(self, kind: type[_Embed | _Embeddings], request: Request) -> Response | StreamingResponse:
        if refusal := only(request, "POST") or self._closed():
            return refusal
        try:
            body = self._decode(request, kind)
            names = _EMBED_NAMES | ({"input": "prompt"} if kind is _Embeddings else {})
            job = start_model_job(self.registry, self.models, body.model, partial(_embed_fields, body), names, Embed)
        except Refused as exc:
            return error_response(exc.status, str(exc))
        return _EmbedReply(job, self.registry, body.model, kind is _Embeddings).response

    async def _pull(self, request: Request) -> Response | StreamingResponse:
        if refusal := only(request, "POST") or self._closed():
            return refusal
        try:
            body = decode(request.body, _Pull)
            source, model = self._source(body.given)
            job = start_job(self.registry, ModelDownload(model=source, id=model))
        except Refused as exc:
            return error_response(exc.status, str(exc))
        return _StatusReply(job, body.stream, self.registry, model).response

    def _source(self, name: str) -> tuple[str, str]:
        """What model_download fetches for a pull of `name`, and the id of the model it makes.

        A model rbeed has is fetched again from its source if its file is gone, as a pull
        repairs what Ollama has; other names are sources (Ollama's registry is not one).
        """
        with contextlib.suppress(JobFailed):
            model = self.models.lookup(name.removesuffix(":latest"))
            return model.source, model.id
        if not name.startswith(_SOURCES):
            raise Refused(404, f"model {name!r} not found; rbeed pulls hf:owner/repo/path/file.gguf, "
                               "an http(s):// or file:// URL, or an absolute path", "model")  # fmt: skip
        try:
            model = model_id(resolve_source(name, self.models.config.hf_base)[1])
        except JobFailed as exc:
            raise Refused(400, str(exc), "model") from None
        # model_download keeps the model it has and says so, in a narration a pull's answer has no
        # room for: "success" would tell of a file it did not fetch. /api/create refuses as well.
        if (existing := self.models.catalog.get(model)) is not None and existing.source != name:
            raise Refused(409, f"model {model} exists, from {existing.source}; delete it to pull {name}", "model")
        return name, model

    async def _delete(self, request: Request) -> Response:
        if refusal := only(request, "DELETE") or self._closed():
            return refusal
        try:
            job = start_job(self.registry, ModelDelete(id=self._named_model(request).id))
        except Refused as exc:
            return error_response(exc.status, str(exc))
        return await self._answer(job)

    async def _copy(self, request: Request) -> Response:
        """`ollama cp`: the destination is named as any model, its id the slug (`mine:v2` → `mine-v2`)."""
        if refusal := only(request, "POST") or self._closed():
            return refusal
        try:
            body = decode(request.body, _Copy)
            source = self._model(body.source, "source")
            job = start_job(self.registry, ModelCopy(id=source.id, to=self._new_id(body.destination, "destination")))
        except Refused as exc:
            return error_response(exc.status, str(exc))
        return await self._answer(job)

    async def _create(self, request: Request) -> Response | StreamingResponse:
        """`ollama create` FROM a model rbeed has: a model_copy with its system and parameters."""
        if refusal := only(request, "POST") or self._closed():
            return refusal
        try:
            body = decode(request.body, _Create)
            for field in ("adapters", "modelfile", "template", "license", "quantize"):
                if getattr(body, field):
                    raise Refused(400, _UNMADE.get(field, f"{field} is not supported by rbeed"), field)
            if bool(body.from_) == bool(body.files):
                raise Refused(400, "give one of from (a model rbeed has) and files (a GGUF uploaded to "
                                   "/api/blobs)", "files" if body.files else "from")  # fmt: skip
            to = self._new_id(body.given, "model")
            settings = None if body.parameters is None else _settings(body.parameters)
            if body.files:
                blob, digest = self._blob_of(body.files)
                if (existing := self.models.catalog.get(to)) is not None and existing.sha256 != digest:
                    raise Refused(409, f"model {to} already exists (sha256 {existing.sha256}); "
                                       "model_delete it first", "model")  # fmt: skip
                # Made again, the model gets the record it is given now: no system or defaults, none.
                op = ModelDownload(model=str(blob), id=to, sha256=digest, system=body.system or "",
                                   defaults=settings or Settings(), messages=body.messages or [])  # fmt: skip
            else:
                source = self._model(body.from_, "from")
                if why := source.refuses_system(body.system, body.messages):
                    raise Refused(400, why, "system" if body.system else "messages")
                if why := self.models.taken(to, source):
                    raise Refused(409, why, "model")  # Ollama replaces it; rbeed keeps a model it has
                # As Ollama's: an empty system or history leaves the model's.
                op = ModelCopy(id=source.id, to=to, system=body.system or None, defaults=settings,
                               messages=body.messages or None)  # fmt: skip
            job = start_job(self.registry, op)
        except Refused as exc:
            return error_response(exc.status, str(exc))
        return _StatusReply(job, body.stream, self.registry, to).response

    def _blob_of(self, files: dict) -> tuple[Path, str]:
        """The uploaded GGUF a create's `files` ({name: digest}) names, and its sha256."""
        if len(files) != 1:
            raise Refused(400, "rbeed makes a model of one GGUF file; a model in several files "
                               "(safetensors, or a GGUF with a projector) is not supported", "files")  # fmt: skip
        name, digest = next(iter(files.items()))
        try:
            path = self.models.blobs.path(digest) if isinstance(digest, str) else None
        except BlobError as exc:
            raise Refused(400, str(exc), f"files.{name}") from None
        if path is None or not path.exists():
            raise Refused(400, f"blob {digest!r} not found: POST the file to /api/blobs/<its digest> first",
                          f"files.{name}")  # fmt: skip
        return path, sha256_of(path.name)

    async def _blob(self, request: Request) -> Response:
        """A file for `ollama create`, named by its sha256: HEAD asks whether it is here, POST uploads it."""
        if refusal := only(request, "HEAD", "POST") or self._closed():
            return refusal
        blobs, digest = self.models.blobs, request.path.rsplit("/", 1)[1]
        try:
            if blobs.path(digest).exists():
                if request.method == "POST" and "100-continue" not in request.headers.get("expect", "").lower():
                    while await request.receive():  # as Ollama's Python client sends it anyway, before it reads
                        pass
                return Response(200)
            if request.method == "HEAD":
                return error_response(404, "blob not found")
            length = request.headers.get("content-length", "")
            await blobs.receive(digest, request.receive, int(length) if length.isdigit() else None)
        except BlobError as exc:
            return error_response(exc.status, str(exc))
        return Response(201)

    @staticmethod
    def _new_id(name: str, field: str) -> str:
        """The id of a model named `name` anew, as Ollama names one (`mine/tiny:v2` → `mine-tiny-v2`)."""
        try:
            return model_id(name.removesuffix(":latest"))
        except JobFailed as exc:
            raise Refused(400, str(exc), field) from None

    @staticmethod
    async def _answer(job: Job) -> Response:
        """An empty 200 once the job is done, as Ollama answers a delete or a copy."""
        if (marker := await end_of(job)) == "[DONE]":
            return Response(200)
        return error_response(*failure(job, marker))

    def _closed(self) -> Response | None:
        return None if self.accepting() else error_response(503, "daemon shutting down")
