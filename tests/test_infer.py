"""Inference end to end: infer jobs on the real daemon and real workers running the tiny model."""

from __future__ import annotations

import json
import re
import shutil
import signal
import time

import jinja2
import llama_cpp
import pytest
import trio

import tinymodel

from support import (
    end_marker, is_token, job_error, job_events, job_result, logged, narrations, open_stream, pid_alive,
    read_events_until, rest_of, result_of, run_job, running_daemon, submit,
)  # fmt: skip

RESULT_FIELDS = {"model", "worker_id", "load_ms", "prompt_tokens", "cached_tokens", "completion_tokens", "finish_reason", "ttft_ms",
                 "tokens_per_s"}  # fmt: skip
# Greedy decoding of this prompt runs past 100 tokens without ending a sentence ...
GREEDY = {"operation": "infer", "model": "tiny", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 20}
# ... and of this one ends its sentence (".", then EOS) after a few words.
ENDS = {"operation": "infer", "model": "tiny", "prompt": "Hello", "temperature": 0, "max_tokens": 50}


async def prepare(daemon, tiny_model) -> dict:
    """Register the tiny model as "tiny" and "tiny2"; spawn one explicit worker on "tiny" (returned)."""
    copy = shutil.copyfile(tiny_model, daemon.state_dir.parent / "tiny2.gguf")
    async with daemon.client() as client:
        for source in (tiny_model, copy):
            await job_result(client, {"operation": "model_download", "model": str(source)})
        return await job_result(client, {"operation": "worker_spawn", "model": "tiny", "threads": 1})


def tokens(events) -> list[dict]:
    return [json.loads(e.data) for e in events if e.event == "token"]


def text_of(events) -> str:
    return "".join(token["t"] for token in tokens(events))


async def infer(client, payload: dict, timeout: float = 30) -> tuple[list, dict]:
    """Run an infer job that must succeed: its events and its result."""
    with trio.fail_after(timeout):
        events = await run_job(client, payload)
    assert end_marker(events) == "[DONE]", events
    return events, result_of(events)


# -- a daemon whose workers generate at full speed ------------------------------------------------


@pytest.fixture(scope="module")
def fast(tiny_model):
    with running_daemon("[workers]\nthreads = 2\nkeep_alive = 0\n") as daemon:
        yield daemon, trio.run(prepare, daemon, tiny_model)


@pytest.fixture
async def client(fast):
    async with fast[0].client() as client:
        yield client


async def test_streaming_gives_ordered_tokens_then_a_result(fast, client):
    events, result = await infer(client, GREEDY)
    assert [e.event for e in events] == ["token"] * 20 + ["result", "end"]
    assert [token["i"] for token in tokens(events)] == list(range(20))
    assert all(token.keys() == {"t", "i"} and token["t"] for token in tokens(events))
    assert result.keys() == RESULT_FIELDS
    assert (result["model"], result["worker_id"]) == ("tiny", fast[1]["id"])
    assert (result["completion_tokens"], result["finish_reason"]) == (20, "length")
    assert result["prompt_tokens"] > 1
    assert result["ttft_ms"] > 0 and result["tokens_per_s"] > 0


async def test_greedy_is_deterministic_and_stream_false_gives_the_same_text_at_once(client):
    streamed, _ = await infer(client, GREEDY)
    again, _ = await infer(client, GREEDY)
    assert text_of(streamed) == text_of(again)
    events, result = await infer(client, GREEDY | {"stream": False})
    assert [e.event for e in events] == ["result", "end"]
    assert result["text"] == text_of(streamed)
    assert len(result["text"].split()) == 20


