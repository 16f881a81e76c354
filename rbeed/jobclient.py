"""The client side of the job API: create a job, follow its events (resuming after a drop), cancel it."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable
from typing import Any

import msgspec
import trio

from .httpclient import Client, HTTPError, HTTPTimeout, Response, ServerSentEvent
from .jobs import FINISHED, JobState, end_marker


class Refused(Exception):
    """The daemon answered with an error status; the message is its JSON `error`."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class StreamLost(Exception):
    """A job's event stream broke, or ended before the job did, and resuming it failed too."""

    def __init__(self, job_id: str, problem: Exception | str):
        super().__init__(f"lost the event stream of job {job_id}: {problem}")
        self.problem = problem


def server_message(response: Response) -> str:
    """The `error` of a JSON error body, else the body itself, else the status."""
    body = response.content or b""
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        decoded = None
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        return decoded["error"]
    return body.decode(errors="replace").strip() or f"HTTP {response.status}"


def job_path(job_id: str) -> str:
    return f"/v1/jobs/{urllib.parse.quote(job_id, safe='')}"


def status_end_marker(status: Any) -> str | None:
    """The end event's data that a finished job's status stands for; None while it runs."""
    state = status.get("state") if isinstance(status, dict) else None
    return end_marker(JobState(state), status.get("error")) if state in FINISHED else None


def _after(event_id: str, last_id: str) -> bool:
    """Whether `event_id` comes after `last_id`: a job's events are numbered 1, 2, 3... (all but a
    gap event, which has no id of its own)."""
    return not last_id or (event_id.isdigit() and last_id.isdigit() and int(event_id) > int(last_id))


class JobClient:
    """Jobs on one daemon, through `client`. Plain requests are bounded by `request_timeout`;
    a dropped stream is resumed from the last event id, `reconnects` times in a row, after
    `reconnect_delay` (doubling)."""

    def __init__(self, client: Client, *, request_timeout: float, reconnect_delay: float, reconnects: int = 1):
        self.client = client
        self.request_timeout = request_timeout
        self.reconnect_delay = reconnect_delay
        self.reconnects = reconnects

    async def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float | None = None
    ) -> Response:
        """One request, its answer read whole; an answer too slow is an HTTPTimeout."""
        timeout = self.request_timeout if timeout is None else timeout
        try:
            with trio.fail_after(timeout):
                headers = {"content-type": "application/json"} if body is not None else None
                return await self.client.request(method, path, body=body, headers=headers)
        except trio.TooSlowError:
            raise HTTPTimeout(f"no answer to {method} {path} within {timeout:g} s") from None

    async def answer(self, method: str, path: str) -> Any:
        """The decoded JSON of a 2xx answer; another status raises Refused."""
        response = await self.request(method, path)
        if not 200 <= response.status < 300:
            raise Refused(server_message(response), response.status)
        try:
            return response.json()
        except HTTPError:
            raise HTTPError(f"unexpected answer to {method} {path}: {response.content[:200]!r}") from None

    async def create(self, payload: bytes) -> str:
        """POST the payload; the new job's id."""
        response = await self.request("POST", "/v1/jobs", payload)
        if response.status != 201:
            raise Refused(server_message(response), response.status)
        try:
            job_id = response.json()["job_id"]
        except (HTTPError, KeyError, TypeError):
            job_id = None
        if not isinstance(job_id, str) or not job_id:
            raise HTTPError(f"unexpected answer to POST /v1/jobs: {response.content[:200]!r}")
        return job_id

    async def follow(self, job_id: str, on_event: Callable[[ServerSentEvent], None], after: str = "",
                     resume_within: float = 0) -> str:  # fmt: skip
        """Hand the job's events after event id `after` to `on_event` until its end event; return
        that event's data. A stream that answers other than 200 raises Refused. `resume_within`:
        how long an infer goes on while we reconnect (by default it ends when its reader leaves)."""
        last_id = after
        retries = 0
        path = f"{job_path(job_id)}/stream" + (f"?resume_within={resume_within:g}" if resume_within else "")
        while True:
            headers = {"last-event-id": last_id} if last_id else None
            try:
                async with self.client.stream("GET", path, headers=headers) as response:
                    if response.status != 200:
                        await response.aread()
                        raise Refused(server_message(response), response.status)
                    async for event in response.aiter_sse():
                        if event.event != "gap" and not _after(event.id, last_id):
                            continue  # one we had: from a server that ignored Last-Event-ID
                        retries = 0  # the stream moved on: a later drop gets its own retries
                        last_id = event.id or last_id
                        on_event(event)
                        if event.event == "end":
                            return event.data
                # Without an end event: the end lay at or before `after`, or the stream broke.
                if (end := status_end_marker(await self.answer("GET", job_path(job_id)))) is not None:
                    return end
                problem: Exception | str = "the stream ended before the job did"
            except HTTPError as exc:
                problem = exc
            if retries >= self.reconnects:
                raise StreamLost(job_id, problem)
            await trio.sleep(self.reconnect_delay * 2**retries)
            retries += 1

    async def cancel(self, job_id: str, timeout: float) -> Response:
        """DELETE the job, shielded from the cancellation that may have brought us here."""
        with trio.CancelScope(shield=True):
            return await self.request("DELETE", job_path(job_id), timeout=timeout)
