"""A chaos run: many clients stream, cancel, drop, resume and kill at once; every job obeys the rules.

Each client runs a fixed, seeded list of actions against a daemon serving the tiny model as
"tiny" and "tiny2"; only the interleaving varies, which is the point. A broken rule names the
job and the rule.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from rbeed.httpclient import Client
from support import end_marker, job_result, run_job, submit

RUNNING_OR_QUEUED = ("queued", "running")
PROMPTS = ["Once upon a time", "Hello", "The cat", "In the beginning"]


class Chaos:
    """The shared record of a run: reference texts, workers hit on purpose, and broken rules."""

    def __init__(self, client: Callable[[bool], Client], connect: Callable[[bool], Awaitable[trio.abc.Stream]],
                 reload: Callable[[], Awaitable[object]], on_demand: bool):  # fmt: skip
        self.client_of = client  # client(unix) -> a new Client over the Unix socket or TCP
        self.connect = connect  # connect(unix) -> a raw stream to the daemon
        self.reload = reload  # makes the daemon reload its config
        self.on_demand = on_demand
        self.texts: dict[tuple, str] = {}  # (prompt, max_tokens, temperature, seed) -> text
        self.hit: set[str] = set()  # workers killed or deleted by an action
        self.broken: list[str] = []
        self.ends: collections.Counter[str] = collections.Counter()  # end markers, by their start

    def check(self, rule: bool, message: str) -> None:
        if not rule:
            self.broken.append(message)

    def payload(self, rng: random.Random) -> dict:
        payload = {"operation": "infer", "model": rng.choice(["tiny", "tiny2"]), "prompt": rng.choice(PROMPTS),
                   "max_tokens": rng.choice([1, 5, 40, 120]), "temperature": rng.choice([0, 0.8]),
                   "seed": rng.randrange(3), "stream": rng.random() > 0.2}  # fmt: skip
        if self.on_demand:
            payload["keep_alive"] = rng.choice([0, 0.05, 1])
        return payload

    def check_events(self, job: str, payload: dict, events: list, cancelled: bool = False) -> str:
        """Every rule a finished infer stream obeys; returns its end marker."""
        if not events or events[-1].event != "end":
            self.broken.append(f"{job}: stream ended without an end event")
            return ""
        marker = events[-1].data
        ids = [int(e.id) for e in events]
        self.check(ids == list(range(ids[0], ids[0] + len(ids))), f"{job}: event ids {ids}")
        tokens = [json.loads(e.data) for e in events if e.event == "token"]
        self.check([t["i"] for t in tokens] == list(range(len(tokens))), f"{job}: token indices")
        allowed = marker == "[DONE]" or (cancelled and marker == "[CANCELLED]") or marker.startswith("[ERROR] busy: ")
        if marker.startswith("[ERROR] worker "):  # only one that an action killed or deleted
            allowed = marker.split()[2] in self.hit
        self.check(allowed, f"{job}: ended {marker!r} ({payload})")
        self.ends[marker.split(":")[0][:24]] += 1
        results = [json.loads(e.data) for e in events if e.event == "result"]
        if marker == "[DONE]" and len(results) != 1:
            self.broken.append(f"{job}: {len(results)} results")
        elif marker == "[DONE]":
            text = results[0]["text"] if not payload["stream"] else "".join(t["t"] for t in tokens)
            if payload["stream"]:
                self.check(results[0]["completion_tokens"] == len(tokens), f"{job}: token count")
            key = (payload["prompt"], payload["max_tokens"], payload["temperature"], payload["seed"])
            self.check(self.texts.setdefault(key, text) == text, f"{job}: {key} gave {text!r}, before {self.texts[key]!r}")
        return marker

    # -- actions: each runs one job (or one fault) to its end -------------------------------------

    async def stream_whole(self, client, rng) -> None:
        payload = self.payload(rng)
        job = await submit(client, payload)
        async with client.stream("GET", f"/v1/jobs/{job}/stream") as response:
            events = [event async for event in response.aiter_sse()]
        self.check_events(job, payload, events)

    async def delete_midway(self, client, rng) -> None:
        payload = self.payload(rng) | {"stream": True}
        job = await submit(client, payload)
        events, after = [], rng.randrange(6)
        async with client.stream("GET", f"/v1/jobs/{job}/stream") as response:
            feed = response.aiter_sse()
            async for event in feed:
                events.append(event)
                if event.event == "end" or sum(e.event == "token" for e in events) >= after:
                    break
            if events[-1].event != "end":
                async with self.client_of(True) as other:
                    status = (await other.request("DELETE", f"/v1/jobs/{job}")).status
                events += [event async for event in feed]
                self.check(status in (200, 409), f"{job}: DELETE answered {status}")
                # A cancel the daemon accepted decides the end, whatever the worker did meanwhile.
                self.check(status != 200 or end_marker(events) == "[CANCELLED]", f"{job}: DELETE 200, then {events[-1].data}")
        self.check_events(job, payload, events, cancelled=True)

    async def drop_midway(self, client, rng) -> None:
        payload = self.payload(rng) | {"stream": True}
        job = await submit(client, payload)
        seen, after = 0, rng.randrange(6)
        async with self.client_of(rng.random() < 0.5) as dropping:
            async with dropping.stream("GET", f"/v1/jobs/{job}/stream") as response:
                async for event in response.aiter_sse():
                    seen += event.event == "token"
                    if event.event == "end" or seen >= after:
                        break
        # Re-reading the stream replays it and follows it to its end: cancelled when the daemon
        # saw the drop before this reader came, else run to completion for this reader.
        async with client.stream("GET", f"/v1/jobs/{job}/stream") as response:
            events = [event async for event in response.aiter_sse()]
        self.check_events(job, payload, events, cancelled=True)

    async def resume_midway(self, client, rng) -> None:
        payload = self.payload(rng) | {"stream": True, "max_tokens": 40}
        job = await submit(client, payload)
        first = []
        async with client.stream("GET", f"/v1/jobs/{job}/stream") as response:
            feed = response.aiter_sse()
            async for event in feed:
                first.append(event)
                if event.event == "end" or len(first) >= 3:
                    break
            cut = first[-1].id
            async with self.client_of(True) as other:
                async with other.stream("GET", f"/v1/jobs/{job}/stream", headers={"last-event-id": cut}) as resumed:
                    second = [(e.id, e.event, e.data) async for e in resumed.aiter_sse()]
            first += [event async for event in feed]
        tail = [(e.id, e.event, e.data) for e in first if int(e.id) > int(cut)]
        self.check(second == tail, f"{job}: resumed after {cut}: {second[:2]}... against {tail[:2]}...")
        self.check_events(job, payload, first)

    async def garbage(self, client, rng) -> None:
        junk = rng.choice([
            b"GARBAGE\r\n\r\n",
            b'POST /v1/jobs HTTP/1.1\r\nhost: x\r\ncontent-length: 9\r\n\r\n{"operat',  # then closes early
            b'POST /v1/jobs HTTP/1.1\r\nhost: x\r\ncontent-length: 20\r\n\r\n{"operation":"infe"}',
            b"GET /v1/jobs/job-nope/stream HTTP/1.1\r\nhost: x\r\n\r\n",
        ])  # fmt: skip
        async with await self.connect(rng.random() < 0.5) as stream:
            await stream.send_all(junk)

    async def hit_worker(self, client, rng) -> None:
        """SIGKILL a worker, delete one, or reload the config (SIGHUP)."""
        workers = [w for w in await job_result(client, {"operation": "worker_list"}) if w["state"] in ("ready", "busy")]
        fault = rng.choice(["kill", "delete", "reload"])
        if fault == "reload" or not workers:
            await self.reload()
            return
        worker = rng.choice(workers)
        self.hit.add(worker["id"])
        if fault == "kill":
            with contextlib.suppress(ProcessLookupError):  # an on-demand worker may have stopped since
                os.kill(worker["pid"], signal.SIGKILL)
        else:
            events = await run_job(client, {"operation": "worker_delete", "id": worker["id"]})
            self.check(end_marker(events) in ("[DONE]", f"[ERROR] unknown worker {worker['id']!r}"), f"delete: {events}")

    ACTIONS = {stream_whole: 6, delete_midway: 4, drop_midway: 3, resume_midway: 2, garbage: 1, hit_worker: 0.15}

    async def client(self, seed: int, actions: int) -> None:
        rng = random.Random(seed)
        choices = rng.choices(list(self.ACTIONS), weights=list(self.ACTIONS.values()), k=actions)
        async with self.client_of(seed % 2 == 0) as client:
            for action in choices:
                await action(self, client, rng)


async def register_models(client: Client, tiny_model: Path, directory: Path, spawn: bool) -> None:
    """Register the tiny model as "tiny" and a copy of it as "tiny2"; with `spawn`, a worker on each."""
    copy = shutil.copyfile(tiny_model, directory / "tiny2.gguf")
    for source in (tiny_model, copy):
        await job_result(client, {"operation": "model_download", "model": str(source)})
    if spawn:
        for model in ("tiny", "tiny2"):
            await job_result(client, {"operation": "worker_spawn", "model": model, "threads": 1})


async def run(chaos: Chaos, clients: int, actions: int, timeout: float = 240) -> None:
    """Run the clients at once; then no job may be left running, and both models must still give
    the texts seen during the run, from workers restarted or loaded again."""
    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            for seed in range(clients):
                nursery.start_soon(chaos.client, seed, actions)
    async with chaos.client_of(True) as client:
        jobs = (await client.request("GET", "/v1/jobs")).json()
        assert [job for job in jobs if job["state"] in RUNNING_OR_QUEUED] == []
        for model in ("tiny", "tiny2"):
            payload = {"operation": "infer", "model": model, "prompt": "Hello", "max_tokens": 40,
                       "temperature": 0, "seed": 0, "stream": True}  # fmt: skip
            job = await submit(client, payload)
            async with client.stream("GET", f"/v1/jobs/{job}/stream") as response:
                events = [event async for event in response.aiter_sse()]
            assert chaos.check_events(job, payload, events) == "[DONE]"
    assert chaos.broken == [], "\n".join(chaos.broken)
    assert chaos.ends["[DONE]"] > clients * actions / 4, chaos.ends  # the run did real work
