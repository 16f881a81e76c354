"""The job API's HTTP routes: create, list, inspect, cancel and stream jobs; health."""

from __future__ import annotations

import hmac
import re
from collections.abc import Awaitable, Callable
from functools import partial

import msgspec
import trio

from . import __version__
from .config import ServerConfig
from .jobs import Job, JobRegistry, JobState, RegistryFull
from .operations import PayloadError, decode
from .origins import Origins
from .server import Request, Response, StreamingResponse, error_response, json_response, only

_JOB_PATH = re.compile(r"^/v1/jobs/([^/]+)(/stream)?$")
_STATES = ", ".join(state.value for state in JobState)
_SECONDS = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3})?")
MAX_RESUME_WITHIN = 60  # seconds an infer may go on unread, waiting for its reader to resume


class JobAPI:
    """Turns requests into registry calls; `accepting` goes False while the daemon drains.

    With an `api_key`, a request that did not come over the Unix socket must carry it as a
    bearer token, except /health (hives and load balancers probe it) and `/` (Ollama's clients
    probe it as Ollama answers it: "Ollama is running").
    """

    def __init__(self, registry: JobRegistry, api_key: str | None = None, origins: Origins | None = None):
        self.registry = registry
        self.origins = origins or Origins(ServerConfig())
        self.accepting = True
        self.api_key = api_key
        # Other APIs' routes (OpenAI's): an exact path, or a prefix ending in "/" for one more segment.
        self.routes: dict[str, Callable[[Request], Awaitable[Response | StreamingResponse]]] = {}
        self.uploads: set[str] = set()  # the routes among them that read a POST's body themselves, as it comes
        # Routes (keyed as above, "/v1/" for the rest of it) whose clients read errors in another shape.
        self.error_shapes: dict[str, Callable[[Response], Response]] = {}

    def reads_body(self, request: Request) -> bool:
        """Whether the request's route reads its body itself (an upload: no body limit but its own)."""
        path = request.path
        return request.method == "POST" and (path in self.uploads or path[: path.rfind("/") + 1] in self.uploads)

    def shape_error(self, request: Request, response: Response) -> Response:
        """An error response in the shape the clients of the request's route read, readable by
        the page that sent it if its origin is allowed (the server's own errors come here too)."""
        path = request.path
        shape = None
        if path != "/v1/jobs" and not path.startswith("/v1/jobs/"):
            keys = (path, path[: path.rfind("/") + 1], path[:4])
            shape = next(filter(None, map(self.error_shapes.get, keys)), None)
        return self.origins.stamp(request, shape(response) if shape else response)

    async def __call__(self, request: Request) -> Response | StreamingResponse:
        if refusal := self.origins.refusal(request):  # before the API key: a page is no client
            return self.shape_error(request, refusal)
        response = self.origins.preflight(request) or await self._route(request)
        if isinstance(response, Response):
            return self.shape_error(request, response)
        return self.origins.stamp(request, response)

    async def _route(self, request: Request) -> Response | StreamingResponse:
        path = request.path
        if path == "/health":
            return only(request, "GET") or json_response(200, {"status": "ok", "version": __version__})
        if path == "/":
            return only(request, "GET") or Response(200, b"rbeed is running", "text/plain; charset=utf-8")
        if self.api_key is not None and not request.local and (refusal := _unauthorized(request, self.api_key)):
            return refusal
        if (route := self.routes.get(path) or self.routes.get(path[: path.rfind("/") + 1])) is not None:
            return await route(request)
        if path == "/v1/jobs":
            if request.method == "POST":
                return self._create(request)
            return only(request, "GET", "POST") or self._list(request)
        match = _JOB_PATH.match(path)
        if match is None:
            return error_response(404, f"no such path: {path}")
        job_id, stream = match.groups()
        allowed = ("GET",) if stream else ("GET", "DELETE")
        if refusal := only(request, *allowed):
            return refusal
        job = self.registry.get(job_id)
        if job is None:
            return error_response(404, f"unknown job {job_id!r}")
        if stream:
            return self._stream(job, request)
        if request.method == "DELETE":
            return self._cancel(job)
        return json_response(200, job.status())

    def _create(self, request: Request) -> Response:
        if not self.accepting:
            return error_response(503, "daemon shutting down")
        try:
            operation = decode(request.body)
            job = self.registry.create(operation, len(request.body))
        except PayloadError as exc:
            return error_response(400, str(exc))
        except RegistryFull as exc:
            return error_response(exc.status, str(exc))
        sse_url = f"/v1/jobs/{job.id}/stream"
        return Response(201, msgspec.json.encode({"job_id": job.id, "sse_url": sse_url}),
                        headers=[("location", f"/v1/jobs/{job.id}")])  # fmt: skip

    def _list(self, request: Request) -> Response:
        state = request.query.get("state")
        if state is not None and state not in JobState.__members__.values():
            return error_response(400, f"unknown state {state!r}; valid states: {_STATES}")
        jobs = self.registry.list(JobState(state) if state else None)
        return json_response(200, [job.status() for job in jobs])

    def _cancel(self, job: Job) -> Response:
        if not self.registry.cancel(job):
            return error_response(409, f"job {job.id} already {job.state.value}")
        return json_response(200, job.status())

    def _stream(self, job: Job, request: Request) -> Response | StreamingResponse:
        header = request.headers.get("last-event-id", "0").strip() or "0"
        if not (header.isascii() and header.isdigit() and len(header) <= 18):
            return error_response(400, f"Last-Event-ID must be an event id, got {header[:40]!r}")
        first_after = int(header)
        resume_within = request.query.get("resume_within", "0")
        if not (_SECONDS.fullmatch(resume_within) and float(resume_within) <= MAX_RESUME_WITHIN):
            return error_response(400, f"resume_within must be a number of seconds from 0 to {MAX_RESUME_WITHIN}, "
                                       f"got {resume_within[:40]!r}")  # fmt: skip
        if request.method == "GET":  # not HEAD: only a real stream starts the job
            self.registry.start(job)

        async def produce(send) -> None:
            after = first_after
            with job.reading():
                while True:
                    backlog, gap, feed = job.subscribe(after)
                    pieces = [event for _, event in backlog]
                    if gap is not None:
                        # Events fell out of the replay buffer: say which, then go on.
                        data = msgspec.json.encode({"missed_from": gap[0], "missed_to": gap[1]})
                        pieces.insert(0, b"event: gap\ndata: %s\n\n" % data)
                    if pieces:
                        after = backlog[-1][0] if backlog else after
                        await send(b"".join(pieces), last=feed is None)
                    if feed is None:
                        return
                    if not pieces:  # the head waits for the first event, for a short while only
                        self.registry.nudge_later(job)
                    with feed:
                        after = await self._follow(job, feed, send, after)
                    if after is None:
                        return

        on_disconnect = None
        if job.cancel_on_disconnect:
            on_disconnect = partial(self.registry.reader_left, job, float(resume_within))
        return StreamingResponse(200, produce, on_disconnect=on_disconnect)

    async def _follow(self, job: Job, feed: trio.MemoryReceiveChannel, send, after: int) -> int | None:
        """Relay live events until the job's end event is sent (then None) or the feed closes.

        Events that queued up while the client was slow go out in one write. A feed closes early
        when its reader lagged: the id of the last event sent is returned, from which the caller
        re-reads the replay buffer. No timer here: the registry sends keep-alives into the feed
        of a quiet job.
        """
        while True:
            try:
                event_id, data = await feed.receive()
            except trio.EndOfChannel:
                return after
            after, batch = event_id or after, [data]
            while not (ended := after == job.end_id):
                try:
                    event_id, data = feed.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                after = event_id or after
                batch.append(data)
            await send(b"".join(batch), last=ended)
            if ended:
                return None


def _unauthorized(request: Request, api_key: str) -> Response | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return None
    problem = "wrong API key" if scheme else "an API key is required over TCP"
    return error_response(401, f"{problem}: send it as 'Authorization: Bearer KEY'",
                          [("www-authenticate", 'Bearer realm="rbeed"')])  # fmt: skip
