"""The OpenAI-compatible routes on the real daemon, with real workers running the tiny model."""

from __future__ import annotations

import json
import re

import openai
import pytest
import trio

import tinymodel
from support import job_result, logged, register, register_copy, running_daemon
from test_infer import CHAT_TEMPLATE

COMPLETION = {"model": "tiny", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 12}
PARTS = [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]
CHAT = {"model": "chatty", "temperature": 0, "max_tokens": 10,
        "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": PARTS}]}
# The same chat as an infer job's messages: "developer" is OpenAI's newer name for "system".
CHAT_MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


@pytest.fixture(scope="module")
def rbeed(tiny_model, tmp_path_factory):
    chatty = tinymodel.write_tiny_model(tmp_path_factory.mktemp("chatty") / "chatty.gguf", chat_template=CHAT_TEMPLATE)
    # A small delay per token, so that a stream can be left while it runs.
    with running_daemon("[workers]\nthreads = 2\n", {"RBEED_WORKER_TOKEN_DELAY": "0.02"}) as daemon:
        trio.run(register, daemon, tiny_model, chatty)
        yield daemon


@pytest.fixture
async def client(rbeed):
    async with rbeed.client() as client:
        yield client


async def post(client, path: str, body: dict) -> tuple[int, dict]:
    with trio.fail_after(30):
        response = await client.request("POST", path, json=body)
    return response.status, response.json()


async def stream(client, path: str, body: dict) -> list:
    """The `data:` payloads of a streamed completion, decoded, up to and including "[DONE]"."""
    with trio.fail_after(30):
        async with client.stream("POST", path, json=body | {"stream": True}) as response:
            assert (response.status, response.headers["content-type"]) == (200, "text/event-stream")
            return [event.data if event.data == "[DONE]" else json.loads(event.data)
                    async for event in response.aiter_sse()]  # fmt: skip


async def test_models_are_the_catalog(client):
    response = await client.request("GET", "/v1/models")
    assert response.status == 200
    listing = response.json()
    assert listing["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"]) for m in listing["data"]] == [
        ("chatty", "model", "rbeed"), ("tiny", "model", "rbeed"),
    ]  # fmt: skip
    assert all(isinstance(m["created"], int) for m in listing["data"])
    response = await client.request("GET", "/v1/models/tiny")  # what openai's models.retrieve asks
    assert (response.status, response.json()) == (200, listing["data"][1])
    for unknown in ("gone", "llama3:8b", ""):
        response = await client.request("GET", f"/v1/models/{unknown}")
        error = response.json()["error"]
        assert (response.status, error["code"], error["param"]) == (404, "model_not_found", "model"), unknown
        assert error["message"] == f"unknown model {unknown!r} (known: chatty, tiny)"


async def test_without_max_tokens_a_completion_may_fill_the_context(rbeed, client):
    """As with llama-server and Ollama: no limit but the end of text, or of the context (2048)."""
    for path, body in [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]:
        body = {key: value for key, value in body.items() if key != "max_tokens"}
        status, answer = await post(client, path, body)
        assert status == 200, answer
        prompt = answer["usage"]["prompt_tokens"]
        await logged(rbeed, rf"{prompt} prompt tokens \(\d+ cached\), up to {2048 - prompt} new$")  # the worker's


async def test_a_completion_is_an_infer_job_with_its_text_and_usage(client):
    status, answer = await post(client, "/v1/completions", COMPLETION)
    assert status == 200, answer
    native = await job_result(client, {"operation": "infer", "stream": False, **COMPLETION})
    assert answer["object"] == "text_completion" and answer["model"] == "tiny"
    [choice] = answer["choices"]
    assert (choice["index"], choice["text"], choice["finish_reason"]) == (0, native["text"], "length")
    assert answer["usage"] == {"prompt_tokens": native["prompt_tokens"], "completion_tokens": 12,
                               "total_tokens": native["prompt_tokens"] + 12}  # fmt: skip
    # Its id is the job's: listed, inspectable and cancellable like any other job.
    job = (await client.request("GET", f"/v1/jobs/{answer['id']}")).json()
    assert (job["operation"], job["state"]) == ("infer", "completed")

    word = choice["text"].split()[3]  # `stop` as one string, as OpenAI's clients may send it
    stopped = (await post(client, "/v1/completions", COMPLETION | {"stop": word}))[1]["choices"][0]
    assert (stopped["text"], stopped["finish_reason"]) == (choice["text"].partition(word)[0], "stop")


