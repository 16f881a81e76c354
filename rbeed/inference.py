"""The operations a model's worker answers (infer, embed, tokenize, detokenize): pick (or load) a
worker for the model, queue the request, stream its answer."""

from __future__ import annotations

from functools import partial
from typing import TypeVar

import msgspec
import trio

from . import wire
from .grammar import gbnf
from .jobs import Job, JobFailed
from .metrics import Totals
from .models import Model
from .operations import DEFAULTS, Detokenize, Embed, Infer, OnWorker, Settings, Tokenize, layered
from .workers import Generation, Supervisor, Worker

OpT = TypeVar("OpT", Infer, Embed, Tokenize, Detokenize)
AnswerT = TypeVar("AnswerT", wire.Done, wire.Embedded, wire.Tokenized)


class Inference:
    def __init__(self, supervisor: Supervisor, totals: Totals):
        self.supervisor, self.totals = supervisor, totals
        self._loading: dict[tuple[str, str], trio.Lock] = {}

    def _device(self, op: OnWorker) -> str:
        return "cuda:0" if op.device == "cuda" else op.device or "cpu"

    def _matches(self, worker: Worker, op: OnWorker, model: Model, n_ctx: int) -> bool:
        if not self.supervisor.models.same_file(worker.model, model) or not worker.accepting or worker.n_ctx < n_ctx:
            return False
        if op.device is None:
            return True
        return worker.device.startswith("cuda") if op.device == "cuda" else worker.device == op.device

    async def _worker_for(
        self, job: Job, op: OnWorker, model: Model, generation: Generation, asked_ctx: int | None
    ) -> tuple[Worker, bool]:
        """The worker for the job, and whether it was loaded for it (it then serves `generation` first).

        A worker holding a copy of the model (a hard link to its file) serves it as well, as Ollama shares a
        runner between names of one model: the copy's settings are its jobs', not the worker's.
        """
        # A worker with a larger context than asked for serves the job as well.
        n_ctx = 0 if asked_ctx is None else self.supervisor.context(op.model, asked_ctx)
        if op.worker_id is not None:
            worker = self.supervisor.lookup(op.worker_id)
            if not self.supervisor.models.same_file(worker.model, model):
                raise JobFailed(f"worker {worker.id} serves {worker.model}, not {op.model}", 400)
            if worker.n_ctx < n_ctx:
                raise JobFailed(f"worker {worker.id} has a context of {worker.n_ctx} tokens, not {n_ctx}", 400)
            return worker, False
        # One load per model and device at a time: a second job waits for the first's worker.
        lock = self._loading.setdefault((model.sha256, self._device(op)), trio.Lock())
        async with lock:
            candidates = [w for w in self.supervisor.workers.values() if self._matches(w, op, model, n_ctx)]
            if candidates:
                return min(candidates, key=lambda w: w.backlog), False
            return await self.supervisor.spawn(op.model, self._device(op), n_ctx=asked_ctx, on_demand=True,
                                               keep_alive=op.keep_alive, job=job, first=generation), True  # fmt: skip

    def _named(self, op: OpT) -> tuple[OpT, Model, Settings]:
        """The operation with its model as the catalog's id (which workers are matched by), that
        model, and the settings the job runs with: its own, else the model's defaults, else DEFAULTS."""
        model = self.supervisor.models.lookup(op.model)
        op = op if model.id == op.model else msgspec.structs.replace(op, model=model.id)
        if refused := model.refusal(op):
            raise JobFailed(refused[1], 400)  # known from the catalog: no worker need load it
        own = op if isinstance(op, Infer) else Settings(n_ctx=op.n_ctx if isinstance(op, Embed) else None)
        return op, model, layered(own, model.defaults, DEFAULTS)

    async def infer(self, job: Job, op: Infer) -> None:
        op, model, settings = self._named(op)
        messages = None if op.messages is None else [(m.role, m.content) for m in op.messages]
        # The model's system message (unless the chat has its own) and history, before the chat.
        # Ollama puts a chat's own system message after the history; rbeed keeps it first, where
        # chat templates look for it (Gemma's refuses one anywhere else).
        if messages:
            first = 1 if messages[0][0] == "system" else 0
            lead = messages[:first] or ([("system", model.system)] if model.system else [])
            messages = lead + [(m.role, m.content) for m in model.messages] + messages[first:]
        generation = Generation(
            job, op.stream, prompt=op.prompt or "", max_tokens=settings.max_tokens, temperature=settings.temperature,
            top_p=settings.top_p, top_k=settings.top_k, seed=settings.seed, stop=list(settings.stop), messages=messages,
            min_p=settings.min_p, repeat_penalty=settings.repeat_penalty, presence_penalty=settings.presence_penalty,
            frequency_penalty=settings.frequency_penalty, grammar=op.grammar if op.format is None else gbnf(op.format),
            logit_bias=op.logit_bias, repeat_last_n=settings.repeat_last_n,
        )  # fmt: skip
        generation.on_finish = partial(self.totals.generated, op.model, generation)  # a cancelled one's tokens count too
        worker, outcome, load_ms = await self._run(job, op, model, generation, settings.n_ctx, wire.Done)
        result = {
            "model": op.model, "worker_id": worker.id, "load_ms": load_ms, "prompt_tokens": outcome.prompt_tokens,
            "cached_tokens": outcome.cached_tokens, "completion_tokens": outcome.completion_tokens,
            "finish_reason": outcome.finish_reason, "ttft_ms": round(outcome.ttft_ms, 2),
            "tokens_per_s": round(outcome.tokens_per_s, 1),
        }  # fmt: skip
        if not op.stream:
            result["text"] = "".join(generation.pieces)
        job.result(result)

    async def embed(self, job: Job, op: Embed) -> None:
        op, model, settings = self._named(op)
        generation = Generation(job, False, wire.Embed, inputs=op.inputs, truncate=op.truncate,
                                normalize=op.normalize, dimensions=op.dimensions)  # fmt: skip
        worker, outcome, load_ms = await self._run(job, op, model, generation, settings.n_ctx, wire.Embedded)
        self.totals.embedded(op.model, len(op.inputs), outcome)
        job.result({"model": op.model, "worker_id": worker.id, "load_ms": load_ms,
                    "prompt_tokens": outcome.prompt_tokens, "embeddings": generation.vectors})  # fmt: skip

    async def tokenize(self, job: Job, op: Tokenize) -> None:
        op, model, _ = self._named(op)
        generation = Generation(job, False, wire.Tokenize, text=op.text, add_special=op.add_special,
                                parse_special=op.parse_special)  # fmt: skip
        worker, answer, load_ms = await self._run(job, op, model, generation, None, wire.Tokenized)
        result = {"model": op.model, "worker_id": worker.id, "load_ms": load_ms, "tokens": answer.tokens}
        if op.with_pieces:  # as llama-server's: the text, or where a token holds part of a character, its bytes
            result["pieces"] = [_text_or_bytes(piece) for piece in answer.pieces]
        job.result(result)

    async def detokenize(self, job: Job, op: Detokenize) -> None:
        op, model, _ = self._named(op)
        generation = Generation(job, False, wire.Tokenize, tokens=op.tokens)
        worker, answer, load_ms = await self._run(job, op, model, generation, None, wire.Tokenized)
        text = b"".join(answer.pieces).decode(errors="replace")
        job.result({"model": op.model, "worker_id": worker.id, "load_ms": load_ms, "text": text})

    async def _run(
        self, job: Job, op: OnWorker, model: Model, generation: Generation, n_ctx: int | None, answer: type[AnswerT]
    ) -> tuple[Worker, AnswerT, float]:
        """Serve `generation` on a worker for `op`; the worker, its `answer` (JobFailed if it did not
        give one), and the milliseconds until it was there to take the job (a load, or another
        job's load, waited for)."""
        worker: Worker | None = None
        began = trio.current_time()
        try:
            worker, loaded_for_us = await self._worker_for(job, op, model, generation, n_ctx)
            await worker.wait_loaded()
            load_ms = round((trio.current_time() - began) * 1000, 2)
            if not loaded_for_us and not await worker.submit_aside(generation):
                ahead = worker.backlog
                worker.submit(generation)
                if ahead:
                    job.narrate(f"queued on worker {worker.id} behind {ahead} job(s)")
            if worker.on_demand:  # once taken: a job refused (busy) leaves the worker's keep-alive be
                worker.keep_for(op.keep_alive)
            await generation.done.wait()
        finally:
            if generation.outcome is None:
                generation.abandoned = True  # also when cancelled while its worker loads
                if worker is not None:
                    with trio.CancelScope(shield=True):
                        await worker.abandon(generation)
        if isinstance(outcome := generation.outcome, wire.Failed):
            raise JobFailed(outcome.error, 400 if outcome.refused else 500)
        if not isinstance(outcome, answer):
            raise JobFailed(outcome if isinstance(outcome, str) else "cancelled")  # a Done: cancelled while queued
        return worker, outcome, load_ms


def _text_or_bytes(piece: bytes) -> str | list[int]:
    try:
        return piece.decode()
    except UnicodeDecodeError:
        return list(piece)
