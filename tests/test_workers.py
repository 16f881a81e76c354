"""Workers end to end: the real daemon spawning, supervising and stopping real llama.cpp worker processes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from support import (
    end_marker, is_narration, is_token, job_error, job_events, job_result, narrations, pid_alive, read_events_until,
    register, register_copy, rest_of, result_of, run_job, running_daemon, short_base, start_daemon, steady,
    until_pending, until_stopped, wait_pids_gone,
)  # fmt: skip
from rbeed import wire
from rbeed.config import WorkersConfig
from rbeed.jobs import Job
from rbeed.operations import Infer, Tokenize
from rbeed.workers import Generation, Worker, WorkerDied

# Each worker sleeps this long after every token, so a long generation can be hit mid-stream.
SLOW_TOKENS = {"RBEED_WORKER_TOKEN_DELAY": "0.05"}
CONFIG = """
[workers]
threads = 2
restart_backoff = 0.1
"""
RECORD_FIELDS = {"id", "model", "device", "pid", "state", "threads", "n_ctx", "started_at"}
# Greedy decoding of this prompt runs past 100 tokens without a sentence end: 5 s at SLOW_TOKENS.
LONG = {"operation": "infer", "model": "tiny", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 100}
SHORT = LONG | {"max_tokens": 3}


def spawn(threads: int | None = None, **fields) -> dict:
    return {"operation": "worker_spawn", "model": "tiny", **({"threads": threads} if threads else {}), **fields}


@asynccontextmanager
async def slow_daemon(tiny_model, config: str = CONFIG):
    """A daemon of its own for a test that stops, kills or freezes things: (daemon, leftovers).

    Its workers generate slowly; the tiny model is registered. At the end the daemon is killed,
    its directory removed, and every pid the test put in `leftovers` killed if still there: a
    worker frozen by SIGSTOP, or orphaned by a failed run, cannot notice the daemon is gone.
    """
    base = short_base()
    daemon = start_daemon(base, config=config, env=SLOW_TOKENS)
    leftovers: list[int] = []
    try:
        await register(daemon, tiny_model)
        yield daemon, leftovers
    finally:
        for pid in filter(pid_alive, leftovers):
            os.kill(pid, signal.SIGKILL)
        daemon.stop(signal.SIGKILL)
        shutil.rmtree(base)


@pytest.fixture(scope="module")
def rbeed(tiny_model):
    with running_daemon(CONFIG, SLOW_TOKENS) as daemon:
        trio.run(register, daemon, tiny_model)
        yield daemon


@pytest.fixture
async def client(rbeed):
    """A client of the module's daemon; the workers a test leaves behind are deleted after it."""
    async with rbeed.client() as client:
        yield client
        for worker in await job_result(client, {"operation": "worker_list"}):
            await job_result(client, {"operation": "worker_delete", "id": worker["id"]})


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