async def test_top_p_zero_keeps_the_likeliest_token_as_openai_allows(client):
    greedy = (await post(client, "/v1/completions", COMPLETION | {"temperature": 0}))[1]["choices"][0]["text"]
    status, answer = await post(client, "/v1/completions", COMPLETION | {"temperature": 1.5, "top_p": 0, "seed": 7})
    assert (status, answer["choices"][0]["text"]) == (200, greedy), answer


async def test_a_null_is_a_field_left_out_as_openai_takes_it(client):
    status, answer = await post(client, "/v1/completions", COMPLETION | {"n": None, "stream": None, "echo": None, "stop": None})
    assert status == 200, answer
    assert answer["choices"][0]["text"] == (await post(client, "/v1/completions", COMPLETION))[1]["choices"][0]["text"]


async def test_penalties_and_min_p_reach_the_infer_job(client):
    long = COMPLETION | {"max_tokens": 64}
    plain = (await post(client, "/v1/completions", long))[1]["choices"][0]["text"]
    # OpenAI's two penalties, and llama-server's repeat_penalty, repeat_last_n and min_p.
    for penalty in ({"frequency_penalty": 1.5}, {"presence_penalty": 1.5}, {"repeat_penalty": 1.5, "min_p": 0.1},
                    {"repeat_penalty": 1.5, "repeat_last_n": -1}):
        answer = (await post(client, "/v1/completions", long | penalty))[1]["choices"][0]["text"]
        native = await job_result(client, {"operation": "infer", "stream": False, **long, **penalty})
        assert answer == native["text"] != plain, penalty
    off = (await post(client, "/v1/completions", long | {"repeat_penalty": 1.5, "repeat_last_n": 0}))[1]
    assert off["choices"][0]["text"] == plain  # over no tokens: no penalty


async def test_logit_bias_by_token_id_as_openais_client_sends_it(rbeed):
    word = tinymodel.WORDS[7]  # "▁word": the tiny model's ids are its VOCAB's indexes
    bias = {str(tinymodel.VOCAB.index(word)): 100}
    client = openai.OpenAI(base_url=f"{rbeed.url}/v1", api_key="unused", max_retries=0, timeout=30)
    answer = await trio.to_thread.run_sync(lambda: client.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=3, temperature=0, logit_bias=bias))  # fmt: skip
    assert answer.choices[0].text == word.replace(tinymodel.SPACE, " ") * 3


async def test_a_streamed_completion_sends_chunks_then_usage_then_done(client):
    _, whole = await post(client, "/v1/completions", COMPLETION)
    chunks = await stream(client, "/v1/completions", COMPLETION | {"stream_options": {"include_usage": True}})
    assert chunks[-1] == "[DONE]"
    *tokens, last, usage = chunks[:-1]
    assert len(tokens) == 12 and all(chunk["choices"][0]["finish_reason"] is None for chunk in tokens)
    assert "".join(chunk["choices"][0]["text"] for chunk in tokens) == whole["choices"][0]["text"]
    assert last["choices"][0] == {"index": 0, "text": "", "finish_reason": "length", "logprobs": None}
    assert (usage["choices"], usage["usage"]) == ([], whole["usage"])
    assert len({chunk["id"] for chunk in chunks[:-1]}) == 1 and tokens[0]["id"].startswith("job-")
    # Without include_usage, no usage chunk.
    plain = await stream(client, "/v1/completions", COMPLETION)
    assert len(plain) == 14 and "usage" not in plain[-2]


