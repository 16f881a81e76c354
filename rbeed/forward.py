"""Operations for a remote hive: run there as a job of that hive's daemon, its events relayed here."""

from __future__ import annotations

import logging

import msgspec
import trio

from . import operations as ops
from .hives import LOCAL, Hive
from .httpclient import Client, HTTPError, ServerSentEvent
from .jobclient import JobClient, Refused, StreamLost
from .jobs import Job, JobFailed

log = logging.getLogger("rbeed.forward")

CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 30.0  # creating the job, reading its status
# A hive's streams carry a keep-alive comment every 15 s by default: a minute of silence
# means the connection is dead (a peer gone without a FIN), so it is resumed.
STREAM_READ_TIMEOUT = 60.0
RECONNECTS = 5  # a broken stream is resumed from its last event id this many times in a row,
RECONNECT_DELAY = 0.5  # after this pause, doubling: ~15 s in all
CANCEL_TIMEOUT = 5.0
# An infer there goes on this long without us (it ends when its last reader leaves): the time
# the reconnects above take, if the hive answers them.
RESUME_WITHIN = 20.0

RELAYED = frozenset({"narration", "progress", "token", "result", "gap"})


def remote_payload(operation: ops.AnyOperation) -> bytes:
    """The operation as the hive takes it: its own (localhost), with only the fields given."""
    return msgspec.json.encode(msgspec.structs.replace(operation, hive_id=LOCAL))


async def forward(job: Job, operation: ops.AnyOperation, hive: Hive) -> None:
    """Create the operation as a job on `hive`, where it is that daemon's own (hive_id
    localhost); relay its events to `job` and end as it ends. Cancelling `job` cancels it there."""
    payload = remote_payload(operation)
    async with Client(hive.url, connect_timeout=CONNECT_TIMEOUT, read_timeout=STREAM_READ_TIMEOUT,
                      headers=hive.headers) as client:
        jobs = JobClient(client, request_timeout=REQUEST_TIMEOUT, reconnect_delay=RECONNECT_DELAY,
                         reconnects=RECONNECTS)  # fmt: skip
        try:
            remote_id = await _create(jobs, hive, payload)
        except Refused as exc:
            raise JobFailed(f"hive {hive.id} refused the job: {exc}") from None
        except HTTPError as exc:
            raise JobFailed(f"hive {hive.id}: {exc}") from None
        job.narrate(f"forwarded to hive {hive.id} ({hive.address}) as {remote_id}",
                    hive_id=hive.id, remote_job_id=remote_id)  # fmt: skip
        ended = False
        try:
            resume_within = RESUME_WITHIN if operation.cancel_on_disconnect else 0
            end = await jobs.follow(remote_id, lambda event: _relay(job, event), resume_within=resume_within)
            ended = True
        except Refused as exc:  # the hive forgot the job: restarted, or its TTL ran out
            raise JobFailed(f"hive {hive.id}: job {remote_id}: {exc}") from None
        except (StreamLost, HTTPError) as exc:
            raise JobFailed(f"hive {hive.id}: {exc}") from None
        finally:
            if not ended:  # cancelled here, or cut off from it: it must not run on unwatched
                await _cancel(jobs, hive, remote_id)
    if end == "[DONE]":
        return
    if end == "[CANCELLED]":
        raise JobFailed(f"hive {hive.id}: job {remote_id} was cancelled there")
    raise JobFailed(f"hive {hive.id}: {end.removeprefix('[ERROR]').strip() or f'job {remote_id} failed'}")


async def _create(jobs: JobClient, hive: Hive, payload: bytes) -> str:
    """The id of the job `payload` makes on the hive. Cancelled while its POST is in flight, it
    awaits the answer CANCEL_TIMEOUT more and cancels the job made there, which would otherwise
    wait unstreamed for its TTL."""
    answer: list[str | Exception] = []
    answered = trio.Event()
    request = trio.CancelScope(shield=True)

    async def create() -> None:
        with request:
            try:
                answer.append(await jobs.create(payload))
            except Exception as exc:  # raised below, in the caller's task
                answer.append(exc)
        answered.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(create)
        try:
            await answered.wait()
        except trio.Cancelled:
            with trio.CancelScope(shield=True):
                request.deadline = trio.current_time() + CANCEL_TIMEOUT
                await answered.wait()
                if answer and isinstance(remote_id := answer[0], str):
                    await _cancel(jobs, hive, remote_id)
    await trio.lowlevel.checkpoint()  # raises Cancelled again if that was caught
    if isinstance(outcome := answer[0], Exception):
        raise outcome
    return outcome


def _relay(job: Job, event: ServerSentEvent) -> None:
    if event.event not in RELAYED:  # `end` is follow()'s answer; a newer hive's events are skipped
        return
    try:
        data = msgspec.json.decode(event.data)
    except msgspec.DecodeError:
        log.warning("job %s: skipped a %s event that is not JSON: %.80r", job.id, event.event, event.data)
        return
    job.emit(event.event, data)  # re-encoded: one line, whatever the hive sent


async def _cancel(jobs: JobClient, hive: Hive, remote_id: str) -> None:
    try:
        response = await jobs.cancel(remote_id, CANCEL_TIMEOUT)
    except HTTPError as exc:
        log.warning("could not cancel job %s on hive %s: %s", remote_id, hive.id, exc)
        return
    if response.status not in (200, 404, 409):  # cancelled, forgotten, already ended
        log.warning("could not cancel job %s on hive %s: HTTP %d", remote_id, hive.id, response.status)
