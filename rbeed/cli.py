"""`rbee`: the command-line client of the job API (submit a job, follow its events, render them)."""

from __future__ import annotations

import argparse
import contextlib
import grp
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import msgspec
import trio

from . import __version__
from .config import default_runtime_dir, not_private, shared_tmp_dir
from .httpclient import Client, ConnectError, HTTPError, HTTPTimeout, ServerSentEvent
from .jobclient import JobClient, Refused, StreamLost, job_path, server_message
from .operations import DEFAULTS, HiveCreate, Infer, Settings, WorkerSpawn

EXIT_OK = 0
EXIT_FAILED = 1  # the job ended with [ERROR], or the daemon answered something unusable
EXIT_USAGE = 2  # bad arguments, or the daemon refused the payload (400)
EXIT_UNREACHABLE = 3
EXIT_CANCELLED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_HANGUP = 129  # 128 + SIGHUP: the terminal closed while rbee followed its job
EXIT_TERMINATED = 143  # 128 + SIGTERM
_SIGNAL_EXITS = {signal.SIGINT: EXIT_CANCELLED, signal.SIGHUP: EXIT_HANGUP, signal.SIGTERM: EXIT_TERMINATED}

CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 30.0  # a plain request (create, status, cancel) must be answered within this
CANCEL_TIMEOUT = 3.0  # Ctrl-C: how long the DELETE of the job may take before rbee gives up on it
RECONNECT_DELAY = 0.25  # a dropped event stream is resumed once, after this pause
TTY_REDRAW_INTERVAL = 0.1  # progress bar: at most ~10 redraws per second
PLAIN_PROGRESS_INTERVAL = 5.0  # progress without a terminal: one line per this many seconds

MIB = 1024 * 1024


class CliError(Exception):
    """Ends rbee with `rbee: error: <message>` and the given exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


def _first_leaf(group: BaseExceptionGroup) -> BaseException:
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


# -- rendering (pure functions, unit-tested) --------------------------------------------------


def human_bytes(value: Any) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return format_value(value)
    if abs(value) < 1024:
        return f"{value} B"
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if abs(value) < 1024:
            return f"{value:.1f} {unit}"
    return f"{value / 1024:.1f} TiB"


def human_count(value: Any) -> str:
    """268098176 -> '268M', 7241732096 -> '7.2B'."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return format_value(value)
    for divisor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= divisor:
            scaled = value / divisor
            return f"{scaled:.1f}{suffix}" if scaled < 10 else f"{scaled:.0f}{suffix}"
    return str(value)


# Control characters in what rbee shows (a model's name, a hive's message) are shown escaped: raw,
# they could retitle, clear or rewrite the terminal, or break a line of fields in two.
_CONTROLS = {code: f"\\x{code:02x}" for code in (*range(32), *range(127, 160))}
_CONTROLS_BUT_LINES = {code: escape for code, escape in _CONTROLS.items() if chr(code) not in "\n\t"}


def shown(text: str, lines: bool = False) -> str:
    """`text` with its control characters escaped (with `lines`, all but newline and tab)."""
    return text.translate(_CONTROLS_BUT_LINES if lines else _CONTROLS)


def format_value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict | list):
        return msgspec.json.encode(value).decode()
    return shown(str(value))


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


# Values under these keys are rendered with a unit wherever they appear.
_FORMATTERS: dict[str, Callable[[Any], str]] = {
    "size": human_bytes, "rss": human_bytes, "params": human_count, "parameters": human_count,
}  # fmt: skip


def format_field(key: str, value: Any) -> str:
    """A value as shown under `key`: sizes and counts with units, `*_at` times as local times.

    Times come as epoch seconds (worker records) or ISO 8601 in UTC (job records).
    """
    if key in _FORMATTERS:
        return _FORMATTERS[key](value)
    if key.endswith("_at") and (epoch := _epoch(value)) is not None:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
    return format_value(value)


