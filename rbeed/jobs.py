"""The JobRegistry: each job's payload until a stream takes it, its events, and the tasks that run it."""

from __future__ import annotations

import contextlib
import enum
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import msgspec
import trio

from .config import JobsConfig
from .operations import AnyOperation

log = logging.getLogger("rbeed.jobs")

_encode = msgspec.json.Encoder().encode
_SUBSCRIBER_BUFFER = 256  # events a live reader may fall behind before it re-reads the replay buffer
KEEPALIVE = (0, b": keep-alive\n\n")  # sent to the live readers of a quiet job; not kept for replay
NUDGE = (0, b"")  # sent to a new reader that has heard nothing for NUDGE_DELAY: "write what you have"
NUDGE_DELAY = 0.1  # seconds


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


def end_marker(state: JobState, error: str | None = None) -> str:
    """The data of a finished job's `end` event: rbee's end markers, an error on one line."""
    if state is JobState.COMPLETED:
        return "[DONE]"
    if state is JobState.CANCELLED:
        return "[CANCELLED]"
    return "[ERROR] " + " ".join((error or "failed").splitlines())


class Changed:
    """Something to wait for that happens again and again: `wait()` returns at the next `fire()`.

    Unlike a trio.Event replaced after each set, firing with nobody waiting costs nothing.
    """

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event: trio.Event | None = None

    def fire(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = None

    async def wait(self) -> None:
        if self._event is None:
            self._event = trio.Event()
        await self._event.wait()


class JobFailed(Exception):
    """Raised by an operation to end its job with `[ERROR] <message>`.

    `status` is the HTTP status that the routes answering from the job give: 500 for a failure,
    4xx where the request itself is at fault (a model it names is not there, or cannot do what
    it asks), 503 where the same request may work later.
    """

    def __init__(self, message: str, status: int = 500):
        super().__init__(message)
        self.status = status


class RegistryFull(Exception):
    """More jobs are held than the configured maximum: 503, or 413 for a payload past the budget on its own."""

    def __init__(self, message: str, status: int = 503):
        super().__init__(message)
        self.status = status


class JobStatus(msgspec.Struct):
    job_id: str
    operation: str
    state: str
    error: str | None
    created_at: str
    started_at: str | None
    finished_at: str | None


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(timestamp)) + f".{int(timestamp % 1 * 1000):03d}Z"


