"""The llama.cpp worker subprocess: loads one model and serves generations over a Unix socket.

Invoked as `rbeed worker --id ID --model PATH --socket PATH --device cpu|cuda:N|metal
--threads N [--n-ctx 2048] [--n-batch 32]`, or as `rbeed worker --probe DEVICE` to check a
device without loading a model. Protocol: rbeed.wire frames on one daemon connection at a time;
requests (generations, embeddings) run one at a time in the main thread, which also reads the
connection: while idle it waits for it in poll, so a request wakes the thread that will run it.

Readiness follows the sd_notify protocol when NOTIFY_SOCKET is set: "STATUS=loading <model>",
then "READY=1" once the model is loaded and the socket listens, or "STATUS=failed: <reason>"
and exit code 3 (the last stderr line is then "rbeed-worker: failed: <reason>").

Cancellation: the connection is in O_ASYNC mode, so the kernel sends SIGIO to the main thread
when a frame arrives; during a generation the handler reads it between tokens, or while the prompt
is processed, inside llama.cpp's abort callback (asked after each graph node on the CPU backend)
or between llama-cpp-python's prompt batches (n_batch tokens each). A Cancel of the running
generation sets a flag checked once per token; during prompt processing the abort callback
answers it, or the handler raises between batches, and only while that same generation is still
processing its prompt, so a late signal is harmless.

Environment:
  NOTIFY_SOCKET              sd_notify datagram socket (path, or "@name" for an abstract one).
  RBEED_PDEATHSIG=PID        exit (as on SIGTERM) when process PID, the parent, exits (or has).
  RBEED_WORKER_TOKEN_DELAY   TEST-ONLY: seconds to sleep after each generated token, so tests
                             can cancel mid-stream on a model that generates thousands of tok/s.
"""

from __future__ import annotations

import argparse
import codecs
import collections
import ctypes
import fcntl
import os
import re
import select
import signal
import socket
import stat
import sys
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import jinja2

# Not imported here: llama_cpp, until the device is known (it reads CUDA_VISIBLE_DEVICES); numpy,
# until after llama_cpp: imported before a CUDA build's llama.cpp, numpy (2.4.6 and 2.5.2) made its
# model load crash (SIGSEGV) on an H100 machine, on the cpu device and on cuda alike.
from rbeed import gbnf, wire
from rbeed.config import parse_cpu_list

EXIT_FAILED = 3

_F_SETOWN_EX, _F_OWNER_TID = 15, 0  # Linux: direct SIGIO to one thread (fcntl has no names for them)
_BACKEND_NAMES = {"cuda": "CUDA", "metal": "MTL"}  # as llama_print_system_info() names them
_TYPICAL_P = 1.0  # llama-cpp-python's create_completion default, kept so results match it
_POOLING_CLS, _POOLING_LAST, _POOLING_RANK = 2, 3, 4  # enum llama_pooling_type (0 none, 1 mean)


def _log(message: str) -> None:
    sys.stderr.write(f"rbeed-worker: {message}\n")
    sys.stderr.flush()


def _notify(state: str) -> None:
    """Send one sd_notify datagram; a no-op without NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        _log(f"sd_notify to {address!r} failed: {exc.strerror or exc}")


class _StartupError(Exception):
    """A reason the worker cannot serve, reported as STATUS=failed."""


class _ChatError(Exception):
    """Why a chat's messages cannot become a prompt: no chat template, or the template refused them
    (`refused`: the request's fault), or it failed on them (a bug in the model's template)."""

    def __init__(self, message: str, refused: bool = True):
        super().__init__(message)
        self.refused = refused


class _InputError(Exception):
    """An embedding's input that cannot be embedded: why, for Failed."""


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM/SIGINT."""


class _PromptCancelled(BaseException):
    """Raised in the main thread to abandon prompt processing of a cancelled generation."""


class _Job:
    __slots__ = ("id", "cancelled", "in_prompt")

    def __init__(self, job_id: int) -> None:
        self.id = job_id
        self.cancelled = False
        self.in_prompt = False


class _StopMatcher:
    """Holds back text that may be the start of a stop string; finds the first stop string."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string was reached)."""
        pending = self._held + text
        cuts = [pending.find(s) for s in self._stops if s in pending]
        if cuts:
            self._held = ""
            return pending[: min(cuts)], True
        keep = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(pending)), keep, -1):
                if pending.endswith(stop[:n]):
                    keep = n
                    break
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rbeed worker", description=__doc__.splitlines()[0])
    parser.add_argument("--id", required=True, help="worker id, for logs")
    parser.add_argument("--model", required=True, help="GGUF model file")
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--device", required=True, help="cpu, cuda:N or metal")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--n-batch", type=int, default=32, help="0: the whole context (an encoder's inputs)")
    parser.add_argument("--cpu-affinity", metavar="LIST", help="CPUs to run on, e.g. 0-3,6")
    return parser.parse_args(argv)