async def test_the_same_seed_gives_the_same_text_and_another_seed_another(client):
    sampled = GREEDY | {"temperature": 1.0, "max_tokens": 30, "stream": False}
    texts = [(await infer(client, sampled | {"seed": seed}))[1]["text"] for seed in (1, 1, 2)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


async def test_repeat_presence_and_frequency_penalties_keep_greedy_text_from_repeating(client):
    long = GREEDY | {"max_tokens": 64, "stream": False}
    words = {}
    for name, penalty in [("none", {}), ("repeat", {"repeat_penalty": 1.5}), ("presence", {"presence_penalty": 1.5}),
                          ("frequency", {"frequency_penalty": 1.5})]:  # fmt: skip
        _, result = await infer(client, long | penalty)
        words[name] = result["text"].split()
    # The tiny model's greedy text comes back to the same words: 64 of them, ~36 distinct. Penalised,
    # it finds new ones (a repeat or two at most) until it ends its sentence.
    assert len(words["none"]) == 64 and len(set(words["none"])) < 45, words["none"]
    for name in ("repeat", "presence", "frequency"):
        assert len(words[name]) > 30 and len(set(words[name])) >= len(words[name]) - 2, (name, words[name])
        assert words[name][:30] == words["none"][:30]  # the same text until it would repeat


async def test_repeat_last_n_is_how_far_back_the_penalties_look(client):
    long = GREEDY | {"max_tokens": 64, "stream": False, "repeat_penalty": 1.5}
    texts = {n: (await infer(client, long | ({} if n is None else {"repeat_last_n": n})))[1]["text"].split()
             for n in (None, 64, 0, 8, 32, -1)}  # fmt: skip
    plain = (await infer(client, long | {"repeat_penalty": 1.0}))[1]["text"].split()
    # Unpenalised, the tiny model's greedy text comes back to its words every ~28 of them.
    assert len(plain) == 64 and len(set(plain)) < 40, plain
    assert texts[0] == texts[8] == plain  # no penalty, or one over fewer words than come between repeats
    assert texts[32] != plain and len(set(texts[32])) > len(set(plain))  # some repeats caught
    assert texts[None] == texts[64]  # 64 by default, as llama-server's and Ollama's
    for n in (64, -1):  # -1: the whole context
        assert len(set(texts[n])) >= len(texts[n]) - 2, (n, texts[n])


async def test_the_penalties_count_the_prompts_tokens_as_llama_servers_do(client):
    # A repeat penalty below 1 favours the tokens in its window: the prompt's among them, the
    # first token is one of those (a word the tiny vocabulary has whole: the rest is letters).
    one = GREEDY | {"max_tokens": 1, "stream": False}
    prompt = (await job_result(client, {"operation": "tokenize", "model": "tiny", "text": GREEDY["prompt"],
                                        "add_special": True}))["tokens"]  # fmt: skip
    plain = (await infer(client, one))[1]["text"]
    texts = {n: (await infer(client, one | {"repeat_penalty": 0.01, "repeat_last_n": n}))[1]["text"] for n in (64, 0)}
    assert texts[64] != plain and token_id(texts[64]) in prompt, (plain, texts, prompt)
    assert texts[0] == plain  # a window of none: nothing counted


async def test_min_p_of_one_leaves_only_the_likeliest_token_to_sample(client):
    greedy = (await infer(client, GREEDY | {"max_tokens": 30, "stream": False}))[1]["text"]
    sampled = GREEDY | {"temperature": 1.0, "max_tokens": 30, "stream": False, "seed": 7}
    narrowed = (await infer(client, sampled | {"min_p": 1.0}))[1]["text"]
    free = (await infer(client, sampled | {"min_p": 0.0}))[1]["text"]
    assert narrowed == greedy != free


def token_id(piece: str) -> int:
    """The tiny model's id of the word piece a token event carries (" the": "▁the")."""
    return tinymodel.VOCAB.index(piece.replace(" ", tinymodel.SPACE))


async def test_logit_bias_bans_a_token_or_forces_one_and_is_checked_against_the_vocabulary(client):
    events, greedy = await infer(client, GREEDY)
    first, *_ = (token["t"] for token in tokens(events))
    banned = (await infer(client, GREEDY | {"stream": False, "logit_bias": {token_id(first): -100}}))[1]["text"]
    assert not banned.startswith(first) and banned != text_of(events)
    # Another word forced: every token is it (before the penalties too: greedy text repeats it anyway).
    forced = next(w for w in tinymodel.WORDS[5:] if w.replace(tinymodel.SPACE, " ") not in text_of(events))
    piece = forced.replace(tinymodel.SPACE, " ")
    forcing = GREEDY | {"stream": False, "max_tokens": 4, "logit_bias": {token_id(forced): 100}}
    for extra in ({}, {"repeat_penalty": 1.5}, {"temperature": 1.0, "seed": 3}):
        assert (await infer(client, forcing | extra))[1]["text"] == piece * 4, extra
    # Under a grammar the bias only moves the choice among the tokens it allows.
    _, held = await infer(client, forcing | {"max_tokens": 20, "format": {"enum": ["yes", "no"]}})
    assert (held["text"], held["finish_reason"]) in [('"yes"', "stop"), ('"no"', "stop")], held
    # Token ids past the vocabulary are refused from the catalog's vocab_size, before any worker runs.
    size = len(tinymodel.VOCAB)
    assert await job_error(client, GREEDY | {"logit_bias": {size: 1, 0: 1}}) == (
        f"logit_bias: token {size} is not one of tiny's (ids 0 to {size - 1})")
    assert (await infer(client, GREEDY | {"logit_bias": {}}))[1]["completion_tokens"] == greedy["completion_tokens"]


PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "likes"], "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
    "likes": {"type": "array", "items": {"enum": ["tea", "cake"]}, "maxItems": 3}}}  # fmt: skip


