"""Download chaos: clients download, cancel, drop, delete and look up the same models at once,
from a server that drops connections and answers 503; every job obeys the rules, and the
catalog and the models directory agree at the end."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random

import trio

from httpfixture import RecordedRequest, Reply, serve_files
from support import end_marker, run_job, running_daemon, submit

CONFIG = """
[models]
download_retries = 3
download_retry_delay = 0.02
"""
PIECE = 256 * 1024
ACTIONS = ["download", "download", "cancel", "drop", "delete", "get"]


class DownloadChaos:
    def __init__(self, server, files: dict[str, bytes]):
        self.server = server
        self.files = files
        self.sha256 = {name.removesuffix(".gguf"): hashlib.sha256(data).hexdigest() for name, data in files.items()}
        self.broken: list[str] = []
        self.ends: collections.Counter[str] = collections.Counter()
        self.retries = 0

    def check(self, rule: bool, message: str) -> None:
        if not rule:
            self.broken.append(message)

    def paced(self, name: str, rng: random.Random):
        """The file's handler: its bytes a piece every 10 ms, and one answer in ten a 503."""

        async def handler(request: RecordedRequest) -> Reply:
            if rng.random() < 0.1:
                return Reply(503, {"content-length": "0"})
            reply = self.server._file_reply(name, request)
            if reply.status in (200, 206):
                body = reply.body

                async def pieces():
                    for start in range(0, len(body), PIECE):
                        await trio.sleep(0.01)
                        yield body[start : start + PIECE]

                reply.headers["content-length"] = str(len(body))
                reply.body = pieces()
            return reply

        return handler

    async def drop_connections(self, rng: random.Random) -> None:
        while True:
            await trio.sleep(rng.uniform(0.02, 0.2))
            name = rng.choice(list(self.files))
            self.server.drop_after[name] = rng.randrange(1, len(self.files[name]))

    async def download(self, client, rng: random.Random, action: str) -> None:
        name = rng.choice(list(self.files))
        model = name.removesuffix(".gguf")
        payload = {"operation": "model_download", "model": self.server.url(name)}
        if rng.random() < 0.3:
            payload["sha256"] = self.sha256[model]
        job = await submit(client, payload)
        events, cancelled = [], False
        async with client.stream("GET", f"/v1/jobs/{job}/stream") as response:
            async for event in response.aiter_sse():
                events.append(event)
                if event.event == "progress" and action == "drop":
                    break  # the download goes on without a reader; the stream is read again below
                if event.event == "progress" and action == "cancel" and not cancelled:
                    answer = await client.request("DELETE", f"/v1/jobs/{job}")
                    self.check(answer.status in (200, 409), f"{job}: DELETE answered {answer.status}")
                    cancelled = answer.status == 200
        if not events or events[-1].event != "end":
            async with client.stream("GET", f"/v1/jobs/{job}/stream") as response:
                events = [event async for event in response.aiter_sse()]
        ids = [int(event.id) for event in events]
        self.check(ids == list(range(1, len(ids) + 1)), f"{job}: event ids {ids}")
        self.retries += sum(event.event == "narration" and "resuming from byte" in event.data for event in events)
        marker = end_marker(events)
        self.ends[marker[:12]] += 1
        if cancelled:
            self.check(marker == "[CANCELLED]", f"{job}: DELETE accepted, but it ended {marker}")
        elif marker == "[DONE]":
            result = json.loads(next(event.data for event in events if event.event == "result"))
            self.check(result["sha256"] == self.sha256[model], f"{job}: {model} recorded with a wrong sha256")
        else:  # only retries used up may fail a download
            self.check("503" in marker or "connection closed" in marker, f"{job}: {action} ended {marker}")

    async def lookup(self, client, rng: random.Random, operation: str) -> None:
        model = rng.choice(list(self.files)).removesuffix(".gguf")
        marker = end_marker(await run_job(client, {"operation": operation, "id": model}))
        self.ends[f"{operation} {marker[:12]}"] += 1
        allowed = marker == "[DONE]" or f"unknown model {model!r}" in marker or "is being deleted" in marker
        # A delete of a model not yet recorded would remove its partial download: not while it runs.
        allowed |= operation == "model_delete" and f"model {model} is being downloaded by job-" in marker
        self.check(allowed, f"{operation} {model} ended {marker}")

    async def client(self, daemon, seed: int, actions: int) -> None:
        rng = random.Random(seed)
        async with daemon.client(unix=seed % 2 == 0) as client:
            for action in rng.choices(ACTIONS, k=actions):
                if action in ("delete", "get"):
                    await self.lookup(client, rng, f"model_{action}")
                else:
                    await self.download(client, rng, action)


async def test_downloads_under_chaos_keep_every_rule(tiny_model):
    tiny = tiny_model.read_bytes()  # a real GGUF header; the random tails make three distinct models
    files = {f"m{n}.gguf": tiny + os.urandom((n + 1) * 1536 * 1024) for n in range(3)}
    clients, actions = 6, 25
    with running_daemon(CONFIG) as daemon:
        async with serve_files(files) as server:
            chaos = DownloadChaos(server, files)
            rng = random.Random(0)
            for name in files:
                server.routes[f"/{name}"] = chaos.paced(name, rng)
            with trio.fail_after(120):
                async with trio.open_nursery() as faults:
                    faults.start_soon(chaos.drop_connections, rng)
                    async with trio.open_nursery() as nursery:
                        for seed in range(clients):
                            nursery.start_soon(chaos.client, daemon, seed, actions)
                    faults.cancel_scope.cancel()
        async with daemon.client() as client:
            assert (await client.request("GET", "/v1/jobs?state=running")).json() == []
            [listed] = [event for event in await run_job(client, {"operation": "model_list"}) if event.event == "result"]
        models_dir, models = daemon.state_dir / "models", json.loads(listed.data)
        for model in models:  # the catalog and the directory agree
            content = (models_dir / model["file"]).read_bytes()
            assert hashlib.sha256(content).hexdigest() == chaos.sha256[model["id"]]
        recorded = {model["file"] for model in models}
        leftover = [path.name for path in models_dir.iterdir() if path.name not in recorded]
        assert [name for name in leftover if not name.endswith((".part", ".part.from"))] == []
        assert "Traceback" not in daemon.log()
    assert chaos.broken == [], "\n".join(chaos.broken)
    assert chaos.ends["[DONE]"] > clients * actions / 4 and chaos.retries > 0, (chaos.ends, chaos.retries)
