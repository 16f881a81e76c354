"""GET /metrics: Prometheus's text format, its totals and gauges following what the daemon did,
on the real daemon with a real worker running the tiny model."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest
import trio

from rbeed import __version__
from rbeed.metrics import Exposition, Histogram
from support import (
    end_marker, job_error, job_events, job_result, logged, read_events_until, register, rest_of, running_daemon, submit,
)  # fmt: skip

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"({_NAME})(?:\{{((?:{_LABEL},)*{_LABEL})\}})? (\S+)")
_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample by (name, labels), and each family's type; asserts the format: a HELP and a TYPE
    line before each family's samples, which come together, each family once, values that parse."""
    samples: Samples = {}
    types: dict[str, str] = {}
    family = None
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            family = line.split(" ", 3)[2]
            assert family not in types and line.split(" ", 3)[3], line
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == family and kind in ("counter", "gauge", "histogram"), line
            types[name] = kind
            continue
        match = _SAMPLE.fullmatch(line)
        assert match, line
        name, labels, value = match.groups()
        suffixes = _HISTOGRAM_SUFFIXES if types[family] == "histogram" else ("",)
        assert name in {family + suffix for suffix in suffixes}, (family, line)
        key = (name, frozenset(re.findall(r'([a-zA-Z_]\w*)="((?:[^"\\]|\\.)*)"', labels or "")))
        assert key not in samples, line
        samples[key] = float(value)
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    """A sample's value, 0 for one not there yet (a counter not yet touched)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(client) -> tuple[Samples, dict[str, str]]:
    response = await client.request("GET", "/metrics")
    assert (response.status, response.headers["content-type"]) == (200, "text/plain; version=0.0.4; charset=utf-8")
    return parse(response.content.decode())


@pytest.fixture(scope="module")
def daemon(tiny_model):
    with running_daemon() as daemon:
        trio.run(register, daemon, tiny_model)
        yield daemon


async def test_metrics_count_the_jobs_tokens_and_workers_the_daemon_served(daemon):
    async with daemon.client() as client:
        before, _ = await scrape(client)
        infer = {"operation": "infer", "model": "tiny", "prompt": "The capital of France is", "seed": 1}
        results = [await job_result(client, infer | {"max_tokens": n}) for n in (3, 9)]
        embedded = await job_result(client, {"operation": "embed", "model": "tiny", "input": ["one", "two words"]})
        assert "unknown model" in await job_error(client, infer | {"model": "nope"})
        cancelled = await submit(client, {"operation": "hive_list"})
        assert (await client.request("DELETE", f"/v1/jobs/{cancelled}")).status == 200
        worker = await job_result(client, {"operation": "worker_get", "id": results[0]["worker_id"]})
        models = await job_result(client, {"operation": "model_list"})
        after, types = await scrape(client)

    def added(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Jobs, by operation and the state they ended in (the worker_get and model_list too).
    assert added("rbeed_jobs_finished_total", hive="localhost", operation="infer", state="completed") == 2
    assert added("rbeed_jobs_finished_total", hive="localhost", operation="infer", state="failed") == 1
    assert added("rbeed_jobs_finished_total", hive="localhost", operation="embed", state="completed") == 1
    assert added("rbeed_jobs_finished_total", hive="localhost", operation="hive_list", state="cancelled") == 1
    assert added("rbeed_jobs_finished_total", hive="localhost", operation="model_list", state="completed") == 1
    assert value(after, "rbeed_jobs", state="running") == value(after, "rbeed_jobs", state="queued") == 0
    assert value(after, "rbeed_jobs", state="failed") >= 1  # held until their TTL

    # Tokens, as the jobs' results count them; the time to each first token, as a histogram.
    tiny = {"model": "tiny"}
    finishes = {}
    for result in results:
        finishes[result["finish_reason"]] = finishes.get(result["finish_reason"], 0) + 1
    for reason, count in finishes.items():
        assert added("rbeed_generations_total", finish_reason=reason, **tiny) == count
    for total, field in (("prompt", "prompt_tokens"), ("prompt_cached", "cached_tokens"),
                         ("completion", "completion_tokens")):  # fmt: skip
        assert added(f"rbeed_{total}_tokens_total", **tiny) == sum(r[field] for r in results), total
    assert all(r["completion_tokens"] > 1 for r in results)
    ttft = "rbeed_time_to_first_token_seconds"
    assert added(f"{ttft}_count", **tiny) == 2
    assert added(f"{ttft}_sum", **tiny) == pytest.approx(sum(r["ttft_ms"] for r in results) / 1000, abs=1e-4)
    buckets = sorted((float(dict(labels)["le"]), v) for (name, labels), v in after.items()
                     if name == f"{ttft}_bucket" and dict(labels)["model"] == "tiny")  # fmt: skip
    assert [le for le, _ in buckets][-1] == float("inf") and len(buckets) == 12
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative
    assert buckets[-1][1] == value(after, f"{ttft}_count", **tiny)
    decode = sum((r["completion_tokens"] - 1) / r["tokens_per_s"] for r in results)
    assert added("rbeed_decode_seconds_total", **tiny) == pytest.approx(decode, rel=0.02)  # tok/s is rounded
    assert added("rbeed_embedded_inputs_total", **tiny) == 2
    assert added("rbeed_embedded_tokens_total", **tiny) == embedded["prompt_tokens"] > 2

    # Gauges read at the scrape: the worker, the catalog, the daemon's own process.
    where = {"worker": worker["id"], "model": "tiny", "device": "cpu"}
    assert value(after, "rbeed_workers", model="tiny", device="cpu", state="ready") == 1
    assert value(after, "rbeed_worker_threads", **where) == worker["threads"] >= 1
    assert value(after, "rbeed_worker_queued_jobs", **where) == 0
    assert value(after, "rbeed_worker_restarts_total", **where) == 0
    assert value(after, "rbeed_worker_resident_memory_bytes", **where) > 10 << 20  # llama.cpp and Python
    assert value(after, "rbeed_models") == len(models)
    assert value(after, "rbeed_http_connections") >= 1  # this scrape's
    assert 10 << 20 < value(after, "process_resident_memory_bytes") < 1 << 30
    assert time.time() - 600 < value(after, "process_start_time_seconds") < time.time()
    assert value(after, "process_open_fds") > 3 and value(after, "process_cpu_seconds_total") > 0
    assert value(after, "rbeed_build_info", version=__version__) == 1
    assert types["rbeed_jobs_finished_total"] == "counter" and types[ttft] == "histogram"
    assert types["rbeed_workers"] == "gauge"


async def test_a_cancelled_generation_counts_the_tokens_it_made(tiny_model):
    with running_daemon(env={"RBEED_WORKER_TOKEN_DELAY": "0.05"}) as slow:
        await register(slow, tiny_model)
        async with slow.client() as client:
            await job_result(client, {"operation": "infer", "model": "tiny", "prompt": "x", "max_tokens": 1})
            before, _ = await scrape(client)
            long = {"operation": "infer", "model": "tiny", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 200}
            async with job_events(client, long) as (job_id, events):
                received = await read_events_until(events, lambda e: e.event == "token" and json.loads(e.data)["i"] == 2)
                assert (await client.request("DELETE", f"/v1/jobs/{job_id}")).status == 200
                assert end_marker(await rest_of(events, timeout=5)) == "[CANCELLED]"
            # The worker's Done arrives after the job has ended: no job waits for it. The worker logs
            # the count once it has sent it, which the daemon may read after a scrape: bounded poll.
            made = int((await logged(slow, r"^rbeed-worker: generation \d+: cancelled, (\d+) tokens")).group(1))
            tiny = {"model": "tiny"}
            cancelled = {"finish_reason": "cancelled", **tiny}
            with trio.fail_after(5):
                while value(after := (await scrape(client))[0], "rbeed_generations_total", **cancelled) == 0:
                    await trio.sleep(0.01)
    assert value(after, "rbeed_generations_total", **cancelled) == 1
    assert value(after, "rbeed_generations_total", finish_reason="length", **tiny) == 1  # the first job only
    added = value(after, "rbeed_completion_tokens_total", **tiny) - value(before, "rbeed_completion_tokens_total", **tiny)
    assert added == made >= len([e for e in received if e.event == "token"]) == 3
    assert value(after, "rbeed_time_to_first_token_seconds_count", **tiny) == 2


async def test_a_generation_whose_worker_died_counts_as_an_error_with_its_tokens(tiny_model):
    with running_daemon("[workers]\nrestart = 'no'\n", {"RBEED_WORKER_TOKEN_DELAY": "0.05"}) as slow:
        await register(slow, tiny_model)
        async with slow.client() as client:
            before, _ = await scrape(client)
            long = {"operation": "infer", "model": "tiny", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 200}
            async with job_events(client, long) as (_, events):
                received = await read_events_until(events, lambda e: e.event == "token" and json.loads(e.data)["i"] == 2)
                [worker] = await job_result(client, {"operation": "worker_list"})
                worker_id = worker["id"]
                os.kill(worker["pid"], signal.SIGKILL)
                received += await rest_of(events, timeout=5)
            assert end_marker(received).startswith(f"[ERROR] worker {worker_id} died")
            after, _ = await scrape(client)
    tiny = {"model": "tiny"}
    # Its tokens were made all the same: they went uncounted, as did the generation.
    assert value(after, "rbeed_generations_total", finish_reason="error", **tiny) == 1
    added = value(after, "rbeed_completion_tokens_total", **tiny) - value(before, "rbeed_completion_tokens_total", **tiny)
    assert added == sum(e.event == "token" for e in received) >= 3
    # Failed (restart = "no"), it is listed, and holds no threads: the sum of the gauge was more than the CPUs.
    assert value(after, "rbeed_workers", model="tiny", device="cpu", state="failed") == 1
    assert ("rbeed_worker_threads", frozenset({"worker": worker_id, "model": "tiny", "device": "cpu"}.items())) not in after


async def test_metrics_is_read_only(daemon):
    async with daemon.client() as client:
        posted = await client.request("POST", "/metrics", body=b"")
        head = await client.request("HEAD", "/metrics")
    assert (posted.status, posted.headers["allow"]) == (405, "GET")
    assert (head.status, head.content) == (200, b"")


def test_label_values_are_escaped_and_histograms_are_cumulative():
    out = Exposition()
    out.family("x_total", "counter", "Some help.", [({"a": 'q"uote\\back\nline', "b": "plain"}, 2), ({}, 0.5)])
    histogram = Histogram((0.1, 1.0))
    for seconds in (0.05, 0.1, 0.5, 7):
        histogram.observe(seconds)
    out.histograms("h_seconds", "Times.", [({"m": "tiny"}, histogram)])
    assert out.encode().decode().splitlines() == [
        "# HELP x_total Some help.", "# TYPE x_total counter",
        'x_total{a="q\\"uote\\\\back\\nline",b="plain"} 2', "x_total 0.5",
        "# HELP h_seconds Times.", "# TYPE h_seconds histogram",
        'h_seconds_bucket{m="tiny",le="0.1"} 2', 'h_seconds_bucket{m="tiny",le="1.0"} 3',
        'h_seconds_bucket{m="tiny",le="+Inf"} 4', 'h_seconds_sum{m="tiny"} 7.65', 'h_seconds_count{m="tiny"} 4',
    ]  # fmt: skip
    parse(out.encode().decode())
