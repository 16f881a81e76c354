"""Workers on a GPU (cuda:N) end to end: the real daemon, a CUDA build of llama-cpp-python and the
GPUs nvidia-smi lists. Skipped where there are none (CI has none)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import llama_cpp
import numpy
import pytest
import trio

from support import (
    end_marker, is_token, job_error, job_events, job_result, read_events_until, register, rest_of, running_daemon,
    wait_pids_gone,
)  # fmt: skip
from test_embed import TEXTS
from test_infer import GREEDY, infer, text_of, tokens


def nvidia_smi(*args: str) -> list[str]:
    """nvidia-smi's output lines; none where it is missing or fails."""
    if (program := shutil.which("nvidia-smi")) is None:
        return []
    try:
        done = subprocess.run([program, *args], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return done.stdout.splitlines()


GPUS = sum(line.startswith("GPU ") for line in nvidia_smi("-L")) if llama_cpp.llama_supports_gpu_offload() else 0
pytestmark = pytest.mark.skipif(not GPUS, reason="needs a CUDA build of llama-cpp-python and an NVIDIA GPU")
SEEDED = GREEDY | {"temperature": 0.8, "seed": 7, "max_tokens": 30}


def gpu_memory_of(pid: int) -> int:
    """The GPU memory (MiB) that process `pid` holds, 0 if none."""
    for line in nvidia_smi("--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"):
        holder, _, used = line.partition(",")
        if holder.strip() == str(pid):
            return int(used)
    return 0


@pytest.fixture(scope="module")
def gpu_daemon(tiny_model):
    with running_daemon("[workers]\nthreads = 4\n") as daemon:
        trio.run(register, daemon, tiny_model)
        yield daemon


@pytest.fixture
async def client(gpu_daemon):
    async with gpu_daemon.client() as client:
        yield client


# In a process of its own, so that its GPU memory is freed when it exits.
REFERENCE = """
import json, sys
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=2048, n_batch=32, n_gpu_layers=-1, verbose=False)
runs = json.loads(sys.argv[2])
print(json.dumps([llm.create_completion(**run)["choices"][0]["text"] for run in runs]))
"""


def on_gpu(model, *runs: dict) -> list[str]:
    """llama-cpp-python's own texts for `runs` (create_completion's arguments), on GPU 0."""
    done = subprocess.run([sys.executable, "-c", REFERENCE, str(model), json.dumps(runs)], capture_output=True,
                          text=True, timeout=120, check=True)  # fmt: skip
    return json.loads(done.stdout)


async def spawn(client, device: str, **fields) -> dict:
    kind, _, index = device.partition(":")
    return await job_result(client, {"operation": "worker_spawn", "model": "tiny", "worker": kind,
                                     "device": int(index or 0), "threads": 1} | fields, timeout=120)  # fmt: skip


async def test_a_cuda_worker_holds_the_gpu_and_generates_as_llama_cpp_python_there(client, tiny_model):
    worker = await spawn(client, "cuda:0")
    assert worker["device"] == "cuda:0" and worker["state"] == "ready"
    held = gpu_memory_of(worker["pid"])
    greedy = text_of((await infer(client, GREEDY | {"worker_id": worker["id"]}))[0])
    seeded_events, seeded = await infer(client, SEEDED | {"device": "cuda"})  # any GPU: this worker
    await job_result(client, {"operation": "worker_delete", "id": worker["id"]})
    await wait_pids_gone([worker["pid"]])

    assert held > 0, "the worker holds no GPU memory"
    greedy_there, seeded_there = on_gpu(tiny_model, {"prompt": GREEDY["prompt"], "max_tokens": 20, "temperature": 0},
                                        {"prompt": SEEDED["prompt"], "max_tokens": 30, "temperature": 0.8, "seed": 7})
    assert greedy == greedy_there and greedy
    assert seeded["worker_id"] == worker["id"]
    assert text_of(seeded_events) == seeded_there
    assert gpu_memory_of(worker["pid"]) == 0


async def test_embeddings_on_a_gpu_are_the_cpus(client):
    on_cpu = await job_result(client, {"operation": "embed", "model": "tiny", "input": TEXTS, "device": "cpu"})
    on_cuda = await job_result(client, {"operation": "embed", "model": "tiny", "input": TEXTS, "device": "cuda"},
                               timeout=120)  # fmt: skip
    listed = await job_result(client, {"operation": "worker_list"})

    assert {w["device"] for w in listed} >= {"cpu", "cuda:0"}
    assert on_cuda["worker_id"] != on_cpu["worker_id"]
    cpu, cuda = numpy.array(on_cpu["embeddings"]), numpy.array(on_cuda["embeddings"])
    assert cuda.shape == cpu.shape == (len(TEXTS), 64)
    assert numpy.abs(cuda - cpu).max() < 1e-3
    assert numpy.allclose(numpy.linalg.norm(cuda, axis=1), 1.0, atol=1e-6)


async def test_a_gpu_that_is_not_there_fails_the_spawn_clearly(client):
    missing = f"cuda:{GPUS}"
    error = await job_error(client, {"operation": "worker_spawn", "model": "tiny", "worker": "cuda", "device": GPUS},
                            timeout=120)  # fmt: skip
    listed = await job_result(client, {"operation": "worker_list"})

    assert f"device {missing} is not available: cuda found no GPU" in error
    assert missing not in {w["device"] for w in listed}


@pytest.fixture(scope="module")
def slow_gpu_daemon(tiny_model):
    """Workers that pause 50 ms after each token, for a cancel to land mid-generation."""
    with running_daemon("[workers]\nthreads = 2\n", {"RBEED_WORKER_TOKEN_DELAY": "0.05"}) as daemon:
        trio.run(register, daemon, tiny_model)
        yield daemon


async def test_deleting_an_infer_mid_generation_on_a_gpu_stops_it_within_a_token(slow_gpu_daemon):
    async with slow_gpu_daemon.client() as client:
        worker = await spawn(client, "cuda:0")
        on_worker = GREEDY | {"worker_id": worker["id"]}
        async with job_events(client, on_worker | {"max_tokens": 100}) as (job_id, events):  # 5 s unless cancelled
            await read_events_until(events, is_token)
            response = await client.request("DELETE", f"/v1/jobs/{job_id}")
            rest = await rest_of(events, timeout=1)
        with trio.fail_after(2):
            _, after = await infer(client, on_worker | {"max_tokens": 3})

    assert response.status == 200
    assert end_marker(rest) == "[CANCELLED]" and len(tokens(rest)) <= 1
    assert re.search(r"^rbeed-worker: generation \d+: cancelled, [01] tokens", slow_gpu_daemon.log(), re.MULTILINE)
    assert after["completion_tokens"] == 3 and after["worker_id"] == worker["id"]