def _pin(cpu_list: str | None) -> None:
    if cpu_list:
        try:
            os.sched_setaffinity(0, parse_cpu_list(cpu_list))
        except (ValueError, OSError) as exc:
            raise _StartupError(f"cannot run on CPUs {cpu_list}: {exc}") from None


def _gpu_layers(device: str) -> int:
    """n_gpu_layers for `device`; selects the CUDA device, so call before importing llama_cpp."""
    if device == "cpu":
        return 0
    if device.startswith("cuda:") and device[5:].isdigit():
        os.environ["CUDA_VISIBLE_DEVICES"] = device[5:]
        return -1
    if device == "metal":
        if sys.platform != "darwin":
            raise _StartupError(f"device metal is only available on macOS, not {sys.platform}")
        return -1
    raise _StartupError(f"unknown device {device!r} (expected cpu, cuda:N or metal)")


def _check_model_file(path: str) -> None:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise _StartupError(f"model file not found: {path}") from None
    except IsADirectoryError:
        raise _StartupError(f"model path is a directory: {path}") from None
    except OSError as exc:
        raise _StartupError(f"cannot read model file {path}: {exc.strerror}") from None
    if magic != b"GGUF":
        raise _StartupError(f"not a GGUF file: {path}")


class _LlamaErrors:
    """llama.cpp's log sink: keeps recent error lines (to explain load failures), drops the rest.

    The sink is process-wide and called until exit (also while freeing the model), so the
    one instance lives in _llama_errors for the life of the process.
    """

    _ERROR, _CONTINUATION = 4, 5  # enum ggml_log_level
    _PREFIXES = re.compile(r"^(?:[\w.]+: |error loading model: )+")
    _GENERIC = ("failed to load model", "failed to read header")

    def __init__(self, llama_cpp: Any) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=16)
        self._in_error = False

        def sink(level: int, text: bytes, user_data: Any) -> None:
            if level == self._ERROR:
                self.lines.append(text.decode("utf-8", "replace").strip())
                self._in_error = True
            elif level == self._CONTINUATION and self._in_error:
                self.lines[-1] += text.decode("utf-8", "replace").rstrip()
            else:
                self._in_error = False

        _CALLBACK_CODE.add(sink.__code__)
        self._sink = llama_cpp.llama_log_callback(sink)
        llama_cpp.llama_log_set(self._sink, ctypes.c_void_p(0))

    def reason(self) -> str:
        """The most specific error llama.cpp reported, without its function-name prefixes."""
        messages = [self._PREFIXES.sub("", line) for line in self.lines]
        specific = [m for m in messages if not m.startswith(self._GENERIC)]
        return (specific or messages or [""])[0]


_llama_errors: _LlamaErrors | None = None
# The code of the Python functions that llama.cpp calls (its log sink, the abort callback).
_CALLBACK_CODE: set[Any] = set()


def _raise_is_dropped(frame: Any) -> bool:
    """Whether an exception that a signal handler raises at `frame` would be printed and dropped:
    inside a function llama.cpp called (ctypes drops it) or inside a finalizer (Python does)."""
    while frame is not None:
        if frame.f_code in _CALLBACK_CODE or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _check_gpu(device: str, n_gpu_layers: int, *, find: bool = True) -> None:
    """Refuse a GPU device that this llama-cpp-python build lacks or (if `find`) cannot find."""
    import llama_cpp

    if not n_gpu_layers or llama_cpp.llama_supports_gpu_offload():
        return
    backend = "metal" if device == "metal" else "cuda"
    # a GPU backend lists itself here even when it found no device
    system_info = llama_cpp.llama_print_system_info().decode(errors="replace")
    if f"{_BACKEND_NAMES[backend]} :" not in system_info:
        flag = "GGML_CUDA" if backend == "cuda" else "GGML_METAL"
        raise _StartupError(f"llama-cpp-python was built without GPU support ({backend}); "
                            f'reinstall it with CMAKE_ARGS="-D{flag}=on"')  # fmt: skip
    if find:
        raise _StartupError(f"device {device} is not available: {backend} found no GPU")


def _load_model(args: argparse.Namespace, n_gpu_layers: int) -> Any:
    _check_model_file(args.model)
    _check_gpu(args.device, n_gpu_layers)
    import llama_cpp

    from rbeed.llama import Llama

    global _llama_errors
    errors = _llama_errors = _LlamaErrors(llama_cpp)
    # An encoder (non-causal attention) takes each input in one batch, and in one micro-batch of
    # llama.cpp's: the daemon passes 0 for it, meaning the context (or llama.cpp's default batch
    # where the model's own context is asked for).
    n_batch = args.n_batch or args.n_ctx or 512
    try:
        return Llama(
            model_path=args.model,
            n_ctx=args.n_ctx,
            n_threads=args.threads,
            n_threads_batch=args.threads,
            n_batch=n_batch,
            n_ubatch=512 if args.n_batch else n_batch,  # 512: llama-cpp-python's default, cut to n_batch
            n_gpu_layers=n_gpu_layers,
            logits_all=False,
            # Every token's hidden state, not one pooled by llama.cpp: its pooling covers one
            # n_batch batch, not a whole input; _Worker._embed pools across batches itself.
            pooling_type=llama_cpp.LLAMA_POOLING_TYPE_NONE,
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError, MemoryError) as exc:
        detail = errors.reason() or str(exc)
        raise _StartupError(f"failed to load model: {detail}") from None


