"""Real `python -m rbeed.worker` subprocesses on the tiny model, driven over real sockets."""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import fcntl
import itertools
import os
import pathlib
import re
import signal
import socket
import stat
import subprocess
import sys
import threading

import llama_cpp
import pytest
import trio

import tinymodel
from rbeed import wire
from rbeed.grammar import gbnf

REPO = pathlib.Path(__file__).resolve().parent.parent
PROMPT = "Once upon a time"
PLAIN_WORDS = {piece.removeprefix(tinymodel.SPACE) for piece in tinymodel.WORDS}


@pytest.fixture(scope="session")
def in_process(tiny_model: pathlib.Path) -> llama_cpp.Llama:
    """The tiny model in this process, configured like the workers the tests start."""
    return llama_cpp.Llama(
        model_path=str(tiny_model), n_ctx=2048, n_batch=32, n_threads=1, verbose=False
    )


def reference_text(llm: llama_cpp.Llama, seed: int, max_tokens: int) -> tuple[str, str]:
    """llama-cpp-python's own (text, finish_reason) for PROMPT with the tests' parameters."""
    choice = llm.create_completion(
        PROMPT, max_tokens=max_tokens, temperature=0.8, top_p=0.95, top_k=40, seed=seed
    )["choices"][0]
    return choice["text"], choice["finish_reason"]


@pytest.fixture(scope="session")
def long_seed(in_process: llama_cpp.Llama) -> int:
    """A seed whose generation runs 60 tokens without ending its sentence."""
    return next(s for s in range(100) if reference_text(in_process, s, 60)[1] == "length")


@dataclasses.dataclass
class Generation:
    pieces: list[str]
    end: wire.Done | wire.Failed

    @property
    def text(self) -> str:
        return "".join(self.pieces)


class Client:
    """The daemon's side of a worker connection."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._decoder = wire.FrameDecoder()
        self._pending: collections.deque[wire.Message] = collections.deque()

    async def send(self, msg: wire.Message) -> None:
        await self.stream.send_all(wire.encode(msg))

    async def receive(self) -> wire.Message:
        """The next message; EOFError when the worker closed the connection."""
        while not self._pending:
            data = await self.stream.receive_some()
            if not data:
                raise EOFError
            self._pending.extend(self._decoder.feed(data))
        return self._pending.popleft()

    async def finish(self, job_id: int) -> Generation:
        """Collect the Token frames of `job_id` up to its Done or Failed."""
        pieces: list[str] = []
        while True:
            msg = await self.receive()
            assert msg.id == job_id, msg
            if isinstance(msg, wire.Token):
                pieces.append(msg.text)
            else:
                assert isinstance(msg, (wire.Done, wire.Failed)), msg
                return Generation(pieces, msg)

    async def generate(self, job_id: int, prompt: str = PROMPT, **params) -> Generation:
        await self.send(request(job_id, prompt, **params))
        return await self.finish(job_id)


def request(job_id: int, prompt: str = PROMPT, **params) -> wire.Generate:
    params = {"max_tokens": 40, "temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0,
              "presence_penalty": 0.0, "frequency_penalty": 0.0} | params  # infer's defaults
    return wire.Generate(id=job_id, prompt=prompt, **params)


def worker_command(model: pathlib.Path, socket_path: pathlib.Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "rbeed.worker", "--id", "t1", "--model", str(model),
        "--socket", str(socket_path), "--device", "cpu", "--threads", "1", *args,
    ]  # fmt: skip


class Worker:
    """A worker subprocess with the test's NOTIFY_SOCKET and a pipe on its stderr."""

    def __init__(self, tmp_path: pathlib.Path) -> None:
        self.socket_path = tmp_path / "w.sock"
        self.notify_path = tmp_path / "notify"
        self.notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.process: trio.Process | None = None
        self.stderr = ""

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RBEED_")}
        python_path = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        return env | {"NOTIFY_SOCKET": str(self.notify_path), "PYTHONPATH": python_path} | extra

    async def start(self, command: list[str], **env: str) -> None:
        await self.notify.bind(str(self.notify_path))
        self.process = await trio.lowlevel.open_process(
            command, env=self.env(**env), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
        )

    async def notification(self) -> str:
        return (await self.notify.recv(4096)).decode()

    async def ready(self) -> str:
        """Wait for READY=1, returning the datagram; fails on STATUS=failed."""
        while "READY=1" not in (state := await self.notification()):
            assert "STATUS=failed" not in state, state
        return state

    async def stderr_until(self, text: str) -> str:
        """Read the worker's stderr until `text` appears in it; returns all of it so far."""
        assert self.process is not None and self.process.stderr is not None
        while text not in self.stderr:
            data = await self.process.stderr.receive_some()
            if not data:
                raise AssertionError(f"stderr ended without {text!r}:\n{self.stderr}")
            self.stderr += data.decode()
        return self.stderr

    async def exit_code(self) -> int:
        """Wait for the process to exit, reading the rest of its stderr."""
        assert self.process is not None and self.process.stderr is not None
        while data := await self.process.stderr.receive_some():
            self.stderr += data.decode()
        return await self.process.wait()

    async def connect(self) -> Client:
        return Client(await trio.open_unix_socket(str(self.socket_path)))

    async def aclose(self) -> None:
        if self.process is not None:
            with trio.CancelScope(shield=True):
                self.process.kill()
                await self.process.wait()
                if self.process.stderr is not None:
                    await self.process.stderr.aclose()
        self.notify.close()