def _epoch(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        return moment.timestamp() if moment.tzinfo is not None else None
    return None


@dataclass(frozen=True)
class Column:
    header: str
    keys: tuple[str, ...]  # the first one present in a row is shown; "a.b" looks into row["a"]

    def cell(self, row: dict) -> str:
        for key in self.keys:
            value: Any = row
            for part in key.split("."):
                if not isinstance(value, dict) or part not in value:
                    break
                value = value[part]
            else:
                return format_field(part, value)
        return "-"


TABLES: dict[str, list[Column]] = {
    "hive_list": [
        Column("ID", ("id",)),
        Column("HOST", ("host",)),
        Column("PORT", ("port",)),
        Column("ONLINE", ("online",)),
        Column("VERSION", ("version",)),
    ],
    "worker_list": [
        Column("ID", ("id",)),
        Column("MODEL", ("model",)),
        Column("DEVICE", ("device",)),
        Column("STATE", ("state",)),
        Column("PID", ("pid",)),
        Column("THREADS", ("threads",)),
        Column("CTX", ("n_ctx",)),
        Column("MEMORY", ("rss",)),
        Column("UNTIL", ("stops_at",)),
    ],
    "job_list": [
        Column("ID", ("job_id",)),
        Column("OPERATION", ("operation",)),
        Column("STATE", ("state",)),
        Column("CREATED", ("created_at",)),
        Column("ERROR", ("error",)),
    ],
    "model_list": [
        Column("ID", ("id",)),
        Column("SIZE", ("size",)),
        Column("QUANT", ("metadata.quantization", "metadata.file_type")),
        Column("ARCH", ("metadata.architecture",)),
        Column("PARAMS", ("metadata.parameters",)),
    ],
}


def columns_for(operation: str | None, rows: list[dict]) -> list[Column]:
    """The table layout of an operation's list; for others, every key in first-seen order."""
    if operation in TABLES:
        return TABLES[operation]
    return [Column(key.upper(), (key,)) for key in dict.fromkeys(key for row in rows for key in row)]


def render_table(rows: list[dict], columns: list[Column]) -> str:
    """Left-aligned columns separated by two spaces, header first; no trailing blanks."""
    cells = [[column.header for column in columns]]
    cells += [[column.cell(row) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in cells)


def render_fields(record: dict, indent: str = "") -> str:
    """`key: value` lines, values aligned; a nested object becomes an indented block."""
    width = max((len(str(key)) for key in record), default=0) + 1
    lines = []
    for key, value in record.items():
        if isinstance(value, dict) and value:
            lines.append(f"{indent}{key}:")
            lines.append(render_fields(value, indent + "  "))
        else:
            lines.append(f"{indent}{f'{key}:':<{width}} {format_field(str(key), value)}")
    return "\n".join(lines)


def render_result(operation: str | None, result: Any) -> str:
    if isinstance(result, list) and all(isinstance(row, dict) for row in result):
        return render_table(result, columns_for(operation, result))
    if isinstance(result, dict):
        return render_fields(result) if result else "{}"
    return format_value(result)


def progress_text(fields: dict, width: int | None = None) -> str:
    """One progress report as text: percentage, MiB done/total, rate and ETA, as far as known.

    With `width`, a bar fills what the line leaves of that many columns. Fields other than
    done/total/rate (the daemon may add some) are shown first, as a label.
    """
    done, total, rate = fields.get("done"), fields.get("total"), fields.get("rate")
    label = " ".join(format_value(v) for k, v in fields.items() if k not in ("done", "total", "rate"))
    known_total = isinstance(total, int | float) and total > 0 and isinstance(done, int | float)
    parts = []
    if isinstance(done, int | float):
        parts.append(f"{done / MIB:.1f}/{total / MIB:.1f} MiB" if known_total else f"{done / MIB:.1f} MiB")
    if isinstance(rate, int | float):
        parts.append(f"{rate / MIB:.1f} MiB/s")
    if known_total:
        remaining = max(total - done, 0)
        if remaining == 0:
            parts.append("done")
        elif isinstance(rate, int | float) and rate > 0:
            parts.append(f"ETA {format_duration(math.ceil(remaining / rate))}")
        else:
            parts.append("ETA --:--")
    head = f"{label} " if label else ""
    tail = "  ".join(parts)
    if not known_total:
        return (head + tail).rstrip()
    fraction = min(max(done / total, 0.0), 1.0)
    percent = f"{int(fraction * 100):3d}%"
    if width is None:
        return f"{head}{percent}  {tail}"
    # The bar keeps its length whatever the numbers after it: room for their widest is kept.
    widest = len(f"{total / MIB:.1f}/{total / MIB:.1f} MiB  9999.9 MiB/s  ETA --:--")
    room = width - len(head) - len(percent) - max(widest, len(tail)) - 5  # " [" and "]  " around the bar
    if room < 10:
        return f"{head}{percent}  {tail}"[:width]
    filled = int(fraction * room)
    return f"{head}{percent} [{'#' * filled}{'.' * (room - filled)}]  {tail}"


class ProgressDisplay:
    """Progress reports on stderr: a bar redrawn in place on a terminal, sparse lines otherwise."""

    def __init__(self, stream: TextIO, *, tty: bool, width: int = 80, clock: Callable[[], float] = time.monotonic):
        self._stream = stream
        self._tty = tty
        self._width = width
        self._clock = clock
        self._interval = TTY_REDRAW_INTERVAL if tty else PLAIN_PROGRESS_INTERVAL
        self._shown_at: float | None = None
        self._pending: dict | None = None  # the latest report, when not yet shown
        self._drawn = False  # a bar line is on screen, without its newline

    def update(self, fields: dict) -> None:
        now = self._clock()
        complete = fields.get("total") is not None and fields.get("done") == fields.get("total")
        if self._shown_at is not None and now - self._shown_at < self._interval and not complete:
            self._pending = fields
            return
        self._show(fields, now)

    def _show(self, fields: dict, now: float) -> None:
        self._pending = None
        self._shown_at = now
        if self._tty:
            self._stream.write("\r\x1b[K" + progress_text(fields, self._width - 1))
            self._drawn = True
        else:
            self._stream.write(f"· {progress_text(fields)}\n")
        self._stream.flush()

    def clear(self) -> None:
        """Take the bar off the line so that other text can be written there."""
        if self._drawn:
            self._stream.write("\r\x1b[K")
            self._drawn = False
            self._shown_at = None  # redraw on the next report

    def finish(self) -> None:
        """Show the last report if it was held back, and end the bar's line."""
        if self._pending is not None:
            self._show(self._pending, self._clock())
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()
            self._drawn = False
        self._shown_at = None


# -- the terminal and the views of a job's events ---------------------------------------------


class Console:
    """stdout for results and tokens; stderr for narration, progress and errors."""

    def __init__(self, stdout: TextIO, stderr: TextIO, *, color: bool, tty: bool, width: int,
                 stdout_tty: bool = False):  # fmt: skip
        self.stdout = stdout
        self.stderr = stderr
        self.stdout_tty = stdout_tty  # generated text is shown with its control characters escaped
        marker = "·" if "·".encode(stderr.encoding or "utf-8", errors="ignore") else "-"  # LANG=C: -
        self._prefix = f"\x1b[2m{marker}\x1b[0m " if color else f"{marker} "
        self.progress = ProgressDisplay(stderr, tty=tty, width=width)

    @classmethod
    def for_process(cls) -> Console:
        # A dumb terminal cannot erase a line: it gets the progress lines a pipe gets.
        tty = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        color = tty and "NO_COLOR" not in os.environ
        width = 0
        if tty:
            try:
                width = os.get_terminal_size(sys.stderr.fileno()).columns
            except OSError:
                pass
        width = width or 80  # a terminal that does not know its size says 0
        # Output in a locale that cannot encode it (LANG=C, PYTHONIOENCODING=ascii) is escaped, not
        # a crash; a closed standard output (>&-) is none at all.
        stdout = sys.stdout or open(os.devnull, "w")  # noqa: SIM115  for the process's life
        stdout.reconfigure(errors="backslashreplace")  # type: ignore[attr-defined]
        return cls(stdout, sys.stderr, color=color, tty=tty, width=width, stdout_tty=stdout.isatty())

    def note(self, message: str) -> None:
        self.progress.clear()
        self.stderr.write(f"{self._prefix}{shown(message, lines=True)}\n")
        self.stderr.flush()

    def error(self, message: str) -> None:
        self.progress.clear()
        self.stderr.write(f"rbee: {shown(message, lines=True)}\n")
        self.stderr.flush()

    def out(self, text: str) -> None:
        try:
            self.stdout.write(text)
            self.stdout.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:  # a full disk, a device that refuses
            raise CliError(f"cannot write to standard output: {os.strerror(exc.errno or 0).lower()}") from None


def read_stdin() -> str:
    """All of standard input, as text: bytes that are not UTF-8 are a usage error, not a crash."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise CliError(f"standard input is not UTF-8 text (at byte {exc.start})", EXIT_USAGE) from None


def decode_data(data: str) -> Any:
    try:
        return msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data


class View:
    """Receives a job's events one by one; `result` holds the operation's answer once seen, and
    `text` what an infer generated."""

    result: Any = None

    def __init__(self) -> None:
        self._pieces: list[str] = []

    def event(self, event: ServerSentEvent) -> None:
        if event.event == "token":
            data = decode_data(event.data)
            piece = data.get("t") if isinstance(data, dict) else None
            if not isinstance(piece, str):
                raise TypeError("a token event without its text")
            self._pieces.append(piece)
        elif event.event == "result":
            self.result = decode_data(event.data)

    def interrupted(self) -> None:
        """Ctrl-C stopped the following before the end event."""

    @property
    def text(self) -> str:
        whole = self.result.get("text") if isinstance(self.result, dict) else None
        return whole if isinstance(whole, str) else "".join(self._pieces)


def _show_event(view: View, event: ServerSentEvent) -> None:
    """Hand `event` to `view`; an event shaped other than the job API's ends rbee (exit 1)."""
    try:
        view.event(event)
    except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as exc:
        data = event.data[:120] + ("..." if len(event.data) > 120 else "")
        raise CliError(f"the daemon sent an event rbee cannot use ({event.event}: {data}): {exc}") from None


class JsonView(View):
    """Each event as one JSON line on stdout: {"id", "event", "data"} (data decoded when JSON)."""

    def __init__(self, console: Console):
        super().__init__()
        self.console = console

    def event(self, event: ServerSentEvent) -> None:
        super().event(event)
        event_id: int | str = int(event.id) if event.id.isdigit() else event.id
        line = {"id": event_id or None, "event": event.event, "data": decode_data(event.data)}
        self.console.out(msgspec.json.encode(line).decode() + "\n")


class HumanView(View):
    """Narration and progress on stderr; tokens and the rendered result on stdout."""

    def __init__(self, console: Console, operation: str | None, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.console = console
        self.operation = operation
        self._clock = clock
        self._started = clock()
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None

    def event(self, event: ServerSentEvent) -> None:
        super().event(event)
        if event.event == "token":  # its text is the piece View.event kept
            self._token()
            return
        data = decode_data(event.data)
        match event.event:
            case "narration":
                self.console.note(str(data.get("message", "")) if isinstance(data, dict) else str(data))
            case "progress":
                self.console.progress.update(data if isinstance(data, dict) else {"status": data})
            case "result":
                self.console.progress.finish()
                if self.operation == "embed" and isinstance(data, dict):
                    self._embeddings(data)
                elif self.operation == "tokenize" and isinstance(data, dict):
                    self._tokens(data)
                elif self.operation == "detokenize" and isinstance(data, dict):
                    self.console.out(str(data.get("text", "")) + "\n")
                elif self.operation != "infer":
                    self.console.out(render_result(self.operation, data) + "\n")
            case "gap":
                missed = f" (ids {data['missed_from']}-{data['missed_to']})" if isinstance(data, dict) else ""
                self.console.note(f"some events were lost to the daemon's replay buffer{missed}")
            case "end":
                self.console.progress.finish()
                if self.operation == "infer":
                    self._finish_infer(ok=event.data == "[DONE]")
            case _:
                self.console.note(f"{event.event}: {format_value(data)}")

    def _embeddings(self, answer: dict) -> None:
        """Each vector as a line of JSON on stdout, in the order of the inputs; a summary on stderr."""
        vectors = answer.get("embeddings") or []
        for vector in vectors:
            self.console.out(msgspec.json.encode(vector).decode() + "\n")
        size = f" of {len(vectors[0])} dimensions" if vectors else ""
        self.console.note(f"{len(vectors)} vector(s){size}, {answer.get('prompt_tokens', 0)} tokens")

    def _tokens(self, answer: dict) -> None:
        """The ids on one line, or a line per token with its text; their count on stderr."""
        tokens, pieces = answer.get("tokens") or [], answer.get("pieces")
        if pieces is None:
            self.console.out(" ".join(map(str, tokens)) + "\n")
        else:
            for token, piece in zip(tokens, pieces):
                self.console.out(f"{token}\t{msgspec.json.encode(piece).decode()}\n")
        self.console.note(f"{len(tokens)} token(s)")

    def interrupted(self) -> None:
        if self._pieces:  # end the line of text, so that what follows starts on its own
            self.console.out("\n")

    def _token(self) -> None:
        now = self._clock()
        if self._first_token_at is None:
            self._first_token_at = now
        self._last_token_at = now
        piece = self._pieces[-1]
        self.console.out(shown(piece, lines=True) if self.console.stdout_tty else piece)

    def _finish_infer(self, ok: bool) -> None:
        answer = self.result if isinstance(self.result, dict) else {}
        text = answer.get("text") if not self._pieces else None
        if isinstance(text, str):
            self.console.out(text)
        if self._pieces or isinstance(text, str):
            self.console.out("\n")
        if ok:
            self.console.note(self.infer_stats(answer))

    def infer_stats(self, answer: dict) -> str:
        """One line: tokens, time to first token, tokens/s; the daemon's figures where it gave them."""
        streamed = len(self._pieces)
        tokens = answer.get("completion_tokens", streamed)
        ttft_ms = answer.get("ttft_ms")
        if ttft_ms is None and self._first_token_at is not None:
            ttft_ms = (self._first_token_at - self._started) * 1000
        rate = answer.get("tokens_per_s")
        if rate is None and streamed > 1 and self._last_token_at > self._first_token_at:
            rate = (streamed - 1) / (self._last_token_at - self._first_token_at)
        parts = [f"{tokens} tokens"]
        if ttft_ms is not None:
            cached = answer.get("cached_tokens")
            reused = f" ({cached} of {answer.get('prompt_tokens')} prompt tokens cached)" if cached else ""
            parts.append(f"ttft {ttft_ms:.0f} ms{reused}")
        if rate is not None:
            parts.append(f"{rate:.1f} tok/s")
        if reason := answer.get("finish_reason"):
            parts.append(f"finish: {reason}")
        return ", ".join(parts)


# -- talking to the daemon --------------------------------------------------------------------


class Session:
    """One daemon address: creates jobs, follows their streams, cancels them."""

    def __init__(self, address: str):
        self.address = address
        try:
            # Streams stay open as long as their job runs: plain requests are bounded by REQUEST_TIMEOUT.
            key = os.environ.get("RBEE_API_KEY", "").strip()
            headers = {"authorization": f"Bearer {key}"} if key and not address.startswith("unix:") else {}
            self.client = Client(address, connect_timeout=CONNECT_TIMEOUT, read_timeout=None, headers=headers)
        except HTTPError as exc:
            raise CliError(f"--url/RBEE_URL: {exc}", EXIT_USAGE) from None
        self.jobs = JobClient(self.client, request_timeout=REQUEST_TIMEOUT, reconnect_delay=RECONNECT_DELAY)

    def unreachable(self, problem: Exception | str) -> CliError:
        reason = str(problem).removeprefix(f"cannot connect to {self.address}: ")
        if reason == "permission denied" and self.address.startswith("unix:"):
            hint = _members_only(self.address.removeprefix("unix:"))
        else:
            hint = "start it with `systemctl start rbeed.socket` (the service starts at the first connection), or run `rbeed serve`"
        return CliError(f"cannot reach the rbeed daemon at {self.address}: {reason}\n  hint: {hint}", EXIT_UNREACHABLE)

    @contextlib.contextmanager
    def _errors(self, refused: str = "", usage_on_400: bool = False) -> Iterator[None]:
        """Turn the job client's exceptions into rbee's messages and exit statuses."""
        try:
            yield
        except (ConnectError, HTTPTimeout) as exc:
            raise self.unreachable(exc) from None
        except HTTPError as exc:
            raise CliError(str(exc)) from None
        except Refused as exc:
            if usage_on_400 and exc.status == 400:  # the payload is wrong, not the daemon
                raise CliError(str(exc), EXIT_USAGE) from None
            if exc.status == 401:
                raise CliError(f"{exc} (rbee sends $RBEE_API_KEY)", EXIT_USAGE) from None
            raise CliError(f"{refused}{exc}") from None

    async def answer(self, method: str, path: str) -> Any:
        """The decoded JSON of a plain request's 2xx answer; any other answer ends rbee with its error."""
        with self._errors():
            return await self.jobs.answer(method, path)

    async def create(self, payload: bytes) -> str:
        with self._errors("the daemon refused the job: ", usage_on_400=True):
            return await self.jobs.create(payload)

    async def follow(self, job_id: str, view: View, after: str = "") -> str:
        """Hand the job's events after event id `after` to `view` until its end event; return that
        event's data. A stream that drops before the end is resumed from the last event id seen."""
        try:
            with self._errors(f"cannot follow job {job_id}: "):
                return await self.jobs.follow(job_id, partial(_show_event, view), after)
        except StreamLost as exc:
            if isinstance(exc.problem, ConnectError | HTTPTimeout):
                raise self.unreachable(exc.problem) from None
            hint = f"`rbee job follow {job_id}` picks it up again while the daemon keeps it"
            raise CliError(f"{exc}\n  hint: {hint}") from None

    async def cancel(self, job_id: str, console: Console) -> None:
        """DELETE the job, shielded from the cancellation that got us here and bounded in time."""
        try:
            with self._errors():
                response = await self.jobs.cancel(job_id, CANCEL_TIMEOUT)
        except CliError as exc:
            console.error(f"could not cancel job {job_id}: {exc}")
            return
        if response.status == 200:
            console.error(f"cancelled job {job_id}")
        elif response.status == 409:  # it ended first: an infer ends as soon as its stream is closed
            console.error(server_message(response))
        else:
            console.error(f"could not cancel job {job_id}: {server_message(response)}")

    async def run(self, payload: bytes, view: View, console: Console) -> int:
        """Create a job, follow it to its end (Ctrl-C cancels it) and return rbee's exit status."""
        job_id = await self.create(payload)
        return await self.attach(job_id, view, console, lambda: self.cancel(job_id, console))

    async def attach(self, job_id: str, view: View, console: Console,
                     on_interrupt: Callable[[], Awaitable[None]], after: str = "") -> int:  # fmt: skip
        """Follow a job to its end and return rbee's exit status; Ctrl-C stops following and
        runs `on_interrupt`, as do SIGTERM and SIGHUP (a closed terminal)."""
        received: list[int] = []
        with trio.open_signal_receiver(*_SIGNAL_EXITS) as interrupts:
            with trio.CancelScope() as following:
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_cancel_on_signal, interrupts, following, received)
                        end = await self.follow(job_id, view, after)
                        nursery.cancel_scope.cancel()
                except* CliError as group:  # the nursery is a detail: raise the error itself
                    raise _first_leaf(group) from None
            if following.cancelled_caught:
                view.interrupted()
                await on_interrupt()
                return _SIGNAL_EXITS[received[0]]
        if end == "[DONE]":
            return EXIT_OK
        if end == "[CANCELLED]":
            console.error(f"job {job_id} was cancelled")
            return EXIT_CANCELLED
        raise CliError(end.removeprefix("[ERROR]").strip() or f"job {job_id} failed")


def _members_only(socket_path: str) -> str:
    """What to do about a daemon's socket that refused us: join its group (rbeed.socket's, and that
    of its directory, is rbee)."""
    for path in (socket_path, os.path.dirname(socket_path)):
        with contextlib.suppress(OSError, KeyError):
            group = grp.getgrgid(os.stat(path).st_gid).gr_name
            join = f"`sudo usermod -aG {group} $USER`, then log in again"
            return f"the socket is for group {group}: join it ({join}), or use sudo"
    return "the daemon's socket is not open to you: ask its administrator, or use sudo"


async def _cancel_on_signal(interrupts, scope: trio.CancelScope, received: list[int]) -> None:
    async for signum in interrupts:
        received.append(signum)
        scope.cancel()
        return


# -- commands ---------------------------------------------------------------------------------


SYSTEM_SOCKET = Path("/run/rbeed/rbeed.sock")


def daemon_address(args: argparse.Namespace) -> str:
    """--url, --socket, $RBEE_URL, then the daemon's default socket."""
    if args.url:
        return args.url
    if args.socket:
        return f"unix:{os.path.abspath(args.socket)}"
    if url := os.environ.get("RBEE_URL"):
        return url
    runtime = default_runtime_dir()
    own = runtime / "rbeed.sock"
    # A daemon of one's own first, else the system service's socket (rbeed.socket). A socket file
    # outlives a killed daemon: a connection shows whether one listens. In /tmp, a socket is one's
    # own only in a directory no one else can write: another user's would get every prompt.
    if runtime == shared_tmp_dir() and not_private(runtime):
        return f"unix:{SYSTEM_SOCKET}"
    return f"unix:{own if _listening(own) or not SYSTEM_SOCKET.exists() else SYSTEM_SOCKET}"


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def build_payload(args: argparse.Namespace) -> dict:
    """The operation of a subcommand, with the options the user gave (the daemon fills defaults)."""
    fields = {name: value for name in args.fields if (value := getattr(args, name)) is not None}
    return {"operation": args.operation, **fields}


async def settle_model(session: Session, console: Console, payload: dict, template: bool = True) -> bool:
    """Complete an infer's payload: its model (--model, else $RBEE_MODEL, else the daemon's only
    model) and, unless --chat, --raw or --system said (or `template` is false: an embed), whether
    PROMPT goes through the model's chat template: it does when the model has one, as in
    `ollama run` and llama-cli.

    False when a lookup was interrupted (run() has cancelled it and said so).
    """
    if payload.get("system"):
        if payload.get("chat") is False:
            raise CliError("--system goes through the chat template: it cannot go with --raw", EXIT_USAGE)
        payload["chat"] = True
    model = payload.get("model") or os.environ.get("RBEE_MODEL")
    if model and (payload.get("chat") is not None or not template):
        payload["model"] = model
        return True
    hive = {"hive_id": payload["hive_id"]} if "hive_id" in payload else {}
    lookup = {"operation": "model_get", "id": model} if model else {"operation": "model_list"}
    found = View()
    try:
        status = await session.run(msgspec.json.encode(lookup | hive), found, console)
    except CliError as exc:
        if exc.code != EXIT_FAILED or model:
            raise
        raise CliError(f"no --model given and RBEE_MODEL is not set; listing the models failed: {exc}") from None
    if status != EXIT_OK:
        return False
    if model:
        record = found.result
    else:
        models = [entry for entry in found.result if isinstance(entry, dict)] if isinstance(found.result, list) else []
        if len(models) != 1:
            ids = [str(entry.get("id")) for entry in models]
            listed = f"the daemon has {len(ids)} models" + (f" ({', '.join(ids)})" if ids else "")
            raise CliError(f"no --model given and RBEE_MODEL is not set; {listed}: pick one with --model", EXIT_USAGE)
        record = models[0]
    payload["model"] = model or str(record.get("id"))
    if template and payload.get("chat") is None:
        payload["chat"] = bool(isinstance(record, dict) and (record.get("metadata") or {}).get("chat_template"))
    return True


async def run_command(args: argparse.Namespace, console: Console) -> int:
    session = Session(daemon_address(args))
    async with session.client:
        if handler := getattr(args, "handler", None):
            return await handler(session, args, console)
        if args.operation == "submit":
            raw = read_stdin() if args.payload == "-" else args.payload
            decoded = decode_data(raw)
            operation = decoded.get("operation") if isinstance(decoded, dict) else None
            body = raw.encode()
        else:
            payload = build_payload(args)
            if args.operation == "infer":
                if payload.get("prompt", "-") == "-":  # `rbee infer < notes.txt`
                    payload["prompt"] = read_stdin()
                if not await settle_model(session, console, payload):
                    return EXIT_CANCELLED
                payload = infer_payload(payload)
            elif args.operation in ("model_copy", "model_download"):
                payload = defaults_payload(payload)
            elif args.operation in ("embed", "tokenize", "detokenize"):
                if args.operation == "embed":
                    payload["input"] = embed_inputs(payload.get("input") or [])
                elif args.operation == "tokenize" and payload.get("text", "-") == "-":
                    payload["text"] = read_stdin()
                if not await settle_model(session, console, payload, template=False):
                    return EXIT_CANCELLED
            operation = args.operation
            body = msgspec.json.encode(payload)
        return await session.run(body, make_view(args, console, operation), console)


def make_view(args: argparse.Namespace, console: Console, operation: str | None) -> View:
    return JsonView(console) if args.json else HumanView(console, operation)


def infer_payload(payload: dict, history: Sequence[dict] = ()) -> dict:
    """An infer's payload from rbee's options, once settle_model() has decided on chat: a chat
    makes `messages` (with --system first), after the conversation so far."""
    chat, system = payload.pop("chat", False), payload.pop("system", None)
    if chat:
        system_message = [{"role": "system", "content": system}] if system else []
        payload["messages"] = [*system_message, *history, {"role": "user", "content": payload.pop("prompt")}]
    return payload


def defaults_payload(payload: dict) -> dict:
    """model_copy's or model_download's payload from rbee's options: infer's among them are the model's
    defaults."""
    defaults = {name: payload.pop(name) for name in Settings.__struct_fields__ if name in payload}
    return payload | ({"defaults": defaults} if defaults else {})


def embed_inputs(texts: list[str]) -> list[str]:
    """embed's inputs: the TEXTs, "-" standing for all of stdin; with none, each line of stdin."""
    if not texts:
        return [line for line in read_stdin().splitlines() if line.strip()]
    return [read_stdin() if text == "-" else text for text in texts]


# -- rbee infer on a terminal: one prompt after another ------------------------------------------


BYE = ("/bye", "/exit")


def read_prompt() -> str:
    """One prompt typed at `>>> `; one that starts with \"\"\" goes on until a line ends with \"\"\"."""
    text = input(">>> ")
    if not text.startswith('"""'):
        return text
    text = text[3:]
    while not text.endswith('"""'):
        text += "\n" + input("... ")
    return text[:-3]


def interactive(args: argparse.Namespace, console: Console) -> int:
    """`rbee infer` with no PROMPT on a terminal, as `ollama run` does: each prompt typed is a job;
    with --chat or --system the conversation so far goes with it. Ctrl-C stops a generation (or
    drops the line being typed); /clear forgets the conversation; Ctrl-D or /bye ends."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  input() then edits lines and keeps a history

    base = build_payload(args)
    if not trio.run(_settle_model, args, console, base):  # once, not for each prompt
        return EXIT_CANCELLED
    chat = base["chat"]
    history: list[dict] = []
    console.note('one prompt per line; """ starts and ends several lines; /bye or Ctrl-D ends'
                 + ("; the conversation goes with each prompt" if chat else ""))  # fmt: skip
    while True:
        try:
            prompt = read_prompt()
        except EOFError:
            console.out("\n")
            return EXIT_OK
        except KeyboardInterrupt:
            console.out("\n")
            console.note("Ctrl-D or /bye ends")
            continue
        if prompt.strip() in BYE:
            return EXIT_OK
        if prompt.strip() == "/clear":
            history.clear()
            console.note("the conversation starts again")
            continue
        if not prompt.strip():
            continue
        try:
            status, payload, reply = trio.run(_turn, args, console, base | {"prompt": prompt}, history)
        except (CliError, KeyboardInterrupt, BaseExceptionGroup) as exc:
            error = _first_leaf(exc) if isinstance(exc, BaseExceptionGroup) else exc
            if isinstance(error, KeyboardInterrupt):  # before the job's stream: the job stops unread
                console.out("\n")
                continue
            if not isinstance(error, CliError):
                raise
            console.error(f"error: {error}")
            if error.code not in (EXIT_FAILED, EXIT_USAGE):  # the daemon is gone: so is the session
                return error.code
            continue
        if chat and status == EXIT_OK:
            history += [payload["messages"][-1], {"role": "assistant", "content": reply}]


async def _settle_model(args: argparse.Namespace, console: Console, payload: dict) -> bool:
    session = Session(daemon_address(args))
    async with session.client:
        return await settle_model(session, console, payload)


async def _turn(
    args: argparse.Namespace, console: Console, payload: dict, history: list[dict]
) -> tuple[int, dict, str]:
    """One prompt of an interactive session: its exit status, its payload and the text generated."""
    payload = infer_payload(payload, history)
    session = Session(daemon_address(args))
    async with session.client:
        view = make_view(args, console, "infer")
        return await session.run(msgspec.json.encode(payload), view, console), payload, view.text


# -- rbee job: the registry's own requests, which create no job ----------------------------------


JOB_STATES = ("queued", "running", "completed", "failed", "cancelled")


def _show(console: Console, args: argparse.Namespace, kind: str, data: Any) -> int:
    console.out((msgspec.json.encode(data).decode() if args.json else render_result(kind, data)) + "\n")
    return EXIT_OK


async def job_list(session: Session, args: argparse.Namespace, console: Console) -> int:
    query = f"?state={args.state}" if args.state else ""
    return _show(console, args, "job_list", await session.answer("GET", f"/v1/jobs{query}"))


async def job_get(session: Session, args: argparse.Namespace, console: Console) -> int:
    return _show(console, args, "job_get", await session.answer("GET", job_path(args.id)))


async def job_cancel(session: Session, args: argparse.Namespace, console: Console) -> int:
    status = await session.answer("DELETE", job_path(args.id))
    if args.json:
        return _show(console, args, "job_cancel", status)
    console.note(f"cancelled job {args.id}")
    return EXIT_OK


async def job_follow(session: Session, args: argparse.Namespace, console: Console) -> int:
    """Attach to a job's stream: replay what it kept, then follow it live, as its creator would."""
    status = await session.answer("GET", job_path(args.id))
    operation = status.get("operation") if isinstance(status, dict) else None
    view = make_view(args, console, operation)

    async def detach() -> None:  # the job goes on (an infer stops once it has no reader left)
        console.error(f"stopped following job {args.id}")

    after = str(args.after) if args.after else ""
    return await session.attach(args.id, view, console, detach, after)


Argument = tuple[tuple[str, ...], dict]


def _arg(*flags: str, **options: Any) -> Argument:
    return flags, options


def _default(operation: type[msgspec.Struct], field: str) -> str:
    """`(default X)` from the payload struct, so that help shows what the daemon will use."""
    [default] = [f.default for f in msgspec.structs.fields(operation) if f.name == field]
    if operation is Infer and field in Settings.__struct_fields__:
        default = getattr(DEFAULTS, field)
        unset = {"seed": "random", "n_ctx": "any worker's"}.get(field, "none")
        shown = format_value(default) if default not in (None, []) else unset
        return f"(default: the model's, else {shown})"
    return f"(default {format_value(default)})"


def _event_id(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not an event id (0, 1, 2 ...)")
    return int(text)


def _finite(text: str) -> float:
    """A number option's value: inf and nan would reach the daemon as null, its default."""
    try:
        if math.isfinite(value := float(text)):
            return value
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")


def _settings(default: Callable[[str], str]) -> tuple[Argument, ...]:
    """infer's options that a model can set defaults for; `default(field)` ends each help."""
    return (
        _arg("-n", "--max-tokens", dest="max_tokens", type=int, metavar="N",
             help=f"tokens to generate at most {default('max_tokens')}"),
        _arg("--temperature", type=_finite, metavar="F", help=f"sampling temperature {default('temperature')}"),
        _arg("--top-p", dest="top_p", type=_finite, metavar="F", help=f"nucleus sampling mass {default('top_p')}"),
        _arg("--top-k", dest="top_k", type=int, metavar="N",
             help=f"sample among the K likeliest tokens, 0 = all {default('top_k')}"),
        _arg("--min-p", dest="min_p", type=_finite, metavar="F",
             help=f"drop tokens less likely than F times the likeliest {default('min_p')}"),
        _arg("--repeat-penalty", dest="repeat_penalty", type=_finite, metavar="F",
             help=f"scale down the logits of the last tokens by F, 1 = off {default('repeat_penalty')}"),
        _arg("--presence-penalty", dest="presence_penalty", type=_finite, metavar="F",
             help=f"subtract F from the logits of the last tokens, -2 to 2 {default('presence_penalty')}"),
        _arg("--frequency-penalty", dest="frequency_penalty", type=_finite, metavar="F",
             help=f"subtract F per occurrence among the last tokens, -2 to 2 {default('frequency_penalty')}"),
        _arg("--repeat-last-n", dest="repeat_last_n", type=int, metavar="N",
             help=f"the last tokens the penalties look at, -1 = the whole context {default('repeat_last_n')}"),
        _arg("--seed", type=int, metavar="N", help=f"sampling seed {default('seed')}"),
        _arg("--stop", action="append", metavar="S", help=f"stop string (repeatable) {default('stop')}"),
        _arg("--no-stop", dest="stop", action="store_const", const=[],
             help="no stop strings, not even the model's (a --stop after it adds one)"),
        _arg("-c", "--ctx-size", dest="n_ctx", type=int, metavar="N",
             help=f"use (or load) a worker whose context holds N tokens; 0 = the model's own {default('n_ctx')}"),
    )  # fmt: skip


_HIVE = _arg("--hive", dest="hive_id", metavar="ID", help="the hive to act on (default: localhost)")
# The options of a command that a model's worker answers: which model, which worker, how long it stays.
_MODEL = _arg("-m", "--model", metavar="ID", help="model id (default: $RBEE_MODEL, else the only model)")
_ON_WORKER = (
    _arg("--device", metavar="D", help="cpu, cuda, cuda:N or metal"),
    _arg("--worker-id", dest="worker_id", metavar="ID", help="use this worker"),
    _arg("--keep-alive", dest="keep_alive", type=_finite, metavar="SECONDS",
         help="keep the worker this long after the job (0 unload, -1 forever)"),
    _HIVE,
)  # fmt: skip


def _source(text: str) -> str:
    """A model source, with a relative path made absolute: the daemon does not share our working
    directory. A file that is there is a path, even with a colon in its name (a:b.gguf)."""
    if os.path.isabs(text) or (urlsplit(text).scheme and not os.path.exists(text)):  # hf: is a scheme too
        return text
    return os.path.abspath(text)


def _format(text: str) -> str | dict:
    """infer's `format`: json, or a JSON Schema given inline or as @FILE."""
    if text == "json":
        return text
    try:
        schema = msgspec.json.decode(Path(text[1:]).read_bytes() if text.startswith("@") else text)
    except (OSError, msgspec.DecodeError) as exc:
        raise argparse.ArgumentTypeError(f"not json, a JSON Schema or @FILE holding one: {exc}") from None
    if not isinstance(schema, dict):
        raise argparse.ArgumentTypeError("a JSON Schema is an object")
    return schema


def _bias(text: str) -> tuple[str, float]:
    """One of infer's `logit_bias`: TOKEN_ID=BIAS."""
    token, _, bias = text.partition("=")
    try:
        if not (token.isascii() and token.isdigit()) or not math.isfinite(value := float(bias)):
            raise ValueError
        return str(int(token)), value  # 012 and 12: one token
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ID=BIAS, as 15043=-100") from None


class _Biases(argparse.Action):
    """Repeated --logit-bias: one object, the last bias given for a token kept."""

    def __call__(self, parser, namespace, value, option_string=None) -> None:
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or {}) | dict([value]))