async def test_a_chat_goes_through_the_models_template(client):
    status, answer = await post(client, "/v1/chat/completions", CHAT)
    assert status == 200, answer
    native = await job_result(client, {"operation": "infer", "stream": False, **CHAT, "messages": CHAT_MESSAGES})
    assert answer["object"] == "chat.completion"
    [choice] = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": native["text"]}
    assert answer["usage"]["completion_tokens"] == native["completion_tokens"]

    chunks = await stream(client, "/v1/chat/completions", CHAT)
    assert chunks[-1] == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    deltas = [chunk["choices"][0]["delta"] for chunk in chunks[:-1]]
    assert deltas[0]["role"] == "assistant" and all("role" not in delta for delta in deltas[1:])
    assert "".join(delta.get("content", "") for delta in deltas) == native["text"]
    assert deltas[-1] == {} and chunks[-2]["choices"][0]["finish_reason"] == native["finish_reason"]


async def test_response_format_holds_a_chat_to_json_as_infers_format_does(client):
    schema = {"type": "object", "properties": {"mood": {"enum": ["glad", "sad"]}, "words": {"type": "integer"}},
              "required": ["mood", "words"]}  # fmt: skip
    answers = {}
    for name, response_format, format in [
        ("schema", {"type": "json_schema", "json_schema": {"name": "mood", "schema": schema, "strict": True}}, schema),
        ("object", {"type": "json_object"}, "json"), ("text", {"type": "text"}, None),
    ]:  # fmt: skip
        _, answer = await post(client, "/v1/chat/completions", CHAT | {"max_tokens": 60, "response_format": response_format})
        text = answer["choices"][0]["message"]["content"]
        native = await job_result(client, {"operation": "infer", "stream": False, **CHAT, "max_tokens": 60,
                                           "messages": CHAT_MESSAGES, "format": format})  # fmt: skip
        assert text == native["text"], name
        answers[name] = text
    assert list(json.loads(answers["schema"])) == ["mood", "words"] and json.loads(answers["schema"])["mood"] in ("glad", "sad")
    assert isinstance(json.loads(answers["object"]), dict)
    # A completion takes it too, as llama-server's does.
    completion = COMPLETION | {"max_tokens": 60, "response_format": {"type": "json_object"}}
    text = (await post(client, "/v1/completions", completion))[1]["choices"][0]["text"]
    assert isinstance(json.loads(text), dict)
    with pytest.raises(ValueError):
        json.loads(answers["text"])  # the tiny model's own words


async def test_grammar_holds_completions_and_chats_to_gbnf_as_llama_servers_does(client):
    grammar = 'root ::= ("yes" | "no") (", " [a-z]{1,8}){1,3} "."'
    for path, body in [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]:
        for seed in (1, 2):
            status, answer = await post(client, path, body | {"temperature": 1.0, "seed": seed, "max_tokens": 60,
                                                               "grammar": grammar})  # fmt: skip
            assert status == 200, answer
            choice = answer["choices"][0]
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            assert re.fullmatch(r"(yes|no)(, [a-z]{1,8}){1,3}\.", text) and choice["finish_reason"] == "stop", text
    status, answer = await post(client, "/v1/completions", COMPLETION | {"grammar": 'root ::= "a" | b'})
    assert (status, answer["error"]["param"]) == (400, "grammar")
    assert answer["error"]["message"] == "`grammar`: Undefined rule identifier 'b'"


