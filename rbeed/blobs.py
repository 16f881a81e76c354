"""Uploaded files named by their sha256 (Ollama's /api/blobs): waiting for a create, or a model's file."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

log = logging.getLogger("rbeed.blobs")

_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")
_FLUSH = 1 << 20  # bytes gathered before each write (and hash) in a thread of its own


class BlobError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def sha256_of(digest: str) -> str:
    """The hex of a digest as Ollama writes them (`sha256:HEX`, or `sha256-HEX` as blob files are named)."""
    if (match := _DIGEST.fullmatch(digest)) is None:
        raise BlobError(400, f"invalid digest {digest[:80]!r}: expected sha256:<64 hex digits>")
    return match.group(1).lower()


def remove_unkept(directory: Path, kept: Callable[[Path], bool], why: str) -> None:
    """Remove the files in `directory` that `kept` does not keep, each logged as `why`."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        try:
            if kept(entry):
                continue
            entry.unlink()
        except OSError as exc:
            log.warning("cannot remove %s: %s", entry, exc.strerror)
        else:
            log.info("removed %s, %s", entry.name, why)


class Blobs:
    """The blobs directory under the state dir: `sha256-HEX`, each checked against its name as it
    was written. A model made of one has it as its file, by a hard link (see Models); the rest go
    at start."""

    def __init__(self, directory: Path):
        self.dir = directory

    def path(self, digest: str) -> Path:
        return self.dir / f"sha256-{sha256_of(digest)}"

    def is_blob(self, path: Path) -> bool:
        return path.parent == self.dir and _DIGEST.fullmatch(path.name) is not None

    def prune(self, keep: set[tuple[int, int]]) -> None:
        """Remove what uploads left that no model is made of: blobs no create took (those whose
        inode is not in `keep`), and parts of uploads cut short."""

        def kept(entry: Path) -> bool:
            return self.is_blob(entry) and ((file := entry.stat()).st_dev, file.st_ino) in keep

        remove_unkept(self.dir, kept, "uploaded and never made a model")

    async def receive(self, digest: str, receive: Callable[[], Awaitable[bytes]], length: int | None) -> None:
        """Write a blob from the body `receive()` gives. BlobError for a body that is not it."""
        path = self.path(digest)
        # A part of its own per upload: two of the same blob at once both end in the one file.
        part = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        hasher = hashlib.sha256()

        def write(file, pieces: list[bytes]) -> None:
            data = b"".join(pieces)
            hasher.update(data)
            file.write(data)

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if length is not None and length > (free := shutil.disk_usage(self.dir).free):
                raise BlobError(507, f"a blob of {length} bytes does not fit: {free} bytes free under {self.dir}")
            with open(part, "wb") as file:
                pieces: list[bytes] = []
                gathered = 0
                while data := await receive():
                    pieces.append(data)
                    if (gathered := gathered + len(data)) >= _FLUSH:
                        await trio.to_thread.run_sync(write, file, pieces)
                        pieces, gathered = [], 0
                await trio.to_thread.run_sync(write, file, pieces)
                await trio.to_thread.run_sync(os.fsync, file.fileno())
            if (got := hasher.hexdigest()) != (named := sha256_of(path.name)):
                raise BlobError(400, f"digest mismatch: the body's sha256 is {got}, not {named}")
            if not path.exists():  # else another upload of it ended first, and may be a model's file now
                os.replace(part, path)
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            raise BlobError(507 if full else 500, f"cannot write blob {path.name}: {exc.strerror}") from None
        finally:
            part.unlink(missing_ok=True)
