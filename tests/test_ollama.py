"""The Ollama-compatible routes on the real daemon, with real workers running the tiny model."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import datetime
from unittest.mock import ANY

import gguf
import ollama
import pytest
import trio

import tinymodel
from rbeed import __version__
from rbeed.compat import Refused
from rbeed.ollama import keep_alive_seconds
from httpfixture import serve_files
from support import end_marker, job_events, job_result, open_stream, register_copy, rest_of, start_daemon
from test_infer import CHAT_TEMPLATE
from test_openai import client, rbeed  # noqa: F401 - the same daemon: "tiny" (no chat template) and "chatty"

GENERATE = {"model": "tiny", "prompt": "Once upon a time", "options": {"temperature": 0, "num_predict": 12}}
CHAT = {"model": "chatty:latest", "options": {"temperature": 0, "num_predict": 10},
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]}  # fmt: skip
NATIVE = {"operation": "infer", "temperature": 0, "stream": False}


async def post(client, path: str, body: dict | bytes) -> tuple[int, dict]:
    with trio.fail_after(30):
        response = await client.request("POST", path, **({"body": body} if isinstance(body, bytes) else {"json": body}))
    assert response.headers["content-type"] == "application/json"
    return response.status, response.json()


async def lines(client, path: str, body: dict) -> list[dict]:
    """The objects of a streamed reply: one JSON object per line."""
    with trio.fail_after(30):
        async with client.stream("POST", path, json=body) as response:
            assert (response.status, response.headers["content-type"]) == (200, "application/x-ndjson")
            data = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.splitlines()]


async def get(client, path: str) -> dict:
    response = await client.request("GET", path)
    assert response.status == 200
    return response.json()


async def loaded(client) -> dict[str, dict]:
    return {entry["name"]: entry for entry in (await get(client, "/api/ps"))["models"]}


async def test_the_root_says_the_daemon_is_running_as_ollama_answers_its_clients(client):
    root = await client.request("GET", "/")
    assert (root.status, root.headers["content-type"], root.content) == (200, "text/plain; charset=utf-8", b"rbeed is running")
    head = await client.request("HEAD", "/")  # how Ollama's own CLI checks for a server
    assert (head.status, head.content) == (200, b"")
    posted = await client.request("POST", "/")
    assert (posted.status, posted.headers["allow"]) == (405, "GET")
    assert (await client.request("GET", "/nope")).status == 404  # `/` is no prefix


async def test_version_tags_and_show_describe_the_catalog(rbeed, client):
    assert await get(client, "/api/version") == {"version": __version__}
    tags = (await get(client, "/api/tags"))["models"]
    assert [(m["name"], m["model"]) for m in tags] == [("chatty", "chatty"), ("tiny", "tiny")]
    tiny = tags[1]
    record = await job_result(client, {"operation": "model_get", "id": "tiny"})
    data = (rbeed.state_dir / "models" / record["file"]).read_bytes()
    assert (tiny["size"], tiny["digest"]) == (len(data), hashlib.sha256(data).hexdigest())
    parameters = record["metadata"]["parameters"]
    assert tiny["details"] == {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama"],
                               "parameter_size": f"{parameters / 1000:.2f}K", "quantization_level": "ALL_F32"}  # fmt: skip
    assert abs(datetime.fromisoformat(tiny["modified_at"]).timestamp() - record["added_at"]) < 1e-3

    status, shown = await post(client, "/api/show", {"model": "tiny:latest"})  # Ollama's name for an untagged model
    assert status == 200
    assert await post(client, "/api/show", {"model": "TINY:latest"}) == (200, shown)
    assert shown["details"] == tiny["details"] and shown["capabilities"] == ["completion"]
    info = shown["model_info"]
    sizes = (info["llama.context_length"], info["llama.embedding_length"], info["llama.vocab_size"])
    assert sizes == (32768, 64, len(tinymodel.VOCAB))
    assert shown["model_info"]["general.parameter_count"] == parameters
    assert await post(client, "/api/show", {"name": "nope"}) == (404, {"error": "unknown model 'nope' (known: chatty, tiny)"})


async def test_show_tells_an_embedding_model_by_its_pooling(rbeed, client, tmp_path):
    import tinymodel

    path = tinymodel.write_tiny_model(tmp_path / "embedder.gguf", pooling_type=gguf.PoolingType.CLS)
    await job_result(client, {"operation": "model_download", "model": str(path)})
    try:
        status, shown = await post(client, "/api/show", {"model": "embedder"})
        assert (status, shown["capabilities"], shown["model_info"]["llama.embedding_length"]) == (200, ["embedding"], 64)
    finally:
        await job_result(client, {"operation": "model_delete", "id": "embedder"})


async def test_generate_streams_lines_then_a_done_line_with_counts(client):
    native = await job_result(client, NATIVE | {"model": "tiny", "prompt": GENERATE["prompt"], "max_tokens": 12})
    streamed = await lines(client, "/api/generate", GENERATE)
    *pieces, done = streamed
    assert len(pieces) == 12 and all(p.keys() == {"model", "created_at", "response", "done"} for p in pieces)
    assert all(p["model"] == "tiny" and p["done"] is False for p in pieces)
    assert "".join(p["response"] for p in pieces) == native["text"]
    assert (done["done"], done["done_reason"], done["response"]) == (True, "length", "")
    assert (done["prompt_eval_count"], done["eval_count"]) == (native["prompt_tokens"], 12)
    assert 0 < done["prompt_eval_duration"] < done["total_duration"] and 0 < done["eval_duration"] < done["total_duration"]
    assert 0 < done["load_duration"] < done["total_duration"]

    status, whole = await post(client, "/api/generate", GENERATE | {"stream": False})
    assert status == 200
    assert (whole["response"], whole["done"], whole["done_reason"]) == (native["text"], True, "length")
    # Clients show eval_count / eval_duration as the speed: a single token's time was 0.
    one = (await post(client, "/api/generate", GENERATE | {"stream": False, "options": {"num_predict": 1}}))[1]
    assert one["eval_count"] == 1 and one["eval_duration"] == one["prompt_eval_duration"] > 0


async def test_a_prompt_goes_through_the_template_unless_raw_and_chat_takes_messages(client):
    messages = CHAT["messages"]
    as_chat = await job_result(client, NATIVE | {"model": "chatty", "messages": messages, "max_tokens": 10})
    as_text = await job_result(client, NATIVE | {"model": "chatty", "prompt": "Hi there", "max_tokens": 10})
    assert as_chat["text"] != as_text["text"]

    generate = CHAT | {"prompt": "Hi there", "system": "Be brief.", "stream": False}
    del generate["messages"]
    assert (await post(client, "/api/generate", generate))[1]["response"] == as_chat["text"]
    assert (await post(client, "/api/generate", generate | {"raw": True}))[1]["response"] == as_text["text"]

    *pieces, done = await lines(client, "/api/chat", CHAT)
    assert all(p["message"]["role"] == "assistant" for p in pieces)
    assert "".join(p["message"]["content"] for p in pieces) == as_chat["text"]
    assert done["message"] == {"role": "assistant", "content": ""} and done["done_reason"] == as_chat["finish_reason"]
    status, whole = await post(client, "/api/chat", CHAT | {"stream": False})
    assert (status, whole["message"]) == (200, {"role": "assistant", "content": as_chat["text"]})


async def test_an_empty_request_loads_the_model_and_keep_alive_zero_unloads_it(client):
    status, answer = await post(client, "/api/chat", {"model": "chatty", "keep_alive": "1h", "stream": False})
    assert (status, answer["done"], answer["done_reason"], answer["message"]) == (
        200, True, "load", {"role": "assistant", "content": ""})  # fmt: skip
    entry = (await loaded(client))["chatty"]
    assert entry["context_length"] == 2048 and entry["size"] > 10 << 20  # the worker's resident memory
    assert abs(datetime.fromisoformat(entry["expires_at"]).timestamp() - (time.time() + 3600)) < 60
    # Past any date a timestamp can hold: shown as a model kept for good is, ten years on.
    await post(client, "/api/chat", {"model": "chatty", "keep_alive": "99999999999999999999h", "stream": False})
    entry = (await loaded(client))["chatty"]
    assert abs(datetime.fromisoformat(entry["expires_at"]).timestamp() - (time.time() + 10 * 365 * 86400)) < 60

    done = await lines(client, "/api/generate", {"model": "Chatty:latest", "keep_alive": 0})  # names are any case
    assert [(d["done"], d["done_reason"], d["response"]) for d in done] == [(True, "unload", "")]
    with trio.fail_after(10):
        while "chatty" in await loaded(client):
            await trio.sleep(0.05)
    # Not loaded: unloading again answers at once, and no job was made for it.
    jobs = len(await get(client, "/v1/jobs"))
    assert (await lines(client, "/api/generate", {"model": "chatty", "keep_alive": "0s"}))[0]["done_reason"] == "unload"
    assert (await post(client, "/api/chat", {"model": "chatty", "keep_alive": 0, "stream": False}))[1] == {
        "model": "chatty", "created_at": ANY, "message": {"role": "assistant", "content": ""}, "done": True,
        "done_reason": "unload"}  # fmt: skip
    assert len(await get(client, "/v1/jobs")) == jobs
    assert (await post(client, "/api/generate", {"model": "nope", "keep_alive": 0}))[0] == 404


async def test_options_reach_the_infer_job(client):
    sampled = GENERATE | {"stream": False, "options": {"temperature": 1.0, "num_predict": 20, "num_ctx": 4096}}
    texts = [(await post(client, "/api/generate", sampled | {"options": sampled["options"] | {"seed": seed}}))[1]
             ["response"] for seed in (5, 5, 6)]  # fmt: skip
    assert texts[0] == texts[1] != texts[2]
    assert (await loaded(client))["tiny"]["context_length"] == 4096  # num_ctx: a worker with that context
    long = GENERATE | {"stream": False, "options": {"temperature": 0, "num_predict": 64}}
    plain = (await post(client, "/api/generate", long))[1]["response"]
    penalised = {"repeat_penalty": 1.5, "presence_penalty": 0.5, "frequency_penalty": 0.5, "min_p": 0.1, "repeat_last_n": 32}
    answer = (await post(client, "/api/generate", long | {"options": long["options"] | penalised}))[1]["response"]
    native = await job_result(client, {"operation": "infer", "model": "tiny", "prompt": GENERATE["prompt"],
                                       "temperature": 0, "max_tokens": 64, "stream": False, **penalised})  # fmt: skip
    assert answer == native["text"] != plain
    word = texts[0][len(texts[0]) // 2 :][:3]
    _, stopped = await post(client, "/api/generate", sampled | {"options": sampled["options"] | {"seed": 5, "stop": [word]}})
    assert (stopped["response"], stopped["done_reason"]) == (texts[0].partition(word)[0], "stop")


async def test_a_null_is_a_field_left_out_as_langchain_sends_them(client):
    # langchain_community's Ollama LLM sends every field it has, unset ones as null: each was a 400.
    nulls = {"images": None, "format": None, "system": None, "template": None, "keep_alive": None, "raw": None,
             "context": None}  # fmt: skip
    body = GENERATE | nulls | {"stream": False, "options": GENERATE["options"] | {"stop": None, "seed": None}}
    status, answer = await post(client, "/api/generate", body)
    assert status == 200, answer
    assert answer["response"] == (await post(client, "/api/generate", GENERATE | {"stream": False}))[1]["response"]
    chat = CHAT | {"stream": False, "messages": [{**message, "images": None} for message in CHAT["messages"]]}
    assert (await post(client, "/api/chat", chat))[1]["message"] == (await post(client, "/api/chat", CHAT | {"stream": False}))[1]["message"]


async def test_a_lone_surrogate_escape_reads_as_a_replacement_character_as_ollama_reads_it(client):
    # JavaScript's JSON.stringify writes one for a string cut mid-emoji; it was "malformed JSON".
    body = json.dumps({**GENERATE, "stream": False, "prompt": "Once upon a time \ud83d"}).encode()
    assert b"\\ud83d" in body
    status, answer = await post(client, "/api/generate", body)
    assert status == 200, answer
    replaced = (await post(client, "/api/generate", GENERATE | {"stream": False, "prompt": "Once upon a time \ufffd"}))[1]
    assert answer["response"] == replaced["response"]
    assert (await post(client, "/api/generate", body[:-1]))[0] == 400  # malformed otherwise too: still refused


async def test_format_holds_the_answer_to_json_or_a_schema_as_infers_does(client):
    schema = {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4}
    greedy = GENERATE | {"stream": False, "options": {"temperature": 0, "num_predict": 40}}
    native = NATIVE | {"model": "tiny", "prompt": GENERATE["prompt"], "max_tokens": 40}
    answers = {}
    # "": Ollama's none; {}: a schema that any JSON value meets (it was taken for none)
    for given, format in [(schema, schema), ("json", "json"), ("", None), ({}, {})]:
        _, answer = await post(client, "/api/generate", greedy | {"format": given})
        assert answer["response"] == (await job_result(client, native | {"format": format}))["text"], given
        answers[format if format is None else str(format)] = answer["response"]
    json.loads(answers["{}"])
    values = json.loads(answers[str(schema)])
    assert 2 <= len(values) <= 4 and all(type(value) is bool for value in values), values
    assert isinstance(json.loads(answers["json"]), dict)
    with pytest.raises(ValueError):
        json.loads(answers[None])


@pytest.mark.parametrize(("path", "body", "status", "message"), [
    ("/api/generate", {"model": "nope", "prompt": "x"}, 404, "unknown model 'nope' (known: chatty, tiny)"),
    ("/api/generate", {"prompt": "x"}, 400, "Object missing required field `model`"),
    ("/api/generate", GENERATE | {"options": {"num_predict": "many"}}, 400,
     "Expected `int | null`, got `str` - at `$.options.num_predict`"),
    ("/api/generate", GENERATE | {"options": {"temperature": -1}}, 400, "Expected `float` >= 0.0 - at `$.options.temperature`"),
    ("/api/generate", GENERATE | {"options": {"num_predict": 0}}, 400, "Expected `int` >= 1 - at `$.options.num_predict`"),
    ("/api/generate", GENERATE | {"options": {"top_k": 10**23}}, 400, "Expected `int` <= 2147483647 - at `$.options.top_k`"),
    ("/api/create", {"model": "x", "from": "tiny", "parameters": {"top_k": 10**23}}, 400,
     "Expected `int` <= 2147483647 - at `$.parameters.top_k`"),
    ("/api/embed", {"model": "tiny", "input": "x", "dimensions": 2**64}, 400, "Expected `int` <= 1048576"),
    ("/api/generate", GENERATE | {"options": {"repeat_penalty": 0}}, 400,
     "Expected `float` > 0.0 - at `$.options.repeat_penalty`"),
    ("/api/generate", GENERATE | {"options": {"num_ctx": 40000}}, 400, "n_ctx 40000 is more than tiny was trained for"),
    ("/api/generate", GENERATE | {"keep_alive": "5 minutes"}, 400, "keep_alive '5 minutes' is not a duration"),
    ("/api/generate", GENERATE | {"format": "xml"}, 400, "Invalid enum value 'xml' - at `$.format`"),
    ("/api/generate", GENERATE | {"options": {"stop": [""]}}, 400, "Expected `str` of length >= 1 - at `$.options.stop[0]`"),
    ("/api/generate", GENERATE | {"format": {"type": "integer", "maximum": 9}}, 400,
     "`format`: rbeed's grammar cannot hold the output to 'maximum'"),
    ("/api/generate", GENERATE | {"images": ["aGk="]}, 400, "images is not supported by rbeed"),
    ("/api/generate", GENERATE | {"system": "Be brief."}, 400, "the model has no chat template to put `system` in"),
    ("/api/chat", CHAT | {"messages": [{"role": "tool", "content": "4"}]}, 400, "role 'tool' is not supported"),
    ("/api/chat", CHAT | {"messages": [{"role": "user", "content": "?", "images": ["aGk="]}]}, 400,
     "messages[0].images is not supported by rbeed"),
    ("/api/chat", CHAT | {"tools": [{"type": "function"}]}, 400, "tools is not supported by rbeed"),
    ("/api/chat", CHAT | {"model": "tiny"}, 400, "the model has no chat template"),
    ("/api/chat", b'{"model": ', 400, "malformed JSON: "),
    ("/api/generate", b'{"model": "tiny", "format": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, 400, "JSON nested too deeply"),
    ("/api/pull", {"model": "llama3.2"}, 404, "model 'llama3.2' not found; rbeed pulls hf:owner/repo/path/file.gguf, "
                                              "an http(s):// or file:// URL, or an absolute path"),
    ("/api/pull", {"model": "hf:owner/model.gguf"}, 400, "bad hf: source 'hf:owner/model.gguf'"),
    ("/api/pull", {"model": "file:models/x.gguf"}, 400, "a local path must be absolute"),
    ("/api/pull", {"stream": False}, 400, "model is required"),
    # These crashed the job (internal error: ValueError).
    ("/api/pull", {"model": "http://[::1"}, 400, "bad source 'http://[::1': Invalid IPv6 URL"),
    ("/api/pull", {"model": "/tmp/x\u0000.gguf"}, 400, "the source '/tmp/x\\x00.gguf' holds a control character"),
    ("/api/pull", {"model": "file:///tmp/x%00.gguf"}, 400, "the source 'file:///tmp/x%00.gguf' holds a NUL character"),
    ("/api/pull", {"model": "/nowhere/x.gguf", "stream": False}, 400,
     "cannot read /nowhere/x.gguf: No such file or directory"),
    ("/api/show", {"model": "nope"}, 404, "unknown model 'nope'"),
])  # fmt: skip
async def test_bad_requests_are_refused_with_a_message_naming_the_field(client, path, body, status, message):
    got, answer = await post(client, path, body)
    assert got == status, answer
    assert answer.keys() == {"error"} and answer["error"].startswith(message), answer


async def test_wrong_methods_are_405_with_allow(client):
    for method, path, allowed in [("GET", "/api/generate", "POST"), ("GET", "/api/show", "POST"),
                                  ("POST", "/api/tags", "GET"), ("DELETE", "/api/ps", "GET"),
                                  ("GET", "/api/pull", "POST"), ("POST", "/api/delete", "DELETE"),
                                  ("PUT", "/api/create", "POST")]:  # fmt: skip
        response = await client.request(method, path)
        assert (response.status, response.headers["allow"]) == (405, allowed)
    assert (await client.request("POST", "/api/push", json={"model": "x"})).status == 404


async def test_a_client_that_leaves_mid_stream_cancels_its_job(client):
    with trio.fail_after(30):
        async with client.stream("POST", "/api/generate", json=GENERATE | {"options": {"num_predict": 500}}) as response:
            async for chunk in response.aiter_bytes():
                assert json.loads(chunk.split(b"\n")[0])["done"] is False
                break  # leaving the block closes the connection
        job_id = (await get(client, "/v1/jobs"))[0]["job_id"]  # newest first
        while (job := await get(client, f"/v1/jobs/{job_id}"))["state"] == "running":
            await trio.sleep(0.02)  # bounded by fail_after: the daemon notices the close at once
    assert (job["operation"], job["state"]) == ("infer", "cancelled")


async def test_a_failure_before_any_output_is_an_http_error(rbeed, client, tiny_model):
    _, installed = await register_copy(rbeed, client, tiny_model, "broken")
    installed.write_bytes(b"<html>gone</html>")
    for streamed in (False, True):
        status, answer = await post(client, "/api/generate", GENERATE | {"model": "broken", "stream": streamed})
        assert status == 500 and "not a GGUF file" in answer["error"], answer
    await job_result(client, {"operation": "model_delete", "id": "broken"})


async def test_pull_downloads_a_source_with_progress_and_fetches_a_lost_file_again(rbeed, client, tiny_model):
    data = tiny_model.read_bytes()
    async with serve_files({"pulled.gguf": data}) as server:
        url = f"{server.base_url}/pulled.gguf"
        streamed = await lines(client, "/api/pull", {"model": url})
        assert streamed[0] == {"status": f"downloading {url} as model pulled"}
        progress = [line for line in streamed if "completed" in line]
        assert progress and all(line["status"] == "pulling pulled" and line["total"] == len(data) for line in progress)
        assert [line["completed"] for line in progress] == sorted(line["completed"] for line in progress)
        assert progress[-1]["completed"] == len(data) and streamed[-1] == {"status": "success"}
        installed = rbeed.state_dir / "models" / "pulled.gguf"
        assert installed.read_bytes() == data
        assert "pulled" in [tag["name"] for tag in (await get(client, "/api/tags"))["models"]]

        # A model rbeed has, by its id: present, at once; its file gone, fetched from its source again.
        assert await lines(client, "/api/pull", {"model": "pulled:latest"}) == [
            {"status": "model pulled is already present"}, {"status": "success"}]  # fmt: skip
        installed.unlink()
        assert await post(client, "/api/pull", {"model": "pulled", "stream": False}) == (200, {"status": "success"})
        assert installed.read_bytes() == data

        # Ollama's own client reads the same lines.
        client_of_ollama = ollama.Client(host=rbeed.url, timeout=30)
        again = await trio.to_thread.run_sync(lambda: list(client_of_ollama.pull(url, stream=True)))
        assert [(line.status, line.completed) for line in again] == [
            ("model pulled is already present", None), ("success", None)]  # fmt: skip

        # Another file of that name: "success" would tell of a file it did not fetch.
        other = server.base_url + "/other/pulled.gguf"
        message = f"model pulled exists, from {url}; delete it to pull {other}"
        assert await post(client, "/api/pull", {"model": other}) == (409, {"error": message})

        # A copy's file gone: a pull of the copy fetches it again as the copy, which keeps its defaults.
        await job_result(client, {"operation": "model_copy", "id": "pulled", "to": "brief", "defaults": {"top_k": 3}})
        (rbeed.state_dir / "models" / "brief.gguf").unlink()
        assert (await lines(client, "/api/pull", {"model": "brief"}))[0] == {"status": f"downloading {url} as model brief"}
        brief = await job_result(client, {"operation": "model_get", "id": "brief"})
        assert (brief["file"], brief["source"], brief["defaults"]["top_k"]) == ("brief.gguf", url, 3)
        assert (rbeed.state_dir / "models" / "brief.gguf").read_bytes() == data
    for model_id in ("pulled", "brief"):
        await job_result(client, {"operation": "model_delete", "id": model_id})


async def test_a_pull_that_fails_says_why_in_the_stream_or_as_an_http_error(client):
    async with serve_files({}) as server:
        url = f"{server.base_url}/gone.gguf"
        streamed = await lines(client, "/api/pull", {"model": url})
        status, answer = await post(client, "/api/pull", {"model": url, "stream": False})
    assert streamed[0] == {"status": f"downloading {url} as model gone"}
    assert streamed[-1].keys() == {"error"} and streamed[-1]["error"].endswith("404 Not Found"), streamed
    assert (status, answer) == (500, streamed[-1])


async def test_delete_removes_a_model_not_in_use_and_waits_for_one_unloading(rbeed, client, tiny_model):
    _, installed = await register_copy(rbeed, client, tiny_model, "doomed")
    client_of_ollama = ollama.Client(host=rbeed.url, timeout=30)
    await post(client, "/api/generate", GENERATE | {"model": "doomed", "stream": False})
    with pytest.raises(ollama.ResponseError) as refused:
        await trio.to_thread.run_sync(client_of_ollama.delete, "doomed")
    assert refused.value.status_code == 409 and "model doomed is in use by worker(s) doomed-cpu-" in refused.value.error
    assert installed.exists()

    # `ollama stop` then `ollama rm`: the worker is still on its way out when the delete comes.
    unload = {"model": "doomed", "keep_alive": 0, "stream": False}
    assert (await post(client, "/api/generate", unload))[1]["done_reason"] == "unload"
    deleted = await client.request("DELETE", "/api/delete", json={"model": "doomed:latest"})
    assert (deleted.status, deleted.content) == (200, b"")
    assert not installed.exists() and "doomed" not in await loaded(client)
    assert "doomed" not in [tag["name"] for tag in (await get(client, "/api/tags"))["models"]]
    again = await client.request("DELETE", "/api/delete", json={"name": "doomed"})
    assert (again.status, again.json()) == (404, {"error": "unknown model 'doomed' (known: chatty, tiny)"})


async def test_copy_names_a_model_anew_as_ollama_cp_does(rbeed, client):
    client_of_ollama = ollama.Client(host=rbeed.url, timeout=30)
    await trio.to_thread.run_sync(client_of_ollama.copy, "tiny:latest", "mine/tiny:v2")  # the id: its slug
    tags = {tag["name"]: tag for tag in (await get(client, "/api/tags"))["models"]}
    assert tags["mine-tiny-v2"] | {"name": "", "model": "", "modified_at": ""} == tags["tiny"] | {
        "name": "", "model": "", "modified_at": ""}  # fmt: skip
    models = rbeed.state_dir / "models"
    assert (models / "mine-tiny-v2.gguf").stat().st_ino == (models / "tiny.gguf").stat().st_ino
    copied = await post(client, "/api/generate", GENERATE | {"model": "mine/tiny:v2", "stream": False, "keep_alive": 0})
    original = await post(client, "/api/generate", GENERATE | {"stream": False})
    assert copied[0] == 200 and copied[1]["response"] == original[1]["response"] != ""
    # OpenAI's routes take the name as Ollama's do (they sent it on to the job, which wants the id), and
    # a negative seed, as Ollama's default options and llama-server's "random", is no seed.
    for path, body in (("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4, "seed": -1}),
                       ("/v1/embeddings", {"input": "Once upon a time"})):  # fmt: skip
        status, answer = await post(client, path, body | {"model": "mine/tiny:v2"})
        assert (status, answer["model"]) == (200, "mine/tiny:v2"), answer
    status, answer = await post(client, "/api/generate", GENERATE | {"stream": False, "options": {"seed": -1}})
    assert status == 200 and answer["response"], answer

    refusals = [
        ({"source": "nope", "destination": "x"}, 404, "unknown model 'nope' (known: chatty, mine-tiny-v2, tiny)"),
        ({"source": "tiny", "destination": "chatty"}, 409, "model chatty already exists (sha256 "),
        ({"source": "tiny", "destination": ":::"}, 400, "cannot derive a model id from ':::'"),
        ({"source": "tiny"}, 400, "Object missing required field `destination`"),
    ]
    for body, status, message in refusals:
        answer = await post(client, "/api/copy", body)
        assert answer[0] == status and answer[1]["error"].startswith(message), answer
    assert (await client.request("GET", "/api/copy")).headers["allow"] == "POST"
    await trio.to_thread.run_sync(client_of_ollama.delete, "mine/tiny:v2")
    assert not (models / "mine-tiny-v2.gguf").exists() and (models / "tiny.gguf").stat().st_nlink == 1


async def test_create_makes_a_model_with_a_system_message_and_parameters_from_one(rbeed, client):
    client_of_ollama = ollama.Client(host=rbeed.url, timeout=30)
    await post(client, "/api/generate", {"model": "chatty", "keep_alive": 0, "stream": False})  # what tests before left
    parameters = {"temperature": 0, "num_predict": 10, "stop": ["zzz", "\n\n"]}
    made = await trio.to_thread.run_sync(
        lambda: client_of_ollama.create("brief:latest", from_="chatty", system="Be brief.", parameters=parameters))
    assert made.status == "success"
    assert (await post(client, "/api/show", {"model": "brief"}))[1]["system"] == "Be brief."
    shown = await trio.to_thread.run_sync(client_of_ollama.show, "brief")
    assert shown.parameters.splitlines() == [f"{'temperature':<30} 0.0", f"{'stop':<30} \"zzz\"",
                                             f"{'stop':<30} \"\\n\\n\"", f"{'num_predict':<30} 10"]  # fmt: skip
    models = rbeed.state_dir / "models"
    assert shown.modelfile.splitlines()[1:] == [f"FROM {models / 'brief.gguf'}", 'SYSTEM """Be brief."""',
                                                *(f"PARAMETER {' '.join(line.split(None, 1))}" for line in shown.parameters.splitlines())]  # fmt: skip
    assert (models / "brief.gguf").stat().st_ino == (models / "chatty.gguf").stat().st_ino

    # Its chats are the model's with its system message first and its parameters: CHAT's.
    question = CHAT["messages"][1:]
    brief = await post(client, "/api/chat", {"model": "brief", "messages": question, "stream": False})
    spelled_out = await post(client, "/api/chat", CHAT | {"stream": False})
    assert brief[0] == spelled_out[0] == 200
    counts = ("prompt_eval_count", "eval_count")
    assert [brief[1][key] for key in counts] == [spelled_out[1][key] for key in counts]
    assert brief[1]["message"] == spelled_out[1]["message"] and brief[1]["message"]["content"] != ""
    unbriefed = await post(client, "/api/chat", CHAT | {"messages": question, "stream": False})
    assert unbriefed[1]["prompt_eval_count"] < brief[1]["prompt_eval_count"]  # no system message in chatty's own
    # A chat's own system message, and a request's options, win over the model's.
    own = [{"role": "system", "content": "Be long."}, *question]
    mine = await post(client, "/api/chat", {"model": "brief", "messages": own, "stream": False,
                                            "options": {"num_predict": 2}})  # fmt: skip
    theirs = await post(client, "/api/chat", CHAT | {"messages": own, "stream": False, "options": {"temperature": 0}})
    assert mine[1]["prompt_eval_count"] == theirs[1]["prompt_eval_count"] and mine[1]["eval_count"] == 2
    assert theirs[1]["message"]["content"].startswith(mine[1]["message"]["content"])
    # OpenAI's route takes the model's settings too: no max_tokens is the model's num_predict.
    completion = await post(client, "/v1/chat/completions", {"model": "brief", "messages": question})
    assert completion[1]["choices"][0]["message"]["content"] == brief[1]["message"]["content"]
    assert completion[1]["usage"]["completion_tokens"] == brief[1]["eval_count"]

    # Made again, streamed: the same file, the record anew.
    async with client.stream("POST", "/api/create", json={"model": "brief", "from": "chatty", "system": "Be kind."}) as response:
        assert (response.status, response.headers["content-type"]) == (200, "application/x-ndjson")
        statuses = [json.loads(line)["status"] for line in (await response.aread()).splitlines()]
    assert statuses == ["model brief is a copy of chatty already; its system, messages and defaults are set anew", "success"]
    shown = (await post(client, "/api/show", {"model": "brief"}))[1]
    assert (shown["system"], shown["parameters"]) == ("Be kind.", "")

    refusals = [
        ({"model": "x"}, 400, "give one of from (a model rbeed has) and files (a GGUF uploaded to /api/blobs)", ""),
        ({"model": "x", "from": "nope"}, 404, "unknown model 'nope'", "from"),
        ({"from": "tiny"}, 400, "model is required", "model"),
        ({"model": "x", "from": "tiny", "files": {"x.gguf": "sha256:ab"}}, 400, "give one of from (a model", ""),
        ({"model": "x", "files": {"x.gguf": "sha256:ab"}}, 400, "invalid digest 'sha256:ab': expected sha256:<64", ""),
        ({"model": "x", "files": {"x.gguf": "sha256:" + "0" * 64}}, 400, f"blob 'sha256:{'0' * 64}' not found: POST ", ""),
        ({"model": "x", "files": {"a.gguf": "sha256:" + "0" * 64, "b.gguf": "sha256:" + "1" * 64}}, 400,
         "rbeed makes a model of one GGUF file; a model in several files (safetensors, or a GGUF with a ", ""),
        ({"model": "x", "from": "tiny", "adapters": {"a.gguf": "sha256:" + "0" * 64}}, 400, "adapters (LoRA) are not", ""),
        ({"model": "x", "from": "tiny", "template": "{{ .Prompt }}"}, 400, "template is not supported by rbeed", ""),
        ({"model": "x", "from": "tiny", "modelfile": "FROM tiny"}, 400, "modelfile (the older API) is not", ""),
        ({"model": "x", "from": "tiny", "parameters": {"mirostat": 1}}, 400,
         "parameter 'mirostat' is not supported by rbeed; it applies temperature, ", ""),
        ({"model": "x", "from": "tiny", "parameters": {"temperature": -1}}, 400,
         "Expected `float` >= 0.0 - at `$.parameters.temperature`", ""),
        ({"model": "x", "from": "tiny", "parameters": {"num_ctx": "big"}}, 400, "at `$.parameters.num_ctx`", ""),
        # Made, it would fail every job of the model with the client's fault.
        ({"model": "x", "from": "tiny", "parameters": {"num_ctx": 40000}}, 400,
         "n_ctx 40000 is more than tiny was trained for (32768 tokens)", ""),
        ({"model": "chatty", "from": "tiny"}, 409, "model chatty already exists (sha256 ", ""),
        ({"model": "x", "from": "tiny", "system": "Hi."}, 400, "model tiny has no chat template to put a system", ""),
        ({"model": "x", "from": "tiny", "messages": [{"role": "user", "content": "Hi"}]}, 400,
         "model tiny has no chat template to put messages in", ""),
        ({"model": "x", "from": "chatty", "messages": [{"role": "tool", "content": "Hi"}]}, 400,
         "at `$.messages[0].role`", ""),
    ]  # fmt: skip
    for body, status, message, _ in refusals:
        answer = await post(client, "/api/create", body | {"stream": False})
        assert answer[0] == status and message in answer[1]["error"], answer
    assert "x" not in {tag["name"] for tag in (await get(client, "/api/tags"))["models"]}
    # num_predict -1 is Ollama's "no limit".
    await post(client, "/api/create", {"model": "x", "from": "tiny", "parameters": {"num_predict": -1}, "stream": False})
    assert (await job_result(client, {"operation": "model_get", "id": "x"}))["defaults"] == {"max_tokens": 1 << 20}
    # The worker it was loaded in serves chatty too; its unload is chatty's (the same file).
    assert (await loaded(client)).keys() == {"brief"}
    unloaded = await post(client, "/api/generate", {"model": "chatty", "keep_alive": 0, "stream": False})
    assert (unloaded[1]["done_reason"], await loaded(client)) == ("unload", {})
    for name in ("x", "brief"):
        await trio.to_thread.run_sync(client_of_ollama.delete, name)


async def test_create_with_messages_puts_that_history_before_each_chat_as_a_modelfiles_message_lines_do(
        rbeed, client):  # fmt: skip
    history = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A pirate, arr."}]
    client_of_ollama = ollama.Client(host=rbeed.url, timeout=30)
    await trio.to_thread.run_sync(lambda: client_of_ollama.create("pirate", from_="chatty", system="Be brief.",
                                                                  messages=history))  # fmt: skip
    shown = (await post(client, "/api/show", {"model": "pirate"}))[1]
    assert (shown["system"], shown["messages"]) == ("Be brief.", history)
    assert shown["modelfile"].endswith('SYSTEM """Be brief."""\nMESSAGE user """Who are you?"""\n'
                                      'MESSAGE assistant """A pirate, arr."""\n')  # after any PARAMETER, as Ollama's
    # A chat with it is the chat with that history written out: after the model's system message,
    # or the chat's own, which stays first.
    hi = {"role": "user", "content": "Hi"}
    ask = {"stream": False, "options": {"temperature": 0, "num_predict": 6}, "keep_alive": 0}
    for own_system in ([], [{"role": "system", "content": "Be long."}]):
        written = own_system or [{"role": "system", "content": "Be brief."}]
        pirate = await post(client, "/api/chat", ask | {"model": "pirate", "messages": [*own_system, hi]})
        chatty = await post(client, "/api/chat", ask | {"model": "chatty", "messages": [*written, *history, hi]})
        plain = await post(client, "/api/chat", ask | {"model": "chatty", "messages": [*written, hi]})
        assert pirate[1]["prompt_eval_count"] == chatty[1]["prompt_eval_count"] > plain[1]["prompt_eval_count"]
        assert pirate[1]["message"] == chatty[1]["message"]
    # As in Ollama, a create from it with an empty system and history keeps its own.
    kept = await post(client, "/api/create", {"model": "pirate2", "from": "pirate", "system": "", "messages": [],
                                              "stream": False})  # fmt: skip
    assert kept[0] == 200 and (await post(client, "/api/show", {"model": "pirate2"}))[1]["messages"] == history
    assert (await post(client, "/api/show", {"model": "pirate2"}))[1]["system"] == "Be brief."
    await trio.to_thread.run_sync(client_of_ollama.delete, "pirate2")
    # The job API's model_copy and model_get carry them too; [] removes them.
    again = await job_result(client, {"operation": "model_copy", "id": "pirate", "to": "pirate", "messages": []})
    assert again["messages"] == [] and (await job_result(client, {"operation": "model_get", "id": "pirate"}))["messages"] == []
    assert "messages" not in (await post(client, "/api/show", {"model": "pirate"}))[1]
    await trio.to_thread.run_sync(client_of_ollama.delete, "pirate")


async def test_create_from_a_gguf_uploaded_as_a_blob_takes_the_blob_as_its_file_as_ollama_create_from_a_file(
        rbeed, client, tmp_path):  # fmt: skip
    # `ollama create mine -f Modelfile` with FROM ./mine.gguf, SYSTEM and a PARAMETER: the client
    # uploads the file to /api/blobs/sha256:HEX, then creates the model of it.
    source = tinymodel.write_tiny_model(tmp_path / "mine.gguf", chat_template=CHAT_TEMPLATE, seed=7)
    digest = "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    blob = rbeed.state_dir / "blobs" / digest.replace(":", "-")
    client_of_ollama = ollama.Client(host=rbeed.url, timeout=30)
    assert (await client.request("HEAD", f"/api/blobs/{digest}")).status == 404
    assert await trio.to_thread.run_sync(client_of_ollama.create_blob, source) == digest
    assert (await client.request("HEAD", f"/api/blobs/{digest}")).status == 200
    assert blob.read_bytes() == source.read_bytes()
    inode = blob.stat().st_ino
    again = await client.request("POST", f"/api/blobs/{digest}", body=source.read_bytes())
    assert again.status == 200  # had: the body is read and dropped
    async with await open_stream(rbeed, unix=True) as stream:  # a client awaiting 100 Continue is not asked for it
        await stream.send_all(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: 500000\r\n"
                              "Expect: 100-continue\r\n\r\n".encode())  # fmt: skip
        reply = b""
        with trio.fail_after(10):
            while data := await stream.receive_some(65536):
                reply += data
    assert reply.startswith(b"HTTP/1.1 200 ") and b" 100 " not in reply

    statuses = await trio.to_thread.run_sync(lambda: [progress.status for progress in client_of_ollama.create(
        "mine:latest", files={"mine.gguf": digest}, system="Be brief.", parameters={"num_predict": 3}, stream=True,
        messages=[{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}])])
    assert statuses == [f"using blob {blob.name}", ANY, "success"] and "reading metadata" in statuses[1]
    model = await job_result(client, {"operation": "model_get", "id": "mine"})
    assert (model["sha256"], model["size"]) == (digest[7:], source.stat().st_size)
    assert (model["system"], model["defaults"], model["metadata"]["chat_template"]) == ("Be brief.", {"max_tokens": 3}, True)
    assert model["messages"] == [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."}]
    assert (rbeed.state_dir / "models" / "mine.gguf").read_bytes() == source.read_bytes()
    mine = rbeed.state_dir / "models" / "mine.gguf"
    assert blob.exists() and mine.stat().st_ino == inode  # its file by a link, not a copy; the blob stays
    answer = await post(client, "/api/chat", {"model": "mine", "messages": [{"role": "user", "content": "Hi"}],
                                              "stream": False, "keep_alive": 0, "options": {"temperature": 0}})  # fmt: skip
    assert answer[0] == 200 and answer[1]["eval_count"] == 3  # its num_predict (sampled, it could end at EOS)
    # So a create of it under another name needs no upload: `ollama create` asks HEAD first.
    assert (await client.request("HEAD", f"/api/blobs/{digest}")).status == 200
    made = await post(client, "/api/create", {"model": "theirs", "files": {"x.gguf": digest}, "stream": False})
    assert made == (200, {"status": "success"}) and (rbeed.state_dir / "models" / "theirs.gguf").stat().st_ino == inode

    # A second create of the same file (uploaded again) makes the record anew, of what it gives
    # (no system, no parameters); a blob uploaded anew (the old one removed by hand) is made a
    # link to the model's file. Another file under that name is refused, as a create from a model is.
    blob.unlink()
    await trio.to_thread.run_sync(client_of_ollama.create_blob, source)
    assert blob.stat().st_ino != inode
    made = await post(client, "/api/create", {"model": "mine", "files": {"x.gguf": digest}, "stream": False})
    assert made == (200, {"status": "success"}) and blob.stat().st_ino == inode and blob.stat().st_nlink == 3
    model = await job_result(client, {"operation": "model_get", "id": "mine"})
    assert (model["system"], model["defaults"], model["messages"]) == (None, {}, [])
    other = (rbeed.state_dir / "models" / "tiny.gguf").read_bytes()
    other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
    assert (await client.request("POST", f"/api/blobs/{other_digest}", body=other)).status == 201
    taken = await post(client, "/api/create", {"model": "mine", "files": {"x.gguf": other_digest}, "stream": False})
    assert taken[0] == 409 and taken[1]["error"].startswith(f"model mine already exists (sha256 {digest[7:]})")
    # A history for a model without a chat template is the request's fault (found once the file
    # is read): a 400, and no model is made.
    history = {"messages": [{"role": "user", "content": "Hi"}], "stream": False}
    refused = await post(client, "/api/create", {"model": "plain", "files": {"x.gguf": other_digest}} | history)
    assert refused == (400, {"error": "model plain has no chat template to put messages in: it continues prompts "
                                      "as they are"})  # fmt: skip
    assert "plain" not in [model["name"] for model in (await get(client, "/api/tags"))["models"]]

    # A file that is not a GGUF uploads (a blob is any file) but makes no model, and stays.
    junk = b"not a model" * 100_000  # over the 1 MiB body limit of other requests
    junk_digest = "sha256:" + hashlib.sha256(junk).hexdigest()
    assert (await client.request("POST", f"/api/blobs/{junk_digest}", body=junk)).status == 201
    failed = await post(client, "/api/create", {"model": "junk", "files": {"junk.gguf": junk_digest}, "stream": False})
    assert failed[0] == 400 and failed[1]["error"].startswith("not a valid GGUF model: "), failed
    assert (await client.request("HEAD", f"/api/blobs/{junk_digest}")).status == 200

    # The blob goes with the last model made of it.
    await trio.to_thread.run_sync(client_of_ollama.delete, "mine")
    assert blob.stat().st_ino == inode and (await client.request("HEAD", f"/api/blobs/{digest}")).status == 200
    await trio.to_thread.run_sync(client_of_ollama.delete, "theirs")
    assert not blob.exists() and (await client.request("HEAD", f"/api/blobs/{digest}")).status == 404


async def test_a_blob_stays_for_a_create_that_takes_it_while_the_last_model_made_of_it_is_deleted(
        rbeed, client, tmp_path):  # fmt: skip
    source = tinymodel.write_tiny_model(tmp_path / "shared.gguf", seed=11)
    digest = "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    blob = rbeed.state_dir / "blobs" / digest.replace(":", "-")
    assert (await client.request("POST", f"/api/blobs/{digest}", body=source.read_bytes())).status == 201
    assert (await post(client, "/api/create", {"model": "first", "files": {"f.gguf": digest}, "stream": False}))[0] == 200
    create = {"operation": "model_download", "model": str(blob), "id": "second"}
    async with job_events(client, create) as (_, events):
        async for event in events:  # linked: its record is written once its metadata is read
            if event.event == "narration" and "reading metadata" in json.loads(event.data)["message"]:
                break
        await job_result(client, {"operation": "model_delete", "id": "first"})
        assert end_marker(await rest_of(events, 30)) == "[DONE]"
    second = rbeed.state_dir / "models" / "second.gguf"
    assert blob.stat().st_ino == second.stat().st_ino
    await job_result(client, {"operation": "model_delete", "id": "second"})
    assert not blob.exists()


async def test_of_two_uploads_of_one_blob_at_once_the_first_to_end_is_kept(rbeed, client):
    # A model may be made of it by then: the second must not put a file of its own in its place.
    body = b"GGUF" + bytes(range(256)) * 4000
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    blob = rbeed.state_dir / "blobs" / digest.replace(":", "-")
    async with await open_stream(rbeed, unix=True) as stream:
        await stream.send_all(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                              "Connection: close\r\n\r\n".encode() + body[:1000])  # fmt: skip
        with trio.fail_after(10):
            while not any(rbeed.state_dir.joinpath("blobs").glob(".*.part")):  # the first has begun
                await trio.sleep(0.01)
        assert (await client.request("POST", f"/api/blobs/{digest}", body=body)).status == 201
        inode = blob.stat().st_ino
        await stream.send_all(body[1000:])
        reply = b""
        with trio.fail_after(10):
            while data := await stream.receive_some(65536):
                reply += data
    assert reply.startswith(b"HTTP/1.1 201 ") and blob.stat().st_ino == inode and blob.read_bytes() == body
    assert not list(rbeed.state_dir.joinpath("blobs").glob(".*.part"))


async def test_a_blob_that_is_not_what_its_digest_says_is_refused_and_leaves_nothing(rbeed, client):
    body = b"GGUF and more" * 100_000
    blobs = rbeed.state_dir / "blobs"
    before = set(blobs.iterdir()) if blobs.exists() else set()
    wrong = await client.request("POST", f"/api/blobs/sha256:{'0' * 64}", body=body)
    assert wrong.status == 400 and wrong.json() == {
        "error": f"digest mismatch: the body's sha256 is {hashlib.sha256(body).hexdigest()}, not {'0' * 64}"}
    for digest, why in [("sha256:xyz", "invalid digest 'sha256:xyz'"), ("md5:" + "0" * 32, "invalid digest 'md5:")]:
        refused = await client.request("POST", f"/api/blobs/{digest}", body=b"x")
        assert refused.status == 400 and refused.json()["error"].startswith(why)
    assert (await client.request("GET", f"/api/blobs/sha256:{'0' * 64}")).headers["allow"] == "HEAD, POST"
    assert set(blobs.iterdir()) == before  # no blob, no part


async def test_a_start_removes_blobs_that_no_create_took_and_parts_of_cut_uploads(tmp_path):
    source = tinymodel.write_tiny_model(tmp_path / "kept.gguf", seed=5)
    digest = "sha256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    blobs = tmp_path / "state" / "blobs"
    kept = blobs / digest.replace(":", "-")
    daemon = await trio.to_thread.run_sync(start_daemon, tmp_path)
    try:
        async with daemon.client() as client:
            assert (await client.request("POST", f"/api/blobs/{digest}", body=source.read_bytes())).status == 201
            made = await post(client, "/api/create", {"model": "kept", "files": {"k.gguf": digest}, "stream": False})
            assert made[0] == 200
    finally:
        assert daemon.stop() == 0, daemon.log()
    left = [blobs / f"sha256-{'a' * 64}", blobs / f".sha256-{'b' * 64}.0123abcd.part"]
    for path in left:
        path.write_bytes(b"GGUF")
    daemon = await trio.to_thread.run_sync(start_daemon, tmp_path)
    try:
        assert list(blobs.iterdir()) == [kept]  # a model's file stays
        assert f"removed {left[0].name}, uploaded and never made a model" in daemon.log()
        assert f"removed {kept.name}" not in daemon.log()
    finally:
        assert daemon.stop() == 0, daemon.log()


@pytest.mark.parametrize(("given", "seconds"), [
    (None, None), (300, 300.0), (0, 0.0), (-1, -1.0), (-30, -1.0), ("300", 300.0), ("5m", 300.0), ("1h30m", 5400.0),
    ("250ms", 0.25), ("1.5h", 5400.0), ("-1", -1.0), ("-1m", -1.0), ("0s", 0.0),
])  # fmt: skip
def test_keep_alive_takes_seconds_or_go_durations(given, seconds):
    assert keep_alive_seconds(given) == seconds


@pytest.mark.parametrize("given", ["", "5 minutes", "m", "5d", "1h-3m"])
def test_keep_alive_refuses_what_is_not_a_duration(given):
    with pytest.raises(Refused, match="is not a duration"):
        keep_alive_seconds(given)