@pytest.fixture
async def start_worker(tmp_path: pathlib.Path, tiny_model: pathlib.Path):
    """start_worker(*args, model=..., **env) -> a started Worker; all are killed at the end."""
    workers: list[Worker] = []

    async def start(*args: str, model: pathlib.Path = tiny_model, **env: str) -> Worker:
        worker = Worker(tmp_path / str(len(workers)))
        worker.socket_path.parent.mkdir()
        workers.append(worker)
        await worker.start(worker_command(model, worker.socket_path, *args), **env)
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            await worker.aclose()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process `pid`."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_state(pid: int, tid: int) -> str:
    """The state letter of thread `tid` of process `pid` (R running, S sleeping...)."""
    return pathlib.Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()[0]


async def ready_client(start_worker, *args: str, **env: str) -> tuple[Worker, Client]:
    worker = await start_worker(*args, **env)
    await worker.ready()
    return worker, await worker.connect()


async def inside_a_long_prompt_batch(start_worker) -> tuple[Worker, Client]:
    """A worker inside one llama_decode call that takes its whole 30,002-token prompt (~10 s):
    only llama.cpp's abort callback, asked after each graph node, runs Python code there."""
    worker, client = await ready_client(start_worker, "--n-ctx", "32768", "--n-batch", "32768")
    await client.send(request(1, prompt="q" * 30000, seed=1))
    await worker.stderr_until("generation 1: 30002 prompt tokens")
    # Bounded poll of /proc: past filling the batch in Python (~0.1 s of CPU), the worker's CPU
    # time grows only inside llama_decode.
    start = cpu_seconds(worker.process.pid)
    while cpu_seconds(worker.process.pid) < start + 0.5:
        await trio.sleep(0.01)
    return worker, client


async def test_ready_then_generate_streams_words(start_worker, tiny_model, in_process):
    with trio.fail_after(10):
        worker = await start_worker()
        assert await worker.notification() == f"STATUS=loading {tiny_model}"
        assert await worker.ready() == f"READY=1\nSTATUS=serving {tiny_model} on cpu"
        assert stat.S_IMODE(worker.socket_path.stat().st_mode) == 0o600
        client = await worker.connect()

        result = await client.generate(1, seed=7, max_tokens=1000)

    assert isinstance(result.end, wire.Done)
    n_prompt = len(in_process.tokenize(PROMPT.encode(), add_bos=True, special=True))
    assert result.end.prompt_tokens == n_prompt
    # every word piece is one valid UTF-8 token, so one frame per counted token
    assert result.end.completion_tokens == len(result.pieces) > 0
    assert result.end.finish_reason == "stop"  # the sentence ended with "."
    assert result.text.endswith(".") and result.text.count(".") == 1
    assert result.text.startswith(" ")
    assert set(result.text.removesuffix(".").replace(",", "").split()) <= PLAIN_WORDS
    assert result.end.ttft_ms > 0 and result.end.tokens_per_s > 0


async def test_seeded_sampling_and_greedy_are_deterministic(start_worker):
    with trio.fail_after(10):
        _, client = await ready_client(start_worker)
        first = await client.generate(1, seed=5, max_tokens=30)
        again = await client.generate(2, seed=5, max_tokens=30)
        other = [(await client.generate(3 + s, seed=100 + s, max_tokens=30)).text for s in range(3)]
        greedy = await client.generate(10, temperature=0.0, max_tokens=30)
        greedy_again = await client.generate(11, temperature=0.0, seed=99, max_tokens=30)

    assert first.text == again.text and first.text
    assert first.text not in other
    assert greedy.text == greedy_again.text and greedy.text


async def test_finish_reasons_length_stop_and_stop_strings(start_worker):
    with trio.fail_after(10):
        _, client = await ready_client(start_worker)
        runs = [await client.generate(seed, seed=seed, max_tokens=12) for seed in range(20)]
        by_reason = collections.defaultdict(list)
        for run in runs:
            by_reason[run.end.finish_reason].append(run)
        # a prompt ending in "." makes EOS the very first token
        immediate = await client.generate(30, prompt="the cat sat.", seed=1)

        long_run = by_reason["length"][0]
        stop = long_run.pieces[3].strip()
        stopped = await client.generate(31, seed=long_run.end.id, max_tokens=12, stop=[stop])

    assert set(by_reason) == {"length", "stop"}
    for run in by_reason["length"]:
        assert run.end.completion_tokens == 12 and "." not in run.text
    for run in by_reason["stop"]:
        assert run.end.completion_tokens < 12 and run.text.endswith(".")

    assert immediate.end.finish_reason == "stop"
    assert immediate.end.completion_tokens == 0 and immediate.pieces == []

    # the stop string may first occur inside an earlier word
    full_text = long_run.text
    assert stopped.text == full_text[: full_text.index(stop)]
    assert stopped.end.finish_reason == "stop"
    assert stopped.end.completion_tokens == next(
        n for n in range(1, 13) if stop in "".join(long_run.pieces[:n])
    )


async def test_text_held_as_maybe_a_stop_strings_start_is_sent_when_the_model_ends_instead(start_worker):
    with trio.fail_after(10):
        _, client = await ready_client(start_worker)
        # The grammar ends the text (an end-of-generation token) after "E", which "END" starts with.
        held = await client.generate(1, grammar='root ::= "Hello E"', stop=["END"], temperature=0.0)
        cut = await client.generate(2, grammar='root ::= "Hello END"', stop=["END"], temperature=0.0)

    assert (held.text, held.end.finish_reason) == ("Hello E", "stop")
    assert (cut.text, cut.end.finish_reason) == ("Hello ", "stop")