class _Message(argparse.Action):
    """Repeated --message ROLE TEXT: a history in order, each TEXT inline or as @FILE."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        role, text = values
        try:
            message = {"role": role, "content": _text(text)}
        except argparse.ArgumentTypeError as exc:
            parser.error(f"argument {option_string}: {exc}")
        setattr(namespace, self.dest, (getattr(namespace, self.dest) or []) + [message])


def _text(text: str) -> str:
    """Text given inline or as @FILE (infer's `grammar`, a model's `system`)."""
    try:
        return Path(text[1:]).read_text() if text.startswith("@") else text
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc}") from None


def _key_file(path: str) -> str:
    """The key in a file ("-": stdin), so that it shows in no process list."""
    try:
        return (sys.stdin.read() if path == "-" else Path(path).read_text()).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {exc}") from None


_API_KEY = _arg("--api-key-file", dest="api_key", type=_key_file, metavar="FILE",
                help="the hive's API key, read from FILE ('-': stdin; an empty file removes it)")  # fmt: skip


def _global_options(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """--url/--socket/--json, accepted before and after the command (`defaults` only at the top)."""
    default = {} if defaults else {"default": argparse.SUPPRESS}
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="daemon address: http://HOST:PORT or unix:/PATH (env RBEE_URL)", **default)
    where.add_argument("--socket", metavar="PATH", help="daemon Unix socket (default: the daemon's own default)", **default)
    parser.add_argument("--json", action="store_true", help="print every event as one JSON line", **default)


def _subcommand(sub, name: str, help: str, arguments: Sequence[Argument]) -> tuple[argparse.ArgumentParser, list]:
    parser = sub.add_parser(name, help=help, description=help)
    dests = [parser.add_argument(*flags, **options).dest for flags, options in arguments]
    _global_options(parser, defaults=False)
    return parser, dests


def _command(sub, name: str, operation: str, help: str, *arguments: Argument) -> argparse.ArgumentParser:
    """A subcommand that sends `operation`; each argument's dest is a payload field."""
    parser, fields = _subcommand(sub, name, help, arguments)
    parser.set_defaults(operation=operation, fields=tuple(fields))
    return parser


