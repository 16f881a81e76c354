"""Control-plane benchmark: hive_list jobs per second, rbeed against a bare trio+h11 server.

One job is `POST /v1/jobs {"operation":"hive_list"}` then `GET <sse_url>` read to its end event,
both on the client's keep-alive connection. Both servers run as subprocesses side by side; the
load comes from a separate process (this file with --loadgen: one epoll loop, raw non-blocking
sockets, a minimal parser of the responses), started afresh for each run. Runs alternate
between the targets; each cell of the table is the median over the rounds.

    python bench/control_plane.py            # 5 rounds x 3 s per target, transport, concurrency
    python bench/control_plane.py --quick    # smoke run: 2 rounds x 1 s
    python bench/control_plane.py --json out.json --server-cpus 0 --client-cpus 1

See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

POST_BODY = b'{"operation":"hive_list"}'
POST_REQUEST = (b"POST /v1/jobs HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n%s" % (len(POST_BODY), POST_BODY))  # fmt: skip
END_DONE = b"event: end\ndata: [DONE]\n\n"


# -- servers as subprocesses, ready by sd_notify ------------------------------------------------


@dataclass
class Server:
    """A server subprocess and where to reach it."""

    name: str
    proc: subprocess.Popen
    socket_path: Path
    host: str
    port: int
    log_path: Path
    notifications: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def address(self, transport: str) -> str:
        return f"unix:{self.socket_path}" if transport == "unix" else f"{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 15) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def taskset(cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus] if cpus else []


def start_server(name: str, argv: list[str], base: Path, socket_path: Path, *, cpus: str | None = None,
                 env: dict | None = None, cwd: Path = ROOT, timeout: float = 60) -> Server:  # fmt: skip
    """Run `argv` with NOTIFY_SOCKET set; return once it sends READY=1 (STATUS names its TCP port)."""
    base.mkdir(parents=True, exist_ok=True)
    notify_path = base / f"{name}.notify"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    log_path = base / f"{name}.log"
    full_env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "PYTHONPATH": str(ROOT), **(env or {})}
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen([*taskset(cpus), *argv], stdout=log_file, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=full_env, cwd=cwd)  # fmt: skip
    server = Server(name, proc, socket_path, "127.0.0.1", 0, log_path)
    deadline = time.monotonic() + timeout
    try:
        while True:
            server.check_alive()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{name} not ready in {timeout:.0f} s:\n{server.log()[-3000:]}")
            notify.settimeout(min(remaining, 0.5))
            try:
                message = notify.recv(4096).decode()
            except TimeoutError:
                continue
            server.notifications.append(message)
            lines = message.splitlines()
            if "READY=1" in lines:
                break
    except BaseException:
        server.stop()
        notify.close()
        raise
    # Keep answering as a service manager would: later STATUS= datagrams must not fail (rbeed
    # logs a warning for each one that does).
    notify.settimeout(None)
    threading.Thread(target=_drain, args=(notify, server.notifications), daemon=True).start()
    status = next((line for line in lines if line.startswith("STATUS=listening on ")), "")
    for part in status.removeprefix("STATUS=listening on ").split(", "):
        if part and not part.startswith("unix:"):
            server.host, _, port = part.rpartition(":")
            server.port = int(port)
    return server


def _drain(notify: socket.socket, into: list[str]) -> None:
    with notify:
        while True:
            into.append(notify.recv(4096).decode(errors="replace"))


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connect(address: str) -> socket.socket:
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address[5:])
    else:
        host, _, port = address.rpartition(":")
        sock = socket.create_connection((host, int(port)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- minimal HTTP/1.1 response parser (for our servers' responses only) -------------------------


def parse_response(buf: bytearray) -> tuple[int, bytes, int] | None:
    """(status, body, bytes used) of the complete response at the start of `buf`, or None if incomplete.

    Handles content-length and chunked bodies (no trailers), which is all our servers send.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).lower()
    status = int(head[9:12])
    pos = end + 4
    if b"\r\ntransfer-encoding: chunked" in head:
        parts = []
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(buf[pos:line_end].split(b";", 1)[0], 16)
            start = line_end + 2
            if len(buf) < start + size + 2:
                return None
            if size == 0:
                return status, b"".join(parts), start + 2
            parts.append(bytes(buf[start : start + size]))
            pos = start + size + 2
    length = 0
    marker = head.find(b"\r\ncontent-length:")
    if marker >= 0:
        line_end = head.find(b"\r\n", marker + 2)
        length = int(head[marker + 17 : line_end if line_end >= 0 else len(head)])
    if len(buf) < pos + length:
        return None
    return status, bytes(buf[pos : pos + length]), pos + length