async def test_matches_llama_cpp_python_create_completion(start_worker, in_process):
    with trio.fail_after(10):
        _, client = await ready_client(start_worker)
        results = [await client.generate(seed, seed=seed, max_tokens=30) for seed in range(5)]

    for seed, result in enumerate(results):
        assert (result.text, result.end.finish_reason) == reference_text(in_process, seed, 30)


async def test_prompt_longer_than_context_fails_and_worker_goes_on(start_worker):
    with trio.fail_after(10):
        _, client = await ready_client(start_worker, "--n-ctx", "256")
        too_long = await client.generate(1, prompt="xyz " * 100)
        after = await client.generate(2, seed=1)

    assert isinstance(too_long.end, wire.Failed) and too_long.end.refused and too_long.pieces == []
    assert "the context holds 256" in too_long.end.error
    assert isinstance(after.end, wire.Done) and after.text


async def test_the_context_is_the_n_ctx_asked_for_not_llama_cpps_padded_one(start_worker, in_process):
    # llama.cpp pads a context to a multiple of 256 (300 makes 512), but llama-cpp-python's token
    # buffer holds the 300 asked for: a longer prompt failed in numpy, and text ran on past 300.
    words = "xyz " * 200
    prompt = words[: next(n for n in range(4, len(words), 4) if len(in_process.tokenize(words[:n].encode())) > 350)]
    no_end = {_id: -100.0 for _id in (2, in_process.tokenize(b".", add_bos=False)[-1])}  # EOS, and "." before it
    with trio.fail_after(20):
        _, client = await ready_client(start_worker, "--n-ctx", "300")
        too_long = await client.generate(1, prompt=prompt)
        long = await client.generate(2, max_tokens=1000, temperature=0.0, logit_bias=no_end)

    assert isinstance(too_long.end, wire.Failed) and too_long.end.refused, too_long.end
    assert too_long.end.error.startswith("prompt is ") and "the context holds 300" in too_long.end.error
    assert isinstance(long.end, wire.Done) and long.end.finish_reason == "length"
    assert long.end.prompt_tokens + long.end.completion_tokens == 300


async def test_an_answer_too_big_for_a_frame_is_refused_and_worker_goes_on(start_worker):
    # 1.25M tokens of " mountain" and their pieces: over the 16 MiB the daemon reads of a frame,
    # which took the worker for broken and restarted it.
    with trio.fail_after(30):
        _, client = await ready_client(start_worker)
        await client.send(wire.Tokenize(id=1, tokens=[tinymodel.VOCAB.index("\u2581mountain")] * 1_250_000))
        too_big = await client.receive()
        after = await client.generate(2, seed=1)

    assert isinstance(too_big, wire.Failed) and too_big.refused, too_big
    assert re.fullmatch(r"the answer is \d+ bytes, more than the 16777216 a worker may send: ask for less at once", too_big.error)
    assert isinstance(after.end, wire.Done) and after.text


async def test_a_logit_bias_past_the_vocabulary_fails_and_worker_goes_on(start_worker):
    """The daemon checks ids against the catalog; a record made before it knew the vocabulary
    size leaves that to the worker, where llama.cpp would read past its array."""
    with trio.fail_after(10):
        _, client = await ready_client(start_worker)
        beyond = await client.generate(1, logit_bias={10**6: 1.0, 3: 1.0})
        after = await client.generate(2, seed=1, logit_bias={3: 1.0})

    assert isinstance(beyond.end, wire.Failed) and beyond.pieces == []
    assert beyond.end.error == f"logit_bias: token {10**6} is not one of the model's (ids 0 to {len(tinymodel.VOCAB) - 1})"
    assert isinstance(after.end, wire.Done) and after.text


async def test_tokenize_answers_llama_cpps_tokens_and_pieces_and_refuses_ids_past_the_vocabulary(
    start_worker, in_process
):
    text = "Once upon a time </s> in caf\u00e9s"
    with trio.fail_after(10):
        _, client = await ready_client(start_worker)
        answers = []
        for job_id, fields in enumerate([{"text": text}, {"text": text, "add_special": True, "parse_special": False},
                                         {"tokens": [1, 75, 2]}, {"tokens": [3, 10**6]}], 1):  # fmt: skip
            await client.send(wire.Tokenize(id=job_id, **fields))
            answers.append(await client.receive())
        after = await client.generate(9, seed=1)

    plain, special, given, beyond = answers
    assert plain.tokens == in_process.tokenize(text.encode(), add_bos=False, special=True)
    assert special.tokens == in_process.tokenize(text.encode(), add_bos=True, special=False)
    assert plain.tokens != special.tokens[1:]  # "</s>" is one token, or its letters
    assert 2 in plain.tokens and special.tokens[0] == 1 and 2 not in special.tokens
    for answer in (plain, special, given):
        assert answer.pieces == [in_process._model.detokenize([t], special=True) for t in answer.tokens]
    assert given.tokens == [1, 75, 2] and given.pieces[0] == b"<s>" and given.pieces[2] == b"</s>"
    # Sentencepiece writes a space before the text, and again after a special token.
    assert b"".join(plain.pieces).decode() == " Once upon a time </s>  in caf\u00e9s"
    assert any(len(piece) == 1 and piece[0] >= 0x80 for piece in plain.pieces)  # é as two byte tokens
    assert beyond == wire.Failed(id=4, error=f"tokens: token {10**6} is not one of the model's (ids 0 to "
                                             f"{len(tinymodel.VOCAB) - 1})", refused=True)  # fmt: skip
    assert isinstance(after.end, wire.Done) and after.text


