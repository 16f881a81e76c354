"""The job payloads: one strict msgspec struct per operation, tagged by the `operation` field."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, ClassVar, Literal, Union

import msgspec

from . import gbnf, grammar

# Ids become file names and URL parts: keep them to a safe, boring alphabet.
Id = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")]
HiveId = Id
# A name, an IPv4 address, or an IPv6 one without brackets (see _check_host).
# No leading dash: a host is ssh_host's default, which ssh would take for an option.
Host = Annotated[str, msgspec.Meta(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9:][A-Za-z0-9._:-]*\Z")]
# systemctl --host's [USER@]HOST: no leading dash, which ssh would take for an option.
_SSH_HOST = r"(?:[A-Za-z0-9][A-Za-z0-9._-]*@)?[A-Za-z0-9\[][A-Za-z0-9._:\[\]-]*"
SshHost = Annotated[str, msgspec.Meta(min_length=1, max_length=253, pattern=rf"^{_SSH_HOST}\Z")]
SshHostOrNone = Annotated[str, msgspec.Meta(max_length=253, pattern=rf"^(?:{_SSH_HOST})?\Z")]  # "": removed
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Sha256 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{64}\Z")]
# A hive's API key goes in an HTTP header: visible ASCII only. "" in hive_update removes it.
ApiKey = Annotated[str, msgspec.Meta(max_length=512, pattern=r"^[!-~]*\Z")]
Device = Annotated[str, msgspec.Meta(pattern=r"^(cpu|cuda|cuda:[0-9]+|metal)\Z")]
# A worker's context in tokens (prompt plus generated text); 0 = what the model was trained for.
Context = Annotated[int, msgspec.Meta(ge=0, le=1 << 24)]
# OpenAI's presence and frequency penalties: subtracted from the logits of tokens already seen.
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]


class Operation(
    msgspec.Struct, tag_field="operation", forbid_unknown_fields=True, kw_only=True, frozen=True, omit_defaults=True
):
    """Base of every payload; `name` is the wire tag.

    Encoded (to forward it to another hive), it leaves out the fields not given: a hive of an
    older rbeed, which refuses fields it does not know, takes every job that sets none of them.
    """

    # A job whose only use is its live output (infer) is cancelled when its last reader leaves;
    # the others (downloads, spawns) go on for a later reader.
    cancel_on_disconnect: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return self.__struct_config__.tag


class HiveStart(Operation, tag="hive_start"):
    hive_id: HiveId = "localhost"


class HiveStop(Operation, tag="hive_stop"):
    hive_id: HiveId = "localhost"


class HiveList(Operation, tag="hive_list"):
    pass


class HiveGet(Operation, tag="hive_get"):
    id: HiveId


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")


def _check_host(host: str | None) -> None:
    """A host with a colon is an IPv6 address: one that is not would make no URL. A name's labels
    are 1 to 63 characters that start and end with a letter or digit, or it cannot be resolved."""
    if not host:
        return
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"host {host!r} is not a name or an IP address") from None
    elif not all(_LABEL.fullmatch(label) for label in host.removesuffix(".").split(".")):
        raise ValueError(f"host {host!r} is not a name or an IP address: each part between dots must be "
                         "1 to 63 letters, digits, - or _, starting and ending with a letter or digit")  # fmt: skip


class HiveCreate(Operation, tag="hive_create"):
    host: Host
    id: HiveId | None = None  # default: derived from host
    port: Port = 8500
    ssh_host: SshHost | None = None
    api_key: ApiKey | None = None  # what that hive's daemon wants from TCP clients

    def __post_init__(self) -> None:
        _check_host(self.host)


class HiveUpdate(Operation, tag="hive_update"):
    id: HiveId
    host: Host | None = None
    port: Port | None = None
    ssh_host: SshHostOrNone | None = None
    api_key: ApiKey | None = None

    def __post_init__(self) -> None:
        _check_host(self.host)


class HiveDelete(Operation, tag="hive_delete"):
    id: HiveId


class WorkerSpawn(Operation, tag="worker_spawn"):
    model: Id
    hive_id: HiveId = "localhost"
    worker: Literal["cpu", "cuda", "metal"] = "cpu"
    device: Annotated[int, msgspec.Meta(ge=0, le=255)] = 0
    threads: Annotated[int, msgspec.Meta(ge=1, le=1024)] | None = None  # default: the free cores
    n_ctx: Context | None = None  # default: [workers] n_ctx


class WorkerList(Operation, tag="worker_list"):
    hive_id: HiveId = "localhost"


class WorkerGet(Operation, tag="worker_get"):
    id: Id
    hive_id: HiveId = "localhost"


class WorkerDelete(Operation, tag="worker_delete"):
    id: Id
    hive_id: HiveId = "localhost"


class ModelList(Operation, tag="model_list"):
    hive_id: HiveId = "localhost"


class ModelGet(Operation, tag="model_get"):
    id: Id
    hive_id: HiveId = "localhost"


TokenId = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
MAX_TOKENS = 1 << 20  # more than any context holds: the worker stops where its context is full
Text = Annotated[str, msgspec.Meta(max_length=1 << 20)]


class Settings(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True, forbid_unknown_fields=True):
    """Infer's settings that a model can give its jobs (as Ollama's Modelfile PARAMETERs do).

    None in a job: the model's, else DEFAULTS.
    """

    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_TOKENS)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=100)] | None = None
    top_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None  # 0: the likeliest token only, as OpenAI allows
    top_k: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None  # llama.cpp's is an int32
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0, le=100)] | None = None  # 1: off
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # The tokens the three penalties look back over: -1 the whole context, 0 none (penalties off).
    repeat_last_n: Annotated[int, msgspec.Meta(ge=-1, le=1 << 20)] | None = None
    # None after all: a random one (llama.cpp's LLAMA_DEFAULT_SEED, 2**32 - 1, means that too)
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 2)] | None = None
    stop: Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(max_length=16)] | None = None
    n_ctx: Context | None = None  # a worker with at least this context; None after all: any


def layered(*layers: Settings) -> Settings:
    """Each setting from the first of `layers` that gives it (not None)."""
    return Settings(**{name: next((v for layer in layers if (v := getattr(layer, name)) is not None), None)
                       for name in Settings.__struct_fields__})  # fmt: skip


DEFAULTS = Settings(max_tokens=256, temperature=0.8, top_p=0.95, top_k=40, min_p=0.05, repeat_penalty=1.0,
                    presence_penalty=0.0, frequency_penalty=0.0, repeat_last_n=64, stop=[])  # fmt: skip


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    role: Literal["system", "user", "assistant"]
    content: Text


# A model's chat history put before each chat's own (a Modelfile's MESSAGEs); [] removes it.
History = Annotated[list[ChatMessage], msgspec.Meta(max_length=1024)]


class ModelCopy(Operation, tag="model_copy"):
    """The model under a second id too (as `ollama cp`): a hard link to its file, with its record.

    `system`, `messages` and `defaults` change the copy's (as `ollama create` FROM the model):
    `defaults` over the model's, field by field; `system` "" and `messages` [] remove theirs.
    Given any, `to` may be `id`.
    """

    id: Id
    to: Id
    hive_id: HiveId = "localhost"
    system: Text | None = None  # the first message of its chats that have no system message
    defaults: Settings | None = None
    messages: History | None = None


class ModelDownload(Operation, tag="model_download"):
    """A GGUF into the catalog. `system`, `messages` and `defaults` are the model's (as
    ModelCopy's); given for a model already present, they replace its own."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]  # path, URL or hf:owner/repo/file
    hive_id: HiveId = "localhost"
    sha256: Sha256 | None = None
    id: Id | None = None  # the model's id; default: a slug of the file's name
    system: Text | None = None
    defaults: Settings | None = None
    messages: History | None = None


