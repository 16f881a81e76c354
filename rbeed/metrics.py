"""Prometheus metrics (GET /metrics): totals counted as generations end, the rest read at each scrape."""

from __future__ import annotations

import bisect
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

from . import __version__, wire
from .jobs import JobRegistry, JobState
from .models import Models
from .server import Request, Response, only
from .workers import Generation, Outcome, Supervisor, resident_bytes

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Time to first token, in seconds: a small model warm on a CPU answers in tens of ms; a long
# prompt, or a large model, takes seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Labels = dict[str, str]
Sample = tuple[Labels, float]


class Histogram:
    """Counts of observations by upper bound (not cumulative until rendered), their sum and count."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds, self.counts = bounds, [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def samples(self, name: str, labels: Labels) -> Iterable[tuple[str, Labels, float]]:
        total = 0
        for bound, count in zip((*self.bounds, "+Inf"), self.counts, strict=True):
            total += count
            yield f"{name}_bucket", labels | {"le": str(bound)}, total
        yield f"{name}_sum", labels, self.sum
        yield f"{name}_count", labels, total


class ModelTotals:
    """What a model's finished generations and embeddings added up to."""

    def __init__(self) -> None:
        self.finishes: Counter[str] = Counter()  # generations by finish reason
        self.prompt_tokens = self.cached_tokens = self.completion_tokens = 0
        self.decode_seconds = 0.0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.embedded_inputs = self.embedded_tokens = 0


class Totals:
    """The counters that only grow, by model; Inference adds to them as each answer arrives."""

    def __init__(self) -> None:
        self.models: defaultdict[str, ModelTotals] = defaultdict(ModelTotals)

    def generated(self, model: str, generation: Generation, done: Outcome) -> None:
        """Count a generation's end: a Done, whatever its finish reason; or a failure of one its
        worker took (finish reason "error"), with the tokens it made before."""
        totals = self.models[model]
        if type(done) is not wire.Done:
            if generation.sent and not (isinstance(done, wire.Failed) and done.refused):
                totals.finishes["error"] += 1
                totals.completion_tokens += generation.made
            return
        totals.finishes[done.finish_reason] += 1
        totals.prompt_tokens += done.prompt_tokens
        totals.cached_tokens += done.cached_tokens
        totals.completion_tokens += done.completion_tokens
        if done.completion_tokens:  # none: no first token, no time to it
            totals.ttft.observe(done.ttft_ms / 1000)
        if done.tokens_per_s > 0:  # the worker's rate: tokens after the first over the time they took
            totals.decode_seconds += (done.completion_tokens - 1) / done.tokens_per_s

    def embedded(self, model: str, inputs: int, done: wire.Embedded) -> None:
        totals = self.models[model]
        totals.embedded_inputs += inputs
        totals.embedded_tokens += done.prompt_tokens