def _listen(path: str) -> socket.socket:
    try:
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise _StartupError(f"{path} exists and is not a socket")
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    previous_umask = os.umask(0o177)
    try:
        listener.bind(path)
        listener.listen(1)
    except OSError as exc:
        listener.close()
        raise _StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(previous_umask)
    return listener


def _exit_with_parent(parent: int) -> None:
    """SIGTERM ourselves when the parent process, `parent`, exits.

    Not PR_SET_PDEATHSIG: that fires when the parent *thread* that forked us exits, and
    trio.open_process forks from a cached worker thread that retires after being idle. The
    parent's pid comes from it, not from getppid(): by the time Python has started, a parent
    killed meanwhile has left us to init, which we would watch for good.
    """
    try:
        pidfd = os.pidfd_open(parent)
    except OSError as exc:
        _log(f"cannot watch parent process {parent}: {exc.strerror}")
        if os.getppid() != parent:
            raise _Terminated from None
        return
    if os.getppid() != parent:  # it exited before pidfd_open; the pid may be reused
        os.close(pidfd)
        _log(f"parent process {parent} exited")
        raise _Terminated

    def watch() -> None:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.poll()
        _log(f"parent process {parent} exited")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


_Request = wire.Generate | wire.Embed | wire.Tokenize
_REQUESTS = (wire.Generate, wire.Embed, wire.Tokenize)


class _Connection:
    """One daemon connection, read only by the main thread: after a poll while idle, on SIGIO while generating."""

    def __init__(self, sock: socket.socket, wait_readable: Callable[[int], None]) -> None:
        self.sock = sock
        self._wait_readable = wait_readable
        # Requests with their arrival times.
        self.pending: collections.deque[tuple[_Request, float]] = collections.deque()
        self.running: _Job | None = None
        self.closed = False  # the daemon hung up, or sent garbage: no more requests
        self.broken = False  # a send failed; stop generating and sending
        self._cancelled_queued: set[int] = set()
        self._decoder = wire.FrameDecoder()
        self._reading = False  # a read is under way: the SIGIO handler must not re-enter it
        self._missed = False  # a SIGIO came while a read was under way
        fd = sock.fileno()
        if sys.platform == "linux":  # to this thread only: a signal to one of llama.cpp's would be wasted
            fcntl.fcntl(fd, _F_SETOWN_EX, struct.pack("ii", _F_OWNER_TID, threading.get_native_id()))
        else:
            fcntl.fcntl(fd, fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_ASYNC)

    def send(self, msg: wire.Message) -> None:
        if self.broken:
            return
        data = wire.encode(msg)
        if len(data) - 4 > wire.MAX_FRAME_SIZE:  # the daemon would take the worker for broken, and restart it
            data = wire.encode(wire.Failed(msg.id, f"the answer is {len(data) - 4} bytes, more than the "
                                                   f"{wire.MAX_FRAME_SIZE} a worker may send: ask for less at once",
                                           refused=True))  # fmt: skip
        try:
            self.sock.sendall(data)
        except OSError:
            self.broken = True
            if self.running is not None:
                self.running.cancelled = True

    def begin_next(self) -> tuple[_Request, float, _Job | None] | None:
        """Wait for the next request and make it the running generation: (request, when it
        arrived, its job, None if it was cancelled while queued); None once the connection closed.
        """
        # The read is claimed from before `pending` is looked at until the request is running,
        # so a SIGIO handled in between leaves what came to us. Else it could take the request
        # the blocking recv waits for (the worker would sleep with it queued), or a Cancel for a
        # request that is neither queued nor running yet (it would be lost).
        self._reading = True
        try:
            while not self.pending and not self.closed:
                self._read(blocking=True)
            if not self.pending:
                return None
            request, arrived = self.pending.popleft()
            if request.id in self._cancelled_queued:
                self._cancelled_queued.discard(request.id)
                job = None
            else:
                job = self.running = _Job(request.id)
        finally:
            self._release()
        return request, arrived, job

    def end(self) -> None:
        self.running = None

    @property
    def reading(self) -> bool:
        return self._reading

    def poll(self) -> None:
        """Read whatever has arrived, without waiting (the SIGIO handler's work)."""
        if self._reading:
            self._missed = True  # the holder of the read reads again once it lets go
            return
        self._reading = True
        try:
            self._read(blocking=False)
        finally:
            self._release()

    def _release(self) -> None:
        """Let go of the read, then read what a SIGIO handled meanwhile left to us."""
        self._reading = False
        if self._missed:  # cleared first: a SIGIO during this poll is left to the poll's own release
            self._missed = False
            self.poll()

    def _read(self, blocking: bool) -> None:
        """Read once if `blocking`, else until the socket is empty; the caller holds `_reading`."""
        while not self.closed:
            if blocking:
                self._wait_readable(self.sock.fileno())
            try:
                data = self.sock.recv(65536, 0 if blocking else socket.MSG_DONTWAIT)
                arrived = time.perf_counter()
                messages = self._decoder.feed(data)
            except BlockingIOError:
                return
            except (OSError, ValueError) as exc:
                _log(f"daemon connection failed: {exc}")
                data = b""
            if not data:
                self._close()
                return
            for msg in messages:
                if type(msg) in _REQUESTS:
                    self.pending.append((msg, arrived))
                elif type(msg) is wire.Cancel:
                    self._cancel(msg.id)
                else:
                    _log(f"ignoring unexpected {type(msg).__name__} from the daemon")
            if blocking:
                return

    def _cancel(self, job_id: int) -> None:
        job = self.running
        if job is not None and job.id == job_id:
            job.cancelled = True
        elif any(request.id == job_id for request, _ in self.pending):
            self._cancelled_queued.add(job_id)

    def _close(self) -> None:
        """Nobody is left to answer: stop the running generation and drop the queued ones."""
        self.closed = True
        self.pending.clear()
        if self.running is not None:
            self.running.cancelled = True