async def test_messages_for_a_model_without_a_chat_template_fail_and_worker_goes_on(start_worker):
    with trio.fail_after(10):
        _, client = await ready_client(start_worker)
        refused = await client.generate(1, messages=[("user", "Hi")])
        after = await client.generate(2, seed=1)

    assert refused.end == wire.Failed(id=1, error=wire.NO_CHAT_TEMPLATE, refused=True) and refused.pieces == []
    assert isinstance(after.end, wire.Done) and after.text


async def test_a_chat_template_that_refuses_the_messages_is_told_from_one_that_fails_on_them(start_worker, tmp_path):
    # raise_exception is a template's refusal (the request's fault); an undefined name, its bug.
    template = ("{% if messages[0].role != 'user' %}{{ raise_exception('a chat starts with the user') }}{% endif %}"
                "{% if messages | length > 1 %}{{ messages[1].nope.deeper }}{% endif %}{{ messages[0].content }}")
    model = tinymodel.write_tiny_model(tmp_path / "buggy.gguf", chat_template=template)
    with trio.fail_after(10):
        _, client = await ready_client(start_worker, model=model)
        refused = await client.generate(1, messages=[("assistant", "Hi")])
        failed = await client.generate(2, messages=[("user", "Hi"), ("user", "again")])
        after = await client.generate(3, messages=[("user", "Hi")], seed=1)

    assert refused.end == wire.Failed(1, "the model's chat template refused the messages: a chat starts with the user",
                                      refused=True)  # fmt: skip
    assert failed.end == wire.Failed(2, "the model's chat template failed on the messages: 'dict object' has no "
                                        "attribute 'nope'")  # fmt: skip
    assert isinstance(after.end, wire.Done) and after.text


async def test_a_grammar_holds_the_text_and_one_that_does_not_parse_fails_without_a_crash(start_worker):
    with trio.fail_after(10):
        _, client = await ready_client(start_worker)
        held = await client.generate(1, seed=1, grammar='root ::= "yes" | "no"')
        broken = await client.generate(2, grammar='root ::= "yes" (')  # llama-cpp-python would segfault on it
        unknown = await client.generate(3, grammar="root ::= <nosuchtoken>")
        beyond = await client.generate(4, grammar="root ::= <[1000000]>")  # llama.cpp would abort on it
        empty = await client.generate(6, grammar="root ::= [z-a]")  # so would it on these
        dead_end = await client.generate(7, grammar='root ::= "Once" [z-a]', prompt="Once", temperature=0.0)
        after = await client.generate(5, seed=1)

    assert held.text in ("yes", "no") and held.end.finish_reason == "stop"
    error = "the output's grammar does not parse (is each <token> in it one of the model's?); the worker's log says why"
    assert broken.end == wire.Failed(2, error, refused=True)
    assert unknown.end == wire.Failed(3, error, refused=True)
    assert beyond.end == wire.Failed(4, f"grammar: token 1000000 is not one of the model's (ids 0 to {len(tinymodel.VOCAB) - 1})",
                                     refused=True)  # fmt: skip
    assert not broken.pieces and not unknown.pieces and not beyond.pieces
    nothing = ("the grammar allows no token here: it matches nothing (an empty range, such as [z-a]?) or nothing "
               "the model's vocabulary can write")  # fmt: skip
    assert (empty.end, empty.pieces) == (wire.Failed(6, nothing, refused=True), [])
    assert dead_end.end == wire.Failed(7, nothing, refused=True) and "".join(dead_end.pieces).strip() == "Once"
    assert isinstance(after.end, wire.Done) and after.text


async def test_greedy_text_under_a_grammar_is_llama_cpp_pythons_with_the_grammar_in_its_chain(start_worker, in_process):
    # The worker lets the grammar check only the token it picked, and filters all the logits
    # through it only when it refuses that one: greedy, that picks the same tokens.
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer"},
                                               "ok": {"type": "boolean"}}, "required": ["name", "n", "ok"]}  # fmt: skip
    grammars = [gbnf("json"), gbnf(schema), gbnf({"type": "array", "items": {"enum": ["tea", "cake"]}, "maxItems": 4})]
    prompts = ["Once upon a time", "Hello", "The quick brown fox"]
    with trio.fail_after(20):
        _, client = await ready_client(start_worker)
        results = [await client.generate(i, prompt=prompt, grammar=grammar, temperature=0.0, max_tokens=60)
                   for i, (prompt, grammar) in enumerate(itertools.product(prompts, grammars))]  # fmt: skip
    for result, (prompt, grammar) in zip(results, itertools.product(prompts, grammars)):
        choice = in_process.create_completion(prompt, max_tokens=60, temperature=0.0,
                                              grammar=llama_cpp.LlamaGrammar.from_string(grammar))["choices"][0]  # fmt: skip
        assert (result.text, result.end.finish_reason) == (choice["text"], choice["finish_reason"]), (prompt, grammar)
    assert any(result.end.finish_reason == "stop" for result in results)


