"""Models end to end: model_* jobs on the real daemon, from local files and a real HTTP server."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
from contextlib import asynccontextmanager
from functools import partial

import gguf
import pytest
import trio

import tinymodel
from httpfixture import RecordedRequest, Reply, serve_files
from support import (
    end_marker, is_narration, job_error, job_events, job_result, logged, narrations, read_events_until,
    register_copy, rest_of, result_of, run_job, running_daemon, short_base, start_daemon,
)  # fmt: skip
from test_infer import CHAT_TEMPLATE

MiB = 1 << 20


@pytest.fixture(scope="module")
def tiny(tiny_model):
    """The tiny model's bytes, sha256 and the metadata gguf's own reader finds in it."""
    reader = gguf.GGUFReader(tiny_model)
    content = tiny_model.read_bytes()
    metadata = {
        "architecture": "llama",
        "parameters": sum(int(tensor.n_elements) for tensor in reader.tensors),
        "file_type": int(gguf.LlamaFileType.ALL_F32),
        "quantization": "ALL_F32",
        "context_length": reader.fields["llama.context_length"].contents(),
        "chat_template": False,
    }
    return content, hashlib.sha256(content).hexdigest(), metadata


# Downloads that fail midway are retried twice in a row without new bytes, 0.05 s then 0.1 s later.
# A worker that ignores SIGTERM (one stopped with SIGSTOP) is killed only after a minute.
CONFIG = """
[models]
download_retries = 2
download_retry_delay = 0.05
[workers]
stop_grace = 60
"""


@pytest.fixture(scope="module")
def rbeed():
    with running_daemon(CONFIG) as daemon:
        yield daemon


@pytest.fixture
async def client(rbeed):
    async with rbeed.client() as client:
        yield client


def download(source: str, **fields) -> dict:
    return {"operation": "model_download", "model": source, **fields}


def assert_progress(events, size: int) -> None:
    """Progress events count bytes up to the whole size."""
    reports = [json.loads(e.data) for e in events if e.event == "progress"]
    assert reports, events
    assert [r["done"] for r in reports] == sorted(r["done"] for r in reports)
    assert all(r["done"] <= r["total"] == size and r["rate"] >= 0 for r in reports)
    assert reports[-1]["done"] == size


def leftovers(daemon, name: str) -> list[str]:
    """Files of the models directory that start with `name`."""
    models = daemon.state_dir / "models"
    return sorted(p.name for p in models.iterdir() if p.name.startswith(name)) if models.exists() else []


async def assert_unknown(client, model_id: str) -> None:
    assert (await job_error(client, {"operation": "model_get", "id": model_id})).startswith(f"unknown model {model_id!r}")
    assert model_id not in [m["id"] for m in await job_result(client, {"operation": "model_list"})]


async def test_local_path_is_copied_with_progress_and_recorded_with_metadata(rbeed, client, tiny_model, tiny):
    content, sha256, metadata = tiny
    events = await run_job(client, download(str(tiny_model)))
    assert end_marker(events) == "[DONE]"
    assert narrations(events)[0] == f"downloading {tiny_model} as model tiny"
    assert_progress(events, len(content))
    record = json.loads(next(e.data for e in events if e.event == "result"))
    assert (record["id"], record["file"], record["size"], record["sha256"]) == ("tiny", "tiny.gguf", len(content), sha256)
    assert record["source"] == str(tiny_model)
    assert {key: record["metadata"][key] for key in metadata} == metadata
    assert (rbeed.state_dir / "models" / "tiny.gguf").read_bytes() == content
    assert leftovers(rbeed, "tiny") == ["tiny.gguf"]  # no .part left behind

    assert await job_result(client, {"operation": "model_get", "id": "tiny"}) == record
    assert record in await job_result(client, {"operation": "model_list"})

    again = await run_job(client, download(str(tiny_model)))
    assert [e.event for e in again] == ["narration", "result", "end"]  # no copy: at once
    assert narrations(again) == ["model tiny is already present"]
    assert json.loads(again[1].data) == record
    elsewhere = await run_job(client, download(tiny_model.as_uri()))  # the same name from another source
    assert narrations(elsewhere) == [f"model tiny is already present, from {tiny_model}; model_delete it to fetch this one"]
    assert json.loads(elsewhere[1].data) == record


async def test_a_download_given_a_system_and_defaults_records_them_and_sets_them_anew_when_present(
        rbeed, client, tiny_model, tmp_path):  # fmt: skip
    chat = tinymodel.write_tiny_model(tmp_path / "talker.gguf", chat_template=CHAT_TEMPLATE)
    made = await job_result(client, download(str(chat), system="Be brief.", defaults={"max_tokens": 3}))
    assert (made["id"], made["system"], made["defaults"]) == ("talker", "Be brief.", {"max_tokens": 3})
    ask = {"operation": "infer", "model": "talker", "stream": False, "temperature": 0}
    answer = await job_result(client, ask | {"prompt": "Once upon a time"})
    assert (answer["completion_tokens"], answer["finish_reason"]) == (3, "length")
    hi = [{"role": "user", "content": "Hi"}]
    by_model = await job_result(client, ask | {"messages": hi})
    spelled_out = await job_result(client, ask | {"messages": [{"role": "system", "content": "Be brief."}, *hi],
                                                  "keep_alive": 0})  # fmt: skip
    assert by_model["prompt_tokens"] == spelled_out["prompt_tokens"] and by_model["text"] == spelled_out["text"]
    # Present already: its record's are set anew ("" removes the system; defaults replace its own).
    events = await run_job(client, download(str(chat), system="", defaults={"top_k": 1}))
    assert narrations(events) == ["model talker is already present", "model talker's system, messages and defaults are set anew"]
    assert (result_of(events)["system"], result_of(events)["defaults"]) == (None, {"top_k": 1})
    assert await job_result(client, {"operation": "model_get", "id": "talker"}) == result_of(events)
    # A system message needs a chat template: refused for the tiny model, fetched or present.
    no_template = "model tiny-system has no chat template to put a system message in: it continues prompts as they are"
    assert await job_error(client, download(str(tiny_model), id="tiny-system", system="Hi.")) == no_template
    assert leftovers(rbeed, "tiny-system") == []
    await job_result(client, {"operation": "model_delete", "id": "talker"})


async def test_file_url_with_an_odd_name_gets_a_slug_id(rbeed, client, tiny_model, tiny):
    source = rbeed.state_dir.parent / "My Model (Q8_0).gguf"
    shutil.copyfile(tiny_model, source)
    record = await job_result(client, download(source.as_uri()))
    assert (record["id"], record["file"], record["sha256"]) == ("my-model-q8_0", "my-model-q8_0.gguf", tiny[1])
    assert record["source"] == source.as_uri()
    assert (rbeed.state_dir / "models" / "my-model-q8_0.gguf").read_bytes() == tiny[0]



async def test_an_id_given_names_the_model_instead_of_its_file_name(rbeed, client, tiny_model, tiny):
    record = await job_result(client, download(str(tiny_model), id="Tiny-Alias.v1"))
    assert (record["id"], record["file"], record["sha256"]) == ("tiny-alias.v1", "tiny-alias.v1.gguf", tiny[1])
    assert (rbeed.state_dir / "models" / "tiny-alias.v1.gguf").read_bytes() == tiny[0]
    again = await run_job(client, download(str(tiny_model), id="tiny-alias.v1"))
    assert narrations(again) == ["model tiny-alias.v1 is already present"]
    refused = await client.request("POST", "/v1/jobs", json=download(str(tiny_model), id="../escape"))
    assert refused.status == 400 and "`$.id`" in refused.json()["error"]
    await job_result(client, {"operation": "model_delete", "id": "tiny-alias.v1"})

async def test_a_model_is_named_by_its_id_or_by_its_file_name_in_any_case(rbeed, client, tiny_model):
    source = rbeed.state_dir.parent / "Named-Model.Q8_0.gguf"
    shutil.copyfile(tiny_model, source)
    record = await job_result(client, download(str(source)))
    assert record["id"] == "named-model.q8_0"
    for name in ("named-model.q8_0", "Named-Model.Q8_0", "Named-Model.Q8_0.gguf", "NAMED-MODEL.Q8_0.GGUF"):
        assert await job_result(client, {"operation": "model_get", "id": name}) == record
    worker = await job_result(client, {"operation": "worker_spawn", "model": "Named-Model.Q8_0.gguf", "threads": 1})
    try:
        assert worker["model"] == "named-model.q8_0"
        prompt = {"operation": "infer", "prompt": "Hi", "max_tokens": 2, "stream": False}
        for named in ({"model": "NAMED-MODEL.Q8_0"}, {"model": "Named-Model.Q8_0.gguf", "worker_id": worker["id"]}):
            result = await job_result(client, prompt | named)
            assert (result["model"], result["worker_id"]) == ("named-model.q8_0", worker["id"])  # no second load
        assert [w["id"] for w in await job_result(client, {"operation": "worker_list"})] == [worker["id"]]
        error = await job_error(client, {"operation": "model_delete", "id": "NAMED-MODEL.Q8_0"})
        assert error == f"model named-model.q8_0 is in use by worker(s) {worker['id']}; delete them first"
    finally:
        await job_result(client, {"operation": "worker_delete", "id": worker["id"]})
    assert (await job_result(client, {"operation": "model_delete", "id": "Named-Model.Q8_0.gguf"}))["id"] == record["id"]
    await assert_unknown(client, "named-model.q8_0")
    assert (await job_error(client, {"operation": "model_get", "id": "Named-Model.Q8_0"})).startswith(
        "unknown model 'Named-Model.Q8_0' (known: ")


async def test_http_download_is_verified_against_the_announced_sha256_and_recorded(rbeed, client, tiny):
    content, sha256, metadata = tiny
    async with serve_files({"web.gguf": content}, digest_header="x-linked-etag") as server:
        events = await run_job(client, download(server.url("web.gguf")))
    assert end_marker(events) == "[DONE]"
    assert_progress(events, len(content))
    assert "range" not in server.requests[0].headers
    record = await job_result(client, {"operation": "model_get", "id": "web"})
    assert (record["sha256"], record["size"], record["source"]) == (sha256, len(content), server.url("web.gguf"))
    assert {key: record["metadata"][key] for key in metadata} == metadata
    assert leftovers(rbeed, "web") == ["web.gguf"]


async def test_a_dropped_connection_is_resumed_with_range_in_the_same_job(rbeed, client, tiny):
    content, sha256, _ = tiny
    async with serve_files({"drop.gguf": content}) as server:
        server.drop_after["drop.gguf"] = 100_000
        events = await run_job(client, download(server.url("drop.gguf")))
    assert end_marker(events) == "[DONE]"
    assert [request.headers.get("range") for request in server.requests] == [None, "bytes=100000-"]
    retry = [line for line in narrations(events) if "resuming" in line]
    assert len(retry) == 1 and retry[0].endswith("; resuming from byte 100000 in 0.05 s"), retry
    assert_progress(events, len(content))
    assert (await job_result(client, {"operation": "model_get", "id": "drop"}))["sha256"] == sha256
    assert (rbeed.state_dir / "models" / "drop.gguf").read_bytes() == content
    assert leftovers(rbeed, "drop") == ["drop.gguf"]


async def test_a_download_that_keeps_failing_ends_with_the_error_and_the_next_one_resumes(rbeed, client, tiny):
    content, sha256, _ = tiny
    overloaded = True

    async def flaky(request: RecordedRequest) -> Reply:
        if overloaded and request.headers.get("range"):
            return Reply(503, {"content-type": "text/plain"}, b"overloaded\n")
        return server._file_reply("flaky.gguf", request)

    async with serve_files({"flaky.gguf": content}) as server:
        server.routes["/flaky.gguf"] = flaky
        server.drop_after["flaky.gguf"] = 100_000
        events = await run_job(client, download(server.url("flaky.gguf")))
        assert "503" in end_marker(events), events
        assert len([line for line in narrations(events) if "resuming" in line]) == 3  # the drop, then two 503s
        await assert_unknown(client, "flaky")
        assert (rbeed.state_dir / "models" / "flaky.gguf.part").stat().st_size == 100_000

        overloaded = False
        events = await run_job(client, download(server.url("flaky.gguf")))
    assert end_marker(events) == "[DONE]"
    assert server.requests[-1].headers["range"] == "bytes=100000-"
    assert "resumed from byte 100000" in narrations(events)
    assert (await job_result(client, {"operation": "model_get", "id": "flaky"}))["sha256"] == sha256
    assert leftovers(rbeed, "flaky") == ["flaky.gguf"]


async def test_a_second_download_of_a_model_follows_the_one_under_way(rbeed, client, tiny):
    content, sha256, _ = tiny
    gate = trio.Event()

    async def held_back(request: RecordedRequest) -> Reply:
        async def body():
            yield content[:1000]
            await gate.wait()
            yield content[1000:]

        return Reply(200, {"content-length": str(len(content))}, body())

    async with serve_files({}) as server:
        server.routes["/twice.gguf"] = held_back
        async with job_events(client, download(server.url("twice.gguf"))) as (first_id, first):
            await read_events_until(first, lambda e: e.event == "narration")
            async with job_events(client, download(server.url("twice.gguf"))) as (_, second):
                waiting = await read_events_until(second, lambda e: e.event == "narration")
                assert narrations(waiting) == [f"model twice is being downloaded by {first_id}; waiting for it to end"]
                gate.set()
                first_rest, second_rest = await rest_of(first, timeout=10), await rest_of(second, timeout=10)
    assert end_marker(first_rest) == end_marker(second_rest) == "[DONE]"
    assert narrations(second_rest) == ["model twice is already present"]
    assert result_of(first_rest) == result_of(second_rest)
    assert result_of(second_rest)["sha256"] == sha256
    assert len(server.requests) == 1


async def test_a_download_during_a_delete_of_the_model_waits_then_downloads_it_afresh(rbeed, client, tiny_model):
    source = shutil.copyfile(tiny_model, rbeed.state_dir.parent / "again.gguf")
    await job_result(client, download(str(source)))
    # Hold SQLite's write lock so that the delete stays in its catalog write.
    database = sqlite3.connect(rbeed.state_dir / "rbeed.sqlite3", isolation_level=None)
    try:
        database.execute("BEGIN IMMEDIATE")
        async with job_events(client, {"operation": "model_delete", "id": "again"}) as (_, deleting):
            with trio.fail_after(5):  # bounded poll: the delete has begun once lookups refuse the model
                while "being deleted" not in (await job_error(client, {"operation": "model_get", "id": "again"})):
                    await trio.sleep(0.01)
            async with job_events(client, download(str(source))) as (job_id, downloading):
                assert (await client.request("GET", f"/v1/jobs/{job_id}")).json()["state"] == "running"
                database.execute("COMMIT")
                deleted, downloaded = await rest_of(deleting, timeout=10), await rest_of(downloading, timeout=10)
    finally:
        database.close()
    assert end_marker(deleted) == end_marker(downloaded) == "[DONE]"
    assert narrations(downloaded)[0] == f"downloading {source} as model again"  # not "already present"
    assert (await job_result(client, {"operation": "model_get", "id": "again"}))["size"] == source.stat().st_size
    assert leftovers(rbeed, "again") == ["again.gguf"]


@pytest.mark.parametrize(("content", "reason"), [
    (b"<!DOCTYPE html><html>Not found</html>\n" * 50, "not a GGUF file (magic b'<!DO', expected b'GGUF')"),
    (b"GGUF" + bytes(range(256)) * 8, "not a valid GGUF model: "),
], ids=["bad magic", "bad header"])  # fmt: skip
async def test_a_file_that_is_not_a_model_is_an_error_and_leaves_nothing(rbeed, client, content, reason):
    async with serve_files({"bad.gguf": content}) as server:
        error = await job_error(client, download(server.url("bad.gguf")))
    assert reason in error
    await assert_unknown(client, "bad")
    assert leftovers(rbeed, "bad") == []


async def test_a_wrong_sha256_is_an_error_and_leaves_nothing(rbeed, client, tiny):
    content, sha256, _ = tiny
    async with serve_files({"wrong.gguf": content}) as server:
        error = await job_error(client, download(server.url("wrong.gguf"), sha256="ab" * 32))
    assert error == f"sha256 mismatch: expected {'ab' * 32}, got {sha256}"
    await assert_unknown(client, "wrong")
    assert leftovers(rbeed, "wrong") == []


async def test_cancelling_a_download_keeps_the_part_and_the_next_one_resumes(rbeed, client, tiny):
    content = tiny[0] + bytes(MiB)  # over one MiB: the daemon writes its first block to disk
    stall = MiB + 1000
    part = rbeed.state_dir / "models" / "stall.gguf.part"
    async with serve_files({"stall.gguf": content}) as server:
        server.stall_after["stall.gguf"] = stall
        async with job_events(client, download(server.url("stall.gguf"))) as (job_id, events):
            with trio.fail_after(10):  # bounded poll of the disk: no event says a block was written
                while not part.exists() or part.stat().st_size < MiB:
                    await trio.sleep(0.02)
            assert not (rbeed.state_dir / "models" / "stall.gguf").exists()
            error = await job_error(client, {"operation": "model_delete", "id": "stall"})
            assert error == f"model stall is being downloaded by {job_id}; cancel that first"
            assert (await client.request("DELETE", f"/v1/jobs/{job_id}")).status == 200
            assert end_marker(await rest_of(events, timeout=5)) == "[CANCELLED]"
        kept = part.stat().st_size
        assert MiB <= kept <= stall and part.read_bytes() == content[:kept]
        await assert_unknown(client, "stall")

        del server.stall_after["stall.gguf"]
        events = await run_job(client, download(server.url("stall.gguf")))
    assert end_marker(events) == "[DONE]"
    assert server.requests[-1].headers["range"] == f"bytes={kept}-"
    assert_progress(events, len(content))
    assert f"resumed from byte {kept}" in narrations(events)
    record = await job_result(client, {"operation": "model_get", "id": "stall"})
    assert (record["size"], record["sha256"]) == (len(content), hashlib.sha256(content).hexdigest())
    assert leftovers(rbeed, "stall") == ["stall.gguf"]


async def test_a_download_cancelled_while_its_metadata_is_read_leaves_no_file_without_a_record(rbeed, client, tiny):
    source = rbeed.state_dir.parent / "late.gguf"
    source.write_bytes(tiny[0])
    async with job_events(client, download(str(source))) as (job_id, events):
        await read_events_until(events, lambda e: e.event == "narration" and "reading metadata" in e.data)
        # Reading it takes a Python subprocess's start (~0.1 s or more): the cancel lands in it.
        assert (await client.request("DELETE", f"/v1/jobs/{job_id}")).status == 200
        assert end_marker(await rest_of(events, timeout=5)) == "[CANCELLED]"
    await assert_unknown(client, "late")
    assert leftovers(rbeed, "late") == []  # installed and kept, it would be a file no model names
    assert (await job_result(client, download(str(source))))["id"] == "late"
    assert leftovers(rbeed, "late") == ["late.gguf"]


async def test_a_model_whose_file_was_gone_is_said_so_and_a_failed_download_of_it_leaves_no_file(
        rbeed, client, tiny):  # fmt: skip
    source = rbeed.state_dir.parent / "regone.gguf"
    source.write_bytes(tiny[0])
    record = await job_result(client, download(str(source)))
    (path := rbeed.state_dir / "models" / "regone.gguf").unlink()  # removed by hand
    for lookup in ({"operation": "model_get", "id": "regone"}, {"operation": "model_list"}):
        events = await run_job(client, lookup)
        assert f"model regone: its file {path} is missing; model_download fetches it again" in narrations(events)[0]
    source.write_bytes(tiny[0][:300_000])
    assert "truncated" in await job_error(client, download(str(source)))
    # Kept under the record, it was "already present" from then on, and a worker loaded it.
    assert leftovers(rbeed, "regone") == []
    source.write_bytes(tiny[0])
    events = await run_job(client, download(str(source)))
    assert narrations(events)[0] == f"downloading {source} as model regone"
    assert result_of(events) | {"added_at": record["added_at"]} == record


async def test_model_delete_of_a_model_only_partly_downloaded_removes_its_part(rbeed, client, tiny):
    models = rbeed.state_dir / "models"
    models.mkdir(exist_ok=True)  # made by the first download: none yet if this test runs alone
    (models / "half.gguf.part").write_bytes(tiny[0][:1000])
    (models / "half.gguf.part.from").write_text("{}")
    events = await run_job(client, {"operation": "model_delete", "id": "half"})
    assert narrations(events) == ["the partial download of model half removed (1000 bytes freed)"]
    assert result_of(events) == {"id": "half", "deleted": True} and leftovers(rbeed, "half") == []
    assert (await job_error(client, {"operation": "model_delete", "id": "half"})).startswith("unknown model 'half'")


async def test_model_delete_refuses_while_the_models_file_is_fetched_again(rbeed, client, tiny):
    content = tiny[0]
    async with serve_files({"refetch.gguf": content}) as server:
        record = await job_result(client, download(server.url("refetch.gguf")))
        (rbeed.state_dir / "models" / "refetch.gguf").unlink()
        server.stall_after["refetch.gguf"] = 1000
        async with job_events(client, download(server.url("refetch.gguf"))) as (job_id, downloading):
            await read_events_until(downloading, lambda e: e.event == "progress")
            error = await job_error(client, {"operation": "model_delete", "id": "refetch"})
            # Deleted meanwhile, the download wrote the record back: a model the delete said was gone.
            assert error == f"model refetch is being written by {job_id}; cancel that or wait for it"
            assert await job_result(client, {"operation": "model_get", "id": "refetch"}) == record
            assert (await client.request("DELETE", f"/v1/jobs/{job_id}")).status == 200
            assert end_marker(await rest_of(downloading, timeout=5)) == "[CANCELLED]"
    assert leftovers(rbeed, "refetch") == ["refetch.gguf.part", "refetch.gguf.part.from"]  # kept for a resume
    assert (await job_result(client, {"operation": "model_delete", "id": "refetch"}))["deleted"]
    await assert_unknown(client, "refetch")
    assert leftovers(rbeed, "refetch") == []


@pytest.mark.parametrize("payload", [
    {"operation": "model_get", "id": "../x"},
    {"operation": "model_delete", "id": "../../etc/passwd"},
    {"operation": "worker_spawn", "model": "a/b"},
    {"operation": "infer", "model": "..", "prompt": "hi"},
], ids=["model_get", "model_delete", "worker_spawn", "infer"])  # fmt: skip
async def test_ids_that_could_escape_are_refused_with_400(client, payload):
    response = await client.request("POST", "/v1/jobs", json=payload)
    assert response.status == 400
    assert "Expected `str` matching regex" in response.json()["error"]


@pytest.mark.parametrize("source", ["hf:../../etc/passwd.gguf", "hf:owner/repo/../../x.gguf", "hf:owner/repo/x.bin",
                                    "hf:owner/repo/a/%2e%2e/x.gguf", "hf:owner"])  # fmt: skip
async def test_bad_hf_sources_are_refused(rbeed, client, source):
    error = await job_error(client, download(source))
    assert error == f"bad hf: source {source!r}; expected hf:owner/repo/path/file.gguf"


async def test_unsupported_schemes_and_nameless_sources_are_refused(rbeed, client):
    assert "unsupported source scheme 'ftp'" in await job_error(client, download("ftp://127.0.0.1/x.gguf"))
    for relative in ("tiny.gguf", "../models/tiny.gguf", "file:tiny.gguf"):  # relative to what? not the daemon's cwd
        assert (await job_error(client, download(relative))).startswith(f"a local path must be absolute: {relative!r}")
    nameless = rbeed.state_dir.parent / "....gguf"
    nameless.write_bytes(b"GGUF")
    assert await job_error(client, download(str(nameless))) == "cannot derive a model id from '....gguf'"


async def test_a_url_naming_a_path_outside_still_lands_in_the_models_dir(rbeed, client, tiny):
    name = "%2E%2E%2F%2E%2E%2Fescape.gguf"  # "../../escape.gguf" once unquoted
    async with serve_files({name: tiny[0]}) as server:
        record = await job_result(client, download(server.url(name)))
    assert (record["id"], record["file"]) == ("escape", "escape.gguf")
    assert (rbeed.state_dir / "models" / "escape.gguf").read_bytes() == tiny[0]
    assert list(rbeed.state_dir.parent.rglob("escape*")) == [rbeed.state_dir / "models" / "escape.gguf"]


async def test_model_delete_refuses_while_a_worker_uses_it_then_removes_file_and_record(rbeed, client, tiny_model):
    source = rbeed.state_dir.parent / "doomed.gguf"
    shutil.copyfile(tiny_model, source)
    record = await job_result(client, download(str(source)))
    installed = rbeed.state_dir / "models" / "doomed.gguf"
    worker = await job_result(client, {"operation": "worker_spawn", "model": "doomed", "threads": 1})
    try:
        error = await job_error(client, {"operation": "model_delete", "id": "doomed"})
        assert error == f"model doomed is in use by worker(s) {worker['id']}; delete them first"
        assert installed.exists()
        assert await job_result(client, {"operation": "model_get", "id": "doomed"}) == record
    finally:
        await job_result(client, {"operation": "worker_delete", "id": worker["id"]})
    events = await run_job(client, {"operation": "model_delete", "id": "doomed"})
    assert end_marker(events) == "[DONE]"
    assert narrations(events) == [f"model doomed deleted ({record['size']} bytes freed)"]
    assert not installed.exists()
    await assert_unknown(client, "doomed")
    assert (await job_error(client, {"operation": "model_delete", "id": "doomed"})).startswith("unknown model 'doomed'")



async def test_two_deletes_waiting_for_the_models_worker_to_stop_delete_it_once(rbeed, client, tiny_model):
    _, installed = await register_copy(rbeed, client, tiny_model, "twice")
    worker = await job_result(client, {"operation": "worker_spawn", "model": "twice", "threads": 1})
    waiting = is_narration(f"waiting for worker {worker['id']} to stop")
    os.kill(worker["pid"], signal.SIGSTOP)  # its SIGTERM waits until it is continued
    try:
        async with job_events(client, {"operation": "worker_delete", "id": worker["id"]}) as (_, stopping):
            with trio.fail_after(10):  # the deletes come once it is on its way out
                await read_events_until(stopping, is_narration(f"stopping worker {worker['id']} (pid {worker['pid']})"))
            async with (
                job_events(client, {"operation": "model_delete", "id": "twice"}) as (_, first),
                job_events(client, {"operation": "model_delete", "id": "twice"}) as (_, second),
            ):
                with trio.fail_after(10):
                    for deleting in (first, second):  # both looked the model up before either deleted it
                        await read_events_until(deleting, waiting)
                os.kill(worker["pid"], signal.SIGCONT)
                ends = sorted([end_marker(await rest_of(first, 10)), end_marker(await rest_of(second, 10))])
    finally:
        with contextlib.suppress(ProcessLookupError):  # on a failure above
            os.kill(worker["pid"], signal.SIGCONT)
    assert ends[0] == "[DONE]"  # the other finds it being deleted, or gone (the race fixed: a KeyError)
    assert ends[1] == "[ERROR] model 'twice' is being deleted" or ends[1].startswith("[ERROR] unknown model 'twice'")
    assert not installed.exists()
    await assert_unknown(client, "twice")

async def test_model_copy_names_the_file_by_a_second_id_without_copying_it(rbeed, client, tiny_model, tmp_path):
    import tinymodel

    original = await job_result(client, download(str(shutil.copyfile(tiny_model, tmp_path / "Original.gguf"))))
    models = rbeed.state_dir / "models"
    (models / "second.name.gguf").write_bytes(b"left by a crash")  # replaced, not an obstacle
    events = await run_job(client, {"operation": "model_copy", "id": "ORIGINAL", "to": "Second.Name"})
    copy = result_of(events)
    assert narrations(events) == ["model original copied as second.name (a hard link to its file: no space used)"]
    assert copy == original | {"id": "second.name", "file": "second.name.gguf", "added_at": copy["added_at"]}
    assert copy["added_at"] >= original["added_at"]
    linked = (models / "original.gguf").stat()
    assert (models / "second.name.gguf").stat().st_ino == linked.st_ino and linked.st_nlink == 2
    assert sorted(p.name for p in models.iterdir() if "name" in p.name or "original" in p.name) == [
        "original.gguf", "second.name.gguf"]  # fmt: skip
    assert await job_result(client, {"operation": "model_get", "id": "second.name"}) == copy

    again = await run_job(client, {"operation": "model_copy", "id": "original", "to": "second.name"})
    assert (result_of(again), narrations(again)) == (copy, ["model second.name is already a copy of original"])
    other = await job_result(client, download(str(tinymodel.write_tiny_model(tmp_path / "other.gguf", seed=1))))
    assert await job_error(client, {"operation": "model_copy", "id": "original", "to": "other"}) == (
        f"model other already exists (sha256 {other['sha256']}); model_delete it first")
    assert await job_error(client, {"operation": "model_copy", "id": "original", "to": "Original.gguf"}) == (
        "'Original.gguf' names model original itself; give another id, or a system, messages or defaults to set")
    assert (await job_error(client, {"operation": "model_copy", "id": "nosuch", "to": "x"})).startswith(
        "unknown model 'nosuch'")
    assert not (models / "x.gguf").exists()

    # The copy outlives the original: deleting one frees nothing while the other holds the file.
    deleted = await run_job(client, {"operation": "model_delete", "id": "original"})
    assert narrations(deleted) == ["model original deleted (its file has other links, so no space was freed)"]
    prompt = {"operation": "infer", "model": "second.name", "prompt": "Hi", "max_tokens": 3, "stream": False}
    answer = await job_result(client, prompt | {"keep_alive": 0, "seed": 1})
    assert (answer["model"], answer["completion_tokens"]) == ("second.name", 3)
    deleted = await run_job(client, {"operation": "model_delete", "id": "second.name"})
    *waited, said = narrations(deleted)  # its worker may still be on its way out (keep_alive 0)
    assert said == f"model second.name deleted ({copy['size']} bytes freed)"
    assert all(re.fullmatch(r"waiting for worker second\.name-cpu-\d+ to stop", line) for line in waited), waited
    assert not (models / "second.name.gguf").exists()
    await job_result(client, {"operation": "model_delete", "id": "other"})


async def test_a_copys_defaults_are_what_its_infer_jobs_leave_out(rbeed, client, tiny_model, tmp_path):
    await job_result(client, download(str(shutil.copyfile(tiny_model, tmp_path / "base.gguf"))))
    defaults = {"temperature": 0.0, "max_tokens": 7, "n_ctx": 96, "stop": ["zzz"]}
    made = await job_result(client, {"operation": "model_copy", "id": "base", "to": "greedy", "defaults": defaults})
    assert (made["defaults"], made["system"]) == (defaults, None)
    ask = {"operation": "infer", "prompt": "Once upon a time", "stream": False}
    by_defaults = await job_result(client, ask | {"model": "greedy"})
    spelled_out = await job_result(client, ask | {"model": "base", **defaults})
    assert by_defaults["text"] == spelled_out["text"] != "" and by_defaults["finish_reason"] == "length"
    assert by_defaults["completion_tokens"] == spelled_out["completion_tokens"] == 7
    worker = await job_result(client, {"operation": "worker_get", "id": by_defaults["worker_id"]})
    assert (worker["model"], worker["n_ctx"]) == ("greedy", 96)  # loaded on demand with the copy's context
    assert spelled_out["worker_id"] == worker["id"]  # one worker for a model and its copies: the same file
    # The job's own settings win over the copy's.
    shorter = await job_result(client, ask | {"model": "greedy", "max_tokens": 2})
    assert shorter["completion_tokens"] == 2 and spelled_out["text"].startswith(shorter["text"])

    # A copy of the copy takes its defaults, with what it is given over them, field by field.
    greedier = await job_result(client, {"operation": "model_copy", "id": "greedy", "to": "greedier",
                                         "defaults": {"top_k": 1}})  # fmt: skip
    assert (greedier["defaults"], greedier["system"]) == (defaults | {"top_k": 1}, None)
    # A system message goes in a chat template: a model without one (as the tiny one) is refused it.
    assert await job_error(client, {"operation": "model_copy", "id": "greedy", "to": "chatless", "system": "Hi."}) == (
        "model greedy has no chat template to put a system message in: it continues prompts as they are")
    # Copied onto its own id, a model's are set anew; the same again changes nothing.
    text = spelled_out["text"]
    piece = text[3:6]
    again = {"operation": "model_copy", "id": "greedier", "to": "greedier", "system": "", "defaults": {"stop": [piece]}}
    events = await run_job(client, again)
    updated = result_of(events)
    assert narrations(events) == ["model greedier is a copy of greedier already; its system, messages and defaults are set anew"]
    assert (updated["defaults"], updated["system"]) == (defaults | {"top_k": 1, "stop": [piece]}, None)
    assert await job_result(client, {"operation": "model_get", "id": "greedier"}) == updated
    events = await run_job(client, again)
    assert (result_of(events), narrations(events)) == (updated, ["model greedier is already a copy of greedier"])
    stopped = await job_result(client, ask | {"model": "greedier"})
    assert (stopped["text"], stopped["finish_reason"]) == (text[: text.index(piece)], "stop")
    # A job's empty stop list is no stop strings, not the model's (rbee infer --no-stop).
    unstopped = await job_result(client, ask | {"model": "greedier", "stop": []})
    assert (unstopped["text"], unstopped["finish_reason"]) == (text, spelled_out["finish_reason"])
    # The base copied over it again: its record is the base's (as `ollama cp` overwrites).
    reset = await job_result(client, {"operation": "model_copy", "id": "base", "to": "greedier"})
    assert (reset["defaults"], reset["system"]) == ({}, None)
    await job_result(client, {"operation": "worker_delete", "id": worker["id"]})
    for model in ("greedier", "greedy", "base"):
        await job_result(client, {"operation": "model_delete", "id": model})


async def test_hf_sources_resolve_against_hf_base_and_the_catalog_survives_a_restart(tiny):
    content, sha256, metadata = tiny
    base = short_base()
    daemons = []
    try:
        async with serve_files({"owner/repo/resolve/main/sub/hf-model.gguf": content}) as server:
            config = f'[models]\nhf_base = "{server.base_url}/{{owner}}/{{repo}}/resolve/main/{{path}}"\n'
            daemons.append(await trio.to_thread.run_sync(partial(start_daemon, base, config=config)))
            async with daemons[0].client() as client:
                record = await job_result(client, download("hf:owner/repo/sub/hf-model.gguf"))
        assert server.requests[0].target == "/owner/repo/resolve/main/sub/hf-model.gguf"
        assert (record["id"], record["sha256"], record["source"]) == ("hf-model", sha256, "hf:owner/repo/sub/hf-model.gguf")

        assert daemons[0].stop() == 0
        daemons.append(await trio.to_thread.run_sync(partial(start_daemon, base, config=config)))
        async with daemons[1].client() as client:
            assert await job_result(client, {"operation": "model_list"}) == [record]
            assert await job_result(client, {"operation": "model_get", "id": "hf-model"}) == record
            again = await run_job(client, download("hf:owner/repo/sub/hf-model.gguf"))
        assert narrations(again) == ["model hf-model is already present"]  # the server is gone: no fetch
        assert {key: record["metadata"][key] for key in metadata} == metadata
    finally:
        for daemon in daemons:
            daemon.stop()
        shutil.rmtree(base)



async def daemon_with_copies(tmp_path, tiny_model, names: tuple[str, ...]):
    """A daemon of its own under tmp_path/d, with a copy of the tiny model downloaded under each name."""
    daemon = await trio.to_thread.run_sync(start_daemon, tmp_path / "d")
    try:
        async with daemon.client() as client:
            for name in names:
                await job_result(client, download(str(shutil.copyfile(tiny_model, tmp_path / f"{name}.gguf"))))
    except BaseException:
        daemon.stop()
        raise
    return daemon


async def test_records_an_older_rbeed_made_get_their_metadata_read_again_at_start(tmp_path, tiny_model):
    base = tmp_path / "d"
    daemon = await daemon_with_copies(tmp_path, tiny_model, ("old", "broken"))
    try:
        async with daemon.client() as client:
            record = await job_result(client, {"operation": "model_get", "id": "old"})
            copy = await job_result(client, {"operation": "model_copy", "id": "old", "to": "old-copy"})
        assert daemon.stop() == 0
        database = sqlite3.connect(daemon.state_dir / "rbeed.sqlite3", isolation_level=None)
        for name in ("old", "old-copy", "broken"):  # as rbeed wrote them before it read the vocabulary's size and causality
            older = {**(copy if name == "old-copy" else record), "id": name, "file": f"{name}.gguf"}
            older["metadata"] = {k: v for k, v in record["metadata"].items() if k not in ("vocab_size", "causal")}
            database.execute("UPDATE models SET record = ? WHERE id = ?", (json.dumps(older).encode(), name))
        database.close()
        broken = daemon.state_dir / "models" / "broken.gguf"
        broken.write_bytes(broken.read_bytes()[:1000])

        daemon = await trio.to_thread.run_sync(start_daemon, base)
        for name in ("old", "old-copy"):  # one file, read once for both
            await logged(daemon, rf"model {name}: metadata read again$")
        await logged(daemon, r"model broken: its metadata could not be read again: not a valid GGUF model: .*truncated")
        async with daemon.client() as client:
            assert await job_result(client, {"operation": "model_get", "id": "old"}) == record
            assert await job_result(client, {"operation": "model_get", "id": "old-copy"}) == copy
            assert "vocab_size" not in (await job_result(client, {"operation": "model_get", "id": "broken"}))["metadata"]
            # An id past the vocabulary is refused from the catalog, before any worker starts.
            bad = {"operation": "infer", "model": "old", "prompt": "x", "logit_bias": {str(record["metadata"]["vocab_size"]): 1}}
            assert "logit_bias: token" in await job_error(client, bad)
            assert await job_result(client, {"operation": "worker_list"}) == []
        assert broken.exists()  # kept: it is the user's to delete
    finally:
        daemon.stop()


async def test_odd_records_and_files_left_in_the_models_dir_do_not_stop_a_start(tmp_path, tiny_model, tiny):
    base = tmp_path / "d"
    daemon = await daemon_with_copies(tmp_path, tiny_model, ("kept", "moved"))
    try:
        async with daemon.client() as client:
            kept = await job_result(client, {"operation": "model_get", "id": "kept"})
        assert daemon.stop() == 0
        models = daemon.state_dir / "models"
        # An admin moved a model's file to another disk and left a symlink.
        elsewhere = shutil.move(models / "moved.gguf", tmp_path / "other-disk.gguf")
        (models / "moved.gguf").symlink_to(elsewhere)
        database = sqlite3.connect(daemon.state_dir / "rbeed.sqlite3", isolation_level=None)
        for key, record in [("bad", {"id": "bad", "file": "bad.gguf"}), ("out", {**kept, "id": "out", "file": "../x.gguf"})]:
            database.execute("INSERT INTO models (id, record) VALUES (?, ?)", (key, json.dumps(record).encode()))
        database.close()
        # What a crash between writing a file and its record leaves: files no record names.
        os.link(models / "kept.gguf", models / "orphan-copy.gguf")
        os.link(models / "kept.gguf", models / ".kept-2.gguf.0a1b2c3d.link")
        (models / "unrecorded.gguf").write_bytes(tiny[0])
        (models / "resume.gguf.part").write_bytes(tiny[0][:1000])

        daemon = await trio.to_thread.run_sync(start_daemon, base)
        await logged(daemon, r"skipped the models record 'bad': Object missing required field `size`$")
        await logged(daemon, r"skipped the models record 'out': file '\.\./x\.gguf' is not a name in the models directory")
        for name in ("orphan-copy.gguf", ".kept-2.gguf.0a1b2c3d.link", "unrecorded.gguf"):
            await logged(daemon, rf"removed {re.escape(name)}, which no model's record names$")
        assert sorted(p.name for p in models.iterdir()) == ["kept.gguf", "moved.gguf", "resume.gguf.part"]
        async with daemon.client() as client:
            assert [m["id"] for m in await job_result(client, {"operation": "model_list"})] == ["kept", "moved"]
            spawned = await job_result(client, {"operation": "worker_spawn", "model": "moved", "threads": 1})
            await job_result(client, {"operation": "worker_delete", "id": spawned["id"]})
            events = await run_job(client, {"operation": "model_delete", "id": "kept"})
            assert narrations(events) == [f"model kept deleted ({kept['size']} bytes freed)"]  # no orphan link holds it
    finally:
        daemon.stop()


async def test_a_catalog_write_that_fails_is_a_clear_error_and_leaves_no_file_without_its_record(rbeed, client, tiny_model):
    _, installed = await register_copy(rbeed, client, tiny_model, "locked")
    database = sqlite3.connect(rbeed.state_dir / "rbeed.sqlite3", isolation_level=None)
    try:
        database.execute("BEGIN IMMEDIATE")  # the daemon's writes wait SQLite's 5 s, then fail
        copy_error = await job_error(client, {"operation": "model_copy", "id": "locked", "to": "locked-copy"})
        delete_error = await job_error(client, {"operation": "model_delete", "id": "locked"})
    finally:
        database.close()
    catalog = f"cannot write the models catalog {rbeed.state_dir / 'rbeed.sqlite3'}: database is locked"
    assert copy_error == delete_error == catalog  # not "internal error: OperationalError"
    assert leftovers(rbeed, "locked") == []  # the copy's link went with its record; the delete's file went first
    assert "is missing" in await job_error(client, {"operation": "infer", "model": "locked", "prompt": "x"})
    assert (await job_result(client, {"operation": "model_delete", "id": "locked"}))["deleted"]
    await assert_unknown(client, "locked")


@asynccontextmanager
async def hf_daemon(server, env: dict):
    """A daemon of its own whose hf: sources resolve against `server`, started with `env`."""
    base = short_base()
    config = f'[models]\nhf_base = "{server.base_url}/{{owner}}/{{repo}}/resolve/main/{{path}}"\n'
    daemon = await trio.to_thread.run_sync(partial(start_daemon, base, config=config, env=env))
    try:
        async with daemon.client() as client:
            yield client
    finally:
        daemon.stop()
        shutil.rmtree(base)


def gated(content: bytes, token: str):
    """A route that serves `content` only to requests with the bearer `token`, as a gated repo does."""

    async def route(request: RecordedRequest) -> Reply:
        if request.headers.get("authorization") != f"Bearer {token}":
            return Reply(401, {"content-type": "text/plain"}, b"Access to this model is restricted\n")
        return Reply(200, {"content-length": str(len(content))}, content)

    return route


async def test_hf_downloads_carry_the_token_from_the_credential_and_other_origins_never_see_it(tiny):
    content, sha256, _ = tiny
    credentials = short_base()
    (credentials / "hf-token").write_text("hf_secret\n")
    try:
        async with serve_files({}) as hub, serve_files({"other.gguf": content}) as elsewhere:
            hub.routes["/org/gated/resolve/main/g.gguf"] = gated(content, "hf_secret")
            async with hf_daemon(hub, {"HF_TOKEN": "", "CREDENTIALS_DIRECTORY": str(credentials)}) as client:
                assert (await job_result(client, download("hf:org/gated/g.gguf")))["sha256"] == sha256
                await job_result(client, download(elsewhere.url("other.gguf")))
    finally:
        shutil.rmtree(credentials)
    assert [request.headers.get("authorization") for request in hub.requests] == ["Bearer hf_secret"]
    assert [request.headers.get("authorization") for request in elsewhere.requests] == [None]


async def test_a_gated_hf_model_without_a_token_or_with_a_refused_one_says_what_to_do(tiny):
    content, _, _ = tiny
    async with serve_files({}) as hub:
        hub.routes["/org/gated/resolve/main/g.gguf"] = gated(content, "hf_secret")
        async with hf_daemon(hub, {"HF_TOKEN": "", "CREDENTIALS_DIRECTORY": ""}) as client:
            error = await job_error(client, download("hf:org/gated/g.gguf"))
            assert "401 Unauthorized" in error and error.endswith(
                "; a gated model needs its terms accepted on Hugging Face and a token: "
                "set HF_TOKEN, or the credential hf-token"), error  # fmt: skip
        async with hf_daemon(hub, {"HF_TOKEN": "hf_wrong"}) as client:
            error = await job_error(client, download("hf:org/gated/g.gguf"))
            assert error.endswith("401 Unauthorized; the token was refused, or grants no access to this model"), error
    assert [request.headers.get("authorization") for request in hub.requests] == [None, "Bearer hf_wrong"]