class Job:
    """One operation: its payload (until started), state, and a bounded log of rendered SSE events."""

    __slots__ = ("id", "operation", "hive", "payload", "state", "error", "created_at", "started_at", "finished_at",
                 "cancel_on_disconnect", "readers", "end_id", "_events", "_next_id", "_subscribers", "_scope",
                 "quiet_rounds", "_cancel_reason", "payload_bytes", "error_status", "event_bytes", "left_at",
                 "__weakref__")  # fmt: skip

    def __init__(self, operation: AnyOperation, buffer: int, payload_bytes: int = 0):
        self.id = f"job-{uuid.uuid4()}"
        self.operation = operation.name
        self.hive: str = getattr(operation, "hive_id", "localhost")  # the hive it names (runs on, if forwarded)
        self.payload: AnyOperation | None = operation
        self.payload_bytes = payload_bytes  # the request body it came in, counted while it waits for a stream
        self.state = JobState.QUEUED
        self.error: str | None = None
        self.error_status = 500  # a failed job's JobFailed.status
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.cancel_on_disconnect = operation.cancel_on_disconnect
        self.readers = 0
        self.left_at = 0.0  # when its last reader left (trio time), for reader_left's grace
        self.end_id: int | None = None  # the id of the end event, once the job has finished
        self._events: deque[tuple[int, bytes]] = deque(maxlen=buffer)
        self.event_bytes = 0  # of the events kept
        self._next_id = 1
        self._subscribers: set[trio.MemorySendChannel[tuple[int, bytes]]] = set()
        self._scope: trio.CancelScope | None = None
        self.quiet_rounds = 0  # keep-alive rounds since anything went to the live readers
        self._cancel_reason: tuple[JobState, str | None] = (JobState.CANCELLED, None)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Count a client that relays this job's events while it does (see JobRegistry.reader_left)."""
        self.readers += 1
        try:
            yield
        finally:
            self.readers -= 1

    def status(self) -> JobStatus:
        return JobStatus(
            self.id, self.operation, self.state.value, self.error,
            _iso(self.created_at), _iso(self.started_at), _iso(self.finished_at),
        )  # fmt: skip

    # -- producing events -------------------------------------------------------------------

    def emit(self, name: str, data: Any) -> None:
        """Append one event and hand it to every live reader; JSON-encodes `data` unless bytes."""
        payload = data if isinstance(data, bytes) else _encode(data)
        event_id = self._next_id
        self._next_id += 1
        event = (event_id, b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, name.encode(), payload))
        if len(self._events) == self._events.maxlen:
            self.event_bytes -= len(self._events[0][1])
        self.event_bytes += len(event[1])
        self._events.append(event)
        self._deliver(event)

    def _deliver(self, event: tuple[int, bytes]) -> None:
        self.quiet_rounds = 0
        gone = []
        for channel in self._subscribers:
            try:
                channel.send_nowait(event)
            except (trio.WouldBlock, trio.BrokenResourceError):
                # A full feed means its reader lags: closing it makes the reader re-read the
                # replay buffer from its last id. A broken one has no reader left.
                channel.close()
                gone.append(channel)
        self._subscribers.difference_update(gone)

    def narrate(self, message: str, **fields: Any) -> None:
        self.emit("narration", {"message": message, **fields})

    def progress(self, **fields: Any) -> None:
        self.emit("progress", fields)

    def result(self, value: Any) -> None:
        self.emit("result", value)

    def _finish(self, state: JobState, error: str | None = None) -> None:
        self.state, self.error, self.finished_at = state, error, time.time()
        self.end_id = self._next_id
        self.emit("end", end_marker(state, error).encode())
        for channel in self._subscribers:
            channel.close()
        self._subscribers.clear()

    # -- reading events ---------------------------------------------------------------------

    def subscribe(
        self, after: int
    ) -> tuple[
        list[tuple[int, bytes]], tuple[int, int] | None, trio.MemoryReceiveChannel[tuple[int, bytes]] | None
    ]:
        """Events after id `after`, the range of ids lost to the buffer bound, and a live feed.

        The feed is None once the job has finished: the replayed events then end with `end`.
        """
        gap = None
        if self._events and after + 1 < self._events[0][0]:
            gap = (after + 1, self._events[0][0] - 1)
        backlog = [event for event in self._events if event[0] > after]
        if self.finished:
            return backlog, gap, None
        send, receive = trio.open_memory_channel(_SUBSCRIBER_BUFFER)  # of (id, rendered event)
        self._subscribers.add(send)
        return backlog, gap, receive

    @property
    def last_event_id(self) -> int:
        return self._next_id - 1


Handler = Callable[[Job, AnyOperation], Awaitable[None]]


def _log_end(job: Job, state: JobState, error: str | None) -> None:
    """One journal line per job; lists and gets change nothing, so they are kept for debugging."""
    if state is JobState.FAILED:
        level = logging.WARNING
    else:
        level = logging.DEBUG if job.operation.endswith(("_list", "_get")) else logging.INFO
    if log.isEnabledFor(level):  # cheap for the thousands of lists a second a busy daemon may get
        took = f" after {time.time() - job.started_at:.2f} s" if job.started_at else ""
        why = f": {error}" if state is JobState.FAILED else ""
        log.log(level, "job %s (%s) %s%s%s", job.id, job.operation, state.value, took, why)