async def test_format_holds_the_output_to_a_json_schema_or_to_a_json_object(client):
    with pytest.raises(ValueError):  # the tiny model's own text is words
        json.loads((await infer(client, GREEDY | {"stream": False}))[1]["text"])
    for seed in (1, 2, 3):
        events, result = await infer(client, GREEDY | {"temperature": 1.0, "seed": seed, "max_tokens": 200, "format": PERSON})
        person = json.loads(text_of(events))
        assert result["finish_reason"] == "stop", person  # the grammar ends where the value does
        assert list(person) == PERSON["required"] and len(person["name"]) <= 20, person
        assert type(person["age"]) is int and set(person["likes"]) <= {"tea", "cake"} and len(person["likes"]) <= 3
    _, answer = await infer(client, ENDS | {"format": {"enum": ["yes", "no"]}, "stream": False})
    assert (answer["text"], answer["finish_reason"]) in [('"yes"', "stop"), ('"no"', "stop")]
    _, anything = await infer(client, ENDS | {"format": "json", "stream": False})
    assert anything["finish_reason"] == "stop" and isinstance(json.loads(anything["text"]), dict)


async def test_finish_reasons_length_end_of_sentence_and_stop_string(client):
    _, result = await infer(client, ENDS | {"stream": False})
    assert result["finish_reason"] == "stop"
    assert result["text"].endswith(".") and result["text"].count(".") == 1
    assert result["completion_tokens"] == len(result["text"].replace(".", " .").split()) < 50

    _, result = await infer(client, ENDS | {"stream": False, "max_tokens": 2})
    assert (result["finish_reason"], result["completion_tokens"]) == ("length", 2)

    _, whole = await infer(client, GREEDY | {"stream": False})
    stop = " " + whole["text"].split()[5]
    events, result = await infer(client, GREEDY | {"stop": [stop, "never there"]})
    assert result["finish_reason"] == "stop"
    assert text_of(events) == whole["text"][: whole["text"].index(stop)]


# top_k 1 at a temperature above 0: sampled (so the prompt's prefix may be reused), yet the
# likeliest token every time, so that its text can be compared with a greedy run's.
SAMPLED_GREEDY = {"temperature": 0.8, "top_k": 1, "stream": False}