async def test_cancel_mid_stream_then_next_generation(start_worker, long_seed):
    seed = long_seed
    with trio.fail_after(10):
        _, client = await ready_client(start_worker, RBEED_WORKER_TOKEN_DELAY="0.2")

        await client.send(request(1, seed=seed, max_tokens=60))
        await client.send(request(2, seed=seed, max_tokens=60))  # queued behind 1
        first = await client.receive()
        assert isinstance(first, wire.Token) and first.id == 1
        await client.send(wire.Cancel(2))
        await client.send(wire.Cancel(1))
        cancelled = await client.finish(1)
        cancelled_queued = await client.finish(2)
        after = await client.generate(3, seed=seed, max_tokens=3)

    assert cancelled.end.finish_reason == "cancelled"
    # the cancel lands within a token: the first was being delayed when it was sent
    assert 1 <= cancelled.end.completion_tokens <= 2
    assert cancelled.end.completion_tokens == len(cancelled.pieces) + 1
    assert cancelled_queued == Generation([], wire.Done(2, 0, 0, "cancelled", 0.0, 0.0))
    assert after.end.finish_reason == "length" and after.end.completion_tokens == 3
    assert after.pieces[0] == first.text


async def test_frames_that_arrive_mid_generation_are_read_and_served_in_order(start_worker, long_seed):
    # Sent once generation 1 streams, 2 and 3 reach the worker while it generates: they are
    # read then (not when 1 ends), so the cancel of 3 is honoured and 2 runs next.
    with trio.fail_after(10):
        worker, client = await ready_client(start_worker, RBEED_WORKER_TOKEN_DELAY="0.2")
        await client.send(request(1, seed=long_seed, max_tokens=4))
        first = await client.receive()
        assert isinstance(first, wire.Token) and first.id == 1
        await client.send(request(2, seed=long_seed, max_tokens=4))
        await client.send(request(3, seed=long_seed, max_tokens=4))
        await client.send(wire.Cancel(3))
        one = await client.finish(1)
        two = await client.finish(2)
        three = await client.finish(3)

    assert one.end.finish_reason == "length" and len([first, *one.pieces]) == 4
    assert two.end.finish_reason == "length" and two.text == first.text + one.text
    assert three == Generation([], wire.Done(3, 0, 0, "cancelled", 0.0, 0.0))
    # 2 waited about three token delays (600 ms) behind 1; its TTFT counts from its arrival
    assert two.end.ttft_ms >= 300


@contextlib.contextmanager
def connection_without_sigio():
    """(daemon's socket, a worker _Connection on the other end) with O_ASYNC off: the tests call
    the SIGIO handler themselves, where a signal would run it, and no real one may come."""
    from rbeed import worker

    daemon, ours = socket.socketpair()
    with daemon, ours:
        connection = worker._Connection(ours, wait_readable=lambda fd: None)  # its blocking recv waits
        fcntl.fcntl(ours, fcntl.F_SETFL, fcntl.fcntl(ours, fcntl.F_GETFL) & ~os.O_ASYNC)
        yield daemon, connection


class HandlerAt:
    """While entered, runs `handler(frame)` before the `line`-th line executed in `functions`, as
    a signal handled at that bytecode boundary would run; `ran` says whether that line came."""

    def __init__(self, line: int, functions, handler) -> None:
        self.line, self.handler, self.ran = line, handler, False
        self._codes = {function.__code__ for function in functions}
        self._lines = 0

    def _trace(self, frame, event, arg):
        if event == "line":
            self._lines += 1
            if self._lines - 1 == self.line:
                self.ran = True
                self.handler(frame)  # may raise, as a handler may
        return self._trace

    def __enter__(self) -> HandlerAt:
        sys.settrace(lambda frame, event, arg: self._trace if frame.f_code in self._codes else None)
        return self

    def __exit__(self, *exc_info) -> None:
        sys.settrace(None)


@pytest.mark.parametrize("arrives", ["nothing more", "a cancel"])
def test_a_frame_read_by_sigio_anywhere_in_begin_next_is_not_lost(arrives):
    # Its read must not take the request the idle wait's blocking recv is about to wait for, nor
    # lose a Cancel for a request between the queue and running. A Generate is queued in the
    # socket; at each line of begin_next in turn, a frame arrives (or none) and the handler reads.
    from rbeed import worker

    functions = [worker._Connection.begin_next, worker._Connection.poll, worker._Connection._release,
                 worker._Connection._read]  # fmt: skip
    for line in itertools.count():
        with connection_without_sigio() as (daemon, connection):

            def sigio(frame) -> None:
                if arrives == "a cancel":
                    daemon.sendall(wire.encode(wire.Cancel(7)))
                connection.poll()

            daemon.sendall(wire.encode(request(7)))
            # A lost request would leave the wait blocked: hang up after a while to end it.
            hang_up = threading.Timer(5, daemon.shutdown, (socket.SHUT_WR,))
            hang_up.start()
            try:
                with HandlerAt(line, functions, sigio) as handler:
                    item = connection.begin_next()
            finally:
                hang_up.cancel()
            assert item is not None and item[0] == request(7), f"request lost, handler at line {line}"
            job = item[2]
            cancelled = job is None or job.cancelled
            assert cancelled == (handler.ran and arrives == "a cancel"), f"handler at line {line}"
        if not handler.ran:  # the handler came after the last line: every line is covered
            break


