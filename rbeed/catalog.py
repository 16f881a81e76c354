"""A persistent catalog of records by id: SQLite under the state dir, read from memory."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Generic, TypeVar

import msgspec
import trio

from .jobs import JobFailed

log = logging.getLogger("rbeed.catalog")

Record = TypeVar("Record", bound=msgspec.Struct)


class Catalog(Generic[Record]):
    """Records of one type in one table; every write goes through to SQLite off the event loop.

    Reads are served from memory: the catalog is small and read on hot paths (hive_list).
    """

    def __init__(self, path: Path, table: str, record_type: type[Record]):
        self._path = path
        self._table = table
        self._type = record_type
        self._db: sqlite3.Connection | None = None
        self._lock = trio.Lock()  # one statement at a time on the shared connection
        self._records: dict[str, Record] = {}

    async def open(self) -> None:
        self._records = await trio.to_thread.run_sync(self._open)

    def _open(self) -> dict[str, Record]:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"CREATE TABLE IF NOT EXISTS {self._table} (id TEXT PRIMARY KEY, record BLOB NOT NULL)")
        records = {}
        for key, blob in self._db.execute(f"SELECT id, record FROM {self._table}"):
            try:
                records[key] = msgspec.json.decode(blob, type=self._type)
            except msgspec.DecodeError as exc:  # edited by hand, or by a newer rbeed: left as it is
                log.warning("%s: skipped the %s record %r: %s", self._path, self._table, key, exc)
        return records

    async def close(self) -> None:
        async with self._lock:
            if self._db is not None:
                db, self._db = self._db, None
                await trio.to_thread.run_sync(db.close)

    def get(self, key: str) -> Record | None:
        return self._records.get(key)

    def list(self) -> list[Record]:
        return [self._records[key] for key in sorted(self._records)]

    async def put(self, key: str, record: Record) -> None:
        blob = msgspec.json.encode(record)
        await self._execute(f"INSERT OR REPLACE INTO {self._table} (id, record) VALUES (?, ?)", (key, blob))
        self._records[key] = record

    async def delete(self, key: str) -> None:
        await self._execute(f"DELETE FROM {self._table} WHERE id = ?", (key,))
        self._records.pop(key, None)

    async def _execute(self, sql: str, args: tuple) -> None:
        async with self._lock:
            if self._db is None:
                raise RuntimeError(f"the {self._table} catalog is closed")
            try:
                await trio.to_thread.run_sync(self._db.execute, sql, args)
            except sqlite3.Error as exc:
                full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                raise JobFailed(f"cannot write the {self._table} catalog {self._path}: {exc}", 507 if full else 500) from None
