"""JobRegistry in process on a MockClock: deferred start, TTL expiry, cancel, replay, gaps, lag."""

from __future__ import annotations

import gc
import json
import weakref
from contextlib import asynccontextmanager

import pytest
import trio

from rbeed import operations as ops
from rbeed.config import JobsConfig
from rbeed.jobs import NUDGE, NUDGE_DELAY, Job, JobFailed, JobRegistry, JobState, RegistryFull

LIST = ops.HiveList()


@asynccontextmanager
async def running_registry(handler, **jobs_config):
    registry = JobRegistry(JobsConfig(**jobs_config), handler)
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run)
        yield registry
        nursery.cancel_scope.cancel()


async def until_finished(registry: JobRegistry, job: Job) -> None:
    with trio.fail_after(1):
        while not job.finished:
            await registry.changed.wait()


def ids_of(events) -> list[int]:
    return [event_id for event_id, _ in events]


def frames(events) -> list[dict]:
    """The rendered SSE frames as {id, event, data} with the raw bytes checked line by line."""
    parsed = []
    for event_id, frame in events:
        assert frame.endswith(b"\n\n") and frame.count(b"\n") == 4, frame
        id_line, event_line, data_line = frame.decode().split("\n")[:3]
        assert id_line == f"id: {event_id}"
        parsed.append({"id": event_id, "event": event_line.removeprefix("event: "), "data": data_line.removeprefix("data: ")})
    return parsed


class Gate:
    """A handler that narrates, then waits for `release`; records whether it was cancelled."""

    def __init__(self, narrations: int = 1):
        self.narrations = narrations
        self.entered = trio.Event()
        self.release = trio.Event()
        self.calls = 0
        self.cancelled = False

    async def __call__(self, job: Job, operation) -> None:
        self.calls += 1
        for number in range(self.narrations):
            job.narrate(f"line {number + 1}")
        self.entered.set()
        try:
            await self.release.wait()
        except trio.Cancelled:
            self.cancelled = True
            raise
        job.result({"released": True})


async def finish_at_once(job: Job, operation) -> None:
    job.narrate("hello", step=1)
    job.progress(done=1, total=2)
    job.result({"ok": True})


# -- events -----------------------------------------------------------------------------------


async def test_events_have_consecutive_ids_a_name_and_one_json_data_line(autojump_clock):
    async with running_registry(finish_at_once) as registry:
        job = registry.create(LIST)
        registry.start(job)
        await until_finished(registry, job)
        backlog, gap, feed = job.subscribe(0)
    assert gap is None and feed is None  # finished: everything is in the backlog
    assert frames(backlog) == [
        {"id": 1, "event": "narration", "data": '{"message":"hello","step":1}'},
        {"id": 2, "event": "progress", "data": '{"done":1,"total":2}'},
        {"id": 3, "event": "result", "data": '{"ok":true}'},
        {"id": 4, "event": "end", "data": "[DONE]"},
    ]
    assert job.last_event_id == 4


async def test_a_job_stays_queued_until_started_and_starts_once(autojump_clock):
    gate = Gate()
    async with running_registry(gate, unstreamed_ttl=60) as registry:
        job = registry.create(LIST)
        await trio.sleep(30)
        assert (job.state, gate.calls, job.started_at) == (JobState.QUEUED, 0, None)
        assert job.status().state == "queued" and job.status().started_at is None
        registry.start(job)
        registry.start(job)
        with trio.fail_after(1):
            await gate.entered.wait()
        registry.start(job)
        assert job.state is JobState.RUNNING and job.status().started_at is not None
        gate.release.set()
        await until_finished(registry, job)
    assert gate.calls == 1
    assert job.state is JobState.COMPLETED and job.error is None
    status = job.status()
    assert status.job_id == job.id and job.id.startswith("job-") and status.operation == "hive_list"
    assert status.created_at <= status.started_at <= status.finished_at
    assert status.finished_at.endswith("Z")


async def test_failures_end_with_an_error_marker_on_one_line(autojump_clock):
    async def fails(job: Job, operation) -> None:
        job.narrate("trying")
        raise JobFailed("model 'x' missing\r\nsecond line\rthird")

    async def crashes(job: Job, operation) -> None:
        raise ValueError("secret detail")

    async with running_registry(fails) as registry:
        job = registry.create(LIST)
        registry.start(job)
        await until_finished(registry, job)
    assert job.state is JobState.FAILED and job.error.startswith("model 'x' missing")
    end = frames(job.subscribe(0)[0])[-1]  # frames() checks the marker is a single data line
    assert end["event"] == "end" and end["data"] == "[ERROR] model 'x' missing second line third"

    async with running_registry(crashes) as registry:
        job = registry.create(LIST)
        registry.start(job)
        await until_finished(registry, job)
    assert job.state is JobState.FAILED
    assert frames(job.subscribe(0)[0])[-1]["data"] == "[ERROR] internal error: ValueError"


