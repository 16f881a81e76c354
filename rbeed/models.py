"""The model catalog: GGUF files under the state dir, and the model_* operations."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import msgspec
import trio

from . import gbnf, wire
from .catalog import Catalog
from .config import ModelsConfig, read_secret
from .blobs import Blobs, remove_unkept, sha256_of
from .download import DownloadError, DownloadResult, SourceError, VerificationError, download
from .ggufinfo import NEWEST_KEY
from .httpclient import Client, StatusError
from .jobs import Job, JobFailed
from .operations import (ChatMessage, Detokenize, Embed, Infer, ModelCopy, ModelDelete, ModelDownload, ModelGet,
                         ModelList, Settings, Tokenize, layered)

log = logging.getLogger("rbeed.models")

_HF = re.compile(r"^hf:([A-Za-z0-9][\w.-]*)/([A-Za-z0-9][\w.-]*)/((?:[\w.-]+/)*[\w.-]+\.gguf)$")


class Model(msgspec.Struct):
    id: str
    file: str
    size: int
    sha256: str
    source: str
    added_at: float
    metadata: dict = {}
    system: str | None = None  # the first message of its chats that have none
    defaults: Settings = msgspec.field(default_factory=Settings)  # for its infer jobs' settings they leave out
    messages: list[ChatMessage] = []  # put before each chat's own, after its system message

    def __post_init__(self) -> None:
        # Checked as records are read: a catalog edited by hand must not name a file elsewhere.
        if Path(self.file).name != self.file or self.file in ("", ".", ".."):
            raise ValueError(f"file {self.file!r} is not a name in the models directory")

    @property
    def without_chat_template(self) -> bool:
        """Its GGUF is known to carry no chat template (a record without metadata does not say)."""
        return self.metadata.get("chat_template") is False

    @property
    def is_encoder(self) -> bool:
        """Its GGUF says that its attention is not causal (BERT and its kind): it makes embeddings only."""
        return self.metadata.get("causal") is False

    def refuses_system(self, system: str | None, messages: list[ChatMessage] | None = None) -> str | None:
        """Why `system` (or `messages`) cannot be the model's system message (its history), if they cannot."""
        if (system or messages) and self.without_chat_template:
            what = "a system message" if system else "messages"
            return f"model {self.id} has no chat template to put {what} in: it continues prompts as they are"
        return None

    def with_settings(self, system: str | None, defaults: Settings | None, messages: list[ChatMessage] | None = None,
                      *, over_own: bool = True) -> Model:  # fmt: skip
        """The model with `system` ("" removes it), `messages` ([] removes them) and `defaults`,
        over its own or instead of them; None leaves each as it is."""
        if why := self.refuses_system(system, messages):
            raise JobFailed(why, 400)
        if defaults is not None and defaults.n_ctx:
            self.check_context(defaults.n_ctx)  # refused here, not at each job the default would fail
        if defaults is not None and over_own:
            defaults = layered(defaults, self.defaults)
        return msgspec.structs.replace(self, system=self.system if system is None else system or None,
                                       defaults=self.defaults if defaults is None else defaults,
                                       messages=self.messages if messages is None else messages)  # fmt: skip

    def check_context(self, n_ctx: int) -> None:
        """JobFailed (400) for a context longer than the model was trained for: past it llama.cpp's
        output turns to garbage."""
        trained = self.metadata.get("context_length")
        if trained and n_ctx > trained:
            raise JobFailed(f"n_ctx {n_ctx} is more than {self.id} was trained for ({trained} tokens)", 400)

    def refusal(self, op: Infer | Embed | Tokenize | Detokenize) -> tuple[str, str] | None:
        """The field at fault and why, where the catalog already tells that `op` would fail on
        this model: refused before any worker loads for it."""
        meta = self.metadata
        vocab_size = meta.get("vocab_size")
        if isinstance(op, Embed):
            size = meta.get("embedding_length")
            if op.dimensions is not None and size and op.dimensions > size:
                return "dimensions", f"dimensions {op.dimensions} is more than {self.id} has ({size})"
        elif isinstance(op, Detokenize):
            if vocab_size and (why := wire.unknown_token("tokens", op.tokens, vocab_size, f"{self.id}'s")):
                return "tokens", why
        elif isinstance(op, Infer):
            if self.is_encoder:
                return "model", wire.EMBEDDINGS_ONLY
            if op.messages is not None and self.without_chat_template:
                return "messages", wire.NO_CHAT_TEMPLATE
            if vocab_size and (why := wire.unknown_token("logit_bias", op.logit_bias, vocab_size, f"{self.id}'s")):
                return "logit_bias", why
            grammar_ids = gbnf.token_ids(op.grammar) if op.grammar else None
            if vocab_size and (why := wire.unknown_token("grammar", grammar_ids, vocab_size, f"{self.id}'s")):
                return "grammar", why
        return None