def sse_url_of(body: bytes) -> bytes:
    start = body.index(b'"sse_url":"') + 11
    return body[start : body.index(b'"', start)]


def get_request(url: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nhost: bench\r\naccept: text/event-stream\r\n\r\n" % url


def exchange(sock: socket.socket, request: bytes) -> tuple[int, bytes]:
    """Blocking: send one request, read its whole response."""
    sock.sendall(request)
    buf = bytearray()
    while (parsed := parse_response(buf)) is None:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("server closed the connection mid-response")
        buf += data
    return parsed[0], parsed[1]


def run_jobs(address: str, count: int) -> int:
    """Run `count` jobs one after another on one connection (for warm-up); returns the failures."""
    failures = 0
    with connect(address) as sock:
        for _ in range(count):
            status, body = exchange(sock, POST_REQUEST)
            if status != 201:
                failures += 1
                continue
            status, body = exchange(sock, get_request(sse_url_of(body)))
            failures += status != 200 or not body.endswith(END_DONE)
    return failures


# -- the load generator (runs in its own process) -----------------------------------------------


class _Client:
    __slots__ = ("sock", "buf", "posting", "started")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.posting = True
        self.started = 0.0


def loadgen(address: str, concurrency: int, duration: float, warmup: float) -> dict:
    """`concurrency` clients in one epoll loop, each running jobs back to back on its own connection.

    Jobs that end within [warmup, warmup + duration) count; a job whose POST is not 201, whose
    stream is not 200 or does not end with `[DONE]` counts as a failure, not as throughput.
    """
    selector = selectors.DefaultSelector()
    clients = []

    def begin(client: _Client, now: float) -> None:
        client.posting, client.started = True, now
        client.sock.sendall(POST_REQUEST)

    def reopen(client: _Client) -> None:
        selector.unregister(client.sock)
        client.sock.close()
        client.sock = connect(address)
        client.sock.setblocking(False)
        client.buf.clear()
        selector.register(client.sock, selectors.EVENT_READ, client)

    for _ in range(concurrency):
        client = _Client(connect(address))
        client.sock.setblocking(False)
        selector.register(client.sock, selectors.EVENT_READ, client)
        clients.append(client)
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    window_start, window_end = start + warmup, start + warmup + duration
    for client in clients:
        begin(client, start)
    done = total = failures = failures_outside = errors = 0
    latencies: list[float] = []
    body_bytes = 0
    active = len(clients)
    while active:
        for key, _ in selector.select(5.0) or [(None, None)]:
            if key is None:
                raise RuntimeError(f"no response from {address} within 5 s")
            client = key.data
            try:
                data = client.sock.recv(65536)
                if not data:
                    raise ConnectionError("server closed the connection")
            except OSError:
                errors += 1
                now = time.perf_counter()
                if now < window_end:
                    reopen(client)
                    begin(client, now)
                else:
                    selector.unregister(client.sock)
                    active -= 1
                continue
            client.buf += data
            parsed = parse_response(client.buf)
            if parsed is None:
                continue
            status, body, used = parsed
            del client.buf[:used]
            now = time.perf_counter()
            counted = window_start <= now < window_end
            if client.posting:
                if status == 201:
                    client.posting = False
                    client.sock.sendall(get_request(sse_url_of(body)))
                    continue
                ok = False
            else:
                ok = status == 200 and body.endswith(END_DONE)
                body_bytes = len(body)
            if not ok:
                failures += counted
                failures_outside += not counted
            else:
                total += 1
                if counted:
                    done += 1
                    latencies.append(now - client.started)
            if now < window_end:
                begin(client, now)
            else:
                selector.unregister(client.sock)
                active -= 1
    for client in clients:
        client.sock.close()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    deciles = statistics.quantiles(latencies, n=10) if len(latencies) >= 2 else [0.0] * 9
    return {
        "jobs": done, "failures": failures, "failures_outside_window": failures_outside,
        "connection_errors": errors, "duration_s": duration, "jobs_per_s": done / duration,
        "latency_ms": {"p10": deciles[0] * 1e3, "p50": deciles[4] * 1e3, "p90": deciles[8] * 1e3},
        "stream_body_bytes": body_bytes, "jobs_in_run": total,
        "client_cpu_us_per_job": (usage.ru_utime + usage.ru_stime - usage_before.ru_utime - usage_before.ru_stime)
                                 / max(total, 1) * 1e6,
    }  # fmt: skip


# -- the orchestration --------------------------------------------------------------------------

TARGETS = ("rbeed", "bare", "floor")


def start_targets(base: Path, cpus: str | None, finished_ttl: float, rbeed_root: Path,
                  bare_per_event: bool) -> dict[str, Server]:  # fmt: skip
    # A job stays held for finished_ttl after it ends and the registry holds at most max_jobs:
    # the defaults (600 s, 10,000) would refuse jobs after a few seconds at this rate.
    config = base / "rbeed.toml"
    config.write_text(f'[jobs]\nfinished_ttl = {finished_ttl}\nmax_jobs = 1000000\n\n[workers]\nbackend = "process"\n')
    rbeed_argv = [sys.executable, "-m", "rbeed", "serve", "--listen", "127.0.0.1:0",
                  "--socket", str(base / "rbeed.sock"), "--state-dir", str(base / "state"),
                  "--runtime-dir", str(base / "run"), "--config", str(config)]  # fmt: skip
    bare_argv = [sys.executable, str(HERE / "bare_server.py"), "--listen", "127.0.0.1:0",
                 "--socket", str(base / "bare.sock"), *(["--write-per-event"] if bare_per_event else [])]  # fmt: skip
    floor_argv = [sys.executable, str(HERE / "bare_server.py"), "--listen", "127.0.0.1:0",
                  "--socket", str(base / "floor.sock"), "--jobs"]  # fmt: skip
    servers = {}
    try:
        servers["rbeed"] = start_server("rbeed", rbeed_argv, base, base / "rbeed.sock", cpus=cpus,
                                        env={"PYTHONPATH": str(rbeed_root)}, cwd=rbeed_root)  # fmt: skip
        servers["bare"] = start_server("bare", bare_argv, base, base / "bare.sock", cpus=cpus)
        servers["floor"] = start_server("floor", floor_argv, base, base / "floor.sock", cpus=cpus)
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def run_load(server: Server, transport: str, concurrency: int, duration: float, warmup: float,
             cpus: str | None) -> dict:  # fmt: skip
    argv = [*taskset(cpus), sys.executable, str(Path(__file__).resolve()), "--loadgen", server.address(transport),
            "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", str(warmup)]  # fmt: skip
    cpu_before = cpu_seconds(server.pid)
    result = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 60)
    cpu = cpu_seconds(server.pid) - cpu_before
    server.check_alive()
    if result.returncode != 0:
        raise RuntimeError(f"load generator failed against {server.name}:\n{result.stderr[-3000:]}")
    figures = json.loads(result.stdout)
    # Server CPU per job varies much less than jobs/s with the load of other processes.
    figures["server_cpu_us_per_job"] = cpu / max(figures["jobs_in_run"], 1) * 1e6
    return figures


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    if len(values) < 3:
        return ""
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return f"{deciles[0]:.0f}-{deciles[8]:.0f}"