# -- expiry -----------------------------------------------------------------------------------


async def test_a_job_never_streamed_expires_after_unstreamed_ttl(autojump_clock):
    async with running_registry(Gate(), unstreamed_ttl=10, finished_ttl=100) as registry:
        first = registry.create(LIST)
        await trio.sleep(5)
        second = registry.create(LIST)
        await trio.sleep(4.9)  # t=9.9
        assert registry.get(first.id) is first and registry.list() == [second, first]  # newest first
        await trio.sleep(0.2)  # t=10.1
        assert registry.get(first.id) is None and registry.list() == [second]
        await trio.sleep(4.8)  # t=14.9
        assert registry.get(second.id) is second
        await trio.sleep(0.2)  # t=15.1
        assert registry.list() == []
        # Counted as ended (rbeed_jobs_finished_total): jobs made are jobs held or ended.
        assert registry.ended == {("hive_list", "localhost", "expired"): 2}


async def test_a_running_job_outlives_unstreamed_ttl_and_a_finished_one_stays_finished_ttl(autojump_clock):
    gate = Gate()
    async with running_registry(gate, unstreamed_ttl=10, finished_ttl=30) as registry:
        job = registry.create(LIST)
        registry.start(job)
        await trio.sleep(50)
        assert registry.get(job.id) is job and job.state is JobState.RUNNING
        gate.release.set()
        await until_finished(registry, job)
        await trio.sleep(29.9)
        assert registry.get(job.id) is job and job.state is JobState.COMPLETED
        assert registry.list(JobState.COMPLETED) == [job]
        await trio.sleep(0.2)
        assert registry.get(job.id) is None and registry.list() == [] and registry.finished_bytes == 0


async def test_registry_size_stays_bounded_under_an_endless_stream_of_jobs(autojump_clock):
    """3000 jobs at 100 a second, half never streamed: at most ~1 s worth are ever held."""
    async with running_registry(finish_at_once, unstreamed_ttl=1, finished_ttl=1) as registry:
        alive: list[weakref.ref] = []
        most_held = 0
        for _ in range(300):
            for number in range(10):
                job = registry.create(LIST)
                alive.append(weakref.ref(job))
                if number % 2:
                    registry.start(job)
            del job
            await trio.sleep(0.1)
            most_held = max(most_held, len(registry.list()))
        # 100 jobs a second live about 1 s each: the registry holds ~100, never thousands.
        assert 90 <= most_held <= 110, most_held
        await trio.sleep(1.5)
        assert registry.list() == []
        gc.collect()
        # Nothing else (expiry queues, tasks) keeps expired jobs in memory.
        assert sum(ref() is not None for ref in alive) == 0


async def test_more_jobs_than_max_jobs_is_refused_until_some_expire(autojump_clock):
    async with running_registry(Gate(), max_jobs=3, unstreamed_ttl=10) as registry:
        for _ in range(3):
            registry.create(LIST)
        with pytest.raises(RegistryFull):
            registry.create(LIST)
        await trio.sleep(10.1)
        assert registry.create(LIST).state is JobState.QUEUED


async def test_past_max_jobs_the_oldest_finished_jobs_make_room(autojump_clock):
    holding = trio.Event()  # set: jobs run until cancelled

    async def handler(job: Job, operation) -> None:
        if holding.is_set():
            await trio.sleep_forever()

    async with running_registry(handler, max_jobs=3, finished_ttl=600) as registry:
        oldest, older = registry.create(LIST), registry.create(LIST)
        for job in (oldest, older):
            registry.start(job)
            await until_finished(registry, job)
        holding.set()
        running = registry.create(LIST)
        registry.start(running)
        # 10000 requests to the compat routes in finished_ttl made every request after them a 503.
        newest = registry.create(LIST)
        assert registry.get(oldest.id) is None and registry.get(older.id) is older
        registry.create(LIST)
        assert registry.get(older.id) is None and [registry.get(job.id) for job in (running, newest)] == [running, newest]
        with pytest.raises(RegistryFull, match="^3 jobs queued or running; try again later$"):
            registry.create(LIST)