class ModelDelete(Operation, tag="model_delete"):
    id: Id
    hive_id: HiveId = "localhost"


class Infer(Operation, Settings, tag="infer"):
    cancel_on_disconnect: ClassVar[bool] = True
    model: Id
    prompt: Text | None = None  # text to continue, or ...
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=1024)] | None = None  # a chat
    hive_id: HiveId = "localhost"
    device: Device | None = None
    worker_id: Id | None = None
    stream: bool = True
    keep_alive: Annotated[float, msgspec.Meta(ge=-1)] | None = None  # seconds; 0 unload after, -1 keep
    format: Literal["json"] | dict | None = None  # output held to a JSON object, or to a JSON Schema
    grammar: Annotated[str, msgspec.Meta(min_length=1)] | None = None  # ... or to GBNF, as llama-server's `grammar`
    # Added to tokens' logits before sampling, by token id (OpenAI's logit_bias): -100 bans one, 100 all but forces it.
    logit_bias: Annotated[dict[TokenId, Annotated[float, msgspec.Meta(ge=-100, le=100)]],
                          msgspec.Meta(max_length=1024)] | None = None  # fmt: skip

    def __post_init__(self) -> None:
        if self.prompt is None and self.messages is None:
            raise ValueError("give `prompt` (text to continue) or `messages` (a chat)")
        if self.prompt is not None and self.messages is not None:
            raise ValueError("give `prompt` or `messages`, not both")
        if self.format is not None and self.grammar is not None:
            raise ValueError("give `format` or `grammar`, not both")
        if isinstance(self.format, dict):
            grammar.gbnf(self.format)  # a schema that makes no grammar is a bad request, not a failed job
        if self.grammar is not None:
            try:
                gbnf.check(self.grammar)
            except gbnf.GrammarError as exc:
                raise ValueError(f"`grammar`: {exc}") from None