def _job_command(sub, name: str, handler, help: str, *arguments: Argument) -> None:
    """A subcommand that talks to the job API itself: `handler(session, args, console)`."""
    parser, _ = _subcommand(sub, name, help, arguments)
    parser.set_defaults(handler=handler)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rbee",
        description="Client of the rbeed daemon: runs each command as a job and follows its events.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: 0 done, 1 job failed, 2 usage error or payload refused,\n"
        "  3 daemon unreachable, 130 cancelled (Ctrl-C cancels the job; SIGTERM 143, SIGHUP 129)\n"
        "environment: RBEE_URL (daemon address), RBEE_API_KEY (sent over TCP), RBEE_MODEL (infer's\n"
        "  default model), NO_COLOR",
    )
    parser.add_argument("--version", action="version", version=f"rbee {__version__}")
    _global_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", help="create any job from its JSON payload and follow it")
    submit.add_argument("payload", metavar="JSON", help='e.g. \'{"operation": "hive_list"}\'; "-" reads stdin')
    _global_options(submit, defaults=False)
    submit.set_defaults(operation="submit")

    hive = commands.add_parser("hive", help="manage hives (machines running rbeed)").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    by_id = _arg("id", metavar="ID")
    _command(hive, "list", "hive_list", "list hives with their health")
    _command(hive, "get", "hive_get", "show one hive", by_id)
    _command(hive, "create", "hive_create", "register a remote hive",
             _arg("host", metavar="HOST"),
             _arg("--id", help="hive id (default: derived from HOST)"),
             _arg("--port", type=int, help=f"rbeed port on HOST {_default(HiveCreate, 'port')}"),
             _arg("--ssh-host", dest="ssh_host", metavar="H", help="ssh destination for start/stop"),
             _API_KEY)  # fmt: skip
    _command(hive, "update", "hive_update", "change a remote hive", by_id,
             _arg("--host"), _arg("--port", type=int), _arg("--ssh-host", dest="ssh_host", metavar="H"),
             _API_KEY)  # fmt: skip
    _command(hive, "delete", "hive_delete", "forget a remote hive", by_id)
    for action in ("start", "stop"):
        _command(hive, action, f"hive_{action}", f"{action} rbeed on a hive",
                 _arg("hive_id", metavar="ID", nargs="?", help="hive id (default: localhost)"))  # fmt: skip

    model = commands.add_parser("model", help="manage models on a hive").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    system = _arg("--system", type=_text, metavar="TEXT",
                  help="the system message of its chats that have none, inline or as @FILE ('' removes it)")
    message = _arg("--message", nargs=2, action=_Message, dest="messages", metavar=("ROLE", "TEXT"),
                   help="a message (ROLE: system, user or assistant) of the history its chats get first, "
                        "as a Modelfile's MESSAGE, its TEXT inline or as @FILE; repeat it for each")  # fmt: skip
    no_messages = _arg("--no-messages", action="store_const", const=[], dest="messages",
                       help="remove the history (for a model present, or the copy's)")  # fmt: skip
    _command(model, "download", "model_download",
             "download a GGUF model (path, URL or hf:owner/repo/file), with a system message and defaults for "
             "infer's options (which replace those of a model present already)",
             _arg("model", metavar="SOURCE", type=_source), _arg("--sha256", metavar="HEX", help="expected sha256"),
             _arg("--id", metavar="ID", help="the model's id (default: from the file's name)"),
             system, message, no_messages,
             *_settings(lambda field: ""), _HIVE)  # fmt: skip
    _command(model, "list", "model_list", "list models", _HIVE)
    _command(model, "get", "model_get", "show one model", by_id, _HIVE)
    _command(model, "copy", "model_copy",
             "name a model by a new id too (a hard link to its file: no space used), with its own system message "
             "and defaults for infer's options (over ID's; NEW_ID may be ID to change them)",
             by_id, _arg("to", metavar="NEW_ID"),
             system, message, no_messages,
             *_settings(lambda field: "(default: ID's)"), _HIVE)  # fmt: skip
    _command(model, "delete", "model_delete", "delete a model", by_id, _HIVE)

    worker = commands.add_parser("worker", help="manage workers on a hive").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    _command(worker, "spawn", "worker_spawn", "start a worker serving a model",
             _arg("model", metavar="MODEL"),
             _arg("--worker", choices=["cpu", "cuda", "metal"], help=f"backend {_default(WorkerSpawn, 'worker')}"),
             _arg("--device", type=int, metavar="N", help=f"device index {_default(WorkerSpawn, 'device')}"),
             _arg("--threads", type=int, metavar="N", help="CPU threads (default: the cores no other worker holds)"),
             _arg("-c", "--ctx-size", dest="n_ctx", type=int, metavar="N",
                  help="context in tokens, prompt plus text; 0 = the model's own (default: [workers] n_ctx)"),
             _HIVE)  # fmt: skip
    _command(worker, "list", "worker_list", "list workers", _HIVE)
    _command(worker, "get", "worker_get", "show one worker", by_id, _HIVE)
    _command(worker, "delete", "worker_delete", "stop and remove a worker", by_id, _HIVE)

    _command(commands, "infer", "infer", "generate text; tokens are printed as they arrive",
             _arg("prompt", metavar="PROMPT", nargs="?",
                  help='the text to continue; "-" reads it from stdin, and so does none unless stdin is a '
                       "terminal, where it starts a session (a prompt per line)"),
             _MODEL, *_settings(lambda field: _default(Infer, field)),
             _arg("--format", type=_format, metavar="FORMAT",
                  help="hold the output to JSON: json (an object), or a JSON Schema, inline or as @FILE"),
             _arg("--grammar", type=_text, metavar="GBNF",
                  help="hold the output to a GBNF grammar (llama.cpp's), inline or as @FILE"),
             _arg("--logit-bias", dest="logit_bias", type=_bias, action=_Biases, metavar="ID=BIAS",
                  help="add BIAS (-100 to 100) to token ID's logit; -100 bans it, 100 forces it (repeatable; "
                       "`rbee tokenize --pieces` shows the ids)"),
             _arg("--chat", action="store_const", const=True,
                  help="send PROMPT as a user's message, through the model's chat template "
                       "(the default when the model has one)"),
             _arg("--raw", dest="chat", action="store_const", const=False,
                  help="send PROMPT as text to continue, even when the model has a chat template"),
             _arg("--system", metavar="TEXT", help="a system message before PROMPT (implies --chat)"),
             _arg("--no-stream", dest="stream", action="store_const", const=False,
                  help="print the text only when it is complete"),
             *_ON_WORKER)  # fmt: skip

    _command(commands, "embed", "embed", "print a vector per text, a line of JSON each",
             _arg("input", metavar="TEXT", nargs="*",
                  help='a text to embed; "-" reads one from stdin; with none, each line of stdin is one'),
             _MODEL,
             _arg("--dimensions", type=int, metavar="N", help="keep the first N dimensions (default: all)"),
             _arg("--no-truncate", dest="truncate", action="store_const", const=False,
                  help="fail on a text longer than the context, rather than cut it"),
             _arg("--no-normalize", dest="normalize", action="store_const", const=False,
                  help="print the vectors as pooled, not scaled to unit length"),
             _arg("-c", "--ctx-size", dest="n_ctx", type=int, metavar="N",
                  help="use (or load) a worker whose context holds N tokens; 0 = the model's own"),
             *_ON_WORKER)  # fmt: skip

    _command(commands, "tokenize", "tokenize", "print the model's token ids for a text, on one line",
             _arg("text", metavar="TEXT", nargs="?", help='the text; "-" or none reads it from stdin'),
             _MODEL,
             _arg("--add-special", dest="add_special", action="store_const", const=True,
                  help="add the tokens that start (and end) a prompt, where the model's vocabulary has them: "
                       "an infer's prompt gets them"),
             _arg("--no-parse-special", dest="parse_special", action="store_const", const=False,
                  help="read a special token's text (<eos>) as letters, not as that token"),
             _arg("--pieces", dest="with_pieces", action="store_const", const=True,
                  help="print a line per token instead: its id and its text (as JSON)"),
             *_ON_WORKER)  # fmt: skip
    _command(commands, "detokenize", "detokenize", "print the text that token ids stand for",
             _arg("tokens", metavar="ID", type=int, nargs="+", help="a token id"),
             _MODEL, *_ON_WORKER)  # fmt: skip

    job = commands.add_parser("job", help="list, inspect, follow and cancel jobs").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    _job_command(job, "list", job_list, "list the daemon's jobs, newest first",
                 _arg("--state", choices=JOB_STATES, help="only the jobs in this state"))  # fmt: skip
    _job_command(job, "get", job_get, "show a job's state and times", by_id)
    _job_command(job, "follow", job_follow,
                 "show a job's events from its start, then follow it to its end (Ctrl-C stops following)", by_id,
                 _arg("--after", type=_event_id, metavar="N", help="only the events after event id N"))  # fmt: skip
    _job_command(job, "cancel", job_cancel, "cancel a queued or running job", by_id)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    for name, value in vars(args).items():  # undecodable bytes in an argument come as surrogates
        if any(isinstance(text, str) and not _utf8(text) for text in (value if isinstance(value, list) else [value])):
            parser.error(f"argument {name}: not UTF-8 text")
    if args.url and args.socket:  # one given before the command, the other after it
        parser.error("argument --socket: not allowed with argument --url")
    console = Console.for_process()
    status = EXIT_FAILED
    try:
        if getattr(args, "operation", None) == "infer" and args.prompt is None and sys.stdin.isatty():
            status = interactive(args, console)
        else:
            status = trio.run(run_command, args, console)
    except* CliError as group:
        error = _first_leaf(group)
        console.progress.finish()
        console.error(f"error: {error}")
        status = error.code
    except* KeyboardInterrupt:  # Ctrl-C outside of following a job: no job to cancel
        console.error("interrupted")
        status = EXIT_CANCELLED
    except* BrokenPipeError:  # e.g. `rbee model list | head -1`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return status


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