class JobRegistry:
    """Creates jobs, runs each in the registry's nursery when first streamed, and expires them."""

    def __init__(self, config: JobsConfig, handler: Handler, keepalive: Callable[[], float] = lambda: 15.0):
        self._config = config
        self._handler = handler
        self._keepalive = keepalive  # seconds between keep-alive comments on a quiet stream
        self._jobs: dict[str, Job] = {}
        self._running: set[Job] = set()
        self._nursery: trio.Nursery | None = None
        # Deadlines in deadline order: creation order for unstreamed, finish order for finished.
        # A job leaves _unstreamed when it starts or ends, so that the queue does not keep every
        # job of the last unstreamed_ttl seconds alive.
        self._unstreamed: dict[Job, float] = {}
        self.unstreamed_bytes = 0  # their payload_bytes: a flood of unstreamed jobs is held to a budget
        self._finished: deque[tuple[float, Job]] = deque()
        self.finished_bytes = 0  # the event_bytes of the jobs in _finished, held to a budget
        self._reaper: trio.CancelScope | None = None
        self._counts = dict.fromkeys(JobState, 0)  # jobs held, by state
        self.ended: Counter[tuple[str, str, str]] = Counter()  # jobs ever finished, by (operation, hive, state)
        self._awaiting_first: deque[tuple[float, Job, int]] = deque()  # (deadline, job, its last event id)
        self._awaited = Changed()
        self.changed = Changed()  # fired whenever a job starts or finishes
        self.on_change: Callable[[], None] = lambda: None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the job tasks and the expiry timer until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._keep_streams_alive)
            nursery.start_soon(self._nudge_new_readers)
            task_status.started()
            while True:
                with trio.CancelScope(deadline=self._next_deadline()) as self._reaper:
                    await trio.sleep_forever()
                self._expire(trio.current_time())

    async def _keep_streams_alive(self) -> None:
        """Send `: keep-alive` to the streams of running jobs quiet for a keep-alive period.

        One timer for all streams, ticking every half period, instead of a timeout around each
        stream's wait: a quiet stream hears from its job at least once a period.
        """
        while True:
            await trio.sleep(self._keepalive() / 2)
            for job in self._running:
                job.quiet_rounds += 1
                if job.quiet_rounds >= 2:
                    job._deliver(KEEPALIVE)

    def nudge_later(self, job: Job) -> None:
        """Nudge the job's live readers in NUDGE_DELAY unless it emits an event first.

        A new stream writes its HTTP head with its first event, so that a short job answers with
        one write and the client is not woken twice; this bounds how long the head can wait.
        """
        if not self._awaiting_first:
            self._awaited.fire()
        self._awaiting_first.append((trio.current_time() + NUDGE_DELAY, job, job.last_event_id))

    async def _nudge_new_readers(self) -> None:
        while True:
            if not self._awaiting_first:
                await self._awaited.wait()
            # In rounds at least half a delay apart, not one wake-up per stream: a nudge may come
            # up to half a delay late.
            await trio.sleep_until(max(self._awaiting_first[0][0], trio.current_time() + NUDGE_DELAY / 2))
            now = trio.current_time()
            while self._awaiting_first and self._awaiting_first[0][0] <= now:
                _, job, last_event_id = self._awaiting_first.popleft()
                if job.last_event_id == last_event_id and not job.finished:
                    job._deliver(NUDGE)

    # -- lookup -----------------------------------------------------------------------------

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def list(self, state: JobState | None = None) -> list[Job]:
        jobs = reversed(self._jobs.values())
        return [job for job in jobs if state is None or job.state == state]

    def count(self, *states: JobState) -> int:
        return sum(self._counts[state] for state in states)

    def _move(self, job: Job, state: JobState | None) -> None:
        """Keep the per-state counts in step as `job` moves to `state` (None: forgotten)."""
        self._counts[job.state] -= 1
        if state is not None:
            self._counts[state] += 1
            job.state = state

    # -- lifecycle --------------------------------------------------------------------------

    def create(self, operation: AnyOperation, payload_bytes: int = 0) -> Job:
        """A queued job for `operation`, decoded from `payload_bytes` of request body."""
        # Past the limit the oldest finished jobs go early, as past max_finished_bytes: a steady
        # stream of short jobs (each Ollama and OpenAI request is one) must not be refused.
        while len(self._jobs) >= self._config.max_jobs and self._finished:
            self._forget(self._finished.popleft()[1])
        if len(self._jobs) >= self._config.max_jobs:
            raise RegistryFull(f"{len(self._jobs)} jobs queued or running; try again later")
        if payload_bytes > self._config.max_unstreamed_bytes:
            raise RegistryFull(f"a payload of {payload_bytes} bytes is more than [jobs] max_unstreamed_bytes "
                               f"({self._config.max_unstreamed_bytes}) lets jobs not yet streamed hold",
                               413)  # fmt: skip
        if self.unstreamed_bytes + payload_bytes > self._config.max_unstreamed_bytes:
            raise RegistryFull(f"jobs not yet streamed hold {self.unstreamed_bytes} bytes of payload; "
                               "stream or delete them, or try again later")  # fmt: skip
        job = Job(operation, self._config.event_buffer, payload_bytes)
        self._jobs[job.id] = job
        self._counts[JobState.QUEUED] += 1
        self._unstreamed[job] = self._arm(self._config.unstreamed_ttl)
        self.unstreamed_bytes += payload_bytes
        return job

    def _take_payload(self, job: Job) -> AnyOperation | None:
        """Take a job off the unstreamed queue (started, ended or expired): its payload, no longer held."""
        if self._unstreamed.pop(job, None) is not None:
            self.unstreamed_bytes -= job.payload_bytes
        payload, job.payload = job.payload, None
        return payload

    def start(self, job: Job) -> None:
        """Start a queued job (the first stream does this); later calls do nothing."""
        if job.payload is None or job.state is not JobState.QUEUED:
            return
        assert self._nursery is not None, "JobRegistry.run() is not running"
        payload = self._take_payload(job)
        self._move(job, JobState.RUNNING)
        self._running.add(job)
        job.started_at = time.time()
        self._nursery.start_soon(self._run, job, payload, name=job.id)
        self._signal()

    def cancel(self, job: Job, state: JobState = JobState.CANCELLED, reason: str | None = None) -> bool:
        """End a queued or running job; False when it has already finished."""
        if job.finished:
            return False
        if job._scope is None:  # queued, or started but its task not yet scheduled
            job._cancel_reason = (state, reason)
            if job.state is JobState.QUEUED:
                self._end(job, state, reason)
                return True
            job._scope = trio.CancelScope()
        job._cancel_reason = (state, reason)
        job._scope.cancel()
        return True

    def reader_left(self, job: Job, resume_within: float = 0.0) -> None:
        """Cancel a job whose output is all it is for (infer) once its last reader has gone: at
        once, or when no reader has come back within `resume_within` seconds (a relay resuming)."""
        if job.readers or job.finished:
            return
        if resume_within <= 0:
            self.cancel(job)
            return
        assert self._nursery is not None, "JobRegistry.run() is not running"
        job.left_at = left_at = trio.current_time()
        self._nursery.start_soon(self._cancel_unless_resumed, job, left_at, resume_within)

    async def _cancel_unless_resumed(self, job: Job, left_at: float, resume_within: float) -> None:
        await trio.sleep_until(left_at + resume_within)
        if job.left_at == left_at:  # a later leave has its own timer
            self.reader_left(job)

    def cancel_all(self, state: JobState, reason: str) -> None:
        for job in list(self._jobs.values()):
            self.cancel(job, state, reason)

    async def _run(self, job: Job, operation: AnyOperation) -> None:
        scope = job._scope or trio.CancelScope()
        job._scope = scope
        outcome: tuple[JobState, str | None] = (JobState.COMPLETED, None)
        with scope:
            try:
                await self._handler(job, operation)
            except JobFailed as exc:
                outcome = (JobState.FAILED, str(exc))
                job.error_status = exc.status
            except Exception as exc:
                log.exception("job %s (%s) crashed", job.id, job.operation)
                outcome = (JobState.FAILED, f"internal error: {type(exc).__name__}")
        # A cancel that was accepted decides the end, even when the handler, already woken
        # for the last time, returned without reaching another checkpoint.
        if scope.cancel_called:
            outcome = job._cancel_reason
        if not job.finished:
            self._end(job, *outcome)

    def _end(self, job: Job, state: JobState, error: str | None = None) -> None:
        self._move(job, state)
        self.ended[job.operation, job.hive, state.value] += 1
        self._running.discard(job)
        _log_end(job, state, error)
        job._finish(state, error)
        self._take_payload(job)  # cancelled while queued
        self._finished.append((self._arm(self._config.finished_ttl), job))
        self.finished_bytes += job.event_bytes
        # Past the budget the oldest go early: a stream of large results (embeddings) would
        # otherwise hold finished_ttl's worth of them. A reader still relaying one keeps it.
        while self.finished_bytes > self._config.max_finished_bytes:
            self._forget(self._finished.popleft()[1])
        self._signal()

    def _signal(self) -> None:
        self.changed.fire()
        self.on_change()

    # -- expiry -----------------------------------------------------------------------------

    def _arm(self, ttl: float) -> float:
        """The deadline `ttl` from now, with the reaper woken by then."""
        deadline = trio.current_time() + ttl
        if self._reaper is not None and deadline < self._reaper.deadline:
            self._reaper.deadline = deadline
        return deadline

    def _next_deadline(self) -> float:
        heads = [self._finished[0][0]] if self._finished else []
        if self._unstreamed:
            heads.append(next(iter(self._unstreamed.values())))
        if not heads:
            return float("inf")
        # Expire in batches, not one wake-up per job: a TTL is kept to within a tenth of itself
        # (at most a second), which a busy daemon does not notice and saves a wake-up per job.
        granularity = min(1.0, self._config.unstreamed_ttl / 10, self._config.finished_ttl / 10)
        return max(min(heads), trio.current_time() + granularity)

    def _expire(self, now: float) -> None:
        while self._unstreamed:
            job, deadline = next(iter(self._unstreamed.items()))
            if deadline > now:
                break
            self._take_payload(job)
            log.info("job %s expired: never streamed", job.id)
            self.ended[job.operation, job.hive, "expired"] += 1  # or jobs made would vanish from the counts
            self._move(job, None)
            del self._jobs[job.id]
        while self._finished and self._finished[0][0] <= now:
            self._forget(self._finished.popleft()[1])

    def _forget(self, job: Job) -> None:
        """Drop a finished job: its id is unknown from now on."""
        self.finished_bytes -= job.event_bytes
        if self._jobs.pop(job.id, None) is not None:
            self._move(job, None)