def test_a_sigio_during_another_handlers_read_leaves_it_whole():
    # A SIGIO handler reads, learns that the generation whose prompt is being processed was
    # cancelled, and raises to abandon the prompt. A second SIGIO, for a request arriving while
    # the first handler still reads, must not raise in the middle of that read: the request
    # would stay unread with its signal spent. Run the second handler at each line in turn.
    from rbeed import worker

    functions = [worker._Connection.poll, worker._Connection._release, worker._Connection._read,
                 worker._Worker.on_sigio]  # fmt: skip
    for line in itertools.count():
        with connection_without_sigio() as (daemon, connection):
            handlers = worker._Worker.__new__(worker._Worker)  # no model: only the SIGIO handler runs
            # Both handlers run where raising is safe (between llama_decode calls), so only the
            # read in progress can keep the second from raising.
            between_batches = type("Frame", (), {"f_code": llama_cpp.Llama.eval.__code__, "f_back": None})()
            handlers.connection, handlers._interruptible = connection, {between_batches.f_code}
            job = connection.running = worker._Job(7)
            job.in_prompt = True
            daemon.sendall(wire.encode(wire.Cancel(7)))

            def second_sigio(frame) -> None:
                daemon.sendall(wire.encode(request(8)))
                handlers.on_sigio(signal.SIGIO, between_batches)

            with HandlerAt(line, functions, second_sigio) as handler, pytest.raises(worker._PromptCancelled):
                handlers.on_sigio(signal.SIGIO, between_batches)
            assert job.cancelled and not job.in_prompt
            assert [r.id for r, _ in connection.pending] == ([8] if handler.ran else []), f"second handler at line {line}"
        if not handler.ran:
            break


async def test_cancel_during_prompt_processing_lands_fast(start_worker, in_process):
    # ~30000 byte tokens with n_batch 32 take seconds to evaluate, even on this model
    prompt = "q" * 30000
    with trio.fail_after(10):
        worker, client = await ready_client(start_worker, "--n-ctx", "32768")
        await client.send(request(1, prompt=prompt, seed=1))
        await worker.stderr_until("generation 1: 30002 prompt tokens")
        with trio.fail_after(1):
            await client.send(wire.Cancel(1))
            cancelled = await client.finish(1)
        after = await client.generate(2, seed=1, max_tokens=5)
        worker.process.send_signal(signal.SIGTERM)
        assert await worker.exit_code() == 0

    assert cancelled.end == wire.Done(1, 30002, 0, "cancelled", 0.0, 0.0)
    assert cancelled.pieces == []
    # the stopped prompt left nothing behind that changes the next generation
    assert (after.text, after.end.finish_reason) == reference_text(in_process, 1, 5)
    assert "generation 1: cancelled, 0 tokens" in worker.stderr
    assert "Traceback" not in worker.stderr and "Exception ignored" not in worker.stderr


async def test_an_encoder_worker_refuses_to_generate_and_an_input_past_its_batch(start_worker, tmp_path):
    # As the daemon would start one for a catalog record that does not say the model is an encoder:
    # with its usual batches of 32 tokens, not one of the whole context.
    encoder = tinymodel.write_tiny_encoder(tmp_path / "encoder.gguf")
    with trio.fail_after(10):
        worker, client = await ready_client(start_worker, "--n-ctx", "512", "--n-batch", "32", model=encoder)
        refused = await client.generate(1)
        await client.send(wire.Embed(2, ["the cat " * 20], truncate=False))
        too_long = await client.receive()
        await client.send(wire.Embed(3, ["the cat " * 20, "Hello"]))
        cut, hello, done = [await client.receive() for _ in range(3)]

    assert refused == Generation([], wire.Failed(1, wire.EMBEDDINGS_ONLY, refused=True))
    assert too_long == wire.Failed(2, "input 0 is 42 tokens, an encoder's one batch holds 32; truncate it, or ask for a larger n_ctx",
                                   refused=True)  # fmt: skip
    assert (len(cut.vector), len(hello.vector), done) == (64, 64, wire.Embedded(3, 32 + 3))


async def test_cancel_lands_inside_a_long_prompt_batch(start_worker):
    with trio.fail_after(10):
        worker, client = await inside_a_long_prompt_batch(start_worker)
        with trio.fail_after(1):
            await client.send(wire.Cancel(1))
            cancelled = await client.finish(1)
        after = await client.generate(2, seed=1, max_tokens=5)

    assert cancelled.end == wire.Done(1, 30002, 0, "cancelled", 0.0, 0.0)
    assert after.end.completion_tokens == 5


async def test_disconnect_mid_generation_stops_it_and_next_connection_works(
    start_worker, long_seed
):
    with trio.fail_after(10):
        worker, client = await ready_client(start_worker, RBEED_WORKER_TOKEN_DELAY="0.05")
        await client.send(request(1, seed=long_seed, max_tokens=60))
        assert isinstance(await client.receive(), wire.Token)
        await client.stream.aclose()
        stderr = await worker.stderr_until("daemon disconnected")
        assert "generation 1: cancelled" in stderr
        again = await worker.connect()
        result = await again.generate(2, seed=1, max_tokens=2)

    assert result.end.completion_tokens == len(result.pieces) > 0


async def test_sigterm_mid_generation_exits_promptly(start_worker, long_seed):
    with trio.fail_after(10):
        worker, client = await ready_client(start_worker, RBEED_WORKER_TOKEN_DELAY="0.05")
        await client.send(request(1, seed=long_seed, max_tokens=60))
        assert isinstance(await client.receive(), wire.Token)
        worker.process.send_signal(signal.SIGTERM)
        with trio.fail_after(2):
            assert await worker.exit_code() == 0

    assert worker.stderr.splitlines()[-1] == "rbeed-worker: terminated"
    assert not worker.socket_path.exists()


