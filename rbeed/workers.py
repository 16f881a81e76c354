"""The worker supervisor: llama.cpp workers per model and device, their queues, deaths and restarts."""

from __future__ import annotations

import enum
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import msgspec
import trio

from . import wire
from .backends import WorkerStartError, first_of, probe_device
from .config import WorkersConfig, parse_cpu_list
from .jobs import Job, JobFailed
from .models import Models
from .operations import WorkerDelete, WorkerGet, WorkerList, WorkerSpawn
from .transport import open_unix_transport

log = logging.getLogger("rbeed.workers")


class WorkerState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    BUSY = "busy"
    RESTARTING = "restarting"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


class WorkerRecord(msgspec.Struct):
    id: str
    model: str
    device: str
    pid: int | None
    state: str
    threads: int
    n_ctx: int  # its context in tokens: prompt plus generated text
    started_at: float
    backend: str
    on_demand: bool
    restarts: int  # in a row: back to 0 once a job is served
    restarts_total: int
    queued: int
    error: str | None
    keep_alive: float | None  # on demand: idle seconds before it stops (-1: never)
    stops_at: float | None  # when it stops unless a job comes first: while idle, on demand
    rss: int | None  # resident memory of its process in bytes, as `ollama ps` shows a model's size


_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes(pid: int | None) -> int | None:
    """A process's resident set size from /proc; None when it is gone or not visible."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class WorkerDied(Exception):
    pass


class WorkerHung(WorkerDied):
    """Alive but not answering: no exit status is coming until it is stopped."""


# How a request ended: the worker's last frame for it, or why the daemon gave up on it (its worker died).
Outcome = wire.Done | wire.Embedded | wire.Tokenized | wire.Failed | str
_ENDINGS = (wire.Done, wire.Embedded, wire.Tokenized, wire.Failed)


class Generation:
    """One request (a generation, embeddings, tokens) on its way through a worker: the frame to
    send and where the answer goes."""

    _ids = itertools.count(1)

    def __init__(self, job: Job, stream: bool, kind: type[wire.Generate | wire.Embed | wire.Tokenize] = wire.Generate,
                 **fields):  # fmt: skip
        self.job = job
        self.request = kind(id=next(self._ids), **fields)
        self.stream = stream
        self.pieces: list[str] = []
        self.made = 0  # tokens the worker sent, those of a job gone too
        self.vectors: list[list[float]] = []
        self.done = trio.Event()
        self.outcome: Outcome | None = None
        self.sent = False
        self.abandoned = False  # its job went away: skip it if still queued, drop its tokens
        # Told the outcome as it arrives, even when its job went away first (a cancel's Done).
        self.on_finish: Callable[[Outcome], None] = lambda outcome: None

    def token(self, text: str) -> None:
        self.made += 1
        if self.abandoned:
            return
        if self.stream:
            self.job.emit("token", {"t": text, "i": len(self.pieces)})
        self.pieces.append(text)

    def finish(self, outcome: Outcome) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.on_finish(outcome)
            self.done.set()


class Worker:
    """One worker: its launch settings, its request queue, and the task that serves it."""

    def __init__(self, id: str, model: str, model_path: Path, device: str, threads: int, n_ctx: int,
                 n_batch: int, socket_path: Path, config: WorkersConfig, on_demand: bool,
                 keep_alive: float | None):  # fmt: skip
        self.id, self.model, self.model_path, self.device = id, model, model_path, device
        self.threads, self.n_ctx, self.n_batch, self.socket_path = threads, n_ctx, n_batch, socket_path
        self.config, self.on_demand = config, on_demand
        self.asked_keep_alive = keep_alive  # on demand: the last job's keep_alive; None: the config's
        self.state = WorkerState.STARTING
        self.pid: int | None = None
        self.started_at = time.time()
        self.stops_at: float | None = None
        self.restarts = self.restarts_total = 0
        self.error: str | None = None
        self.backend = ""
        self.current: Generation | None = None
        self.aside: dict[int, Generation] = {}  # tokenizes sent while `current` runs, answered between its tokens
        self.first: Generation | None = None  # on demand: the job it is loaded for, served before the queue
        self.draining = False  # takes no new jobs; stops once those queued are served (its threads are wanted)
        self.closing = False  # being stopped (deleted, idle, drained): takes no jobs at all
        # Waiting generations, at most queue_size: one whose job goes away leaves at once, freeing its place.
        self.queue: deque[Generation] = deque()
        self._queued = trio.lowlevel.ParkingLot()  # serve() waits here for the next one
        self.loaded = trio.Event()  # set once the first load succeeded or failed
        self.ready_once = False  # a load succeeded: a later end is not a failure to load
        self.stopped = trio.Event()
        self.scope = trio.CancelScope()
        self._stream: trio.abc.Stream | None = None
        self._send_lock = trio.Lock()
        self._answer = trio.CancelScope()  # the wait for the running generation's frames
        self._idle: trio.CancelScope | None = None  # the wait for a job, while idle: its deadline is the stop
        self._idle_since = 0.0

    @property
    def live(self) -> bool:
        """Whether it holds its threads: until its process is gone."""
        return self.state not in (WorkerState.STOPPED, WorkerState.FAILED)

    @property
    def accepting(self) -> bool:
        """Whether a job that picks a worker for its model may pick this one."""
        return self.live and not self.closing and not self.draining

    def record(self) -> WorkerRecord:
        return WorkerRecord(
            self.id, self.model, self.device, self.pid, self.state.value, self.threads, self.n_ctx, self.started_at,
            self.backend, self.on_demand, self.restarts, self.restarts_total,
            len(self.queue), self.error, self.keep_alive, self.stops_at,
            resident_bytes(self.pid),
        )  # fmt: skip

    @property
    def keep_alive(self) -> float | None:
        """Idle seconds before it stops (-1: never); None for a worker kept until deleted."""
        if not self.on_demand:
            return None
        return self.config.keep_alive if self.asked_keep_alive is None else self.asked_keep_alive

    def keep_for(self, keep_alive: float | None) -> None:
        """A job's keep_alive (None: the config's) sets how long it may idle after that job, as in Ollama."""
        self.asked_keep_alive = keep_alive
        self.retime()

    def retime(self) -> None:
        """Move the idle stop to the keep-alive now in force (a job asked, or a reload changed it)."""
        if self._idle is None:
            return
        keep_alive = self.keep_alive
        timeout = 0.0 if self.draining else math.inf if keep_alive is None or keep_alive < 0 else keep_alive
        self._idle.deadline = self._idle_since + timeout
        self.stops_at = time.time() + self._idle.deadline - trio.current_time() if timeout < math.inf else None

    @property
    def backlog(self) -> int:
        """Generations a new one would wait for: the running one and the queued ones."""
        return (self.current is not None) + len(self.queue)

    async def wait_loaded(self) -> None:
        """Return once the model is loaded; JobFailed if it never was, or the worker ended since."""
        if not self.loaded.is_set():  # no trip through the run loop on the way to a token
            await self.loaded.wait()
        if self.live:
            return
        if self.ready_once:
            raise JobFailed(f"worker {self.id} is {self.state.value}" + (f": {self.error}" if self.error else ""))
        if self.state is WorkerState.FAILED:
            raise JobFailed(f"worker {self.id} failed to load {self.model}: {self.error}")
        raise JobFailed(f"worker {self.id} stopped while loading {self.model}")

    def submit(self, generation: Generation) -> None:
        if not self.live or self.closing:
            raise JobFailed(f"worker {self.id} is {self.state.value if not self.live else 'stopping'}")
        if len(self.queue) >= self.config.queue_size:
            raise JobFailed(f"busy: worker {self.id} has {len(self.queue)} jobs waiting", 503)
        self.queue.append(generation)
        self._queued.unpark()

    async def submit_aside(self, generation: Generation) -> bool:
        """Send a tokenize at once, to be answered between the running generation's tokens (as
        llama-server tokenizes beside its slots) rather than after it; False where none runs."""
        current = self.current
        if (type(generation.request) is not wire.Tokenize or current is None or not current.sent
                or type(current.request) is not wire.Generate or current.outcome is not None
                or self._stream is None or self.closing or len(self.aside) >= self.config.queue_size):  # fmt: skip
            return False
        self.aside[generation.request.id] = generation  # serve() reads on until it is answered
        with trio.CancelScope(shield=True):  # a frame cut short would garble the stream
            try:
                await self._send(self._stream, generation.request)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the worker is gone: its supervisor fails what it was sent
            except BaseException:
                del self.aside[generation.request.id]  # never sent: serve() must not wait for it
                raise
        return True

    def fail_sent(self, why: str) -> None:
        """Fail what the worker was sent and did not answer: it is gone."""
        for generation in (self.current, *self.aside.values()):
            if generation is not None:
                generation.finish(why)
        self.current = None
        self.aside.clear()

    async def abandon(self, generation: Generation) -> None:
        """The job went away (cancel, disconnect): stop its generation at once if it is running."""
        generation.abandoned = True
        if generation in self.queue:
            self.queue.remove(generation)
        if generation is self.current and generation.sent and generation.outcome is None and self._stream:
            # A worker that does not end the generation within cancel_timeout is taken for hung:
            # serve() gives up on it, and the supervisor kills it and starts it again.
            self._answer.deadline = min(self._answer.deadline, trio.current_time() + self.config.cancel_timeout)
            try:
                await self._send(self._stream, wire.Cancel(generation.request.id))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _send(self, stream: trio.abc.Stream, message: wire.Message) -> None:
        """Send one frame; a Cancel and a Generate never interleave on the stream."""
        data = wire.encode(message)
        try:
            self._send_lock.acquire_nowait()  # the usual case: no trip through the run loop
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            await stream.send_all(data)
        finally:
            self._send_lock.release()

    async def serve(self, stream: trio.abc.Stream) -> None:
        """Feed queued generations to the worker one at a time; return once idle for keep_alive."""
        self._stream = stream
        try:
            await self._serve(stream)
        finally:  # gone, or going: nothing more is sent aside
            self._stream = None

    async def _serve(self, stream: trio.abc.Stream) -> None:
        decoder = wire.FrameDecoder()
        while True:
            self.state = WorkerState.READY
            generation, self.first = self.first, None
            if generation is None and not self.queue:  # a queued job is taken at once, even with keep_alive 0
                try:
                    with trio.CancelScope() as self._idle:
                        self._idle_since = trio.current_time()
                        self.retime()
                        while not self.queue:
                            await self._queued.park()
                finally:  # also when the process died, or a stop came, while it was idle
                    self._idle, self.stops_at = None, None
            if generation is None:
                if not self.queue:  # idle for keep_alive: none was queued before this task ran again
                    self.closing = True  # from here to its exit it must take no job
                    return
                generation = self.queue.popleft()
            if generation.abandoned:
                continue
            # Left set if this raises: the supervisor fails the generation with the reason.
            self.current, self.state = generation, WorkerState.BUSY
            await self._send(stream, generation.request)
            generation.sent = True
            with trio.CancelScope() as self._answer:
                if generation.abandoned:  # its job went away while the request was on its way
                    await self.abandon(generation)
                while generation.outcome is None:
                    await self._read(stream, decoder, generation)
            if generation.outcome is None:
                raise WorkerHung(f"did not stop its generation within {self.config.cancel_timeout:g} s of a cancel")
            self.current = None
            with trio.move_on_after(self.config.cancel_timeout):  # tokenizes sent aside as it ended
                while self.aside:
                    await self._read(stream, decoder, generation)
            if self.aside:
                raise WorkerHung(f"did not answer a tokenize within {self.config.cancel_timeout:g} s")
            self.restarts = 0

    async def _read(self, stream: trio.abc.Stream, decoder: wire.FrameDecoder, generation: Generation) -> None:
        """Read what the worker sent, and give each frame to the request it answers."""
        data = await stream.receive_some(1 << 16)
        if not data:
            raise WorkerDied("closed its connection")
        for message in decoder.feed(data):
            if message.id != generation.request.id:
                if (aside := self.aside.pop(message.id, None)) is not None:
                    aside.finish(message)
            elif type(message) is wire.Token:
                generation.token(message.text)
            elif type(message) is wire.Embedding:
                generation.vectors.append(message.vector)
            elif type(message) in _ENDINGS:
                generation.finish(message)


class Supervisor:
    """Starts, serves, restarts and stops workers; shares the CPU threads out among them."""

    def __init__(self, config: WorkersConfig, models: Models, backend, runtime_dir: Path):
        self.config = config
        self.models = models
        self.backend = backend
        self.socket_dir = runtime_dir / "workers"
        self.workers: dict[str, Worker] = {}
        self.on_change: Callable[[], None] = lambda: None  # called whenever a worker starts or ends
        self._nursery: trio.Nursery | None = None
        self._serial = itertools.count(1)
        self._placing = trio.Lock()  # one placement at a time, in arrival order (trio's Lock is fair)
        self._usable_backends = {"cpu"}  # those the llama.cpp build supports, once probed
        models.in_use = lambda model_id: [w.id for w in self.workers.values() if w.model == model_id and w.live]
        models.released = self._released

    async def _released(self, model_id: str, job: Job) -> None:
        """Return once no worker of the model is on its way out (unloaded, idle, deleted)."""
        while leaving := [w for w in self.workers.values() if w.model == model_id and w.live and w.closing]:
            job.narrate(f"waiting for worker {leaving[0].id} to stop")
            await leaving[0].stopped.wait()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own every worker's task; when cancelled, each worker is stopped before this returns."""
        await self.backend.remove_leftovers()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def cores(self) -> int:
        if self.config.threads:
            return self.config.threads
        if self.config.cpu_affinity:
            return len(parse_cpu_list(self.config.cpu_affinity))
        return len(os.sched_getaffinity(0))  # those this process may run on: taskset, a cgroup's cpuset

    def _signal(self) -> None:
        self.on_change()

    def status(self) -> str:
        live = [w for w in self.workers.values() if w.live]
        return f"{len(live)} worker{'s' if len(live) != 1 else ''}"

    # -- placement --------------------------------------------------------------------------

    def _free_threads(self) -> int:
        return self.cores - sum(w.threads for w in self.workers.values() if w.live)

    async def _make_room(self, threads: int, job: Job | None, wait: bool) -> None:
        """Free `threads`: wait for workers already stopping, stop idle on-demand ones (oldest first).

        With `wait` (a load on demand, as Ollama swaps models), a busy on-demand worker is drained
        too: it takes no new jobs and stops once it has served those queued on it. Returns early
        when that cannot free enough.
        """
        while (missing := threads - self._free_threads()) > 0:
            live = sorted((w for w in self.workers.values() if w.live), key=lambda w: w.started_at)
            closing = [w for w in live if w.closing]
            on_demand = [w for w in live if w.on_demand and not w.closing]
            idle = [w for w in on_demand if not w.backlog and w.first is None]
            busy = [w for w in on_demand if w not in idle] if wait else []
            if sum(w.threads for w in closing + idle + busy) < missing:
                return
            if closing:
                await closing[0].stopped.wait()  # deleted or idle: its process is on its way out
            elif idle:
                if job is not None:
                    job.narrate(f"stopping idle worker {idle[0].id} to free {idle[0].threads} thread(s)")
                await self.stop(idle[0])
            else:
                await self._drain(next((w for w in busy if w.draining), busy[0]), missing, job)

    async def _drain(self, worker: Worker, missing: int, job: Job | None) -> None:
        if job is not None:
            job.narrate(f"waiting for worker {worker.id} to finish {worker.backlog} job(s); "
                        f"it then stops to free {worker.threads} thread(s)")  # fmt: skip
        log.info("worker %s draining: %d thread(s) wanted for another model", worker.id, missing)
        worker.draining = True
        try:
            await worker.stopped.wait()
        finally:
            if not worker.stopped.is_set():  # this job went away: nobody wants the threads now
                worker.draining = False

    def context(self, model_id: str, n_ctx: int | None) -> int:
        """The context to load a model with: n_ctx (0: the model's own), else [workers] n_ctx.

        The configured default is cut to what the model was trained for; more than that, asked
        for, is refused: past it llama.cpp's output turns to garbage.
        """
        model = self.models.lookup(model_id)
        trained = model.metadata.get("context_length")
        if n_ctx is None:
            return min(self.config.n_ctx, trained or self.config.n_ctx)
        model.check_context(n_ctx)
        return n_ctx or trained or 0

    async def spawn(self, model_id: str, device: str, *, threads: int | None = None, n_ctx: int | None = None,
                    on_demand: bool = False, keep_alive: float | None = None, job: Job | None = None,
                    first: Generation | None = None) -> Worker:  # fmt: skip
        """Start a worker and return it once its model is loaded; JobFailed says why not.

        `first` is served as soon as the model is loaded: an on-demand worker with keep_alive 0
        would otherwise stop before the job it was loaded for has queued its generation.
        """
        if device == "metal":
            raise JobFailed("device metal is only available on macOS; this host runs Linux", 400)
        wanted = threads or 1
        if wanted > self.cores:  # no wait or delete would free that many
            raise JobFailed(f"threads {wanted} is more than the {self.cores} the workers have in all "
                            "([workers] threads, else the CPUs)", 400)  # fmt: skip
        with self.models.held(model_id, f"job {job.id}" if job else "a spawn") as model:
            path = self.models.path_of(model)
            n_ctx = self.context(model_id, n_ctx)
            await self._check_device(device, job)
            async with self._placing:
                await self._make_room(wanted, job, wait=on_demand)
                free = self._free_threads()
                if free < wanted:
                    holders = ", ".join(f"{w.id} ({w.threads})" for w in self.workers.values() if w.live)
                    raise JobFailed(f"no CPU threads free: {self.cores} in all, held by {holders}; "
                                    "delete a worker first", 503)  # fmt: skip
                threads = threads or free
                serial = next(self._serial)  # of its socket: a short path, never reused
                # The lowest number no listed worker has: a unit keeps its --runtime limits until
                # reboot, so a new name for every load would pile them up (systemd backend).
                prefix = f"{model.id[:48]}-{device.replace(':', '')}"
                worker_id = next(f"{prefix}-{n}" for n in itertools.count(1) if f"{prefix}-{n}" not in self.workers)
                n_batch = 0 if model.is_encoder else self.config.n_batch  # an encoder's inputs: one batch each
                worker = Worker(
                    worker_id, model.id, path, device, threads, n_ctx, n_batch, self.socket_dir / f"{serial}.sock",
                    self.config, on_demand, keep_alive,
                )  # fmt: skip
                worker.backend, worker.first = self.backend.name, first
                self.workers[worker_id] = worker  # from here on, in_use covers the model
                assert self._nursery is not None, "Supervisor.run() is not running"
                self._nursery.start_soon(self._supervise, worker, name=f"worker {worker_id}")
        self._signal()
        if job is not None:
            job.narrate(f"loading {model.id} on {device} with {threads} thread(s) and a context of "
                        f"{n_ctx or 'its own'} tokens as worker {worker_id}")  # fmt: skip
        started = trio.current_time()
        with trio.fail_after(self.config.load_timeout + self.config.stop_grace + 5):
            await worker.wait_loaded()
        if job is not None:
            job.narrate(f"worker {worker_id} ready in {trio.current_time() - started:.2f} s", worker_id=worker_id)
        return worker

    async def _check_device(self, device: str, job: Job | None) -> None:
        """Refuse a device the llama.cpp build lacks before stopping workers to make room for it."""
        backend = device.partition(":")[0]  # the build supports all of a backend's devices, or none
        if backend in self._usable_backends:
            return
        if job is not None:
            job.narrate(f"checking that this llama.cpp build supports {device}")
        reason = await probe_device(device, self.config.load_timeout)
        if reason is not None:
            raise JobFailed(reason, 400)
        self._usable_backends.add(backend)

    async def stop(self, worker: Worker) -> None:
        worker.closing = True
        worker.scope.cancel()
        await worker.stopped.wait()

    # -- supervision ------------------------------------------------------------------------

    async def _supervise(self, worker: Worker) -> None:
        try:
            with worker.scope:
                while True:
                    try:
                        reason = await self._incarnation(worker)
                    except WorkerStartError as exc:
                        reason = str(exc)
                        if not worker.loaded.is_set():
                            worker.error, worker.state = reason, WorkerState.FAILED
                            return
                    except Exception as exc:  # a bug here must not take the daemon down
                        log.exception("worker %s: supervision failed", worker.id)
                        reason = f"internal error: {type(exc).__name__}"
                    worker.pid = None  # its process is gone: a pid the system may give another (rss read from it)
                    worker.fail_sent(f"worker {worker.id} died ({reason})")
                    if reason is None:  # stopped after keep_alive idle time, or drained
                        log.info("worker %s %s: stopping", worker.id, "drained" if worker.draining else "idle")
                        return
                    if self.config.restart == "no" or worker.restarts >= self.config.max_restarts:
                        worker.error, worker.state = reason, WorkerState.FAILED
                        log.error("worker %s %s; not restarting", worker.id, reason)
                        return
                    worker.restarts += 1
                    worker.restarts_total += 1
                    worker.state = WorkerState.RESTARTING
                    delay = self.config.restart_backoff * 2 ** (worker.restarts - 1)
                    log.warning("worker %s %s; restart %d in %.1f s", worker.id, reason, worker.restarts, delay)
                    await trio.sleep(delay)
        finally:
            worker.pid = None
            if worker.state is not WorkerState.FAILED:
                worker.state = WorkerState.STOPPED
            why = f"worker {worker.id} {worker.state.value}" + (f": {worker.error}" if worker.error else "")
            worker.fail_sent(why)
            if worker.first is not None:
                worker.first.finish(why)
            while worker.queue:
                worker.queue.popleft().finish(why)
            if worker.state is WorkerState.STOPPED or not worker.loaded.is_set():
                self._unlist(worker)  # a worker that never loaded is not listed
            worker.loaded.set()
            worker.stopped.set()
            self._signal()

    async def _incarnation(self, worker: Worker) -> str | None:
        """Run the worker once: launch, load, serve. Returns why it ended (None: idle stop)."""
        async with self.backend.launch(worker) as handle:
            worker.pid = handle.pid
            with trio.move_on_after(self.config.load_timeout) as loading:
                await handle.ready()
            if loading.cancelled_caught:
                raise WorkerStartError(f"model not loaded within {self.config.load_timeout:g} s")
            stream = await open_unix_transport(str(worker.socket_path))
            # A unit's main pid is known only once it is ready.
            worker.pid, worker.error, worker.state = handle.pid, None, WorkerState.READY
            worker.ready_once = True
            worker.loaded.set()
            log.info("worker %s ready (pid %s, %s, %d threads)", worker.id, handle.pid, worker.device, worker.threads)
            ended: str | None = None
            async with stream:

                async def watch_exit() -> None:
                    nonlocal ended
                    ended = await handle.wait()

                async def serve() -> None:
                    nonlocal ended
                    try:
                        await worker.serve(stream)
                    except (WorkerDied, trio.BrokenResourceError) as exc:
                        # A crash also closes the connection: the exit status, if it comes (before,
                        # or within the stop grace), says more.
                        if ended is None:
                            ended = str(exc) if isinstance(exc, WorkerDied) else "lost its connection"
                        if not isinstance(exc, WorkerHung):  # else its stop's own grace is enough
                            await trio.sleep(self.config.stop_grace)
                    else:
                        worker.state = WorkerState.STOPPING
                        ended = None

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(first_of, watch_exit, serve)
            return ended

    # -- operations -------------------------------------------------------------------------

    def lookup(self, worker_id: str) -> Worker:
        worker = self.workers.get(worker_id)
        if worker is None:
            raise JobFailed(f"unknown worker {worker_id!r}")
        return worker

    async def op_spawn(self, job: Job, op: WorkerSpawn) -> None:
        device = "cpu" if op.worker == "cpu" else "metal" if op.worker == "metal" else f"cuda:{op.device}"
        worker = await self.spawn(op.model, device, threads=op.threads, n_ctx=op.n_ctx, job=job)
        job.result(worker.record())

    async def op_list(self, job: Job, op: WorkerList) -> None:
        job.result([w.record() for w in self.workers.values()])

    async def op_get(self, job: Job, op: WorkerGet) -> None:
        job.result(self.lookup(op.id).record())

    async def op_delete(self, job: Job, op: WorkerDelete) -> None:
        worker = self.lookup(op.id)
        job.narrate(f"stopping worker {worker.id} (pid {worker.pid})")
        await self.stop(worker)
        self._unlist(worker)  # a failed one: listed until deleted
        job.result(worker.record())

    def _unlist(self, worker: Worker) -> None:
        # By identity: once a worker is gone its id is free, and a new worker may hold it already
        # (a spawn woken by the same stop, run first).
        if self.workers.get(worker.id) is worker:
            del self.workers[worker.id]