class _Worker:
    def __init__(self, llm: Any, token_delay: float) -> None:
        import llama_cpp

        self.llm = llm
        # llama.cpp pads the context (300 makes 512), but the Llama's token buffer is the size asked for.
        self.n_ctx = min(llm.n_ctx(), llm.context_params.n_ctx)
        self.n_ctx_train = llm._model.n_ctx_train()
        self.token_delay = token_delay
        self._vocab = llm._model.vocab
        self._is_eog = llama_cpp.llama_vocab_is_eog
        self._token_to_piece = llama_cpp.llama_token_to_piece
        self._pieces: list[bytes | None] = [None] * llm.n_vocab()
        self._default_seed = llama_cpp.LLAMA_DEFAULT_SEED
        self._add_bos = llama_cpp.llama_vocab_get_add_bos(self._vocab)
        self._chat_formatter: Any = None  # built from the model's chat template on the first chat
        # A recurrent state cannot be cut back to a prefix: such models evaluate every prompt whole.
        self._reuses_prefix = not (
            llama_cpp.llama_model_is_recurrent(llm.model) or llama_cpp.llama_model_is_hybrid(llm.model)
        )
        metadata = llm.metadata
        architecture = metadata.get("general.architecture")
        # An encoder (BERT) keeps no memory of tokens to generate from, and its attention looks
        # both ways, so that each input must fit in one batch.
        self._generates = llm._ctx.memory is not None
        causal = metadata.get(f"{architecture}.attention.causal", "true") != "false"
        self._input_limit = self.n_ctx if causal else min(self.n_ctx, llm.context_params.n_ubatch)
        # How the model's own pooling, if it has one, makes one vector of its tokens' (llama.cpp's
        # enum llama_pooling_type); a generative model has none, and its tokens are averaged.
        self._pooling = int(metadata.get(f"{architecture}.pooling_type", 0))
        self._set_embeddings = llama_cpp.llama_set_embeddings
        self._embedding_of = llama_cpp.llama_get_embeddings_ith
        self.connection: _Connection | None = None
        self._set_abort_callback = llama_cpp.llama_set_abort_callback
        self._ctx = llm._ctx.ctx
        self._prompt_job: _Job | None = None
        self._terminating = False  # SIGTERM came where a raise is dropped: exit at the next token
        # run() has signal.set_wakeup_fd write a byte to wakeup_fd for each signal: see wait_readable.
        self._wakeup, self.wakeup_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Where a SIGIO may abandon a prompt: between llama_decode calls, in llama-cpp-python's
        # batch loop. Raised anywhere else (building a sampler, a finalizer) it could leave a
        # half-made object or be dropped; the abort callback or the next token stops it then.
        self._interruptible = {llama_cpp.Llama.eval.__code__, llama_cpp._internals.LlamaContext.decode.__code__,
                               llama_cpp._internals.LlamaBatch.set_batch.__code__}  # fmt: skip

        def prompt_cancelled(data: object) -> bool:
            job = self._prompt_job  # attribute reads only: a signal handled here has this frame
            return self._terminating or (job is not None and job.cancelled)

        _CALLBACK_CODE.add(prompt_cancelled.__code__)
        self._abort = llama_cpp.ggml_abort_callback(prompt_cancelled)
        self._no_abort = ctypes.cast(None, llama_cpp.ggml_abort_callback)

    def _prompt_phase(self, job: _Job, processing: bool) -> None:
        """Mark `job` as processing its prompt or not; while it is, llama.cpp asks after each graph
        node whether it was cancelled.

        Set only then, where one n_batch batch takes long (~130 ms for gemma3 270M on two threads
        here); during decoding the cancel flag is checked once per token instead.
        The CPU backend asks; GPU backends do not, and stop between batches (see on_sigio).
        """
        job.in_prompt = processing
        self._prompt_job = job if processing else None
        self._set_abort_callback(self._ctx, self._abort if processing else self._no_abort, None)

    def on_terminate(self, signum: int, frame: Any) -> None:
        if _raise_is_dropped(frame):
            self._terminating = True
        else:
            raise _Terminated

    def on_sigio(self, signum: int, frame: Any) -> None:
        connection = self.connection
        if connection is None:
            return
        connection.poll()
        if connection.reading:
            return  # this SIGIO came during another handler's read, which the raise would cut short
        job = connection.running
        if job is None or not (job.cancelled and job.in_prompt):
            return
        if frame is not None and frame.f_code in self._interruptible:
            job.in_prompt = False
            raise _PromptCancelled

    def wait_readable(self, fd: int) -> None:
        """Block until `fd` can be read; _Terminated once a SIGTERM came.

        Not a blocking accept or recv: the kernel may give a SIGTERM to another thread (llama.cpp's,
        the parent watch), as it does while this one has a SIGIO pending. Python then runs the
        handler at this thread's next bytecode, and interrupts no system call of this thread:
        the wakeup byte ends the poll instead, and the loop's next turn runs the handler.
        """
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(self._wakeup, select.POLLIN)
        while not self._terminating:  # also set by a SIGTERM handled where its raise was dropped
            ready = [ready_fd for ready_fd, _ in poller.poll()]
            if self._wakeup in ready:
                os.read(self._wakeup, 4096)
            if fd in ready:  # readable, closed or failed: the read that follows tells
                return
        raise _Terminated

    def serve(self, listener: socket.socket) -> None:
        while True:
            self.wait_readable(listener.fileno())
            sock, _ = listener.accept()
            _log("daemon connected")
            with sock:
                self.connection = connection = _Connection(sock, self.wait_readable)
                while (item := connection.begin_next()) is not None:
                    request, received, job = item
                    try:
                        if job is None:
                            connection.send(wire.Done(request.id, 0, 0, "cancelled", 0.0, 0.0))
                        elif connection.broken:
                            pass
                        elif type(request) is wire.Embed:
                            self._embed(request, job, connection)
                        elif type(request) is wire.Tokenize:
                            self._tokenize(request, connection)
                        else:
                            self._generate(request, received, job, connection)
                    finally:
                        connection.end()
                    if self._terminating:  # handled where a raise is dropped, after the last token
                        raise _Terminated
                self.connection = None
            _log("daemon disconnected")

    def _piece(self, token: int, special: bool = False) -> bytes:
        """The bytes `token` stands for; a special token's (`<eos>`) are none unless `special`."""
        size = 64
        while True:
            buffer = ctypes.create_string_buffer(size)
            n = self._token_to_piece(self._vocab, token, buffer, size, 0, special)
            if n >= 0:
                piece = buffer.raw[:n]
                if not special:
                    self._pieces[token] = piece
                return piece
            size = -n

    def _tokenize(self, request: wire.Tokenize, connection: _Connection) -> None:
        """Answer a Tokenize: the text's tokens, or the tokens given, with the bytes of each."""
        llm = self.llm
        if request.text is None:
            tokens = request.tokens
            if error := wire.unknown_token("tokens", tokens, llm.n_vocab(), "the model's"):
                connection.send(wire.Failed(request.id, error, refused=True))
                return
        else:
            try:
                tokens = llm.tokenize(request.text.encode(), add_bos=request.add_special,
                                      special=request.parse_special)  # fmt: skip
            except RuntimeError as exc:
                connection.send(wire.Failed(request.id, f"cannot tokenize the text: {exc}", refused=True))
                return
        pieces = [self._piece(token, special=True) for token in tokens]
        connection.send(wire.Tokenized(request.id, tokens, pieces))

    def _answer_aside(self, connection: _Connection) -> None:
        """Answer the tokenizes the daemon sent while a generation runs (it sends nothing else then)."""
        pending = connection.pending
        while pending and type(pending[0][0]) is wire.Tokenize:
            try:
                request, _ = pending.popleft()
            except IndexError:  # a SIGIO's read found the daemon gone, and dropped what it sent
                return
            self._tokenize(request, connection)

    def _prompt_tokens(self, request: wire.Generate) -> list[int]:
        """The request's prompt as tokens: its text after a BOS, or its messages through the model's
        chat template. Raises _ChatError, or RuntimeError when the text cannot be tokenized."""
        llm = self.llm
        if request.messages is None:
            return llm.tokenize(request.prompt.encode(), add_bos=True, special=True)
        messages = [{"role": role, "content": content} for role, content in request.messages]
        try:
            text = self._chat_template()(messages=messages).prompt
        except ValueError as exc:  # the template's raise_exception: messages it does not take
            raise _ChatError(f"the model's chat template refused the messages: {exc}") from None
        except jinja2.TemplateError as exc:  # its bugs (an undefined name, say)
            raise _ChatError(f"the model's chat template failed on the messages: {exc}", refused=False) from None
        tokens = llm.tokenize(text.encode(), add_bos=False, special=True)
        bos = llm.token_bos()
        if self._add_bos and bos != -1 and tokens[:1] != [bos]:  # most templates write the BOS themselves
            tokens.insert(0, bos)
        return tokens

    def _chat_template(self) -> Any:
        if self._chat_formatter is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            llm = self.llm
            template = llm.metadata.get("tokenizer.chat_template")
            if not template:
                raise _ChatError(wire.NO_CHAT_TEMPLATE)

            def text(token: int) -> str:
                return "" if token == -1 else llm.detokenize([token], special=True).decode(errors="replace")

            try:
                self._chat_formatter = Jinja2ChatFormatter(template, text(llm.token_eos()), text(llm.token_bos()))
            except jinja2.TemplateError as exc:
                raise _ChatError(f"the model's chat template is not valid Jinja: {exc}", refused=False) from None
        return self._chat_formatter

    def _cached_prefix(self, prompt_tokens: list[int]) -> int:
        """How many leading prompt tokens the context holds already: the last job's prompt and
        text are still there. At least one token is left to evaluate, for fresh logits."""
        import numpy  # after llama_cpp: see the imports above

        llm = self.llm
        held = llm.input_ids[: min(llm.n_tokens, len(prompt_tokens) - 1)]
        mismatches = numpy.flatnonzero(held != numpy.asarray(prompt_tokens[: len(held)]))
        return int(mismatches[0]) if len(mismatches) else len(held)

    def _generate(
        self, request: wire.Generate, received: float, job: _Job, connection: _Connection
    ) -> None:
        """Run one generation: Token frames as text is produced, then Done (or Failed)."""
        llm = self.llm
        if not self._generates:
            connection.send(wire.Failed(request.id, wire.EMBEDDINGS_ONLY, refused=True))
            return
        try:
            prompt_tokens = self._prompt_tokens(request)
        except _ChatError as exc:
            connection.send(wire.Failed(request.id, str(exc), refused=exc.refused))
            return
        except RuntimeError as exc:
            connection.send(wire.Failed(request.id, f"cannot tokenize the prompt: {exc}", refused=True))
            return
        n_prompt = len(prompt_tokens)
        if n_prompt == 0:
            connection.send(wire.Failed(request.id, "empty prompt", refused=True))
            return
        if n_prompt >= self.n_ctx:
            error = f"prompt is {n_prompt} tokens, the context holds {self.n_ctx}"
            if self.n_ctx_train > self.n_ctx:
                error += f"; the model's holds {self.n_ctx_train}: ask for a larger one with n_ctx"
            _log(f"generation {request.id} failed: {error}")
            connection.send(wire.Failed(request.id, error, refused=True))
            return
        if error := wire.unknown_token("logit_bias", request.logit_bias, llm.n_vocab(), "the model's"):
            connection.send(wire.Failed(request.id, error, refused=True))
            return
        room = self.n_ctx - n_prompt
        max_tokens = room if request.max_tokens <= 0 else min(request.max_tokens, room)

        # A request for reproducible text (a seed, or greedy at temperature 0) has its whole
        # prompt evaluated: reusing a cached prefix changes batch shapes, and with them the
        # floating point results, enough to change a token now and then. Otherwise the prefix
        # shared with the last job is kept, as llama-server's cache_prompt does: a long system
        # prompt or a growing conversation is evaluated once.
        reproducible = request.seed is not None or request.temperature <= 0
        cached = self._cached_prefix(prompt_tokens) if self._reuses_prefix and not reproducible else 0
        if cached:
            llm.n_tokens = cached  # eval() drops the rest of the KV cache
        else:
            llm.reset()
        _log(f"generation {request.id}: {n_prompt} prompt tokens ({cached} cached), up to {max_tokens} new")
        llm.set_seed(self._default_seed if request.seed is None else request.seed % 2**32)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        stopper = _StopMatcher(request.stop) if request.stop else None
        pieces, piece_of, is_eog, vocab = self._pieces, self._piece, self._is_eog, self._vocab
        send, token_delay, pending = connection.send, self.token_delay, connection.pending
        completion = 0
        first: float | None = None
        last = received
        finish = "length"
        llm.logit_bias, llm.prompt = request.logit_bias, prompt_tokens
        llm.last_n_tokens_size = self.n_ctx if request.repeat_last_n < 0 else request.repeat_last_n  # the penalties'
        tokens = llm.generate(
            prompt_tokens[cached:],
            reset=False,
            top_k=request.top_k,
            top_p=request.top_p,
            min_p=request.min_p,
            typical_p=_TYPICAL_P,
            temp=max(request.temperature, 0.0),
            repeat_penalty=request.repeat_penalty,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            grammar=request.grammar,  # GBNF: rbeed.llama.Llama parses it
        )
        # The outer try also catches a _PromptCancelled raised in the inner finally clause
        # before it clears in_prompt.
        try:
            try:
                self._prompt_phase(job, True)
                if job.cancelled:  # cancelled before in_prompt was set: no signal was sent
                    raise _PromptCancelled
                for token in tokens:
                    now = time.perf_counter()
                    if self._terminating:  # a SIGTERM handled where a raise is dropped
                        raise _Terminated
                    if job.in_prompt:
                        self._prompt_phase(job, False)
                        first = now
                    if job.cancelled:
                        finish = "cancelled"
                        break
                    if is_eog(vocab, token):
                        finish = "stop"
                        break
                    completion += 1
                    last = now  # the rate's span ends at the last token it counts, not at the end token
                    text = decoder.decode(pieces[token] or piece_of(token))
                    if stopper is not None:
                        text, stopped = stopper.feed(text)
                        if stopped:
                            finish = "stop"
                            if text:
                                send(wire.Token(request.id, text))
                            break
                    if text:
                        send(wire.Token(request.id, text))
                    if pending:
                        self._answer_aside(connection)
                    if completion >= max_tokens:
                        break
                    if token_delay:
                        time.sleep(token_delay)
            finally:
                self._prompt_phase(job, False)
                tokens.close()
        except _PromptCancelled:
            finish = "cancelled"
        except gbnf.GrammarError as exc:  # before the first token: the request's grammar does not fit the model
            _log(f"generation {request.id} refused: {exc}")
            send(wire.Failed(request.id, str(exc), refused=True))
            return
        except (RuntimeError, ValueError) as exc:
            if self._terminating:
                raise _Terminated from None
            if not job.cancelled:  # else it is llama_decode saying that the abort callback stopped it
                _log(f"generation {request.id} failed: {exc}")
                send(wire.Failed(request.id, f"generation failed: {exc}"))
                return
            finish = "cancelled"
        if finish != "cancelled":
            tail = decoder.decode(b"", final=True)
            if stopper is not None:  # what it held as maybe a stop string's start was not one
                tail = stopper.flush() + tail
            if tail:
                send(wire.Token(request.id, tail))
        ttft_ms = 0.0 if first is None else (first - received) * 1000.0
        rate = 0.0
        if first is not None and completion > 1 and last > first:
            rate = (completion - 1) / (last - first)
        send(wire.Done(request.id, n_prompt, completion, finish, ttft_ms, rate, cached))
        _log(
            f"generation {request.id}: {finish}, {completion} tokens,"
            f" ttft {ttft_ms:.1f} ms, {rate:.1f} tok/s"
        )

    def _embed(self, request: wire.Embed, job: _Job, connection: _Connection) -> None:
        """Answer an Embed: an Embedding per input, in order, then Embedded; or Failed.

        The context's tokens are replaced by each input's in turn, so the next generation finds no
        prefix of its prompt cached.
        """
        import numpy  # after llama_cpp: see the imports above

        llm = self.llm
        _log(f"embedding {request.id}: {len(request.inputs)} input(s)")
        try:
            if self._pooling == _POOLING_RANK:
                raise _InputError("the model ranks documents (a reranker): it makes no embeddings")
            if request.dimensions is not None and request.dimensions > llm.n_embd():
                raise _InputError(f"dimensions {request.dimensions} is more than the model's {llm.n_embd()}")
            # Every input is checked before any runs.
            inputs = [self._embedding_tokens(request, index, text) for index, text in enumerate(request.inputs)]
            self._set_embeddings(self._ctx, True)
            for tokens in inputs:
                vector = self._pooled(tokens, job)[: request.dimensions]  # [:None] keeps them all
                if request.normalize and (norm := numpy.linalg.norm(vector)) > 0:
                    vector = vector / norm
                # As float32, written the shortest way that reads back the same: 0.0123, not 0.012300000526
                shortest = vector.astype(numpy.float32).astype(str).astype(float)
                connection.send(wire.Embedding(request.id, shortest.tolist()))
        except (_InputError, _PromptCancelled, RuntimeError) as exc:
            # RuntimeError: llama_decode failed, or returned 2 as its abort callback stopped it
            if self._terminating:
                raise _Terminated from None
            if isinstance(exc, _PromptCancelled) or job.cancelled:
                error = "cancelled"
            else:
                error = str(exc) if isinstance(exc, _InputError) else f"embedding failed: {exc}"
            _log(f"embedding {request.id}: {error}")
            connection.send(wire.Failed(request.id, error, refused=isinstance(exc, _InputError)))
            return
        finally:
            self._prompt_phase(job, False)
            self._set_embeddings(self._ctx, False)
            llm.reset()
            llm._ctx.kv_cache_clear()
        prompt_tokens = sum(map(len, inputs))
        connection.send(wire.Embedded(request.id, prompt_tokens))
        _log(f"embedding {request.id}: done, {prompt_tokens} tokens")

    def _embedding_tokens(self, request: wire.Embed, index: int, text: str) -> list[int]:
        """An input's tokens, cut to the context if the request allows; _InputError says why not."""
        tokens = self.llm.tokenize(text.encode(), add_bos=True, special=True)  # BOS and EOS as the vocab says
        if not tokens:
            raise _InputError(f"input {index} makes no tokens")
        if len(tokens) > (limit := self._input_limit):
            if not request.truncate:
                holds = "the context holds" if limit == self.n_ctx else "an encoder's one batch holds"
                raise _InputError(f"input {index} is {len(tokens)} tokens, {holds} {limit}; "
                                  "truncate it, or ask for a larger n_ctx")  # fmt: skip
            tokens = tokens[:limit]
        return tokens

    def _pooled(self, tokens: list[int], job: _Job) -> Any:
        """One input's vector (a numpy array): its tokens' last hidden states, pooled as the model says."""
        import numpy  # after llama_cpp: see the imports above

        llm = self.llm
        n_embd, n_batch = llm.n_embd(), llm.n_batch
        llm._ctx.kv_cache_clear()  # each input from position 0
        total = numpy.zeros(n_embd, dtype=numpy.float64)
        first = last = None
        self._prompt_phase(job, True)
        if job.cancelled:  # before in_prompt was set: no signal was sent
            raise _PromptCancelled
        for start in range(0, len(tokens), n_batch):
            chunk = tokens[start : start + n_batch]
            llm._batch.set_batch(chunk, n_past=start, logits_all=True)  # every token an output
            llm._ctx.decode(llm._batch)
            if job.cancelled:
                raise _PromptCancelled
            states = [numpy.ctypeslib.as_array(self._embedding_of(self._ctx, i), shape=(n_embd,))
                      for i in range(len(chunk))]  # fmt: skip
            total += numpy.sum(states, axis=0)
            first = states[0].copy() if first is None else first
            last = states[-1]
        if self._pooling == _POOLING_CLS:
            return first
        if self._pooling == _POOLING_LAST:
            return last.copy()
        return total / len(tokens)