async def test_spawn_narrates_loading_and_returns_the_record_that_list_and_get_show(client):
    events = await run_job(client, spawn(threads=1))
    assert end_marker(events) == "[DONE]"
    assert [e.event for e in events] == ["narration", "narration", "result", "end"]
    record = result_of(events)
    worker_id = record["id"]
    assert narrations(events)[0] == f"loading tiny on cpu with 1 thread(s) and a context of 2048 tokens as worker {worker_id}"
    assert narrations(events)[1].startswith(f"worker {worker_id} ready in ")
    assert RECORD_FIELDS <= record.keys()
    assert (record["model"], record["device"], record["state"], record["threads"]) == ("tiny", "cpu", "ready", 1)
    assert (record["on_demand"], record["keep_alive"], record["stops_at"]) == (False, None, None)  # kept until deleted
    assert time.time() - 30 < record["started_at"] <= time.time()
    assert pid_alive(record["pid"])
    argv = cmdline(record["pid"])
    assert argv[argv.index("--threads") + 1] == "1" and argv[argv.index("--id") + 1] == worker_id
    resident = int(Path(f"/proc/{record['pid']}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert 10 << 20 < record["rss"] and abs(record["rss"] - resident) < 8 << 20  # python + llama.cpp + the model

    assert [steady(w) for w in await job_result(client, {"operation": "worker_list"})] == [steady(record)]
    assert steady(await job_result(client, {"operation": "worker_get", "id": worker_id})) == steady(record)

    stopped = await job_result(client, {"operation": "worker_delete", "id": worker_id})
    assert (stopped["id"], stopped["state"], stopped["rss"]) == (worker_id, "stopped", None)
    assert not pid_alive(record["pid"])  # stopped and reaped before the job ended
    assert await job_result(client, {"operation": "worker_list"}) == []
    assert await job_error(client, {"operation": "worker_get", "id": worker_id}) == f"unknown worker {worker_id!r}"


async def test_a_worker_loads_the_context_asked_for_up_to_the_models_own(client):
    default = await job_result(client, spawn(threads=1))
    own = await job_result(client, spawn(threads=1, n_ctx=0))
    # [workers] n_ctx by default; 0 asks for what the model was trained for (tinymodel's 32768).
    assert (default["n_ctx"], own["n_ctx"]) == (2048, 32768)
    for record in (default, own):
        argv = cmdline(record["pid"])
        assert int(argv[argv.index("--n-ctx") + 1]) == record["n_ctx"]
    await job_result(client, {"operation": "worker_delete", "id": own["id"]})
    assert await job_error(client, spawn(threads=1, n_ctx=32769)) == "n_ctx 32769 is more than tiny was trained for (32768 tokens)"
    assert [w["id"] for w in await job_result(client, {"operation": "worker_list"})] == [default["id"]]


async def test_infer_uses_or_loads_a_worker_whose_context_holds_its_n_ctx(client):
    long = SHORT | {"prompt": "the cat and the dog " * 150}
    error = await job_error(client, long)
    prompt_tokens = int(re.fullmatch(
        r"prompt is (\d+) tokens, the context holds 2048; the model's holds 32768: ask for a larger one with n_ctx",
        error).group(1))  # fmt: skip
    assert 2048 < prompt_tokens < 4000
    [small] = await job_result(client, {"operation": "worker_list"})
    assert (small["n_ctx"], small["on_demand"]) == (2048, True)

    # As Ollama reloads a model for another num_ctx: the idle worker gives its threads to a new one.
    events = await run_job(client, long | {"n_ctx": 4000})
    assert end_marker(events) == "[DONE]"
    assert f"stopping idle worker {small['id']} to free 2 thread(s)" in narrations(events)
    large = result_of(events)["worker_id"]
    assert result_of(events)["prompt_tokens"] == prompt_tokens
    [record] = await job_result(client, {"operation": "worker_list"})
    assert (record["id"], record["n_ctx"]) == (large, 4000)

    # A larger context serves a smaller ask, and any ask at all.
    for n_ctx in (3000, None, 0):
        ask = {} if n_ctx is None else {"n_ctx": n_ctx}
        if n_ctx == 0:
            ask["worker_id"] = large
            assert await job_error(client, SHORT | ask) == f"worker {large} has a context of 4000 tokens, not 32768"
        else:
            assert (await job_result(client, SHORT | ask))["worker_id"] == large


async def test_the_decode_rate_spans_the_tokens_it_counts_only(client):
    # A generation that ends on the end-of-generation token counted that token's time, not the
    # token: its rate read (n-1)/n of one cut at n tokens. At SLOW_TOKENS both are ~20 tok/s.
    held = SHORT | {"format": {"enum": ["y"]}, "max_tokens": 50}  # "y" in quotes: 3 tokens
    stopped = await job_result(client, held)
    assert stopped["finish_reason"] == "stop" and stopped["completion_tokens"] == 3, str(stopped)
    cut = await job_result(client, held | {"max_tokens": stopped["completion_tokens"]})
    assert cut["finish_reason"] == "length"
    assert stopped["tokens_per_s"] / cut["tokens_per_s"] > 0.85, (stopped, cut)


async def test_worker_delete_ends_the_infer_running_on_it_with_an_error(client):
    worker = await job_result(client, spawn(threads=1))
    async with job_events(client, LONG | {"worker_id": worker["id"]}) as (_, events):
        await read_events_until(events, is_token)
        await job_result(client, {"operation": "worker_delete", "id": worker["id"]})
        rest = await rest_of(events, timeout=5)
    assert end_marker(rest) == f"[ERROR] worker {worker['id']} stopped"
    assert not pid_alive(worker["pid"])


async def test_threads_are_shared_out_and_never_oversubscribed(client):
    first = await job_result(client, spawn(threads=1))
    second = await job_result(client, spawn(threads=1))
    error = await job_error(client, spawn(threads=1))
    assert error == (f"no CPU threads free: 2 in all, held by {first['id']} (1), {second['id']} (1); "
                     "delete a worker first")  # fmt: skip
    assert [w["id"] for w in await job_result(client, {"operation": "worker_list"})] == [first["id"], second["id"]]
    # More than there are in all: no delete would help ("held by ..." sent the user deleting workers).
    assert await job_error(client, spawn(threads=3)) == ("threads 3 is more than the 2 the workers have in all "
                                                         "([workers] threads, else the CPUs)")  # fmt: skip
    await job_result(client, {"operation": "worker_delete", "id": second["id"]})
    assert "no CPU threads free" in await job_error(client, spawn(threads=2))
    third = await job_result(client, spawn())  # no thread count: what is free
    assert third["threads"] == 1
    assert sum(w["threads"] for w in await job_result(client, {"operation": "worker_list"})) == 2


async def test_an_idle_on_demand_worker_is_stopped_to_make_room(client):
    inferred = await job_result(client, SHORT)
    [on_demand] = await job_result(client, {"operation": "worker_list"})
    assert (on_demand["id"], on_demand["on_demand"], on_demand["threads"]) == (inferred["worker_id"], True, 2)
    events = await run_job(client, spawn(threads=1))
    assert end_marker(events) == "[DONE]"
    assert f"stopping idle worker {on_demand['id']} to free 2 thread(s)" in narrations(events)
    assert not pid_alive(on_demand["pid"])
    assert [w["id"] for w in await job_result(client, {"operation": "worker_list"})] == [result_of(events)["id"]]


async def test_a_busy_on_demand_worker_is_not_stopped_for_a_spawn(client):
    async with job_events(client, LONG) as (_, events):
        await read_events_until(events, is_token)
        assert "no CPU threads free" in await job_error(client, spawn(threads=1))
        [busy] = await job_result(client, {"operation": "worker_list"})
        assert pid_alive(busy["pid"])


@pytest.fixture
async def other_model(rbeed, client, tiny_model):
    """A second model, "other" (a copy of tiny), registered for one test and removed after it."""
    other = shutil.copyfile(tiny_model, rbeed.state_dir.parent / "other.gguf")
    await job_result(client, {"operation": "model_download", "model": str(other)})
    yield "other"
    for worker in await job_result(client, {"operation": "worker_list"}):
        await job_result(client, {"operation": "worker_delete", "id": worker["id"]})
    await job_result(client, {"operation": "model_delete", "id": "other"})


async def test_a_load_on_demand_waits_for_a_busy_on_demand_worker_to_drain(client, other_model):
    # As Ollama swaps models: an infer of another model waits for the busy on-demand worker to
    # finish its jobs, then that worker stops and the other model loads. Jobs for the first model
    # that come meanwhile are not queued on the draining worker, so they cannot starve the wait.
    async with job_events(client, LONG | {"max_tokens": 40}) as (_, busy_events):
        await read_events_until(busy_events, is_token)
        [busy] = await job_result(client, {"operation": "worker_list"})
        async with job_events(client, SHORT | {"model": other_model}) as (_, other_events):
            waiting = await read_events_until(other_events, lambda e: e.event == "narration")
            assert narrations(waiting) == [
                f"waiting for worker {busy['id']} to finish 1 job(s); it then stops to free 2 thread(s)"]
            async with job_events(client, SHORT) as (_, later_events):
                busy_rest = await rest_of(busy_events, timeout=10)
                other_rest = await rest_of(other_events, timeout=10)
                later_rest = await rest_of(later_events, timeout=10)
    assert end_marker(busy_rest) == end_marker(other_rest) == end_marker(later_rest) == "[DONE]"
    assert result_of(busy_rest)["completion_tokens"] == 40  # drained, not cut short
    assert result_of(other_rest)["worker_id"].startswith(f"{other_model}-cpu-")
    # Not queued on the draining worker: loaded anew, by its name once free.
    assert any(line.startswith("loading tiny on cpu") for line in narrations(later_rest)), later_rest
    assert result_of(later_rest)["worker_id"] == busy["id"] and not pid_alive(busy["pid"])


async def test_a_cancelled_wait_leaves_the_busy_worker_taking_jobs(client, other_model):
    async with job_events(client, LONG | {"max_tokens": 40}) as (_, busy_events):
        await read_events_until(busy_events, is_token)
        [busy] = await job_result(client, {"operation": "worker_list"})
        async with job_events(client, SHORT | {"model": other_model}) as (job_id, other_events):
            await read_events_until(other_events, lambda e: e.event == "narration")
            assert (await client.request("DELETE", f"/v1/jobs/{job_id}")).status == 200
            assert end_marker(await rest_of(other_events, timeout=2)) == "[CANCELLED]"
        async with job_events(client, SHORT) as (_, later_events):
            queued = await read_events_until(later_events, lambda e: e.event == "narration")
            assert narrations(queued) == [f"queued on worker {busy['id']} behind 1 job(s)"]
            later_rest = await rest_of(later_events, timeout=10)
        assert end_marker(await rest_of(busy_events, timeout=10)) == "[DONE]"
    assert result_of(later_rest)["worker_id"] == busy["id"]
    assert [w["id"] for w in await job_result(client, {"operation": "worker_list"})] == [busy["id"]]


async def test_a_model_waiting_to_load_cannot_be_deleted_from_under_its_job(client, other_model):
    # The load of `other` waits for the busy worker to drain; no worker for it is listed yet.
    async with job_events(client, LONG | {"max_tokens": 40}) as (_, busy_events):
        await read_events_until(busy_events, is_token)
        async with job_events(client, SHORT | {"model": other_model}) as (job_id, other_events):
            await read_events_until(other_events, lambda e: e.event == "narration")
            error = await job_error(client, {"operation": "model_delete", "id": other_model})
            assert error == (f"model {other_model} is being loaded for job {job_id}; "
                             "cancel that or delete its worker once loaded")  # fmt: skip
            other_rest = await rest_of(other_events, timeout=10)
        assert end_marker(await rest_of(busy_events, timeout=10)) == "[DONE]"
    assert end_marker(other_rest) == "[DONE]"
    assert result_of(other_rest)["completion_tokens"] == 3
    assert [m["id"] for m in await job_result(client, {"operation": "model_list"})] == [other_model, "tiny"]


async def test_metal_is_refused_clearly(client):
    assert await job_error(client, spawn(worker="metal")) == "device metal is only available on macOS; this host runs Linux"
    assert await job_result(client, {"operation": "worker_list"}) == []


async def test_an_unknown_model_is_refused_clearly(client):
    for payload in (spawn(model="nope"), SHORT | {"model": "nope"}):
        error = await job_error(client, payload)
        assert error.startswith("unknown model 'nope' (known: ") and "tiny" in error, error
    assert await job_result(client, {"operation": "worker_list"}) == []


async def test_cuda_on_a_cpu_only_build_is_refused_before_any_worker_is_stopped(client):
    llama_cpp = pytest.importorskip("llama_cpp")
    if llama_cpp.llama_supports_gpu_offload() or "CUDA :" in llama_cpp.llama_print_system_info().decode():
        pytest.skip("this llama-cpp-python build has CUDA")
    inferred = await job_result(client, SHORT)  # an idle on-demand worker holds every thread
    [idle] = await job_result(client, {"operation": "worker_list"})
    reason = 'llama-cpp-python was built without GPU support (cuda); reinstall it with CMAKE_ARGS="-DGGML_CUDA=on"'
    for payload, device in ((spawn(worker="cuda", device=1), "cuda:1"), (SHORT | {"device": "cuda"}, "cuda:0")):
        events = await run_job(client, payload)
        assert end_marker(events) == f"[ERROR] {reason}"
        assert narrations(events)[:1] == [f"checking that this llama.cpp build supports {device}"]
    assert [steady(w) for w in await job_result(client, {"operation": "worker_list"})] == [steady(idle)]
    assert idle["id"] == inferred["worker_id"] and pid_alive(idle["pid"])


async def test_a_model_whose_file_was_removed_is_refused_before_any_worker_is_stopped(rbeed, client, tiny_model):
    source, installed = await register_copy(rbeed, client, tiny_model, "gone")
    installed.unlink()
    await job_result(client, SHORT)  # an idle on-demand worker holds every thread
    [idle] = await job_result(client, {"operation": "worker_list"})
    reason = f"model gone's file {installed} is missing; model_download {source} again, or model_delete gone"
    for payload in (spawn(model="gone"), SHORT | {"model": "gone"}):
        assert await job_error(client, payload) == reason
    assert [steady(w) for w in await job_result(client, {"operation": "worker_list"})] == [steady(idle)]
    assert pid_alive(idle["pid"])
    restored = await job_result(client, {"operation": "model_download", "model": str(source)})
    assert restored["id"] == "gone" and installed.is_file()
    await job_result(client, {"operation": "model_delete", "id": "gone"})


async def test_a_bad_model_file_fails_the_spawn_with_the_reason(rbeed, client, tiny_model):
    _, installed = await register_copy(rbeed, client, tiny_model, "broken")
    content = installed.read_bytes()

    installed.write_bytes(b"<html>gone</html>" * 100)
    error = await job_error(client, spawn(model="broken"))
    assert error.startswith("worker broken-cpu-") and error.endswith(f"not a GGUF file: {installed}"), error

    installed.write_bytes(content[: len(content) // 2])
    error = await job_error(client, spawn(model="broken"))
    assert "failed to load broken: failed to load model: " in error, error
    assert "Traceback" not in error
    assert await job_result(client, {"operation": "worker_list"}) == []
    await job_result(client, {"operation": "model_delete", "id": "broken"})


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or not shutil.which("taskset"), reason="needs 2 CPUs, taskset")
async def test_threads_default_to_the_cpus_the_daemon_may_run_on(tiny_model):
    base = short_base()
    daemon = start_daemon(base, prefix=("taskset", "-c", "0"))  # as a cgroup's cpuset or taskset leave it
    try:
        await register(daemon, tiny_model)
        async with daemon.client() as client:
            worker = await job_result(client, spawn())
        assert worker["threads"] == 1
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.stop(signal.SIGKILL)
        shutil.rmtree(base)


async def test_a_worker_process_that_cannot_start_fails_its_spawn_at_once_with_the_reason(tiny_model):
    base = short_base()
    deep = base / ("d" * 100)  # too long a path for the worker's notify socket: bind() fails
    daemon = start_daemon(base, "--runtime-dir", str(deep))
    try:
        await register(daemon, tiny_model)
        async with daemon.client() as client:
            error = await job_error(client, spawn(), timeout=5)  # not after three restarts' backoff
        assert error.endswith(f"cannot start a worker process ({deep}/workers/tiny-cpu-1.notify): "
                              "AF_UNIX path too long"), error  # fmt: skip
        assert daemon.stop() == 0, daemon.log()
    finally:
        daemon.stop(signal.SIGKILL)
        shutil.rmtree(base)


@pytest.mark.parametrize(("number", "name"), [(signal.SIGKILL, "SIGKILL"), (signal.SIGRTMIN + 6, "SIGRTMIN+6")])
async def test_a_killed_worker_fails_its_job_promptly_and_is_restarted(rbeed, client, number, name):
    worker = await job_result(client, spawn(threads=1))
    async with job_events(client, LONG | {"worker_id": worker["id"]}) as (_, events):
        await read_events_until(events, is_token)
        os.kill(worker["pid"], number)
        rest = await rest_of(events, timeout=5)
    # A real-time signal, which signal.Signals does not name, was an internal error.
    assert end_marker(rest) == f"[ERROR] worker {worker['id']} died (killed by {name})"
    restarting = await job_result(client, {"operation": "worker_get", "id": worker["id"]})
    assert restarting["restarts"] == restarting["restarts_total"] == 1
    assert restarting["pid"] != worker["pid"]  # None until the new process runs: the old pid may be another's

    # Queued while it restarts, served by the new process.
    result = await job_result(client, SHORT | {"worker_id": worker["id"]}, timeout=10)
    assert (result["worker_id"], result["completion_tokens"]) == (worker["id"], 3)
    restarted = await job_result(client, {"operation": "worker_get", "id": worker["id"]})
    assert restarted["state"] == "ready" and restarted["pid"] != worker["pid"] and pid_alive(restarted["pid"])
    # A job served starts the count in a row over; the total, which /metrics shows as a counter, stays.
    assert (restarted["restarts"], restarted["restarts_total"]) == (0, 1)
    assert not pid_alive(worker["pid"])
    assert await job_result(client, {"operation": "worker_list"}) == [restarted]
    assert f"worker {worker['id']} killed by {name}; restart 1 in 0.1 s" in rbeed.log()  # restart_backoff


async def test_without_restart_a_killed_worker_is_failed_and_sigterm_stops_the_others(tiny_model):
    async with slow_daemon(tiny_model, CONFIG + 'restart = "no"\n') as (daemon, _):
        async with daemon.client() as client:
            killed = await job_result(client, spawn(threads=1))
            other = await job_result(client, spawn(threads=1))
            async with job_events(client, LONG | {"worker_id": killed["id"]}) as (_, events):
                await read_events_until(events, is_token)
                os.kill(killed["pid"], signal.SIGKILL)
                rest = await rest_of(events, timeout=5)
            assert end_marker(rest) == f"[ERROR] worker {killed['id']} died (killed by SIGKILL)", daemon.log()
            failed = await job_result(client, {"operation": "worker_get", "id": killed["id"]})
            assert (failed["state"], failed["error"], failed["restarts"]) == ("failed", "killed by SIGKILL", 0)
            assert failed["pid"] is None
            error = await job_error(client, SHORT | {"worker_id": killed["id"]})
            assert error == f"worker {killed['id']} is failed: killed by SIGKILL"
            assert (await job_result(client, SHORT))["worker_id"] == other["id"]  # the daemon goes on
        assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
        assert not pid_alive(other["pid"])  # stopped and reaped before the daemon exited


async def test_a_worker_that_does_not_end_a_cancelled_generation_is_restarted(tiny_model):
    # SIGSTOP stands for a worker stuck in llama.cpp: it neither reads the Cancel nor answers.
    async with slow_daemon(tiny_model, CONFIG + "cancel_timeout = 0.5\nstop_grace = 60\n") as (daemon, leftovers):
        async with daemon.client() as client:
            worker = await job_result(client, spawn(threads=1))
            async with job_events(client, LONG | {"worker_id": worker["id"]}) as (job_id, events):
                await read_events_until(events, is_token)
                leftovers.append(worker["pid"])
                os.kill(worker["pid"], signal.SIGSTOP)
                await until_stopped(worker["pid"])
                assert (await client.request("DELETE", f"/v1/jobs/{job_id}")).status == 200
                rest = await rest_of(events, timeout=5)
            assert end_marker(rest) == "[CANCELLED]"
            # Stopped at once once found hung, not after a stop_grace spent waiting for it to exit.
            await until_pending(worker["pid"], signal.SIGTERM)
            os.kill(worker["pid"], signal.SIGKILL)  # as its stop_grace would, 60 s on
            # Queued behind the hung generation, served by the worker's next process.
            result = await job_result(client, SHORT | {"worker_id": worker["id"]}, timeout=10)
            assert (result["worker_id"], result["completion_tokens"]) == (worker["id"], 3)
            restarted = await job_result(client, {"operation": "worker_get", "id": worker["id"]})
            assert restarted["pid"] != worker["pid"] and not pid_alive(worker["pid"])
        reason = "did not stop its generation within 0.5 s of a cancel"
        assert f"worker {worker['id']} {reason}; restart 1 in 0.1 s" in daemon.log()


async def test_a_job_for_a_worker_being_deleted_waits_and_loads_its_model_anew(tiny_model):
    # SIGSTOP holds the deleted worker's process for the stop grace: a window in which the worker
    # still holds its threads. A job for its model that comes then must neither be queued on it
    # ("[ERROR] worker ... stopped") nor fail for want of threads: it waits, then loads anew.
    async with slow_daemon(tiny_model, CONFIG + "stop_grace = 0.5\n") as (daemon, leftovers):
        async with daemon.client() as client, daemon.client() as deleting:
            worker = await job_result(client, spawn(threads=2))
            leftovers.append(worker["pid"])
            os.kill(worker["pid"], signal.SIGSTOP)
            stopping = f"stopping worker {worker['id']} (pid {worker['pid']})"
            async with job_events(deleting, {"operation": "worker_delete", "id": worker["id"]}) as (_, deletion):
                await read_events_until(deletion, is_narration(stopping))
                events = await run_job(client, SHORT)
                assert end_marker(await rest_of(deletion, timeout=5)) == "[DONE]"
        assert end_marker(events) == "[DONE]", events
        assert result_of(events)["worker_id"] == worker["id"]  # a new worker, by the name free again
        assert narrations(events)[0].startswith("loading tiny on cpu with 2 thread(s)")
        assert not pid_alive(worker["pid"])
        # The delete, ending after the new worker took the id, unlisted that one (half the runs):
        # a worker nobody could see or delete, holding its threads.
        async with daemon.client() as client:
            [listed] = await job_result(client, {"operation": "worker_list"})
        assert listed["id"] == worker["id"] and listed["pid"] != worker["pid"] and pid_alive(listed["pid"])


async def test_workers_exit_when_the_daemon_is_killed(tiny_model):
    async with slow_daemon(tiny_model) as (daemon, leftovers):
        async with daemon.client() as client:
            pids = [(await job_result(client, spawn(threads=1)))["pid"] for _ in range(2)]
        leftovers += pids
        assert all(map(pid_alive, pids))
        assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
        await wait_pids_gone(pids, timeout=10)
        workers_dir = daemon.runtime_dir / "workers"
        assert sorted(p.name for p in workers_dir.iterdir()) == ["tiny-cpu-1.notify", "tiny-cpu-2.notify"]
        # The next daemon on this runtime dir removes them (its workers would reuse some paths only).
        again = start_daemon(daemon.socket_path.parent, config=CONFIG)
        try:
            assert list(workers_dir.iterdir()) == []
            assert f"removed 2 leftover worker file(s) from {workers_dir}" in again.log()
            assert again.stop() == 0
        finally:
            again.stop(signal.SIGKILL)


async def test_a_worker_deleted_while_it_loads_fails_its_spawn(rbeed, client, tiny_model):
    _, installed = await register_copy(rbeed, client, tiny_model, "stuck")
    installed.unlink()
    os.mkfifo(installed)  # the worker's open() blocks until someone writes: it loads forever
    try:
        async with job_events(client, spawn(model="stuck")) as (_, events):
            [loading] = narrations(await read_events_until(events, lambda e: e.event == "narration"))
            worker_id = loading.rsplit(" ", 1)[1]
            stopped = await job_result(client, {"operation": "worker_delete", "id": worker_id})
            rest = await rest_of(events, timeout=5)
        assert stopped["state"] == "stopped" and not pid_alive(stopped["pid"])
        assert end_marker(rest) == f"[ERROR] worker {worker_id} stopped while loading stuck"
        assert await job_result(client, {"operation": "worker_list"}) == []
    finally:
        installed.unlink()
        await job_result(client, {"operation": "model_delete", "id": "stuck"})


async def test_a_worker_not_loaded_within_load_timeout_fails_its_spawn_and_is_not_restarted(tiny_model):
    async with slow_daemon(tiny_model, CONFIG + "load_timeout = 1\n") as (daemon, _):
        async with daemon.client() as client:
            _, installed = await register_copy(daemon, client, tiny_model, "stuck")
            installed.unlink()
            os.mkfifo(installed)  # the worker's open() blocks until someone writes: it loads forever
            # Was "internal error: TooSlowError", after three restarts that each waited it out again.
            error = await job_error(client, spawn(model="stuck"), timeout=5)
            assert error == "worker stuck-cpu-1 failed to load stuck: model not loaded within 1 s"
            assert await job_result(client, {"operation": "worker_list"}) == []
            assert (await job_result(client, spawn(threads=2)))["state"] == "ready"  # its threads are free
        assert "restart" not in daemon.log() and "Traceback" not in daemon.log()


def allowed_cpus(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Cpus_allowed_list:"))


async def test_cpu_affinity_pins_workers_and_bounds_the_thread_budget(tiny_model):
    # One CPU in the list: the budget is one thread, whatever the machine has.
    with running_daemon("[workers]\ncpu_affinity = \"0\"\n", {}) as daemon:
        await register(daemon, tiny_model)
        async with daemon.client() as client:
            record = await job_result(client, spawn())
            assert record["threads"] == 1
            assert allowed_cpus(record["pid"]) == "0"
            argv = cmdline(record["pid"])
            assert argv[argv.index("--cpu-affinity") + 1] == "0"
            assert "no CPU threads free" in await job_error(client, spawn())


# -- Worker.serve against a worker scripted over an in-memory stream: orders of frames that a real
# worker gives only by chance.


def scripted(**config) -> tuple[Worker, Generation, Generation]:
    """A worker (not on demand), a generation and a tokenize for it."""
    worker = Worker("w1", "tiny", Path("tiny.gguf"), "cpu", 1, 2048, 32, Path("w1.sock"), WorkersConfig(**config),
                    on_demand=False, keep_alive=None)  # fmt: skip
    generation = Generation(Job(Infer(model="tiny", prompt="x"), 16), False, prompt="x", max_tokens=5,
                            temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0,
                            presence_penalty=0.0, frequency_penalty=0.0)  # fmt: skip
    tokenize = Generation(Job(Tokenize(model="tiny", text="x"), 16), False, wire.Tokenize, text="x")
    return worker, generation, tokenize


async def frames(stream, decoder: wire.FrameDecoder) -> list:
    return decoder.feed(await stream.receive_some(65536))


async def test_a_tokenize_sent_aside_is_answered_after_a_cancelled_generation_ends_late(autojump_clock):
    # The generation's Done comes just within cancel_timeout of its cancel, the tokenize's answer
    # after that deadline: it is still read, not left in the stream until the next job.
    worker, generation, tokenize = scripted(cancel_timeout=1.0)
    ours, theirs = trio.testing.memory_stream_pair()
    decoder = wire.FrameDecoder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.serve, ours)
        worker.submit(generation)
        [sent] = await frames(theirs, decoder)
        assert sent == generation.request and await worker.submit_aside(tokenize)
        assert await frames(theirs, decoder) == [tokenize.request]
        await worker.abandon(generation)
        assert await frames(theirs, decoder) == [wire.Cancel(generation.request.id)]
        await trio.sleep(0.8)
        await theirs.send_all(wire.encode(wire.Done(generation.request.id, 1, 0, "cancelled", 0.0, 0.0)))
        await trio.sleep(0.5)
        await theirs.send_all(wire.encode(wire.Tokenized(tokenize.request.id, [7], [b"x"])))
        with trio.fail_after(5):
            await tokenize.done.wait()
        assert tokenize.outcome == wire.Tokenized(tokenize.request.id, [7], [b"x"])
        assert (worker.current, worker.aside) == (None, {})
        nursery.cancel_scope.cancel()


async def test_a_worker_that_died_takes_nothing_aside(autojump_clock):
    worker, generation, tokenize = scripted()
    ours, theirs = trio.testing.memory_stream_pair()
    worker.submit(generation)

    async def hang_up() -> None:
        await frames(theirs, wire.FrameDecoder())
        await theirs.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hang_up)
        with pytest.raises(WorkerDied, match="closed its connection"):
            await worker.serve(ours)
    # The supervisor fails the generation and restarts the worker: the tokenize queues for that.
    assert worker.current is generation and not await worker.submit_aside(tokenize)


async def test_tokenizes_aside_are_bounded_by_the_queue_size(autojump_clock):
    worker, generation, tokenize = scripted(queue_size=1)
    ours, theirs = trio.testing.memory_stream_pair()
    worker.submit(generation)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.serve, ours)
        decoder = wire.FrameDecoder()
        await frames(theirs, decoder)
        another = Generation(tokenize.job, False, wire.Tokenize, text="y")
        assert await worker.submit_aside(tokenize) and not await worker.submit_aside(another)
        nursery.cancel_scope.cancel()