async def test_sigterm_inside_a_long_prompt_batch_exits_promptly(start_worker):
    with trio.fail_after(10):
        worker, _ = await inside_a_long_prompt_batch(start_worker)
        worker.process.send_signal(signal.SIGTERM)
        with trio.fail_after(2):
            assert await worker.exit_code() == 0

    assert worker.stderr.splitlines()[-1] == "rbeed-worker: terminated"
    assert "Exception ignored" not in worker.stderr


def truncated(model: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    path.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    return path


def random_bytes(model: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    path.write_bytes(os.urandom(4096))
    return path


def random_after_magic(model: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    return path


def missing(model: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    return path


@pytest.mark.parametrize(
    ("make_model", "reason"),
    [
        (random_bytes, "not a GGUF file: {path}"),
        (missing, "model file not found: {path}"),
        (
            truncated,
            "failed to load model: tensor 'output.weight' data is not within the file bounds,"
            " model is corrupted or incomplete",
        ),
        (random_after_magic, "failed to load model: "),
    ],
)
async def test_bad_model_reports_failed_and_exits_3(
    start_worker, tiny_model, tmp_path, make_model, reason
):
    path = make_model(tiny_model, tmp_path / "bad.gguf")
    reason = reason.format(path=path)
    with trio.fail_after(10):
        worker = await start_worker(model=path)
        assert await worker.notification() == f"STATUS=loading {path}"
        failed = await worker.notification()
        assert await worker.exit_code() == 3

    assert failed.startswith(f"STATUS=failed: {reason}")
    last_line = worker.stderr.splitlines()[-1]
    assert last_line == f"rbeed-worker: {failed.removeprefix('STATUS=')}"
    assert "Traceback" not in worker.stderr
    assert len(failed) < 200


@pytest.mark.parametrize(
    ("device", "reason"),
    [
        ("metal", "device metal is only available on macOS, not linux"),
        ("cuda:0", 'llama-cpp-python was built without GPU support (cuda); reinstall it with CMAKE_ARGS="-DGGML_CUDA=on"'),
        ("tpu", "unknown device 'tpu' (expected cpu, cuda:N or metal)"),
    ],
)
async def test_unusable_device_fails_clearly(start_worker, device, reason):
    if device == "cuda:0" and llama_cpp.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build can offload to a GPU")
    if device == "cuda:0" and "CUDA :" in llama_cpp.llama_print_system_info().decode():
        reason = "device cuda:0 is not available: cuda found no GPU"  # CUDA build, no GPU
    if sys.platform != "linux":
        pytest.skip("reasons are worded for Linux")
    with trio.fail_after(10):
        worker = await start_worker("--device", device)
        await worker.notification()
        assert await worker.notification() == f"STATUS=failed: {reason}"
        assert await worker.exit_code() == 3
    assert worker.stderr.splitlines()[-1] == f"rbeed-worker: failed: {reason}"


def test_the_worker_module_leaves_llama_cpp_and_numpy_unloaded():
    # llama_cpp must wait for --device (CUDA_VISIBLE_DEVICES), and numpy for llama_cpp: numpy loaded
    # first made a CUDA build's model load crash with SIGSEGV, on cpu and cuda alike.
    code = "import sys, rbeed.worker; print(sorted({'llama_cpp', 'numpy', 'gguf'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"


# Forks the worker from a thread that exits at once (as trio.open_process does from its thread
# cache), prints the worker's pid, and exits when its stdin closes.
SPAWNER = """
import os, subprocess, sys, threading
spawned = []
env = dict(os.environ, RBEED_PDEATHSIG=str(os.getpid()))
thread = threading.Thread(target=lambda: spawned.append(subprocess.Popen(sys.argv[1:], env=env)))
thread.start()
thread.join()
print(spawned[0].pid, flush=True)
sys.stdin.read()
"""


async def test_worker_exits_with_its_parent_process_not_thread(tmp_path, tiny_model):
    worker = Worker(tmp_path)
    await worker.notify.bind(str(worker.notify_path))
    command = worker_command(tiny_model, worker.socket_path)
    spawner = await trio.lowlevel.open_process(
        [sys.executable, "-c", SPAWNER, *command],
        env=worker.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    pid = 0
    try:
        with trio.fail_after(10):
            pid = int(await spawner.stdout.receive_some())
            await worker.ready()
            client = await worker.connect()
            # the forking thread is gone: the worker still serves
            result = await client.generate(1, seed=1, max_tokens=3)
            assert isinstance(result.end, wire.Done)
            await spawner.stdin.aclose()
            assert await spawner.wait() == 0
            with trio.fail_after(3), pytest.raises(EOFError):
                await client.receive()
    finally:
        spawner.kill()
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        worker.notify.close()


def test_a_sigterm_handled_in_a_finalizer_ends_the_worker_once_its_daemon_disconnects(in_process, tmp_path):
    # Seen once in a full run: the daemon's SIGTERM was handled inside a finalizer (its raise only
    # remembered), the daemon then closed the connection, and the worker went back to accept()
    # for good, until stop_grace's SIGKILL.
    from llama_cpp import _internals

    from rbeed import worker

    handled = worker._Worker(in_process, 0.0)
    in_finalizer = type("Frame", (), {"f_code": _internals.LlamaSampler.__del__.__code__, "f_back": None})()
    handled.on_terminate(signal.SIGTERM, in_finalizer)
    ignored = signal.signal(signal.SIGIO, signal.SIG_IGN)  # serve()'s connection asks for SIGIO
    try:
        with socket.socket(socket.AF_UNIX) as listener, socket.socket(socket.AF_UNIX) as daemon:
            listener.bind(str(tmp_path / "w.sock"))
            listener.listen()
            listener.settimeout(5)  # a worker waiting for another connection fails the test, not hangs it
            daemon.connect(str(tmp_path / "w.sock"))
            daemon.close()
            with pytest.raises(worker._Terminated):
                handled.serve(listener)
    finally:
        signal.signal(signal.SIGIO, ignored)


@pytest.mark.parametrize(
    ("where", "raises"),
    [("llama-cpp-python's batch loop", True), ("between two llama_decode calls", True),
     ("a sampler's finalizer", False), ("building a sampler", False), ("llama.cpp's abort callback", False)],
)  # fmt: skip
def test_a_sigio_abandons_a_cancelled_prompt_only_where_raising_is_safe(in_process, where, raises):
    # Found by the chaos run: a SIGIO handled inside LlamaSampler.__del__ raised there, and Python
    # printed and dropped the exception; handled inside LlamaSampler.__init__, it left a sampler
    # without its exit stack, whose finalizer then failed. Elsewhere the abort callback (CPU) or
    # the next token stops the cancelled prompt instead.
    from llama_cpp import _internals

    from rbeed import worker

    handled = worker._Worker(in_process, 0.0)
    code = {
        "llama-cpp-python's batch loop": llama_cpp.Llama.eval.__code__,
        "between two llama_decode calls": _internals.LlamaContext.decode.__code__,
        "a sampler's finalizer": _internals.LlamaSampler.__del__.__code__,
        "building a sampler": _internals.LlamaSampler.__init__.__code__,
        "llama.cpp's abort callback": next(c for c in worker._CALLBACK_CODE if c.co_name == "prompt_cancelled"),
    }[where]
    with connection_without_sigio() as (daemon, connection):
        handled.connection = connection
        daemon.sendall(wire.encode(request(7)))
        _, _, job = connection.begin_next()
        job.in_prompt = True
        daemon.sendall(wire.encode(wire.Cancel(7)))
        frame = type("Frame", (), {"f_code": code, "f_back": None})()
        if raises:
            with pytest.raises(worker._PromptCancelled):
                handled.on_sigio(signal.SIGIO, frame)
        else:
            handled.on_sigio(signal.SIGIO, frame)
            assert job.in_prompt  # still cancellable by the abort callback
        assert job.cancelled  # the Cancel was read either way


@pytest.mark.parametrize("line", [1, 2, 3])
def test_tokenizes_answered_aside_are_left_when_a_sigio_finds_the_daemon_gone_meanwhile(in_process, line):
    # The SIGIO handler's read clears what the daemon sent once it hangs up: between the check
    # for a waiting tokenize and its popleft, that left an IndexError to kill the worker.
    from rbeed import worker

    handled = worker._Worker(in_process, 0.0)
    with connection_without_sigio() as (daemon, connection):
        handled.connection = connection
        connection.running = worker._Job(1)
        daemon.sendall(wire.encode(wire.Tokenize(id=2, text="Once upon")))
        connection.poll()
        assert len(connection.pending) == 1

        def sigio(frame):
            daemon.shutdown(socket.SHUT_WR)
            handled.on_sigio(signal.SIGIO, frame)

        with HandlerAt(line, [worker._Worker._answer_aside], sigio) as handler:
            handled._answer_aside(connection)
        assert handler.ran and connection.closed and not connection.pending


@pytest.mark.parametrize("waiting_in", ["accept", "recv"])
async def test_a_sigterm_the_kernel_gives_to_another_thread_ends_an_idle_worker(start_worker, waiting_in):
    # Seen once in CI: the daemon closed the connection (a SIGIO pending on the main thread) and
    # sent SIGTERM, which the kernel then gave to another of the worker's threads. Python ran its
    # handler at the main thread's next bytecode, and that thread sat in accept() for good.
    tgkill = ctypes.CDLL(None, use_errno=True).tgkill
    with trio.fail_after(10):
        worker = await start_worker(RBEED_PDEATHSIG=str(os.getpid()))  # with its parent-watch thread
        await worker.ready()
        if waiting_in == "recv":
            client = await worker.connect()
            await worker.stderr_until("daemon connected")
        pid = worker.process.pid
        while thread_state(pid, pid) != "S":  # bounded poll: until the main thread waits in a system call
            await trio.sleep(0.001)
        others = [int(tid) for tid in os.listdir(f"/proc/{pid}/task") if int(tid) != pid]
        assert others, "the worker runs no other thread"
        assert tgkill(pid, others[0], signal.SIGTERM) == 0, ctypes.get_errno()
        with trio.fail_after(2):
            assert await worker.exit_code() == 0

    assert worker.stderr.splitlines()[-1] == "rbeed-worker: terminated"
    if waiting_in == "recv":
        assert await client.stream.receive_some() == b""


async def test_a_worker_whose_daemon_died_before_it_looked_exits_without_loading(start_worker):
    # Killed while its worker's Python started, the daemon left it to init: had the worker taken
    # getppid() for its daemon, it would have watched init, and served on with nobody to stop it.
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process
    with trio.fail_after(10):
        worker = await start_worker(RBEED_PDEATHSIG=str(gone.pid))
        assert await worker.exit_code() == 0
    assert worker.stderr.splitlines()[-2:] == [f"rbeed-worker: cannot watch parent process {gone.pid}: No such process",
                                               "rbeed-worker: terminated"]  # fmt: skip
    assert "loading" not in worker.stderr
