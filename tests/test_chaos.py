"""Chaos on the real daemon with the process backend: two workers, or models loaded on demand."""

from __future__ import annotations

import signal

import pytest

import chaos
from support import open_stream, running_daemon

# A worker delay per token keeps generations long enough (up to ~0.4 s) to be hit mid-stream.
ENV = {"RBEED_WORKER_TOKEN_DELAY": "0.003"}
CONFIG = """
[workers]
threads = 2
queue_size = 8
restart_backoff = 0.1
max_restarts = 1000
[jobs]
finished_ttl = 60
"""


@pytest.mark.parametrize(("on_demand", "clients", "actions"), [(False, 8, 50), (True, 4, 15)],
                         ids=["two-workers", "loaded-on-demand"])  # fmt: skip
async def test_chaos_keeps_every_rule(tiny_model, on_demand, clients, actions):
    with running_daemon(CONFIG, ENV) as daemon:
        async with daemon.client() as client:
            await chaos.register_models(client, tiny_model, daemon.state_dir.parent, spawn=not on_demand)

        async def reload() -> None:
            daemon.proc.send_signal(signal.SIGHUP)

        run = chaos.Chaos(lambda unix: daemon.client(unix=unix, read_timeout=30),
                          lambda unix: open_stream(daemon, unix), reload, on_demand)  # fmt: skip
        await chaos.run(run, clients, actions)
        log = daemon.log()
    for sign in ("Traceback", "crashed", "internal error"):
        assert sign not in log
