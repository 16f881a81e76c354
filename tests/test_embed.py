"""Embeddings end to end: embed jobs, Ollama's /api/embed and /api/embeddings, OpenAI's /v1/embeddings
and `rbee embed`, on the real daemon with real workers running the tiny model."""

from __future__ import annotations

import json

import gguf
import numpy
import ollama
import openai
import pytest
import trio

import tinymodel
from rbeed import wire
from support import end_marker, job_error, job_events, job_result, logged, register, rest_of, running_daemon
from test_cli import cli_env, rbee

# The last is longer than a worker's batch (32 tokens): its mean is taken across batches.
TEXTS = ["Hello", "The capital of France is Paris.", "the cat sat on the mat; " * 30]
EMBED = {"operation": "embed", "model": "tiny"}
N_EMBD = 64  # the tiny model's


@pytest.fixture(scope="module")
def embedder(tiny_model):
    with running_daemon("[workers]\nthreads = 2\n") as daemon:
        trio.run(register, daemon, tiny_model)
        yield daemon


@pytest.fixture(scope="module")
def pooling_models(embedder, tmp_path_factory) -> dict[str, str]:
    """Embedding models whose GGUF names their pooling: the tiny model's weights with `last`,
    `cls` or `rank`; registered in `embedder`, by their paths."""
    made = {name: tinymodel.write_tiny_model(tmp_path_factory.mktemp(name) / f"tiny-{name}.gguf", pooling_type=kind)
            for name, kind in (("last", gguf.PoolingType.LAST), ("cls", gguf.PoolingType.CLS),
                               ("rank", gguf.PoolingType.RANK))}  # fmt: skip
    trio.run(register, embedder, *made.values())
    return {name: str(path) for name, path in made.items()}


@pytest.fixture
async def client(embedder):
    async with embedder.client() as client:
        yield client