async def test_payloads_not_yet_streamed_are_held_to_a_byte_budget(autojump_clock):
    gate = Gate()
    async with running_registry(gate, max_unstreamed_bytes=1000, unstreamed_ttl=10) as registry:
        started, cancelled = registry.create(LIST, 400), registry.create(LIST, 400)
        with pytest.raises(RegistryFull, match="jobs not yet streamed hold 800 bytes of payload"):
            registry.create(LIST, 201)
        assert registry.unstreamed_bytes == 800 and len(registry.list()) == 2  # the refused one is not held
        with pytest.raises(RegistryFull, match=r"a payload of 1001 bytes is more than .* \(1000\)") as alone:
            registry.create(LIST, 1001)  # never to be held: not "try again later"
        assert alone.value.status == 413
        expiring = registry.create(LIST, 200)  # exactly the budget
        registry.start(started)  # a started job's payload is its task's
        assert registry.unstreamed_bytes == 600 and started.payload is None
        registry.cancel(cancelled)
        assert registry.unstreamed_bytes == 200 and cancelled.payload is None
        await trio.sleep(10.1)  # expired unstreamed
        assert registry.get(expiring.id) is None and registry.unstreamed_bytes == 0
        assert registry.create(LIST, 1000).payload_bytes == 1000

async def test_the_events_finished_jobs_keep_are_held_to_a_byte_budget(autojump_clock):
    sizes = iter([3000, 3000, 3000, 4000, 20_000])

    async def result(job: Job, operation) -> None:
        job.result("x" * next(sizes))

    async with running_registry(result, max_finished_bytes=10_000, finished_ttl=100) as registry:
        jobs = []
        for _ in range(5):
            jobs.append(job := registry.create(LIST))
            registry.start(job)
            await until_finished(registry, job)
            assert job.event_bytes == sum(len(frame) for _, frame in job.subscribe(0)[0])
            assert registry.finished_bytes == sum(j.event_bytes for j in registry.list()) <= 10_000
            if len(jobs) == 3:
                assert registry.list() == jobs[::-1]  # 9,200 bytes or so: all kept
            elif len(jobs) == 4:  # over: the oldest went, as many as it took
                assert registry.list() == [jobs[3], jobs[2]]
        assert registry.list() == [] and registry.finished_bytes == 0  # the fifth alone is over the budget
        assert frames(jobs[4].subscribe(0)[0])[-1]["data"] == "[DONE]"  # a reader holding it reads it all


async def test_a_jobs_event_bytes_count_only_the_events_its_buffer_keeps(autojump_clock):
    gate = Gate(narrations=5)
    async with running_registry(gate, event_buffer=2) as registry:
        registry.start(job := registry.create(LIST))
        await gate.entered.wait()
        kept = job.subscribe(0)[0]
        assert ids_of(kept) == [4, 5] and job.event_bytes == sum(len(frame) for _, frame in kept)


# -- cancel -----------------------------------------------------------------------------------


async def test_cancel_a_queued_job(autojump_clock):
    gate = Gate()
    async with running_registry(gate) as registry:
        job = registry.create(LIST)
        assert registry.cancel(job) is True
        assert job.state is JobState.CANCELLED and job.finished_at is not None
        registry.start(job)  # a stream opened afterwards only replays the end
        assert registry.cancel(job) is False
        await trio.sleep(1)
    assert gate.calls == 0
    assert frames(job.subscribe(0)[0]) == [{"id": 1, "event": "end", "data": "[CANCELLED]"}]


async def test_cancel_a_running_job_cancels_its_handler(autojump_clock):
    gate = Gate(narrations=2)
    async with running_registry(gate) as registry:
        job = registry.create(LIST)
        registry.start(job)
        with trio.fail_after(1):
            await gate.entered.wait()
        backlog, _, feed = job.subscribe(0)
        assert registry.cancel(job) is True
        await until_finished(registry, job)
        assert registry.cancel(job) is False
        live = [event async for event in feed]  # the feed closes once the job has ended
    assert gate.cancelled
    assert job.state is JobState.CANCELLED
    assert [e["data"] for e in frames(backlog + live)] == ['{"message":"line 1"}', '{"message":"line 2"}', "[CANCELLED]"]


async def test_cancel_between_start_and_the_first_run_of_the_task(autojump_clock):
    gate = Gate()
    async with running_registry(gate) as registry:
        job = registry.create(LIST)
        registry.start(job)
        registry.cancel(job, JobState.CANCELLED, "daemon shutting down")
        await until_finished(registry, job)
    # The handler gets the cancel at its first checkpoint: it never completes.
    assert job.state is JobState.CANCELLED and job.error == "daemon shutting down"
    events = frames(job.subscribe(0)[0])
    assert "result" not in [e["event"] for e in events] and events[-1]["data"] == "[CANCELLED]"