@pytest.mark.parametrize(("path", "body", "status", "param", "message"), [
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model", "unknown model 'nope' (known: chatty, tiny)"),
    ("/v1/completions", {"model": "llama3:8b", "prompt": "x"}, 404, "model", "unknown model 'llama3:8b'"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt", "Object missing required field `prompt`"),
    ("/v1/completions", COMPLETION | {"max_tokens": 0}, 400, "max_tokens", "Expected `int` >= 1 - at `$.max_tokens`"),
    ("/v1/completions", COMPLETION | {"temperature": "hot"}, 400, "temperature", "Expected `float | null`, got `str`"),
    ("/v1/completions", COMPLETION | {"prompt": ["a", "b"]}, 400, "prompt", "give one prompt per request"),
    ("/v1/completions", COMPLETION | {"n": 2}, 400, "n", "n is not supported by rbeed"),
    ("/v1/completions", COMPLETION | {"presence_penalty": 2.5}, 400, "presence_penalty",
     "Expected `float` <= 2.0 - at `$.presence_penalty`"),
    ("/v1/completions", COMPLETION | {"echo": True}, 400, "echo", "echo is not supported by rbeed"),
    ("/v1/completions", COMPLETION | {"logit_bias": {"the": 1}}, 400, "logit_bias",
     "logit_bias keys must be token ids: integers, as text"),
    ("/v1/completions", COMPLETION | {"logit_bias": {"-1": 1}}, 400, "logit_bias",
     "Expected `int` >= 0 - at `key` in `$.logit_bias`"),
    ("/v1/completions", COMPLETION | {"logit_bias": {"5": 101}}, 400, "logit_bias[...]",
     "Expected `float` <= 100.0 - at `$.logit_bias[...]`"),
    ("/v1/completions", COMPLETION | {"logit_bias": {"5": 1, "100000": 1}}, 400, "logit_bias",
     "logit_bias: token 100000 is not one of tiny's (ids 0 to 598)"),
    # llama.cpp aborts on a token id past the vocabulary: its worker died of it.
    ("/v1/completions", COMPLETION | {"grammar": "root ::= <[5]> <[100000]>"}, 400, "grammar",
     "grammar: token 100000 is not one of tiny's (ids 0 to 598)"),
    ("/v1/completions", COMPLETION | {"grammar": "root ::= <nosuchtoken>"}, 400, None,  # the worker finds it out
     "the output's grammar does not parse (is each <token> in it one of the model's?)"),
    ("/v1/completions", COMPLETION | {"grammar": "root ::= [z-a]"}, 400, None,  # llama.cpp aborted on it
     "the grammar allows no token here: it matches nothing"),
    ("/v1/chat/completions", CHAT | {"tools": [{"type": "function"}]}, 400, "tools", "tools is not supported"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "tool", "content": "4"}]}, 400, "messages[0].role",
     "role 'tool' is not supported; use system, user or assistant"),
    ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content", "only text content parts are supported"),
    ("/v1/chat/completions", CHAT | {"model": "tiny"}, 400, "messages",
     "the model has no chat template: send a `prompt` instead of `messages`"),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "yaml"}}, 400, "response_format.type",
     "Invalid enum value 'yaml' - at `$.response_format.type`"),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "json_schema"}}, 400, "response_format",
     "response_format of type json_schema needs json_schema.schema"),
    ("/v1/chat/completions", CHAT | {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
     400, "response_format", "`response_format`: cannot make a grammar of this JSON Schema: Unrecognized schema"),
])  # fmt: skip
async def test_bad_requests_get_openais_error_shape_naming_the_field(client, path, body, status, param, message):
    got, answer = await post(client, path, body)
    assert got == status, answer
    error = answer["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert error["message"].startswith(message)


async def test_malformed_json_and_wrong_methods(client):
    response = await client.request("POST", "/v1/chat/completions", body=b'{"model": ')
    assert response.status == 400 and response.json()["error"]["message"].startswith("malformed JSON: ")
    deep = b'{"model": "tiny", "prompt": "x", "response_format": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001
    response = await client.request("POST", "/v1/completions", body=deep)  # msgspec raises RecursionError
    assert response.status == 400 and response.json()["error"]["message"] == "JSON nested too deeply"
    response = await client.request("GET", "/v1/chat/completions")
    assert (response.status, response.headers["allow"]) == (405, "POST")
    assert response.json()["error"] == {"message": "method GET not allowed; allowed: POST",
                                        "type": "invalid_request_error", "param": None, "code": None}  # fmt: skip
    for path in ("/v1/models", "/v1/models/tiny"):
        response = await client.request("POST", path)
        assert (response.status, response.headers["allow"]) == (405, "GET")
        assert (await client.request("HEAD", path)).status == 200  # HEAD goes with GET


async def test_errors_from_outside_the_routes_have_openais_shape_too(rbeed, client):
    # OpenAI's client libraries take an error's message from this shape only (else they show the body).
    def openai_error(message: str) -> dict:
        return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}

    too_big = await client.request("POST", "/v1/chat/completions", json=CHAT | {"x": "a" * (1 << 20)})
    assert (too_big.status, too_big.json()) == (413, openai_error("request body over 1048576 bytes"))
    unknown = await client.request("POST", "/v1/responses", json={})
    assert (unknown.status, unknown.json()) == (404, openai_error("no such path: /v1/responses"))
    # The job API keeps its own.
    job = await client.request("GET", "/v1/jobs/nope")
    assert (job.status, job.json()) == (404, {"error": "unknown job 'nope'"})
    client_of_openai = openai.OpenAI(base_url=f"{rbeed.url}/v1", api_key="none", max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as refused:
        await trio.to_thread.run_sync(lambda: client_of_openai.chat.completions.create(
            model="chatty", messages=[{"role": "user", "content": "a" * (1 << 20)}]))
    assert refused.value.message == "Error code: 413 - request body over 1048576 bytes"


async def test_a_failure_before_any_output_is_an_http_error_not_a_stream(rbeed, client, tiny_model):
    _, installed = await register_copy(rbeed, client, tiny_model, "broken")
    installed.write_bytes(b"<html>gone</html>")
    for streamed in (False, True):
        with trio.fail_after(30):
            response = await client.request("POST", "/v1/completions", json=COMPLETION | {"model": "broken",
                                                                                          "stream": streamed})
        assert (response.status, response.headers["content-type"]) == (500, "application/json")
        error = response.json()["error"]
        assert error["type"] == "server_error" and "not a GGUF file" in error["message"], error
    await job_result(client, {"operation": "model_delete", "id": "broken"})


async def test_a_chat_the_models_template_refuses_is_the_clients_error_not_the_servers(client):
    # Only the worker, rendering the template, finds it out: it tells a refusal from a failure.
    refused = CHAT | {"messages": [{"role": "assistant", "content": "Hi"}]}
    for streamed in (False, True):
        with trio.fail_after(30):
            response = await client.request("POST", "/v1/chat/completions", json=refused | {"stream": streamed})
        assert (response.status, response.headers["content-type"]) == (400, "application/json")
        assert response.json()["error"] == {"message": "the model's chat template refused the messages: a chat starts "
                                                       "with the user", "type": "invalid_request_error",
                                            "param": None, "code": None}  # fmt: skip


async def test_a_client_that_leaves_mid_stream_cancels_its_job(client):
    long = COMPLETION | {"max_tokens": 500, "stream": True}
    with trio.fail_after(30):
        async with client.stream("POST", "/v1/completions", json=long) as response:
            async for event in response.aiter_sse():
                job_id = json.loads(event.data)["id"]
                break  # leaving the block closes the connection
        while (job := (await client.request("GET", f"/v1/jobs/{job_id}")).json())["state"] == "running":
            await trio.sleep(0.02)  # bounded by fail_after: the daemon notices the close at once
    assert job["state"] == "cancelled"
    # The worker is free at once for the next request.
    status, answer = await post(client, "/v1/completions", COMPLETION | {"max_tokens": 2})
    assert status == 200 and answer["usage"]["completion_tokens"] == 2


async def test_a_completion_cancelled_by_delete_is_answered_503(rbeed, client):
    answers = []

    async def complete() -> None:
        async with rbeed.client() as own:
            answers.append(await post(own, "/v1/completions", COMPLETION | {"max_tokens": 500}))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(complete)
            while not (running := (await client.request("GET", "/v1/jobs?state=running")).json()):
                await trio.sleep(0.02)  # until the request has made its job
            assert (await client.request("DELETE", f"/v1/jobs/{running[0]['job_id']}")).status == 200
    [(status, answer)] = answers
    assert (status, answer["error"]["message"], answer["error"]["type"]) == (503, "job cancelled", "server_error")


async def test_a_stream_cancelled_after_its_first_token_ends_with_an_error_event_and_no_done(client):
    long = COMPLETION | {"max_tokens": 500, "stream": True}
    with trio.fail_after(30):
        async with client.stream("POST", "/v1/completions", json=long) as response:
            events = response.aiter_sse()
            first = json.loads((await events.__anext__()).data)
            assert (await client.request("DELETE", f"/v1/jobs/{first['id']}")).status == 200
            rest = [event.data async for event in events]
    assert json.loads(rest[-1]) == {"error": {"message": "job cancelled", "type": "server_error"}}
    assert "[DONE]" not in rest and all("choices" in json.loads(data) for data in rest[:-1])