def model_id(file_name: str) -> str:
    """A slug from a file name: `Gemma-3 270M.Q4_K_M.gguf` → `gemma-3-270m.q4_k_m`."""
    stem = file_name[:-5] if file_name.lower().endswith(".gguf") else file_name
    slug = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.")
    if not slug:
        raise JobFailed(f"cannot derive a model id from {file_name!r}", 400)
    return slug[:128]


def resolve_source(source: str, hf_base: str) -> tuple[str, str]:
    """The URL or path to fetch, and the file name the model id derives from."""
    if any(ord(char) < 32 or char == "\x7f" for char in source):  # a NUL cannot even be opened
        raise JobFailed(f"the source {source!r} holds a control character", 400)
    if source.startswith("hf:"):
        match = _HF.match(source)
        if match is None or ".." in source:
            raise JobFailed(f"bad hf: source {source!r}; expected hf:owner/repo/path/file.gguf", 400)
        owner, repo, path = match.groups()
        return hf_base.format(owner=owner, repo=repo, path=path), path.rsplit("/", 1)[-1]
    try:
        url = urlsplit(source)
    except ValueError as exc:  # Invalid IPv6 URL, and the like
        raise JobFailed(f"bad source {source!r}: {exc}", 400) from None
    if url.scheme in ("http", "https"):
        return source, unquote(url.path.rsplit("/", 1)[-1])
    if url.scheme not in ("", "file"):
        raise JobFailed(f"unsupported source scheme {url.scheme!r}; use a path, file://, http(s):// or hf:", 400)
    path = unquote(url.path) if url.scheme else source
    if "\0" in path:  # file:///x%00.gguf
        raise JobFailed(f"the source {source!r} holds a NUL character", 400)
    if not Path(path).is_absolute():  # the daemon's working directory is nobody's business
        raise JobFailed(f"a local path must be absolute: {source!r} (rbee makes one so; the daemon does not "
                        "know the working directory it was meant from)", 400)  # fmt: skip
    return source, Path(path).name


def hf_token() -> str | None:
    """The Hugging Face token: $HF_TOKEN, else the credential `hf-token` (systemd's LoadCredential=).

    Read for each download, so that a new token applies without a restart.
    """
    try:
        return read_secret("HF_TOKEN", "hf-token")
    except OSError as exc:
        raise JobFailed(str(exc)) from None


