"""Tokenizing end to end: tokenize and detokenize jobs, llama-server's /tokenize and /detokenize and
`rbee tokenize|detokenize`, on the real daemon with real workers running the tiny model."""

from __future__ import annotations

import json

import llama_cpp
import pytest
import trio

import tinymodel
from support import job_error, job_result, register, register_copy, run_job, running_daemon
from test_cli import rbee

TEXT = "Once upon a time </s> in caf\u00e9s"


@pytest.fixture(scope="module")
def tokenizer(tiny_model) -> llama_cpp.Llama:
    """The tiny model's vocabulary in this process, as the reference."""
    return llama_cpp.Llama(model_path=str(tiny_model), vocab_only=True, verbose=False)


@pytest.fixture(scope="module")
def hive(tiny_model):
    with running_daemon() as daemon:
        trio.run(register, daemon, tiny_model)
        yield daemon


@pytest.fixture
async def client(hive):
    async with hive.client() as client:
        yield client


async def test_tokenize_gives_llama_cpps_tokens_and_detokenize_their_text(client, tokenizer):
    plain = await job_result(client, {"operation": "tokenize", "model": "tiny", "text": TEXT})
    assert plain.keys() == {"model", "worker_id", "load_ms", "tokens"}
    assert plain["tokens"] == tokenizer.tokenize(TEXT.encode(), add_bos=False, special=True)

    fields = {"operation": "tokenize", "model": "tiny", "text": TEXT, "add_special": True, "parse_special": False,
              "with_pieces": True}  # fmt: skip
    spelled = await job_result(client, fields)
    assert spelled["tokens"] == tokenizer.tokenize(TEXT.encode(), add_bos=True, special=False)
    assert spelled["tokens"][0] == 1 and 2 not in spelled["tokens"]  # a BOS; "</s>" as its letters
    assert len(spelled["pieces"]) == len(spelled["tokens"])
    assert spelled["pieces"][:3] == ["<s>", " ", "O"]
    # "é" is two byte tokens, neither a character on its own: each piece is its bytes.
    assert [piece for piece in spelled["pieces"] if isinstance(piece, list)] == [[0xC3], [0xA9]]

    text = await job_result(client, {"operation": "detokenize", "model": "tiny", "tokens": plain["tokens"]})
    assert text.keys() == {"model", "worker_id", "load_ms", "text"}
    # Sentencepiece's space before the text, and again after the special token; special tokens written out.
    assert text["text"] == " Once upon a time </s>  in caf\u00e9s"
    lone_byte = await job_result(client, {"operation": "detokenize", "model": "tiny", "tokens": [1, 0xC3 + 3]})
    assert lone_byte["text"] == "<s>\ufffd"  # <0xC3> on its own makes no character


async def test_ids_past_the_vocabulary_are_refused_before_any_worker_is_asked(client):
    events = await run_job(client, {"operation": "detokenize", "model": "tiny", "tokens": [5, 10**6]})
    last = len(tinymodel.VOCAB) - 1
    assert [(e.event, e.data) for e in events] == [
        ("end", f"[ERROR] tokens: token {10**6} is not one of tiny's (ids 0 to {last})")
    ]  # no narration: no worker was loaded or queued on
    refused = await client.request("POST", "/v1/jobs", json={"operation": "detokenize", "model": "tiny",
                                                             "tokens": [-1]})  # fmt: skip
    assert refused.status == 400 and "at `$.tokens[0]`" in refused.json()["error"]
    unknown = await job_error(client, {"operation": "tokenize", "model": "nope", "text": "x"})
    assert unknown.startswith("unknown model 'nope'")


async def test_llama_servers_routes(client, hive, tokenizer, tiny_model):
    async def post(path: str, body: dict) -> tuple[int, dict]:
        response = await client.request("POST", path, json=body)
        return response.status, response.json()

    # The only model of the catalog serves a request that names none, as llama-server's one model.
    assert await post("/tokenize", {"content": "Hello"}) == (200, {"tokens": tokenizer.tokenize(b"Hello", False, True)})
    status, answer = await post("/tokenize", {"content": "Hi", "add_special": True, "with_pieces": True})
    assert status == 200 and answer == {"tokens": [{"id": 1, "piece": "<s>"}, {"id": 259, "piece": " "},
                                                   {"id": 75, "piece": "H"}, {"id": 108, "piece": "i"}]}  # fmt: skip
    assert await post("/detokenize", {"tokens": [1, 259, 75, 108], "model": "tiny"}) == (200, {"content": "<s> Hi"})

    status, answer = await post("/detokenize", {"tokens": [10**6]})
    assert status == 400 and answer["error"]["param"] == "tokens"
    status, answer = await post("/tokenize", {"text": "Hello"})
    assert status == 400 and answer["error"]["param"] == "content"
    status, answer = await post("/tokenize", {"content": "Hello", "model": "nope"})
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    assert (await client.request("GET", "/tokenize")).status == 405

    await register_copy(hive, client, tiny_model, "tiny-two")
    status, answer = await post("/tokenize", {"content": "Hello"})
    assert status == 400 and answer["error"]["param"] == "model"
    assert "give the model: " in answer["error"]["message"] and "tiny-two" in answer["error"]["message"]


async def test_rbee_tokenize_and_detokenize(hive, tokenizer):
    ids = tokenizer.tokenize(TEXT.encode(), add_bos=False, special=True)
    done = await trio.to_thread.run_sync(rbee, hive, "tokenize", "-m", "tiny", TEXT)
    assert done.returncode == 0, done.stderr
    assert done.stdout == " ".join(map(str, ids)) + "\n"
    assert f"{len(ids)} token(s)" in done.stderr

    done = await trio.to_thread.run_sync(lambda: rbee(hive, "tokenize", "-m", "tiny", "--pieces", "--add-special",
                                                      stdin="Hi\n"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert [line.split("\t") for line in done.stdout.splitlines()] == [
        ["1", '"<s>"'], ["259", '" "'], ["75", '"H"'], ["108", '"i"'], ["13", json.dumps("\n")]
    ]  # fmt: skip

    done = await trio.to_thread.run_sync(rbee, hive, "detokenize", "-m", "tiny", *map(str, ids))
    assert done.returncode == 0, done.stderr
    assert done.stdout == " Once upon a time </s>  in caf\u00e9s\n"
    done = await trio.to_thread.run_sync(rbee, hive, "detokenize", "-m", "tiny", "7", "1000000")
    assert done.returncode == 1 and "tokens: token 1000000 is not one of tiny's" in done.stderr