class _OnWorker(Operation, kw_only=True):
    """Where a request that any worker of the model can answer goes (one is loaded if none is)."""

    cancel_on_disconnect: ClassVar[bool] = True
    model: Id
    hive_id: HiveId = "localhost"
    device: Device | None = None
    worker_id: Id | None = None
    keep_alive: Annotated[float, msgspec.Meta(ge=-1)] | None = None


EmbedText = Annotated[str, msgspec.Meta(min_length=1, max_length=1 << 20)]


class Embed(_OnWorker, tag="embed", kw_only=True):
    """A vector per input text, from the model's last hidden states (pooled, then unit length)."""

    input: EmbedText | Annotated[list[EmbedText], msgspec.Meta(max_length=2048)]  # [] only loads the model
    truncate: bool = True  # an input longer than the context is cut to it; false: the job fails
    normalize: bool = True  # false: as pooled (Ollama's older /api/embeddings)
    dimensions: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)] | None = None  # keep the first N, as Matryoshka models allow
    n_ctx: Context | None = None

    @property
    def inputs(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else list(self.input)


class Tokenize(_OnWorker, tag="tokenize", kw_only=True):
    """The model's token ids for a text (llama-server's /tokenize)."""

    text: Text
    add_special: bool = False  # the BOS (EOS) that an infer's prompt gets, where the vocabulary adds one
    parse_special: bool = True  # a special token's text (`<start_of_turn>`) is that token
    with_pieces: bool = False  # each token's text too


class Detokenize(_OnWorker, tag="detokenize", kw_only=True):
    """The text that token ids stand for (llama-server's /detokenize), special tokens written out."""

    tokens: Annotated[list[TokenId], msgspec.Meta(max_length=1 << 18)]


AnyOperation = Union[
    HiveStart, HiveStop, HiveList, HiveGet, HiveCreate, HiveUpdate, HiveDelete,
    WorkerSpawn, WorkerList, WorkerGet, WorkerDelete,
    ModelDownload, ModelList, ModelGet, ModelCopy, ModelDelete,
    Infer, Embed, Tokenize, Detokenize,
]  # fmt: skip

OnWorker = Infer | Embed | Tokenize | Detokenize  # what a model's worker answers

NAMES = tuple(cls.__struct_config__.tag for cls in AnyOperation.__args__)

_decoder = msgspec.json.Decoder(AnyOperation)


TOO_DEEP = "JSON nested too deeply"


class PayloadError(ValueError):
    """The payload is not a valid operation; the message names the field."""


def decode(body: bytes) -> AnyOperation:
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if message.endswith("at `$.operation`") or "missing required field `operation`" in message:
            message += f"; valid operations: {', '.join(NAMES)}"
        raise PayloadError(message) from None
    except msgspec.DecodeError as exc:
        raise PayloadError(f"malformed JSON: {exc}") from None
    except UnicodeDecodeError as exc:  # what msgspec raises for bad UTF-8 in the operation's name
        raise PayloadError(f"malformed JSON: a string is not valid UTF-8 ({exc.reason})") from None
    except RecursionError:
        raise PayloadError(TOO_DEEP) from None
