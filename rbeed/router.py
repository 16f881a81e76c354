"""Dispatch of each operation to the service that runs it (the seed's job_router)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from . import operations as ops
from .hives import LOCAL, Hives
from .jobs import Job, JobFailed


class Router:
    """Maps operation types to handlers; operations for a remote hive are refused for now."""

    def __init__(self, hives: Hives, services: dict[type, Callable[[Job, ops.AnyOperation], Awaitable[None]]]):
        self._hives = hives
        self._handlers = {
            ops.HiveStart: hives.start,
            ops.HiveStop: hives.stop,
            ops.HiveList: hives.list,
            ops.HiveGet: hives.get,
            ops.HiveCreate: hives.create,
            ops.HiveUpdate: hives.update,
            ops.HiveDelete: hives.delete,
            **services,
        }

    async def __call__(self, job: Job, operation: ops.AnyOperation) -> None:
        handler = self._handlers.get(type(operation))
        if handler is None:
            raise JobFailed(f"{operation.name}: not implemented")
        hive_id = getattr(operation, "hive_id", LOCAL)
        if hive_id != LOCAL and not isinstance(operation, (ops.HiveStart, ops.HiveStop)):
            if self._hives.catalog.get(hive_id) is None:
                raise JobFailed(f"unknown hive {hive_id!r}")
            raise JobFailed(f"{operation.name} on remote hive {hive_id!r}: forwarding to remote hives is not implemented")
        await handler(job, operation)