class Exposition:
    """Metric families written in Prometheus's text format, each with its HELP and TYPE."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str, samples: Iterable[Sample]) -> None:
        self._head(name, kind, help)
        self.lines += [f"{name}{_labels(labels)} {_value(value)}" for labels, value in samples]

    def histograms(self, name: str, help: str, histograms: Iterable[tuple[Labels, Histogram]]) -> None:
        self._head(name, "histogram", help)
        for labels, histogram in histograms:
            samples = histogram.samples(name, labels)
            self.lines += [f"{sample}{_labels(where)} {_value(value)}" for sample, where, value in samples]

    def _head(self, name: str, kind: str, help: str) -> None:
        self.lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}"]

    def encode(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for value in labels.values())
    return "{" + ",".join(f'{key}="{value}"' for key, value in zip(labels, escaped, strict=True)) + "}"


def _value(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _process(exposition: Exposition, started: float) -> None:
    """The standard process_* families, for the daemon itself (its workers are rbeed_worker_*)."""
    times = os.times()
    exposition.family("process_cpu_seconds_total", "counter", "User and system CPU time of the daemon.",
                      [({}, times.user + times.system)])  # fmt: skip
    exposition.family("process_resident_memory_bytes", "gauge", "Resident memory of the daemon.",
                      [({}, resident_bytes(os.getpid()) or 0)])  # fmt: skip
    exposition.family("process_open_fds", "gauge", "Open file descriptors of the daemon.",
                      [({}, len(os.listdir("/proc/self/fd")))])  # fmt: skip
    exposition.family("process_start_time_seconds", "gauge", "When the daemon started, in seconds since the epoch.",
                      [({}, started)])  # fmt: skip


class MetricsRoute:
    """GET /metrics: the daemon's state and totals for Prometheus to scrape."""

    def __init__(self, registry: JobRegistry, models: Models, supervisor: Supervisor, totals: Totals,
                 connections: Callable[[], int]):  # fmt: skip
        self.registry, self.models, self.supervisor, self.totals = registry, models, supervisor, totals
        self.connections = connections
        self.started = time.time()
        self.routes = {"/metrics": self.scrape}

    async def scrape(self, request: Request) -> Response:
        return only(request, "GET") or Response(200, self.render(), CONTENT_TYPE)

    def render(self) -> bytes:
        out = Exposition()
        out.family("rbeed_build_info", "gauge", "The daemon's version.", [({"version": __version__}, 1)])
        _process(out, self.started)
        out.family("rbeed_http_connections", "gauge", "Open client connections.", [({}, self.connections())])
        out.family("rbeed_jobs", "gauge", "Jobs the registry holds, by state (finished ones until their TTL).",
                   [({"state": state.value}, self.registry.count(state)) for state in JobState])  # fmt: skip
        ended = sorted(self.registry.ended.items())
        out.family("rbeed_jobs_finished_total", "counter",
                   "Jobs that ended, by operation, the hive they named (forwarded ones run there) and state.",
                   [({"operation": operation, "hive": hive, "state": state}, n) for (operation, hive, state), n in ended])  # fmt: skip
        out.family("rbeed_models", "gauge", "Models in the catalog.", [({}, len(self.models.catalog.list()))])
        self._workers(out)
        self._totals(out)
        return out.encode()

    def _workers(self, out: Exposition) -> None:
        records = sorted((worker.record() for worker in self.supervisor.workers.values()), key=lambda r: r.id)
        by_state = Counter((r.model, r.device, r.state) for r in records)
        states = [({"model": m, "device": d, "state": s}, n) for (m, d, s), n in sorted(by_state.items())]
        out.family("rbeed_workers", "gauge", "Workers of this hive, by model, device and state.", states)
        named = [({"worker": r.id, "model": r.model, "device": r.device}, r) for r in records]
        holding = {worker.id for worker in self.supervisor.workers.values() if worker.live}
        out.family("rbeed_worker_resident_memory_bytes", "gauge", "Resident memory of each worker's process.",
                   [(labels, r.rss) for labels, r in named if r.rss is not None])  # fmt: skip
        out.family("rbeed_worker_threads", "gauge", "llama.cpp threads of each worker (one that failed holds none).",
                   [(labels, r.threads) for labels, r in named if r.id in holding])  # fmt: skip
        out.family("rbeed_worker_queued_jobs", "gauge", "Jobs waiting for each worker (not the one it runs).",
                   [(labels, r.queued) for labels, r in named])  # fmt: skip
        out.family("rbeed_worker_restarts_total", "counter", "Times each worker was restarted after it died.",
                   [(labels, r.restarts_total) for labels, r in named])  # fmt: skip

    def _totals(self, out: Exposition) -> None:
        models = sorted(self.totals.models.items())

        def each(field: str) -> list[Sample]:
            return [({"model": model}, getattr(totals, field)) for model, totals in models]

        out.family("rbeed_generations_total", "counter", "Generations that ended, by model and finish reason.",
                   [({"model": model, "finish_reason": reason}, n)
                    for model, totals in models for reason, n in sorted(totals.finishes.items())])  # fmt: skip
        out.family("rbeed_prompt_tokens_total", "counter", "Prompt tokens of finished generations.",
                   each("prompt_tokens"))  # fmt: skip
        out.family("rbeed_prompt_cached_tokens_total", "counter",
                   "Prompt tokens found in a worker's context from the job before, not evaluated again.",
                   each("cached_tokens"))  # fmt: skip
        out.family("rbeed_completion_tokens_total", "counter", "Tokens generated.", each("completion_tokens"))
        out.family("rbeed_decode_seconds_total", "counter",
                   "Seconds from each generation's first token to its last (decode rate: tokens after the first "
                   "over these).", each("decode_seconds"))  # fmt: skip
        out.histograms("rbeed_time_to_first_token_seconds",
                       "Seconds from a worker's receipt of a generation to its first token (prompt evaluation).",
                       [({"model": model}, totals.ttft) for model, totals in models])  # fmt: skip
        out.family("rbeed_embedded_inputs_total", "counter", "Texts embedded.", each("embedded_inputs"))
        out.family("rbeed_embedded_tokens_total", "counter", "Tokens of the texts embedded.", each("embedded_tokens"))