async def test_a_cancel_accepted_after_the_handler_was_woken_for_the_last_time_still_wins(autojump_clock):
    # The handler's last wait has ended (a worker's final frame came) but it has not run yet:
    # it returns without another checkpoint. The DELETE was told "cancelled", so the end says so.
    gate = Gate()
    async with running_registry(gate) as registry:
        job = registry.create(LIST)
        registry.start(job)
        with trio.fail_after(1):
            await gate.entered.wait()
        gate.release.set()
        assert registry.cancel(job, JobState.CANCELLED) is True
        await until_finished(registry, job)
    assert not gate.cancelled  # it did run to its end ...
    assert job.state is JobState.CANCELLED  # ... but the accepted cancel decides the end
    assert [e["data"] for e in frames(job.subscribe(0)[0])][-2:] == ['{"released":true}', "[CANCELLED]"]


async def test_cancel_all_ends_queued_and_running_jobs(autojump_clock):
    gate = Gate()
    async with running_registry(gate) as registry:
        queued, running = registry.create(LIST), registry.create(LIST)
        registry.start(running)
        with trio.fail_after(1):
            await gate.entered.wait()
        registry.cancel_all(JobState.CANCELLED, "daemon shutting down")
        await until_finished(registry, running)
    assert (queued.state, running.state) == (JobState.CANCELLED, JobState.CANCELLED)
    assert registry.count(JobState.CANCELLED) == 2 and registry.count(JobState.RUNNING, JobState.QUEUED) == 0


# -- replay, gaps, lagging readers ------------------------------------------------------------


async def test_replay_after_an_id_and_the_gap_of_events_that_fell_out_of_the_buffer(autojump_clock):
    gate = Gate(narrations=10)
    async with running_registry(gate, event_buffer=4) as registry:
        job = registry.create(LIST)
        registry.start(job)
        with trio.fail_after(1):
            await gate.entered.wait()
        backlog, gap, feed = job.subscribe(0)
        assert gap == (1, 6) and ids_of(backlog) == [7, 8, 9, 10]
        feed.close()
        backlog, gap, feed = job.subscribe(5)
        assert gap == (6, 6) and ids_of(backlog) == [7, 8, 9, 10]
        feed.close()
        backlog, gap, feed = job.subscribe(8)
        assert gap is None and ids_of(backlog) == [9, 10]
        feed.close()
        backlog, gap, feed = job.subscribe(10)
        assert (backlog, gap) == ([], None)
        gate.release.set()
        live = [event async for event in feed]
    assert [e["event"] for e in frames(live)] == ["result", "end"] and ids_of(live) == [11, 12]
    backlog, gap, feed = job.subscribe(0)
    assert gap == (1, 8) and ids_of(backlog) == [9, 10, 11, 12] and feed is None


async def test_a_reader_that_does_not_read_loses_its_feed_and_rereads_the_buffer(autojump_clock):
    gate = Gate(narrations=300)  # more than a live feed holds
    async with running_registry(gate, event_buffer=1000) as registry:
        job = registry.create(LIST)
        registry.start(job)
        _, _, slow_feed = job.subscribe(0)
        with trio.fail_after(1):
            await gate.entered.wait()
        buffered = [event async for event in slow_feed]  # ends: the registry closed the feed
        assert 0 < len(buffered) < 300 and ids_of(buffered) == list(range(1, len(buffered) + 1))
        backlog, gap, feed = job.subscribe(buffered[-1][0])
        assert gap is None and ids_of(buffered + backlog) == list(range(1, 301))
        gate.release.set()
        live = [event async for event in feed]
    assert [json.loads(e["data"]) for e in frames(live)[:1]] == [{"released": True}]
    assert frames(live)[-1]["data"] == "[DONE]"


async def test_a_new_reader_is_nudged_only_if_the_job_stays_quiet(autojump_clock):
    gate = Gate(narrations=0)
    async with running_registry(gate) as registry:
        quiet, busy = registry.create(LIST), registry.create(LIST)
        for job in (quiet, busy):
            registry.start(job)
        feeds = {}
        for job in (quiet, busy):
            _, _, feeds[job] = job.subscribe(0)
            registry.nudge_later(job)
        start = trio.current_time()
        busy.narrate("early")
        with trio.fail_after(NUDGE_DELAY * 5):
            assert await feeds[quiet].receive() == NUDGE
        assert trio.current_time() - start >= NUDGE_DELAY
        assert ids_of([feeds[busy].receive_nowait()]) == [1]
        await trio.sleep(NUDGE_DELAY * 5)
        with pytest.raises(trio.WouldBlock):
            feeds[busy].receive_nowait()  # it spoke before the deadline: no nudge
        gate.release.set()
