"""The hive_* operations, over hive records kept in the catalog; this daemon is hive `localhost`."""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess

import msgspec
import trio

from . import __version__
from .catalog import Catalog
from .config import HivesConfig
from .httpclient import Client, HTTPError
from .jobs import Job, JobFailed
from .operations import HiveCreate, HiveDelete, HiveGet, HiveList, HiveStart, HiveStop, HiveUpdate

log = logging.getLogger("rbeed.hives")

LOCAL = "localhost"


class Hive(msgspec.Struct, frozen=True):
    id: str
    host: str
    port: int
    ssh_host: str | None = None
    api_key: str | None = None  # sent to that daemon as a bearer token; never shown

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def headers(self) -> dict[str, str]:
        """What a request to that daemon carries: its API key, if it has one."""
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _slug(host: str) -> str:
    """An id made of `host`: it starts with a letter or digit, as an id must (IPv6's ::1 gives 1)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", host).lstrip("-._").rstrip("-.")[:128] or "hive"


class Hives:
    """The hive_* operations over a catalog; this daemon is always hive `localhost`."""

    def __init__(self, catalog: Catalog[Hive], config: HivesConfig):
        self.catalog = catalog
        self.config = config
        self._changing = trio.Lock()  # a check and the write it allows must not interleave with another

    def _local(self) -> dict:
        return {"id": LOCAL, "host": LOCAL, "port": None, "ssh_host": None, "local": True,
                "online": True, "version": __version__, "pid": os.getpid()}  # fmt: skip

    def remote(self, hive_id: str) -> Hive:
        hive = self.catalog.get(hive_id)
        if hive is None:
            raise JobFailed(f"unknown hive {hive_id!r}")
        return hive

    async def _health(self, hive: Hive) -> dict:
        record = {**msgspec.structs.asdict(hive), "api_key": hive.api_key is not None, "local": False, "online": False}
        timeout = self.config.health_timeout
        record["error"] = f"no answer within {timeout:g} s"
        with trio.move_on_after(timeout):
            try:
                async with Client(hive.url, connect_timeout=timeout, read_timeout=timeout) as client:
                    response = await client.request("GET", "/health")  # open to all: no API key
                if response.status != 200:
                    record["error"] = f"/health answered {response.status}"
                elif not isinstance(health := response.json(), dict):
                    record["error"] = "/health answered 200 but not with a JSON object"
                else:
                    record.update(online=True, version=health.get("version"))
                    del record["error"]
            except (HTTPError, ValueError) as exc:
                record["error"] = str(exc)
        return record

    async def _health_all(self, hives: list[Hive]) -> list[dict]:
        if not hives:
            return []
        records: list[dict] = [{}] * len(hives)

        async def check(index: int, hive: Hive) -> None:
            records[index] = await self._health(hive)

        async with trio.open_nursery() as nursery:
            for index, hive in enumerate(hives):
                nursery.start_soon(check, index, hive)
        return records

    async def list(self, job: Job, op: HiveList) -> None:
        remotes = self.catalog.list()
        job.narrate(f"{len(remotes) + 1} hive(s)")
        job.result([self._local(), *await self._health_all(remotes)])

    async def get(self, job: Job, op: HiveGet) -> None:
        if op.id == LOCAL:
            job.result(self._local())
        else:
            job.result(await self._health(self.remote(op.id)))

    async def create(self, job: Job, op: HiveCreate) -> None:
        hive_id = op.id or _slug(op.host)
        async with self._changing:
            if hive_id == LOCAL or self.catalog.get(hive_id):
                raise JobFailed(f"hive {hive_id!r} already exists")
            hive = Hive(hive_id, op.host, op.port, op.ssh_host, op.api_key or None)
            await self.catalog.put(hive.id, hive)
        job.narrate(f"hive {hive_id} registered at {hive.address}")
        job.result(await self._health(hive))

    async def update(self, job: Job, op: HiveUpdate) -> None:
        if op.id == LOCAL:
            raise JobFailed("hive 'localhost' is this daemon and cannot be changed")
        changes = {k: v for k in ("host", "port", "ssh_host", "api_key") if (v := getattr(op, k)) is not None}
        for removable in ("ssh_host", "api_key"):
            if changes.get(removable) == "":
                changes[removable] = None
        async with self._changing:
            hive = msgspec.structs.replace(self.remote(op.id), **changes)
            await self.catalog.put(hive.id, hive)
        job.narrate(f"hive {hive.id} updated: {', '.join(changes) or 'nothing changed'}")
        job.result(await self._health(hive))

    async def delete(self, job: Job, op: HiveDelete) -> None:
        if op.id == LOCAL:
            raise JobFailed("hive 'localhost' is this daemon and cannot be deleted")
        async with self._changing:
            self.remote(op.id)
            await self.catalog.delete(op.id)
        job.narrate(f"hive {op.id} deleted")
        job.result({"id": op.id, "deleted": True})

    async def start(self, job: Job, op: HiveStart) -> None:
        await self._start_stop(job, op.hive_id, "start")

    async def stop(self, job: Job, op: HiveStop) -> None:
        await self._start_stop(job, op.hive_id, "stop")

    async def _start_stop(self, job: Job, hive_id: str, action: str) -> None:
        if hive_id == LOCAL:
            job.narrate(f"hive localhost is this daemon (pid {os.getpid()}); it is running")
            job.result({"id": LOCAL, "action": action, "running": True, "local": True})
            return
        hive = self.remote(hive_id)
        template = self.config.start_command
        try:
            command = template.format(ssh_host=hive.ssh_host or hive.host, host=hive.host, port=hive.port, action=action)
            argv = shlex.split(command)
        except (KeyError, IndexError, ValueError) as exc:
            raise JobFailed(f"[hives] start_command {template!r} is unusable: {exc!r}") from None
        if not argv:
            raise JobFailed(f"[hives] start_command {template!r} is unusable: it is empty")
        job.narrate(f"$ {command}")
        returncode = await run_narrated(job, argv)
        if returncode != 0:
            raise JobFailed(f"{action} of hive {hive_id} failed: command exited with status {returncode}")
        job.result({"id": hive_id, "action": action, "local": False})


async def run_narrated(job: Job, argv: list[str]) -> int:
    """Run a command, streaming each line it prints as narration; returns its exit status."""
    try:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    except OSError as exc:
        raise JobFailed(f"cannot run {argv[0]}: {exc.strerror}") from None
    try:
        buffered = b""
        async with process.stdout:
            while chunk := await process.stdout.receive_some(65536):
                *lines, buffered = (buffered + chunk).split(b"\n")
                for line in lines:
                    job.narrate(line.decode(errors="replace"), stream="output")
        if buffered:
            job.narrate(buffered.decode(errors="replace"), stream="output")
        return await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