class Models:
    """The model_* operations; `in_use(id)` (set by the supervisor) names the workers using a model."""

    def __init__(self, catalog: Catalog[Model], models_dir: Path, config: ModelsConfig, blobs: Blobs):
        self.catalog = catalog
        self.dir = models_dir
        self.config = config
        # A model made of an uploaded blob links it as its file, and the blob stays (no space used)
        # while a model is that file: a create of it under another name needs no upload.
        self.blobs = blobs
        self.in_use: Callable[[str], list[str]] = lambda model_id: []
        # Returns once the model's workers on their way out are gone (narrated to the job).
        self.released: Callable[[str, Job], Awaitable[None]] = _nothing_to_wait_for
        self._placing: dict[str, list[str]] = {}  # model id -> jobs placing a worker for it, not yet listed
        self._fetching: dict[str, tuple[str, trio.Event]] = {}  # model id -> the job writing its file, its end
        self._deleting: dict[str, trio.Event] = {}  # model id -> the end of its model_delete
        self._adopting: Counter[str] = Counter()  # sha256 -> creates taking its blob now: a delete leaves it

    def path_of(self, model: Model) -> Path:
        return self.dir / model.file  # a name there (Model checks it); a symlink is the admin's own: followed

    def file_of(self, model: Model) -> Path:
        """Its file, which must be there."""
        if not (path := self.path_of(model)).exists():  # removed by hand
            raise JobFailed(f"model {model.id}'s file {path} is missing; "
                            f"model_download {model.source} again, or model_delete {model.id}")  # fmt: skip
        return path

    def lookup(self, name: str) -> Model:
        """The model `name` names: its id, or what the id derives from (`Gemma-3.Q4_K_M.gguf`, any case)."""
        model = self.catalog.get(name)
        if model is None and name:
            with contextlib.suppress(JobFailed):
                model = self.catalog.get(model_id(name))
        if model is None:
            known = ", ".join(m.id for m in self.catalog.list()) or "none"
            raise JobFailed(f"unknown model {name!r} (known: {known})", 404)
        if model.id in self._deleting:
            raise JobFailed(f"model {model.id!r} is being deleted", 409)
        return model

    def same_file(self, model_id: str, model: Model) -> bool:
        """Whether model `model_id` is `model`, or a copy of it (or it a copy of that): one file."""
        if model_id == model.id:
            return True
        other = self.catalog.get(model_id)
        if other is None or other.sha256 != model.sha256:  # no stat for another model's worker: infer's hot path
            return False
        try:
            return os.path.samefile(self.path_of(other), self.path_of(model))
        except OSError:  # either file gone
            return False

    def taken(self, to: str, model: Model) -> str | None:
        """Why id `to` cannot be made a copy of `model`: it names another model."""
        existing = self.catalog.get(to)
        if existing is None or self.same_file(to, model):
            return None
        return f"model {to} already exists (sha256 {existing.sha256}); model_delete it first"

    @contextlib.contextmanager
    def held(self, model_id: str, holder: str) -> Iterator[Model]:
        """The model, kept from model_delete while `holder` places a worker for it.

        Placing can wait long (for threads to free up); from the moment the worker is listed,
        `in_use` covers it.
        """
        model = self.lookup(model_id)
        self.file_of(model)  # removed by hand: fail before any worker makes room
        holders = self._placing.setdefault(model.id, [])
        holders.append(holder)
        try:
            yield model
        finally:
            holders.remove(holder)
            if not holders:
                del self._placing[model.id]

    async def download(self, job: Job, op: ModelDownload) -> None:
        url, name = resolve_source(op.model, self.config.hf_base)
        model_id_ = model_id(op.id or name)
        blob = self._blob(url)
        with self._taking(blob):
            while True:
                if (deleting := self._deleting.get(model_id_)) is not None:
                    await deleting.wait()  # a catalog write: then it is downloaded afresh
                elif (fetching := self._fetching.get(model_id_)) is not None:
                    # As a second `ollama pull` does: follow the download under way, not fail on its .part.
                    job.narrate(f"model {model_id_} is being downloaded by {fetching[0]}; waiting for it to end")
                    await fetching[1].wait()
                else:
                    break
            existing = self.catalog.get(model_id_)
            if existing is not None and self.path_of(existing).exists():
                if op.sha256 and op.sha256.lower() != existing.sha256:
                    raise JobFailed(f"model {model_id_} is present with sha256 {existing.sha256}, not {op.sha256}", 409)
                moved = existing.source != op.model and not op.sha256  # with a sha256: the same file
                elsewhere = f", from {existing.source}; model_delete it to fetch this one" if moved else ""
                job.narrate(f"model {model_id_} is already present{elsewhere}")
                if (given := existing.with_settings(op.system, op.defaults, op.messages, over_own=False)) != existing:
                    await self.catalog.put(model_id_, given)
                    job.narrate(f"model {model_id_}'s system, messages and defaults are set anew")
                if blob and existing.sha256 == sha256_of(blob.name):
                    await self._share(blob, self.path_of(existing))
                job.result(given)
                return
            self._fetching[model_id_] = (job.id, trio.Event())
            try:
                job.result(await self._fetch(job, op, url, model_id_, blob))
            finally:
                self._fetching.pop(model_id_)[1].set()

    @contextlib.contextmanager
    def _taking(self, blob: Path | None) -> Iterator[None]:
        """`blob` kept from a model_delete of the last model whose file it is while a create takes it."""
        if blob is None:
            yield
            return
        digest = sha256_of(blob.name)
        self._adopting[digest] += 1
        try:
            yield
        finally:
            self._adopting[digest] -= 1
            if not self._adopting[digest]:
                del self._adopting[digest]

    async def _fetch(self, job: Job, op: ModelDownload, url: str, model_id_: str, blob: Path | None) -> Model:
        self.dir.mkdir(parents=True, exist_ok=True)
        dest = self.dir / f"{model_id_}.gguf"
        started = trio.current_time()
        result = linked = await self._adopt(job, blob, dest, op.sha256) if blob else None
        if result is None:
            result = await self._download(job, op, url, dest)
        job.narrate(f"{result.size} bytes in {trio.current_time() - started:.2f} s; reading metadata")
        try:
            metadata = await read_metadata(dest)
            model = Model(model_id_, dest.name, result.size, result.sha256, op.model, time.time(), metadata)
            if (lost := self.catalog.get(model_id_)) is not None and lost.source == op.model:
                # Its file was gone: fetched again, it keeps the system, messages and defaults it was given.
                model = msgspec.structs.replace(model, system=lost.system, defaults=lost.defaults,
                                                messages=lost.messages)  # fmt: skip
            model = model.with_settings(op.system, op.defaults, op.messages, over_own=False)
            await self.catalog.put(model.id, model)
        except BaseException:  # not a model (JobFailed), or cancelled: no file without its record
            dest.unlink(missing_ok=True)  # a record whose file was gone stays so: fetched again next time
            raise
        if blob and not linked and self._adopting[sha256_of(blob.name)] == 1:
            blob.unlink(missing_ok=True)  # copied, and no other create takes it: kept, it would take the space twice
        return model

    def _blob(self, source: str) -> Path | None:
        """The uploaded blob that `source` names, if it names one."""
        return Path(source) if self.blobs.is_blob(Path(source)) else None

    @staticmethod
    async def _adopt(job: Job, blob: Path, dest: Path, sha256: str | None) -> DownloadResult | None:
        """An uploaded blob as the model's file, by a hard link: None where links cannot be made."""
        digest = sha256_of(blob.name)  # checked as it was written
        if sha256 and sha256.lower() != digest:
            raise JobFailed(f"sha256 mismatch: blob {blob.name} is not {sha256}", 400)
        try:
            await link(blob, dest)
        except FileNotFoundError:
            raise JobFailed(f"blob {blob.name} is gone (its model deleted, or removed at a restart); "
                            "upload it again", 400) from None  # fmt: skip
        except OSError as exc:
            log.info("blob %s copied, not linked: %s", blob.name, exc.strerror)
            return None
        job.narrate(f"using blob {blob.name}")
        return DownloadResult(dest, dest.stat().st_size, digest, 0)

    @staticmethod
    async def _share(blob: Path, file: Path) -> None:
        """A blob uploaded again for a model that has its content: made a link to the model's file."""
        try:
            if not os.path.samefile(blob, file):
                await link(file, blob)
        except OSError:  # kept, it would take the space twice
            blob.unlink(missing_ok=True)

    def _drop_blob(self, deleted: Model, path: Path) -> None:
        """Remove the blob `deleted` was made of, unless another model, or a create under way, has it."""
        blob = self.blobs.path(f"sha256:{deleted.sha256}")
        try:
            if self._adopting[deleted.sha256] or not os.path.samefile(blob, path):
                return
            if any(os.path.samefile(blob, other) for m in self.catalog.list()
                   if m.sha256 == deleted.sha256 and m.id != deleted.id and (other := self.path_of(m)).exists()):  # fmt: skip
                return
            blob.unlink()
        except OSError:  # no such blob
            pass

    def prune(self) -> None:
        """Remove the files no record names that a crash or a failed catalog write left: a model's
        file (no operation reaches it, and a link keeps its original's space taken) and half-made
        links. The .part files stay for a download to resume."""
        named = {model.file for model in self.catalog.list()}
        remove_unkept(self.dir, lambda entry: entry.name in named or not entry.name.endswith((".gguf", ".link")),
                      "which no model's record names")  # fmt: skip

    def blob_keep(self) -> set[tuple[int, int]]:
        """The inodes of the models' files: the blobs that are one of them stay at a start's prune."""
        kept = set()
        for model in self.catalog.list():
            with contextlib.suppress(OSError):
                kept.add(((file := os.stat(self.path_of(model))).st_dev, file.st_ino))
        return kept

    async def _download(self, job: Job, op: ModelDownload, url: str, dest: Path) -> DownloadResult:
        job.narrate(f"downloading {url} as model {dest.stem}")

        def on_progress(done: int, total: int | None, rate: float) -> None:
            job.progress(done=done, total=total, rate=round(rate))

        def on_retry(reason: str, done: int, delay: float) -> None:
            job.narrate(f"{reason}; resuming from byte {done} in {delay:g} s", done=done)

        # The token goes to Hugging Face only (the client drops it on a redirect to its CDN).
        hf = _origin(url) == _origin(self.config.hf_base.format(owner="o", repo="r", path="p"))
        token = hf_token() if hf else None
        authorized = Client(url, headers={"authorization": f"Bearer {token}"}) if token else None
        try:
            async with authorized or contextlib.nullcontext() as client:
                result = await download(url, dest, sha256=op.sha256, on_progress=on_progress, on_retry=on_retry,
                                        client=client, retries=self.config.download_retries,
                                        retry_delay=self.config.download_retry_delay)  # fmt: skip
        except DownloadError as exc:
            refused = isinstance(exc.__cause__, StatusError) and exc.__cause__.status in (401, 403)
            if hf and refused and token:
                raise JobFailed(f"{exc}; the token was refused, or grants no access to this model") from None
            if hf and refused:
                raise JobFailed(f"{exc}; a gated model needs its terms accepted on Hugging Face and a token: "
                                "set HF_TOKEN, or the credential hf-token") from None  # fmt: skip
            # Not the file asked for, or none this host can read: the request's fault, as a bad source is.
            raise JobFailed(str(exc), 400 if isinstance(exc, (SourceError, VerificationError)) else 500) from None
        if result.resumed_from:
            job.narrate(f"resumed from byte {result.resumed_from}")
        return result

    async def refresh(self) -> None:
        """Re-read the metadata of records an older rbeed made (they lack what its reader did not know)."""
        read: dict[tuple[int, int], dict | JobFailed] = {}  # by inode: a model's copies are links to its file
        for model in self.catalog.list():
            if NEWEST_KEY in model.metadata:
                continue
            try:
                file = os.stat(path := self.path_of(model))
            except OSError:  # its file is gone: model_get says so, and model_download fetches it again
                continue
            if (inode := (file.st_dev, file.st_ino)) not in read:
                try:
                    read[inode] = await read_metadata(path)
                except JobFailed as exc:
                    read[inode] = exc
            if isinstance(metadata := read[inode], JobFailed):
                log.warning("model %s: its metadata could not be read again: %s", model.id, metadata)
                continue
            if self.catalog.get(model.id) is model:  # not deleted or replaced meanwhile
                await self.catalog.put(model.id, msgspec.structs.replace(model, metadata=metadata))
                log.info("model %s: metadata read again", model.id)

    async def list(self, job: Job, op: ModelList) -> None:
        models = self.catalog.list()
        self._say_if_missing(job, *models)
        job.result(models)

    async def get(self, job: Job, op: ModelGet) -> None:
        model = self.lookup(op.id)
        self._say_if_missing(job, model)
        job.result(model)

    def _say_if_missing(self, job: Job, *models: Model) -> None:
        for model in models:
            if not os.path.exists(path := self.path_of(model)):
                job.narrate(f"model {model.id}: its file {path} is missing; model_download fetches it again, "
                            "model_delete removes the record")  # fmt: skip

    async def copy(self, job: Job, op: ModelCopy) -> None:
        model, to = self.lookup(op.id), model_id(op.to)
        made = msgspec.structs.replace(model.with_settings(op.system, op.defaults, op.messages), id=to, file=f"{to}.gguf",
                                       added_at=time.time())  # fmt: skip
        existing = self.catalog.get(to)
        if to == model.id and op.system is None and op.defaults is None and op.messages is None:
            raise JobFailed(f"{op.to!r} names model {model.id} itself; give another id, or a system, messages "
                            "or defaults to set", 400)  # fmt: skip
        if existing is not None and self.same_file(to, model):
            # Its file already: as `ollama create` again, only its record is made anew.
            made = msgspec.structs.replace(made, file=existing.file)
            if msgspec.structs.replace(existing, added_at=made.added_at) == made:
                job.narrate(f"model {to} is already a copy of {model.id}")
                made = existing
            else:
                await self.catalog.put(to, made)
                job.narrate(f"model {to} is a copy of {model.id} already; its system, messages and defaults are set anew")
            job.result(made)
            return
        if why := self.taken(to, model):
            raise JobFailed(why, 409)
        if to in self._fetching or to in self._deleting:
            raise JobFailed(f"model {to} is being {'deleted' if to in self._deleting else 'written'}; try again later", 409)
        source, dest = self.file_of(model), self.dir / made.file
        self._fetching[to] = (job.id, trio.Event())
        try:
            try:
                await link(source, dest)
            except OSError as exc:
                raise JobFailed(f"cannot link {source} as {dest}: {exc.strerror} (a copy is a hard link: "
                                "the models directory's file system must have them)") from None  # fmt: skip
            try:
                await self.catalog.put(to, made)
            except BaseException:  # no file without its record: it would keep the original's space taken
                dest.unlink(missing_ok=True)
                raise
        finally:
            self._fetching.pop(to)[1].set()
        job.narrate(f"model {model.id} copied as {to} (a hard link to its file: no space used)")
        job.result(made)

    async def delete(self, job: Job, op: ModelDelete) -> None:
        try:
            model = self.lookup(op.id)
        except JobFailed as exc:
            if exc.status == 404 and (freed := self._drop_partial(partial := model_id(op.id))) is not None:
                job.narrate(f"the partial download of model {partial} removed ({freed} bytes freed)")
                job.result({"id": partial, "deleted": True})
                return
            raise
        await self.released(model.id, job)  # not in use, only slow to go: stop_grace bounds the wait
        model = self.lookup(op.id)  # again: another delete may have begun, or ended, meanwhile
        if users := self.in_use(model.id):
            raise JobFailed(f"model {model.id} is in use by worker(s) {', '.join(users)}; delete them first", 409)
        if holders := self._placing.get(model.id):
            raise JobFailed(f"model {model.id} is being loaded for {', '.join(holders)}; "
                            "cancel that or delete its worker once loaded", 409)  # fmt: skip
        if (fetching := self._fetching.get(model.id)) is not None:  # its file, gone, fetched again
            raise JobFailed(f"model {model.id} is being written by {fetching[0]}; cancel that or wait for it", 409)
        self._deleting[model.id] = trio.Event()  # no worker may start on it while the catalog write is awaited
        try:
            path = self.path_of(model)
            self._drop_blob(model, path)
            shared = path.exists() and path.stat().st_nlink > 1  # a copy's, or the original of one
            # The file first: on a full disk, the catalog can be written once its space is free.
            path.unlink(missing_ok=True)
            self._drop_partial(model.id)  # a failed download of its file, gone
            await self.catalog.delete(model.id)
        finally:
            self._deleting.pop(model.id).set()
        freed = "its file has other links, so no space was freed" if shared else f"{model.size} bytes freed"
        job.narrate(f"model {model.id} deleted ({freed})")
        job.result({"id": model.id, "deleted": True})


    def _drop_partial(self, model_id_: str) -> int | None:
        """Remove the .part a failed download of model_id_ left for a resume; the bytes freed, None if none."""
        if (fetching := self._fetching.get(model_id_)) is not None:
            raise JobFailed(f"model {model_id_} is being downloaded by {fetching[0]}; cancel that first", 409)
        part = self.dir / f"{model_id_}.gguf.part"
        try:
            size = part.stat().st_size
        except FileNotFoundError:
            return None
        part.unlink(missing_ok=True)
        part.with_name(part.name + ".from").unlink(missing_ok=True)
        return size


async def _nothing_to_wait_for(model_id: str, job: Job) -> None:
    pass


async def link(source: Path, dest: Path) -> None:
    """`dest` a hard link to `source`, made beside it and renamed: a file left at dest (a crash's)
    is replaced, never half-made."""
    beside = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}.link")
    try:
        await trio.to_thread.run_sync(os.link, source, beside)
        await trio.to_thread.run_sync(os.replace, beside, dest)
    finally:
        beside.unlink(missing_ok=True)


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


async def read_metadata(path: Path) -> dict:
    result = await trio.run_process(
        [sys.executable, "-m", "rbeed.ggufinfo", str(path)],
        capture_stdout=True, capture_stderr=True, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        reason = result.stderr.decode(errors="replace").strip().splitlines()
        if result.returncode == 1:  # the reader's verdict on the file; else it could not run (2, killed)
            raise JobFailed(f"not a valid GGUF model: {reason[-1] if reason else 'unreadable'}", 400)
        raise JobFailed(f"cannot read the model's metadata: {reason[-1] if reason else 'killed'}")
    return json.loads(result.stdout)