@pytest.fixture(scope="module")
def pooled(tiny_model) -> numpy.ndarray:
    """What llama.cpp's own mean pooling makes of TEXTS, each input in one batch."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(tiny_model), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                          n_ctx=2048, n_batch=2048, n_ubatch=2048, verbose=False)  # fmt: skip
    try:
        return numpy.array(llm.embed(TEXTS, normalize=False))
    finally:
        llm.close()


@pytest.fixture(scope="module")
def reference(pooled) -> numpy.ndarray:
    """The same at unit length."""
    return unit(pooled)


async def embed(client, **fields) -> dict:
    return await job_result(client, EMBED | fields)


def unit(vectors) -> numpy.ndarray:
    vectors = numpy.asarray(vectors, dtype=numpy.float64)
    return vectors / numpy.linalg.norm(vectors, axis=-1, keepdims=True)


async def test_vectors_are_llama_cpps_mean_pooling_even_across_batches(client, reference):
    result = await embed(client, input=TEXTS)
    assert result.keys() == {"model", "worker_id", "load_ms", "prompt_tokens", "embeddings"}
    vectors = numpy.array(result["embeddings"])
    assert vectors.shape == (3, N_EMBD)
    assert numpy.allclose(numpy.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert numpy.abs(vectors - reference).max() < 1e-5
    assert result["prompt_tokens"] > 32 + 2 + 8  # the long one alone spans several batches
    # Texts that differ give vectors that differ: not one vector for everything.
    assert numpy.abs(vectors[0] - vectors[1]).max() > 0.01


@pytest.mark.parametrize("pooling", ["last", "cls"])
async def test_a_models_own_pooling_is_llama_cpps(client, pooling_models, pooling):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=pooling_models[pooling], embedding=True, n_ctx=2048, n_batch=2048,
                          n_ubatch=2048, verbose=False)  # fmt: skip (the GGUF's pooling, as llama.cpp reads it)
    try:
        expected = numpy.array(llm.embed(TEXTS, normalize=True))
    finally:
        llm.close()
    vectors = numpy.array((await embed(client, model=f"tiny-{pooling}", input=TEXTS))["embeddings"])
    assert numpy.abs(vectors - expected).max() < 1e-5
    mean = numpy.array((await embed(client, input=TEXTS))["embeddings"])
    assert numpy.abs(vectors[2] - mean[2]).max() > 0.01  # not the mean, for the long text at least


async def test_a_rerankers_gguf_is_refused(client, pooling_models):
    error = await job_error(client, EMBED | {"model": "tiny-rank", "input": "x"})
    assert error == "the model ranks documents (a reranker): it makes no embeddings"


@pytest.fixture(scope="module")
def encoder(embedder, tmp_path_factory) -> str:
    """A BERT (tinymodel.write_tiny_encoder), registered in `embedder` as tiny-encoder; its path."""
    path = tinymodel.write_tiny_encoder(tmp_path_factory.mktemp("encoder") / "tiny-encoder.gguf")
    trio.run(register, embedder, path)
    return str(path)


# Of ~240 tokens: in one batch, as an encoder's attention looks at every token of its input.
ENCODER_TEXTS = ["Hello", "the cats walked home.", "the dog ran far away, and the bird sang. " * 20]


async def test_an_encoder_embeds_each_input_in_one_batch_as_llama_cpp_does(client, encoder):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=encoder, embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, verbose=False)
    try:
        expected = numpy.array(llm.embed(ENCODER_TEXTS, normalize=True))
        tokens = [len(llm.tokenize(text.encode(), add_bos=True, special=True)) for text in ENCODER_TEXTS]
    finally:
        llm.close()
    assert tokens[2] > 200 and tokens[1] == 8  # [CLS] the cat s walk ed home . [SEP]
    result = await embed(client, model="tiny-encoder", input=ENCODER_TEXTS)
    assert result["prompt_tokens"] == sum(tokens)
    vectors = numpy.array(result["embeddings"])
    assert vectors.shape == (3, N_EMBD) and numpy.abs(vectors - expected).max() < 1e-5
    assert numpy.abs(vectors[0] - vectors[1]).max() > 0.01
    worker = await job_result(client, {"operation": "worker_get", "id": result["worker_id"]})
    assert worker["model"] == "tiny-encoder" and worker["n_ctx"] == 512  # the model's own, not [workers]'s 2048


async def test_an_encoders_input_past_its_context_is_cut_or_refused(client, encoder):
    long = "the cat " * 300  # 602 tokens; the model was trained for 512
    cut = await embed(client, model="tiny-encoder", input=[long])
    assert cut["prompt_tokens"] == 512
    error = await job_error(client, EMBED | {"model": "tiny-encoder", "input": long, "truncate": False})
    assert error == "input 0 is 602 tokens, the context holds 512; truncate it, or ask for a larger n_ctx"


async def test_an_encoder_generates_nothing_and_loads_no_worker_to_say_so(embedder, client, encoder):
    before = await job_result(client, {"operation": "worker_list"})
    infer = {"operation": "infer", "model": "tiny-encoder", "prompt": "Hello"}
    assert await job_error(client, infer) == wire.EMBEDDINGS_ONLY
    generate = await client.request("POST", "/api/generate", json={"model": "tiny-encoder", "prompt": "Hello"})
    assert (generate.status, generate.json()) == (400, {"error": wire.EMBEDDINGS_ONLY})
    completion = await client.request("POST", "/v1/completions", json={"model": "tiny-encoder", "prompt": "Hello"})
    assert completion.status == 400
    assert (completion.json()["error"]["message"], completion.json()["error"]["param"]) == (wire.EMBEDDINGS_ONLY, "model")
    assert await job_result(client, {"operation": "worker_list"}) == before
    model = await job_result(client, {"operation": "model_get", "id": "tiny-encoder"})
    assert (model["metadata"]["causal"], model["metadata"]["pooling"]) == (False, "mean")


async def test_ollama_shows_an_encoder_as_an_embedding_model_without_a_pooling_too(embedder, client, tmp_path):
    unpooled = tinymodel.write_tiny_encoder(tmp_path / "tiny-unpooled.gguf", pooling_type=gguf.PoolingType.NONE)
    await register(embedder, unpooled)
    shown = await client.request("POST", "/api/show", json={"model": "tiny-unpooled"})
    assert (shown.status, shown.json()["capabilities"]) == (200, ["embedding"])
    await job_result(client, {"operation": "model_delete", "id": "tiny-unpooled"})


async def test_an_input_alone_gives_its_vector_in_a_batch_and_the_same_again(client):
    batch = (await embed(client, input=TEXTS))["embeddings"]
    alone = (await embed(client, input=TEXTS[1]))["embeddings"]
    again = (await embed(client, input=[TEXTS[1]]))["embeddings"]
    assert alone == again == [batch[1]]


async def test_unscaled_vectors_and_the_first_dimensions(client, pooled):
    raw = numpy.array((await embed(client, input=TEXTS, normalize=False))["embeddings"])
    assert numpy.abs(raw - pooled).max() < 1e-5 * numpy.abs(pooled).max()
    scaled = numpy.array((await embed(client, input=TEXTS))["embeddings"])
    assert not numpy.allclose(numpy.linalg.norm(raw, axis=1), 1.0, atol=1e-3)
    assert numpy.abs(unit(raw) - scaled).max() < 1e-6
    first8 = numpy.array((await embed(client, input=TEXTS, dimensions=8))["embeddings"])
    assert first8.shape == (3, 8)
    assert numpy.abs(first8 - unit(raw[:, :8])).max() < 1e-6
    whole = await embed(client, input="x", dimensions=N_EMBD, normalize=False)
    assert whole["embeddings"] == (await embed(client, input="x", normalize=False))["embeddings"]
    assert len(whole["embeddings"][0]) == N_EMBD


async def test_too_many_dimensions_fail_before_a_worker_loads(client):
    assert await job_error(client, EMBED | {"input": "x", "dimensions": N_EMBD + 1}) == (
        f"dimensions {N_EMBD + 1} is more than tiny has ({N_EMBD})")  # fmt: skip


async def test_an_input_longer_than_the_context_is_cut_or_refused(client):
    long = "the cat " * 1500  # ~3,000 tokens; the worker's context holds 2,048
    cut = await embed(client, input=[long, "Hello"])
    assert cut["prompt_tokens"] == 2048 + (await embed(client, input="Hello"))["prompt_tokens"]
    error = await job_error(client, EMBED | {"input": ["Hello", long], "truncate": False})
    assert error.startswith("input 1 is ") and error.endswith(
        " tokens, the context holds 2048; truncate it, or ask for a larger n_ctx")  # fmt: skip
    assert int(error.split()[3]) > 2048
    # The worker is unharmed, and embeds the same as before.
    assert (await embed(client, input=[long, "Hello"]))["embeddings"] == cut["embeddings"]


async def test_no_input_only_loads_the_model(embedder, client):
    result = await embed(client, input=[], keep_alive=-1)
    assert result["embeddings"] == [] and result["prompt_tokens"] == 0
    workers = await job_result(client, {"operation": "worker_list"})
    assert [w["state"] for w in workers if w["id"] == result["worker_id"]] == ["ready"]


async def test_a_worker_generates_as_before_after_embedding(client):
    prompt = {"operation": "infer", "model": "tiny", "prompt": "Once upon a time there was a cat", "max_tokens": 8}
    greedy = prompt | {"temperature": 0, "stream": False}
    before = (await job_result(client, greedy))["text"]
    await job_result(client, prompt)  # sampled: its prompt stays in the worker's context ...
    assert (await job_result(client, prompt))["cached_tokens"] > 0  # ... and is reused by the next
    await embed(client, input=TEXTS)
    # An embedding replaced the context's tokens: nothing of the prompt may be taken as cached.
    assert (await job_result(client, prompt))["cached_tokens"] == 0
    await embed(client, input=TEXTS)
    assert (await job_result(client, greedy))["text"] == before


async def test_deleting_a_running_embed_stops_it_and_frees_the_worker(embedder, client):
    # ~600,000 tokens (300 inputs cut to the 2,048-token context): many seconds of work.
    payload = EMBED | {"input": [" the cat" * 400] * 300}
    async with job_events(client, payload) as (job_id, events):
        started = await logged(embedder, r"^rbeed-worker: embedding (\d+): 300 input\(s\)$")
        response = await client.request("DELETE", f"/v1/jobs/{job_id}")
        assert response.status == 200
        rest = await rest_of(events, timeout=1)
    assert end_marker(rest) == "[CANCELLED]"
    with trio.fail_after(2):  # not behind the seconds the cancelled embedding had left
        assert len((await embed(client, input="Hello"))["embeddings"]) == 1
    assert f"rbeed-worker: embedding {started[1]}: cancelled\n" in embedder.log()


async def test_ollamas_client_gets_the_vectors(embedder, reference):
    client = ollama.Client(host=embedder.url, timeout=30)
    answer = await trio.to_thread.run_sync(lambda: client.embed(model="tiny:latest", input=TEXTS))
    assert answer.model == "tiny"
    assert numpy.abs(numpy.array(answer.embeddings) - reference).max() < 1e-5
    assert answer.prompt_eval_count > 32 and 0 < answer.load_duration < answer.total_duration
    loaded = await trio.to_thread.run_sync(lambda: client.embed(model="tiny", input=""))
    assert loaded.embeddings == []
    # The older route: one prompt, its vector as pooled (not unit length).
    older = await trio.to_thread.run_sync(lambda: client.embeddings(model="tiny", prompt=TEXTS[1]))
    assert abs(numpy.linalg.norm(older.embedding) - 1.0) > 1e-3
    assert numpy.abs(unit(older.embedding) - reference[1]).max() < 1e-5


@pytest.mark.parametrize(("body", "status", "says"), [
    ({"model": "nope", "input": "x"}, 404, "unknown model 'nope'"),
    ({"model": "tiny", "input": ["x", ""]}, 400, "at `$.input[1]`"),
    ({"model": "tiny", "input": "x", "dimensions": N_EMBD + 1}, 400, f"more than tiny has ({N_EMBD})"),
    ({"model": "tiny", "input": "x", "options": {"num_ctx": -1}}, 400, "at `$.options.num_ctx`"),
    ({"model": "tiny", "input": 5}, 400, "Expected `str | array`, got `int` - at `$.input`"),
])  # fmt: skip
async def test_ollamas_route_refuses_bad_requests_naming_the_field(client, body, status, says):
    response = await client.request("POST", "/api/embed", json=body)
    assert response.status == status and says in response.json()["error"], response.json()


async def test_openais_client_gets_the_vectors_in_base64_or_as_floats(embedder, reference):
    client = openai.OpenAI(base_url=f"{embedder.url}/v1", api_key="unused", timeout=30)
    # Unless told otherwise, OpenAI's library asks for base64 and decodes it.
    packed = await trio.to_thread.run_sync(lambda: client.embeddings.create(model="tiny", input=TEXTS))
    floats = await trio.to_thread.run_sync(
        lambda: client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float"))  # fmt: skip
    assert [item.index for item in packed.data] == [0, 1, 2]
    as_float32 = [numpy.array([item.embedding for item in answer.data], numpy.float32) for answer in (packed, floats)]
    assert (as_float32[0] == as_float32[1]).all()  # the same float32s, written two ways
    assert numpy.abs(numpy.array([item.embedding for item in floats.data]) - reference).max() < 1e-5
    assert packed.usage.prompt_tokens == packed.usage.total_tokens > 32
    short = await trio.to_thread.run_sync(lambda: client.embeddings.create(model="tiny", input="x", dimensions=4))
    assert len(short.data[0].embedding) == 4


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"model": "tiny", "input": [[1, 2, 3]]}, 400, "input"),
    ({"model": "tiny", "input": [""]}, 400, "input[0]"),
    ({"model": "tiny", "input": "x", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"model": "nope", "input": "x"}, 404, "model"),
])  # fmt: skip
async def test_openais_route_refuses_bad_requests_naming_the_param(client, body, status, param):
    response = await client.request("POST", "/v1/embeddings", json=body)
    assert response.status == status and response.json()["error"]["param"] == param, response.json()


def test_rbee_embed_prints_a_line_of_json_per_text(embedder):
    done = rbee(embedder, "embed", "Hello", "The capital of France is Paris.", "-m", "tiny", "--dimensions", "4")
    assert done.returncode == 0, done.stderr
    vectors = [json.loads(line) for line in done.stdout.splitlines()]
    assert [len(v) for v in vectors] == [4, 4] and vectors[0] != vectors[1]
    assert numpy.allclose(numpy.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    assert "2 vector(s) of 4 dimensions, " in done.stderr
    # With no TEXT, each line of stdin is one (blank ones skipped); the model is $RBEE_MODEL.
    piped = rbee(embedder, "embed", "--dimensions", "4", stdin="Hello\n\nThe capital of France is Paris.\n",
                 env=cli_env(RBEE_MODEL="tiny"))
    assert piped.returncode == 0, piped.stderr
    assert [json.loads(line) for line in piped.stdout.splitlines()] == vectors
    refused = rbee(embedder, "embed", "x", "-m", "tiny", "--dimensions", "999")
    assert refused.returncode == 1 and "dimensions 999 is more than tiny has (64)" in refused.stderr