async def test_a_sampled_prompt_reuses_the_prefix_its_worker_holds_and_a_seed_does_not(fast, client):
    on_worker = GREEDY | {"worker_id": fast[1]["id"], "max_tokens": 30}
    first = on_worker | {"prompt": "the cat and the dog went to the market and"}
    longer = on_worker | {"prompt": first["prompt"] + " then two birds flew over the"}
    _, held = await infer(client, first | SAMPLED_GREEDY)
    _, reused = await infer(client, longer | SAMPLED_GREEDY)
    # The worker's context holds the first prompt (and its text): only the new words are evaluated.
    assert held["prompt_tokens"] <= reused["cached_tokens"] < reused["prompt_tokens"]
    for reproducible in ({"temperature": 0}, SAMPLED_GREEDY | {"seed": 7}):
        await infer(client, first | SAMPLED_GREEDY)
        _, whole = await infer(client, longer | reproducible | {"stream": False})
        assert whole["cached_tokens"] == 0  # the whole prompt again, as the same seed needs
        assert whole["text"] == reused["text"]  # the reused prefix changed nothing of the text


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if loop.first and m['role'] == 'assistant' %}{{ raise_exception('a chat starts with the user') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


async def test_messages_go_through_the_models_chat_template(client, tmp_path):
    chatty = tinymodel.write_tiny_model(tmp_path / "chatty.gguf", chat_template=CHAT_TEMPLATE)
    await job_result(client, {"operation": "model_download", "model": str(chatty)})
    chat = {"operation": "infer", "model": "chatty", "temperature": 0, "max_tokens": 12, "stream": False, "keep_alive": -1,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat"}]}  # fmt: skip
    _, answer = await infer(client, chat)
    # The same text as the template's rendering sent as a prompt: one BOS (the template's), then the turns.
    rendered = jinja2.Template(CHAT_TEMPLATE).render(messages=chat["messages"], bos_token="", add_generation_prompt=True)
    assert rendered == "system: Be brief.\nuser: the cat\nassistant:"
    _, as_prompt = await infer(client, chat | {"messages": None, "prompt": rendered})
    assert (answer["text"], answer["prompt_tokens"]) == (as_prompt["text"], as_prompt["prompt_tokens"])

    # The next turn: the conversation so far is a prefix of the new one, and is reused.
    turn = chat | {"temperature": 0.8, "top_k": 1}
    turn["messages"] = chat["messages"] + [{"role": "assistant", "content": answer["text"]},
                                           {"role": "user", "content": "and the dog"}]  # fmt: skip
    _, reply = await infer(client, turn)
    assert answer["prompt_tokens"] <= reply["cached_tokens"] < reply["prompt_tokens"]

    refused = await job_error(client, chat | {"messages": [{"role": "assistant", "content": "Hi"}]})
    assert refused == "the model's chat template refused the messages: a chat starts with the user"
    # A model whose metadata has no chat template is refused before any worker loads it.
    plain = tinymodel.write_tiny_model(tmp_path / "plain.gguf")
    await job_result(client, {"operation": "model_download", "model": str(plain)})
    no_template = await run_job(client, chat | {"model": "plain"})
    assert end_marker(no_template) == "[ERROR] the model has no chat template: send a `prompt` instead of `messages`"
    assert narrations(no_template) == []
    assert "plain" not in {w["model"] for w in await job_result(client, {"operation": "worker_list"})}
    await job_result(client, {"operation": "worker_delete", "id": reply["worker_id"]})


async def test_worker_id_routes_the_job(fast, client):
    other = await job_result(client, {"operation": "worker_spawn", "model": "tiny", "threads": 1})
    try:
        assert (await infer(client, GREEDY | {"worker_id": other["id"]}))[1]["worker_id"] == other["id"]
        assert (await infer(client, GREEDY | {"worker_id": fast[1]["id"]}))[1]["worker_id"] == fast[1]["id"]
        assert await job_error(client, GREEDY | {"worker_id": "nope"}) == "unknown worker 'nope'"
        error = await job_error(client, GREEDY | {"model": "tiny2", "worker_id": other["id"]})
        assert error == f"worker {other['id']} serves tiny, not tiny2"
    finally:
        await job_result(client, {"operation": "worker_delete", "id": other["id"]})


async def tiny2_workers(client) -> list[dict]:
    return [w for w in await job_result(client, {"operation": "worker_list"}) if w["model"] == "tiny2"]


async def wait_no_tiny2_worker(client) -> None:
    with trio.fail_after(10):
        while await tiny2_workers(client):  # bounded poll: nothing announces an idle stop
            await trio.sleep(0.05)


async def test_load_on_demand_then_reuse_and_keep_alive(client):
    # The daemon's keep_alive is 0: loaded for the job, stopped right after it.
    events, result = await infer(client, GREEDY | {"model": "tiny2"})
    loaded = result["worker_id"]
    assert narrations(events)[0] == f"loading tiny2 on cpu with 1 thread(s) and a context of 2048 tokens as worker {loaded}"
    assert narrations(events)[1].startswith(f"worker {loaded} ready in ")
    ready_in = float(narrations(events)[1].split(" ready in ")[1].removesuffix(" s"))
    assert result["load_ms"] >= ready_in * 1000 - 5 > 0  # the load's time, from the job's start
    await wait_no_tiny2_worker(client)

    # keep_alive -1: loaded once and kept; the next job reuses it without a word about loading.
    events, result = await infer(client, GREEDY | {"model": "tiny2", "keep_alive": -1})
    kept = result["worker_id"]
    assert narrations(events)[0].startswith("loading tiny2 ")  # anew, by the name the first one freed
    [worker] = await tiny2_workers(client)
    assert (worker["keep_alive"], worker["stops_at"]) == (-1, None)

    # keep_alive 60: once idle, the record says when it will stop.
    before = time.time()
    events, result = await infer(client, GREEDY | {"model": "tiny2", "keep_alive": 60})
    assert result["worker_id"] == kept and narrations(events) == []
    assert result["load_ms"] < ready_in * 1000 / 2  # none: the worker was there
    [worker] = await tiny2_workers(client)  # idle from the moment its job got its answer
    assert (worker["id"], worker["on_demand"], worker["state"]) == (kept, True, "ready") and pid_alive(worker["pid"])
    assert worker["keep_alive"] == 60 and before + 60 <= worker["stops_at"] <= time.time() + 60

    # keep_alive 0 on a job: its worker stops after it.
    assert (await infer(client, GREEDY | {"model": "tiny2", "keep_alive": 0}))[1]["worker_id"] == kept
    await wait_no_tiny2_worker(client)
    assert not pid_alive(worker["pid"])

    # A job that gives none gets the daemon's (0), as in Ollama: an earlier job's -1 does not stick.
    kept = (await infer(client, GREEDY | {"model": "tiny2", "keep_alive": -1}))[1]["worker_id"]
    assert (await infer(client, GREEDY | {"model": "tiny2"}))[1]["worker_id"] == kept
    await wait_no_tiny2_worker(client)


async def test_jobs_back_to_back_never_land_on_a_worker_that_is_stopping(client):
    # Each job's worker stops right after it (keep_alive 0), while the next job, sent as soon as
    # the previous one ended, looks for a worker. Before the fix, every other job was queued on
    # the stopping worker and ended "[ERROR] worker tiny2-cpu-N stopped".
    loads = 0
    for _ in range(6):
        events, _ = await infer(client, GREEDY | {"model": "tiny2", "max_tokens": 2})
        loads += any(line.startswith("loading tiny2 ") for line in narrations(events))
    assert loads >= 2  # they did stop in between
    await wait_no_tiny2_worker(client)



def test_a_reload_moves_an_idle_workers_stop_to_the_new_keep_alive(tiny_model):
    with running_daemon("[workers]\nthreads = 1\nkeep_alive = 300\n") as daemon:

        async def main():
            async with daemon.client() as client:
                await job_result(client, {"operation": "model_download", "model": str(tiny_model)})
                before = time.time()
                await infer(client, GREEDY)
                [worker] = await job_result(client, {"operation": "worker_list"})
                assert worker["keep_alive"] == 300 and before + 300 <= worker["stops_at"] <= time.time() + 300
                (daemon.state_dir.parent / "rbeed.toml").write_text("[workers]\nthreads = 1\nkeep_alive = 0\n")
                daemon.proc.send_signal(signal.SIGHUP)
                await logged(daemon, r"reloaded .*workers\.keep_alive")
                with trio.fail_after(10):  # it was due in 5 minutes; now at once
                    while await job_result(client, {"operation": "worker_list"}):
                        await trio.sleep(0.05)
                assert not pid_alive(worker["pid"])

        trio.run(main)

# -- a daemon whose workers take 0.1 s per token, with room for one waiting job -----------------

SLOW_CONFIG = """
[workers]
threads = 1
queue_size = 1
n_ctx = 16384
"""
LONG = GREEDY | {"max_tokens": 100}  # 10 s unless cancelled
SHORT = GREEDY | {"max_tokens": 3}


@pytest.fixture(scope="module")
def slow(tiny_model):
    with running_daemon(SLOW_CONFIG, {"RBEED_WORKER_TOKEN_DELAY": "0.1"}) as daemon:
        yield daemon, trio.run(prepare, daemon, tiny_model)


@pytest.fixture
async def slow_client(slow):
    async with slow[0].client() as client:
        yield client


async def job_state(client, job_id: str) -> str:
    return (await client.request("GET", f"/v1/jobs/{job_id}")).json()["state"]


async def test_one_job_runs_one_waits_and_one_more_is_refused(slow, slow_client):
    worker_id = slow[1]["id"]
    first_job = GREEDY | {"max_tokens": 30}  # 3 s: running through all that follows

    async with job_events(slow_client, first_job) as (_, first_events):
        await read_events_until(first_events, is_token)
        async with job_events(slow_client, SHORT) as (_, second_events):
            queued = await read_events_until(second_events, lambda e: e.event == "narration")
            assert narrations(queued) == [f"queued on worker {worker_id} behind 1 job(s)"]
            with trio.fail_after(2):
                error = await job_error(slow_client, SHORT)
            assert error == f"busy: worker {worker_id} has 1 jobs waiting"
            first_rest, second_rest = await rest_of(first_events, 10), await rest_of(second_events, 10)
    assert end_marker(first_rest) == end_marker(second_rest) == "[DONE]"
    assert len(tokens(second_rest)) == 3
    # The waiting job reached the worker only when the first had ended: its time to first token,
    # which the worker counts from receipt, holds none of the first job's remaining seconds.
    assert result_of(second_rest)["ttft_ms"] < 500


async def test_a_waiting_job_that_is_cancelled_frees_its_place_in_the_queue_at_once(slow, slow_client):
    worker_id = slow[1]["id"]
    async with job_events(slow_client, GREEDY | {"max_tokens": 30}) as (running_id, running):
        await read_events_until(running, is_token)
        async with job_events(slow_client, SHORT) as (waiting_id, waiting):
            await read_events_until(waiting, lambda e: e.event == "narration")
            assert (await slow_client.request("DELETE", f"/v1/jobs/{waiting_id}")).status == 200
            assert end_marker(await rest_of(waiting, 5)) == "[CANCELLED]"
        worker = await job_result(slow_client, {"operation": "worker_get", "id": worker_id})
        assert worker["queued"] == 0  # it held its place until the worker came to it, answering "busy"
        async with job_events(slow_client, SHORT) as (_, after):
            queued = await read_events_until(after, lambda e: e.event == "narration")
            assert narrations(queued) == [f"queued on worker {worker_id} behind 1 job(s)"]
            assert (await slow_client.request("DELETE", f"/v1/jobs/{running_id}")).status == 200
            assert end_marker(await rest_of(after, 10)) == "[DONE]"


async def test_a_tokenize_is_answered_between_a_running_generations_tokens_not_after_it(slow, slow_client, tiny_model):
    # As llama-server tokenizes beside its slots: a client counting tokens while a long generation
    # runs is held neither for the rest of it nor by the jobs queued behind it (the queue is full).
    reference = llama_cpp.Llama(model_path=str(tiny_model), vocab_only=True, verbose=False)
    long = GREEDY | {"max_tokens": 30}  # 3 s
    async with job_events(slow_client, long) as (job_id, events):
        await read_events_until(events, is_token)
        async with job_events(slow_client, SHORT) as (_, queued):
            await read_events_until(queued, lambda e: e.event == "narration")
            with trio.fail_after(2):  # each is answered after the next token (0.1 s): well before the 3 s
                tokenized = await job_result(slow_client, {"operation": "tokenize", "model": "tiny", "text": "Once upon"})
                text = await job_result(slow_client, {"operation": "detokenize", "model": "tiny",
                                                      "tokens": tokenized["tokens"]})  # fmt: skip
            assert await job_state(slow_client, job_id) == "running"
            rest, queued_rest = await rest_of(events, 10), await rest_of(queued, 10)
    assert tokenized["tokens"] == reference.tokenize(b"Once upon", add_bos=False)
    assert text["text"] == reference.detokenize(tokenized["tokens"]).decode()
    assert end_marker(rest) == end_marker(queued_rest) == "[DONE]"
    # The generation went on undisturbed: the text it streamed is the text it gives alone.
    alone = await job_result(slow_client, long | {"stream": False}, timeout=10)
    assert text_of(rest) and alone["text"].endswith(text_of(rest)) and result_of(rest)["completion_tokens"] == 30


async def test_a_job_refused_as_busy_leaves_its_workers_keep_alive_as_the_last_queued_job_set_it(tiny_model):
    # The worker loads on demand. The first job runs, the second (keep_alive -1) waits, the third
    # (keep_alive 0) is refused: had it set its keep_alive, the worker would stop once idle.
    with running_daemon(SLOW_CONFIG, {"RBEED_WORKER_TOKEN_DELAY": "0.1"}) as daemon:
        async with daemon.client() as client:
            await job_result(client, {"operation": "model_download", "model": str(tiny_model)})
            async with job_events(client, GREEDY | {"max_tokens": 20, "keep_alive": 60}) as (_, first_events):
                await read_events_until(first_events, is_token)
                async with job_events(client, SHORT | {"keep_alive": -1}) as (_, second_events):
                    await read_events_until(second_events, lambda e: e.event == "narration")
                    with trio.fail_after(2):
                        error = await job_error(client, SHORT | {"keep_alive": 0})
                    assert error.startswith("busy: worker tiny-cpu-") and error.endswith(" has 1 jobs waiting")
                    first_rest, second_rest = await rest_of(first_events, 10), await rest_of(second_events, 10)
            assert end_marker(first_rest) == end_marker(second_rest) == "[DONE]"
            [worker] = await job_result(client, {"operation": "worker_list"})
            assert (worker["on_demand"], worker["state"], worker["keep_alive"], worker["stops_at"]) == (True, "ready", -1, None)


async def test_deleting_a_running_infer_cancels_it_within_a_token_and_frees_the_worker(slow, slow_client):
    async with job_events(slow_client, LONG) as (job_id, events):
        await read_events_until(events, is_token)
        asked = trio.current_time()
        response = await slow_client.request("DELETE", f"/v1/jobs/{job_id}")
        answered = trio.current_time() - asked
        assert response.status == 200
        rest = await rest_of(events, timeout=1)
    assert end_marker(rest) == "[CANCELLED]"
    assert len(tokens(rest)) <= 1 + int(answered / 0.1)  # those made until the DELETE's answer, and one
    assert await job_state(slow_client, job_id) == "cancelled"
    with trio.fail_after(2):  # not behind the 9 s the cancelled generation had left
        _, result = await infer(slow_client, SHORT | {"worker_id": slow[1]["id"]})
    assert result["completion_tokens"] == 3


def cancelled_generations(daemon) -> int:
    return len(re.findall(r"^rbeed-worker: generation \d+: cancelled,", daemon.log(), re.MULTILINE))


async def test_a_client_that_drops_the_stream_cancels_its_infer(slow, slow_client):
    before = cancelled_generations(slow[0])
    async with job_events(slow_client, LONG) as (job_id, events):
        await read_events_until(events, is_token)
    # Leaving the block closed the connection; nothing tells us when the daemon noticed.
    try:
        with trio.fail_after(3):
            while await job_state(slow_client, job_id) != "cancelled":
                await trio.sleep(0.05)
    finally:
        await slow_client.request("DELETE", f"/v1/jobs/{job_id}")  # if it failed, free the worker for the next test
    with trio.fail_after(2):
        _, result = await infer(slow_client, SHORT | {"worker_id": slow[1]["id"]})
    assert result["completion_tokens"] == 3
    assert cancelled_generations(slow[0]) == before + 1  # logged by the worker before it took the next job


async def open_connections(client) -> int:
    metrics = (await client.request("GET", "/metrics")).content.decode()
    return int(re.search(r"^rbeed_http_connections (\d+)$", metrics, re.MULTILINE)[1])


async def drop_stream_after_a_token(daemon, client, job_id: str, resume_within: str) -> str:
    """Read the job's stream with ?resume_within= up to its first token, drop it, and return
    that token's id once the daemon has seen the connection go (its gauge of connections)."""
    async with daemon.client() as reader:
        async with reader.stream("GET", f"/v1/jobs/{job_id}/stream?resume_within={resume_within}") as response:
            last_id = (await read_events_until(response.aiter_sse(), is_token))[-1].id
    with trio.fail_after(3):
        while await open_connections(client) > 1:
            await trio.sleep(0.02)
    return last_id


async def test_resume_within_keeps_a_dropped_infer_running_for_its_reader_to_come_back(slow, slow_client):
    job_id = await submit(slow_client, GREEDY | {"max_tokens": 30})  # 3 s
    last_id = await drop_stream_after_a_token(slow[0], slow_client, job_id, "5")
    assert await job_state(slow_client, job_id) == "running"  # not cancelled, as without resume_within
    async with slow_client.stream("GET", f"/v1/jobs/{job_id}/stream", headers={"last-event-id": last_id}) as response:
        rest = await rest_of(response.aiter_sse(), 10)
    assert end_marker(rest) == "[DONE]" and int(rest[0].id) == int(last_id) + 1
    assert result_of(rest)["completion_tokens"] == 30

    # One that does not come back: the infer is cancelled once resume_within has passed.
    job_id = await submit(slow_client, LONG)
    await drop_stream_after_a_token(slow[0], slow_client, job_id, "1")
    left = trio.current_time()
    with trio.fail_after(5):
        while await job_state(slow_client, job_id) != "cancelled":
            await trio.sleep(0.02)
    assert trio.current_time() - left > 0.9
    with trio.fail_after(2):
        _, result = await infer(slow_client, SHORT | {"worker_id": slow[1]["id"]})
    assert result["completion_tokens"] == 3


@pytest.mark.parametrize("value", ["61", "-1", "abc", "1e3", "0x10"])
async def test_resume_within_must_be_seconds_up_to_a_minute(slow_client, value):
    job_id = await submit(slow_client, SHORT)
    response = await slow_client.request("GET", f"/v1/jobs/{job_id}/stream?resume_within={value}")
    assert response.status == 400
    assert response.json()["error"] == f"resume_within must be a number of seconds from 0 to 60, got {value!r}"
    assert await job_state(slow_client, job_id) == "queued"  # a refused stream starts nothing


async def test_a_client_that_sends_on_while_its_infer_streams_is_left_to_wait_not_buffered(slow, slow_client):
    """The stream watches its socket for the client leaving: what the client pipelines meanwhile is
    kept for its next request only up to a request's worth (2 MiB here), not to the end of memory."""
    job_id = await submit(slow_client, LONG)
    async with await open_stream(slow[0], unix=True) as stream:
        await stream.send_all(f"GET /v1/jobs/{job_id}/stream HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        with trio.fail_after(10):
            received = await stream.receive_some()
        assert received.startswith(b"HTTP/1.1 200 ")
        sent, piece = 0, b"x" * (1 << 16)
        with trio.move_on_after(3):  # the daemon stops reading: the sends block
            while sent < 64 << 20:
                await stream.send_all(piece)
                sent += len(piece)
        assert sent < 16 << 20  # 2 MiB read, the rest in the two sockets' buffers
        assert await job_state(slow_client, job_id) == "running"
        await slow_client.request("DELETE", f"/v1/jobs/{job_id}")
        with trio.fail_after(10):
            while b"[CANCELLED]" not in received:
                received += await stream.receive_some()
    assert b"event: token" in received


async def test_cancel_during_prompt_processing_ends_quickly(slow, slow_client):
    # About 12,000 prompt tokens: seconds of prompt processing on one thread.
    async with job_events(slow_client, SHORT | {"prompt": " the cat" * 1500}) as (job_id, events):
        started = await logged(slow[0], r"^rbeed-worker: generation (\d+): 1\d{4} prompt tokens")
        response = await slow_client.request("DELETE", f"/v1/jobs/{job_id}")
        assert response.status == 200
        rest = await rest_of(events, timeout=1)
    assert end_marker(rest) == "[CANCELLED]" and tokens(rest) == []
    # The next job starts like the cancelled prompt: it reuses as much of it as was evaluated.
    on_worker = SHORT | {"worker_id": slow[1]["id"], "prompt": " the cat" * 100}
    with trio.fail_after(2.5):  # the whole cancelled prompt would take longer
        _, reused = await infer(slow_client, on_worker | SAMPLED_GREEDY)
    assert f"generation {started[1]}: cancelled, 0 tokens" in slow[0].log()
    _, whole = await infer(slow_client, on_worker | {"stream": False})
    # (As much as the worker evaluated before the cancel landed: here ~800 tokens, but not certain.)
    assert reused["cached_tokens"] < reused["prompt_tokens"] and whole["cached_tokens"] == 0
    assert reused["text"] == whole["text"]
