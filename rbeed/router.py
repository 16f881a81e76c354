"""Dispatch of each operation to the service that runs it (the seed's job_router)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from . import operations as ops
from .forward import forward
from .hives import LOCAL, Hives
from .jobs import Job, JobFailed


class Router:
    """Maps operation types to handlers; an operation for a remote hive is forwarded to it."""

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
            await forward(job, operation, self._hives.remote(hive_id))
        else:
            await handler(job, operation)
