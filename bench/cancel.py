"""Cancel benchmark: how soon a DELETE or a dropped stream frees the worker, against in-process floors.

For each model, with rbeed over its Unix socket and a worker spawned beforehand, `--runs` times each
of three ways to stop an infer; right after it, a one-token follow-up job goes to the same worker
on a second connection. "Free after" is when the follow-up's token arrived, counted from the stop,
less the follow-up's own TTFT on an idle worker (measured each run): how long the stopped
generation kept the worker.

- prompt: DELETE while the worker evaluates a long prompt. Floor: one n_batch prompt batch
  in-process, the granularity at which the worker can stop (half of it on average).
- decode: DELETE after the 5th token; also counts the tokens still streamed after the DELETE.
  Floor: one token's decode time in-process.
- drop: the client closes the stream after the 5th token.

    python bench/cancel.py --cache-dir /tmp/models [--runs 10] [--models gemma,tiny] [--threads 1]
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from inference import MODELS, SAMPLING, HTTPClient, Rbeed, model_file

# Long enough that prompt processing takes a second or more on one thread.
LONG_PROMPTS = {"gemma": "The history of the printing press is long. " * 200, "tiny": " the cat" * 1500}
N_CTX = 16384


def in_process_floors(path: Path, prompt: str, threads: int, n_batch: int) -> tuple[float, float]:
    """(seconds per n_batch prompt batch, seconds per decoded token) in this process."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=threads, n_threads_batch=threads,
                          n_batch=n_batch, logits_all=False, verbose=False)  # fmt: skip
    try:
        tokens = llm.tokenize(prompt.encode(), add_bos=True)
        llm.reset()
        start = time.perf_counter()
        llm.eval(tokens)
        per_batch = (time.perf_counter() - start) / -(-len(tokens) // n_batch)
        llm.reset()
        times = []
        for _, token in zip(range(33), llm.generate(llm.tokenize(b"Once upon a time", add_bos=True), top_k=1)):
            times.append(time.perf_counter())
        return per_batch, (times[-1] - times[0]) / (len(times) - 1)
    finally:
        llm.close()


class Canceller:
    """Infer jobs on the benchmark's worker: a main connection for the job, a control one beside it."""

    def __init__(self, rbeed: Rbeed, follow_up: str):
        self.rbeed = rbeed
        self.control = HTTPClient(rbeed.server.address("unix"))
        self.follow_up_prompt = follow_up

    def payload(self, prompt: str, max_tokens: int) -> dict:
        return {"operation": "infer", "model": self.rbeed.model_id, "worker_id": self.rbeed.worker_id,
                "prompt": prompt, "max_tokens": max_tokens, **SAMPLING}  # fmt: skip

    def start(self, client: HTTPClient, prompt: str, max_tokens: int):
        job = client.ready().json("POST", "/v1/jobs", self.payload(prompt, max_tokens), expect=201)
        return job["job_id"], client.events("GET", job["sse_url"])

    def follow_up(self) -> float:
        """A one-token job on the control connection: when its token arrived."""
        _, events = self.start(self.control, self.follow_up_prompt, 1)
        first = None
        for received, event in events:
            if event.get("event") == "token" and first is None:
                first = received
            elif event.get("event") == "end" and event["data"] != "[DONE]":
                raise RuntimeError(f"the follow-up job ended {event['data']}")
        return first

    def idle_ttft(self) -> float:
        sent = time.perf_counter()
        return self.follow_up() - sent

    def delete(self, job_id: str) -> float:
        sent = time.perf_counter()
        status, body = self.control.ready().request("DELETE", f"/v1/jobs/{job_id}")
        if status != 200:
            raise RuntimeError(f"DELETE answered {status}: {body[:300]!r}")
        return sent

    def in_prompt(self, prompt: str) -> float:
        """DELETE once the worker logs that prompt processing began; seconds until the worker is free."""
        log_before = len(self.rbeed.server.log())
        job_id, events = self.start(self.rbeed.client, prompt, 8)
        pattern = re.compile(r"^rbeed-worker: generation \d+: \d+ prompt tokens", re.MULTILINE)
        deadline = time.monotonic() + 30
        while not pattern.search(self.rbeed.server.log(), log_before):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker never logged its prompt:\n{self.rbeed.server.log()[-1500:]}")
            time.sleep(0.002)
        sent = self.delete(job_id)
        free = self.follow_up()
        if [event for _, event in events if event.get("event") == "token"]:
            raise RuntimeError("a token arrived: the prompt was too short to cancel in")
        return free - sent

    def streaming(self, prompt: str, max_tokens: int):
        """Start a job on the main connection and read its stream up to the 5th token: (job id, events)."""
        job_id, events = self.start(self.rbeed.client, prompt, max_tokens)
        seen = 0
        for _, event in events:
            seen += event.get("event") == "token"
            if seen == 5:
                return job_id, events
        raise RuntimeError(f"the job ended after {seen} tokens")

    def in_decode(self, prompt: str, max_tokens: int) -> tuple[float, int]:
        """DELETE after the 5th token: (seconds until the worker is free, tokens read after the DELETE)."""
        job_id, events = self.streaming(prompt, max_tokens)
        sent = self.delete(job_id)
        free = self.follow_up()
        late = sum(event.get("event") == "token" for _, event in events)
        return free - sent, late

    def dropped(self, prompt: str, max_tokens: int) -> float:
        """Close the stream after the 5th token: seconds until the worker is free."""
        self.streaming(prompt, max_tokens)
        dropped = time.perf_counter()
        self.rbeed.client.close()
        return self.follow_up() - dropped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--models", default="gemma,tiny")
    parser.add_argument("--threads", type=int, default=2, help="worker threads (default 2, what a worker takes here)")
    parser.add_argument("--n-batch", type=int, default=32)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "rbeed-bench")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="rbeed-cancel-"))
    # The tiny model decodes thousands of tokens a second: a worker-side delay per token (the
    # tests' RBEED_WORKER_TOKEN_DELAY) would change what is measured, so it decodes at full speed.
    rbeed = Rbeed(base, args.threads, N_CTX, args.n_batch, None)
    rows = []
    try:
        for name in args.models.split(","):
            spec = MODELS[name.strip()]
            path = model_file(spec, args.cache_dir)
            per_batch, per_token = in_process_floors(path, LONG_PROMPTS[spec.name], args.threads, args.n_batch)
            rbeed.load(path)
            canceller = Canceller(rbeed, "Once upon a time")
            prompt, decode, late, drop = [], [], [], []
            for n in range(args.runs):
                ttft = canceller.idle_ttft()
                prompt.append(canceller.in_prompt(f"{n} " + LONG_PROMPTS[spec.name]) - ttft)
                seconds, tokens = canceller.in_decode(spec.prompt.format(n=n), 2000)
                decode.append(seconds - ttft)
                late.append(tokens)
                drop.append(canceller.dropped(spec.prompt.format(n=n), 2000) - ttft)
            rbeed.unload()
            canceller.control.close()
            med = statistics.median
            rows.append(f"{spec.name:<6} {'prompt':<7} {med(prompt) * 1e3:>8.1f} ms  (max {max(prompt) * 1e3:.1f})"
                        f"   floor: one {args.n_batch}-token batch {per_batch * 1e3:.1f} ms"
                        f"   ratio {med(prompt) / per_batch:.2f}")  # fmt: skip
            rows.append(f"{spec.name:<6} {'decode':<7} {med(decode) * 1e3:>8.1f} ms  (max {max(decode) * 1e3:.1f})"
                        f"   floor: one token {per_token * 1e3:.2f} ms   tokens after the DELETE: "
                        f"median {med(late):g}, max {max(late)}")  # fmt: skip
            rows.append(f"{spec.name:<6} {'drop':<7} {med(drop) * 1e3:>8.1f} ms  (max {max(drop) * 1e3:.1f})")
    finally:
        rbeed.close()
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{args.runs} runs each, {args.threads} thread(s), n_batch {args.n_batch}; worker free after (median, max):")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