def report(runs: list[dict], memory: dict[str, dict], ratio_target: float, rss_target_mib: float) -> str:
    lines = []
    header = (f"{'transport':<9} {'conc':>4}  {'rbeed jobs/s':>12} {'(p10-p90)':>11}  {'bare jobs/s':>11} "
              f"{'(p10-p90)':>11}  {'ratio':>5} {'paired':>6}  {'floor':>6} {'r/floor':>7}  "
              f"{'cpu us/job r/b/f':>16}  {'p50 ms r/b':>11}  {'fail':>5}")  # fmt: skip
    lines += [header, "-" * len(header)]
    cells = sorted({(run["transport"], run["concurrency"]) for run in runs}, key=lambda c: (c[0] != "unix", c[1]))
    for transport, concurrency in cells:
        by_target = {t: [r for r in runs if (r["transport"], r["concurrency"], r["target"]) == (transport, concurrency, t)]
                     for t in TARGETS}  # fmt: skip
        rates = {t: [r["jobs_per_s"] for r in by_target[t]] for t in TARGETS}
        cpu = {t: median([r["server_cpu_us_per_job"] for r in by_target[t]]) for t in TARGETS}
        p50 = {t: median([r["latency_ms"]["p50"] for r in by_target[t]]) for t in TARGETS}
        fails = sum(r["failures"] + r["connection_errors"] for r in runs
                    if (r["transport"], r["concurrency"]) == (transport, concurrency))  # fmt: skip
        ratio = median(rates["rbeed"]) / median(rates["bare"])
        # Per-round ratios: each pairs runs taken seconds apart, so slow drift in load cancels out.
        paired = median([r / b for r, b in zip(rates["rbeed"], rates["bare"])])
        flag = "" if ratio >= ratio_target else "  < target"
        lines.append(
            f"{transport:<9} {concurrency:>4}  {median(rates['rbeed']):>12.0f} {spread(rates['rbeed']):>11}  "
            f"{median(rates['bare']):>11.0f} {spread(rates['bare']):>11}  {ratio:>5.2f} {paired:>6.2f}  "
            f"{median(rates['floor']):>6.0f} {median(rates['rbeed']) / median(rates['floor']):>7.2f}  "
            f"{cpu['rbeed']:>6.0f}/{cpu['bare']:.0f}/{cpu['floor']:<4.0f}  {p50['rbeed']:>5.2f}/{p50['bare']:<5.2f}  "
            f"{fails:>5}{flag}"
        )
    client_cpu = median([r["client_cpu_us_per_job"] for r in runs])
    lines.append(f"(ratio = median rbeed / median bare; paired = median of per-round ratios; target >= {ratio_target};")
    lines.append(" floor = bare --jobs, the structure's floor (job task, cancel scope, channel) with canned content;")
    lines.append(f" cpu us/job = server CPU time per job; the load generator used {client_cpu:.0f} us/job)")
    lines.append("")
    lines.append(f"{'server':<6} {'RSS idle':>9} {'RSS after load':>15} {'peak (VmHWM)':>13}")
    for name in TARGETS:
        idle, after = memory[name]["idle"], memory[name]["after_load"]
        lines.append(f"{name:<6} {idle['VmRSS'] / 1024:>7.1f} M {after['VmRSS'] / 1024:>13.1f} M "
                     f"{after['VmHWM'] / 1024:>11.1f} M")  # fmt: skip
    idle_rbeed = memory["rbeed"]["idle"]["VmRSS"] / 1024
    verdict = "ok" if idle_rbeed <= rss_target_mib else "over target"
    lines.append(f"(rbeed idle RSS target <= {rss_target_mib:g} MiB: {verdict})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds per run (default 3)")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds at the start of each run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--concurrency", default="1,16", help="comma-separated client counts (default 1,16)")
    parser.add_argument("--transports", default="unix,tcp", help="unix, tcp or both (default unix,tcp)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds of 1 s")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every run's raw numbers here")
    parser.add_argument("--server-cpus", metavar="LIST", help="taskset -c LIST for both servers (default: no pinning)")
    parser.add_argument("--client-cpus", metavar="LIST", help="taskset -c LIST for the load generator")
    parser.add_argument("--finished-ttl", type=float, default=2.0, help="rbeed [jobs] finished_ttl (default 2 s)")
    parser.add_argument("--bare-write-per-event", action="store_true",
                        help="the bare server writes each h11 event on its own, as h11's example server does")
    parser.add_argument("--rbeed-root", type=Path, default=ROOT, metavar="DIR",
                        help="checkout whose rbeed package to measure (default: this one)")
    parser.add_argument("--loadgen", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loadgen:
        concurrency = int(args.concurrency)
        print(json.dumps(loadgen(args.loadgen, concurrency, args.duration, args.warmup)))
        return 0
    if args.quick:
        args.duration, args.rounds, args.warmup = 1.0, 2, 0.3
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    transports = [t.strip() for t in args.transports.split(",")]
    base = Path(tempfile.mkdtemp(prefix="rbeed-cp-"))
    runs: list[dict] = []
    memory: dict[str, dict] = {}
    servers = start_targets(base, args.server_cpus, args.finished_ttl, args.rbeed_root.resolve(),
                            args.bare_write_per_event)  # fmt: skip
    try:
        for name, server in servers.items():
            failures = run_jobs(server.address("unix"), 20) + run_jobs(server.address("tcp"), 5)
            if failures:
                raise RuntimeError(f"{name}: {failures} of the first 25 jobs failed:\n{server.log()[-3000:]}")
            memory[name] = {"idle": memory_kib(server.pid)}
        print(f"servers: {', '.join(f'{name} pid {server.pid}' for name, server in servers.items())}; "
              f"{args.rounds} rounds x {args.duration:g} s (+{args.warmup:g} s warm-up) per run", flush=True)  # fmt: skip
        for transport in transports:  # warm-up runs, not recorded
            for concurrency in concurrencies:
                for name in TARGETS:
                    run_load(servers[name], transport, concurrency, 0.5, 0.2, args.client_cpus)
        for round_no in range(args.rounds):
            order = TARGETS if round_no % 2 == 0 else TARGETS[::-1]
            for transport in transports:
                for concurrency in concurrencies:
                    for name in order:
                        result = run_load(servers[name], transport, concurrency, args.duration, args.warmup,
                                          args.client_cpus)  # fmt: skip
                        result.update(target=name, transport=transport, concurrency=concurrency, round=round_no)
                        runs.append(result)
                        print(f"  round {round_no + 1} {transport:<4} c={concurrency:<3} {name:<5} "
                              f"{result['jobs_per_s']:8.0f} jobs/s  p50 {result['latency_ms']['p50']:.2f} ms  "
                              f"cpu {result['server_cpu_us_per_job']:.0f} us/job  "
                              f"failures {result['failures'] + result['connection_errors']}", flush=True)  # fmt: skip
        for name, server in servers.items():
            memory[name]["after_load"] = memory_kib(server.pid)
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
    bodies = {name: {r["stream_body_bytes"] for r in runs if r["target"] == name} for name in TARGETS}
    print()
    print(report(runs, memory, ratio_target=0.8, rss_target_mib=35))
    print("stream body bytes: " + ", ".join(f"{name} {sorted(sizes)}" for name, sizes in bodies.items()))
    if args.json:
        args.json.write_text(json.dumps({"settings": vars(args) | {"json": str(args.json)}, "runs": runs,
                                         "memory_kib": memory}, indent=1, default=str))  # fmt: skip
    return 1 if any(r["failures"] or r["connection_errors"] for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