def _token_delay() -> float:
    value = os.environ.get("RBEED_WORKER_TOKEN_DELAY", "")
    try:
        return float(value) if value else 0.0
    except ValueError:
        raise _StartupError(f"RBEED_WORKER_TOKEN_DELAY is not a number: {value!r}") from None


def _on_terminate(signum: int, frame: object) -> None:
    """SIGTERM/SIGINT until the model is loaded."""
    if _raise_is_dropped(frame):
        # llama.cpp is loading the model and logging as it goes: a raise would be dropped, and
        # nothing is set up yet that exiting here would leave behind (no socket, no client).
        os._exit(0)
    raise _Terminated


def probe(device: str) -> int:
    """`rbeed worker --probe DEVICE`: whether this build supports DEVICE (exit 0), or why not (exit 3).

    Whether the GPU itself is there is left to the worker, which looks from its own sandbox.
    """
    try:
        _check_gpu(device, _gpu_layers(device), find=False)
    except _StartupError as exc:
        _log(f"failed: {exc}")
        return EXIT_FAILED
    return 0


def run(argv: list[str] | None = None) -> int:
    """Run the worker until SIGTERM (exit 0) or a startup failure (exit 3)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--probe":
        return probe(argv[1])
    args = _parse_args(argv)
    signal.signal(signal.SIGTERM, _on_terminate)
    signal.signal(signal.SIGINT, _on_terminate)
    listener: socket.socket | None = None
    try:
        if parent := os.environ.get("RBEED_PDEATHSIG"):
            _exit_with_parent(int(parent))
        _log(f"worker {args.id}: loading {args.model} on {args.device}")
        _notify(f"STATUS=loading {args.model}")
        try:
            token_delay = _token_delay()
            _pin(args.cpu_affinity)
            llm = _load_model(args, _gpu_layers(args.device))
            listener = _listen(args.socket)
        except _StartupError as exc:
            _notify(f"STATUS=failed: {exc}")
            _log(f"failed: {exc}")
            return EXIT_FAILED
        worker = _Worker(llm, token_delay)
        signal.signal(signal.SIGTERM, worker.on_terminate)
        signal.signal(signal.SIGINT, worker.on_terminate)
        signal.signal(signal.SIGIO, worker.on_sigio)
        signal.siginterrupt(signal.SIGIO, False)  # let llama.cpp's system calls restart, not fail
        signal.set_wakeup_fd(worker.wakeup_fd, warn_on_full_buffer=False)  # a byte per signal: many SIGIOs
        _notify(f"READY=1\nSTATUS=serving {args.model} on {args.device}")
        _log(f"worker {args.id}: serving on {args.socket}")
        worker.serve(listener)
    except _Terminated:
        _log("terminated")
    finally:
        if listener is not None:
            listener.close()
            try:
                os.unlink(args.socket)
            except OSError:
                pass
    return 0


if __name__ == "__main__":
    sys.exit(run())
