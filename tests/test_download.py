"""Tests of rbeed.download against a real HTTP server on 127.0.0.1 and local files."""

import ctypes
import hashlib
import json
import mmap
import os
import pathlib
import re
import sys
import threading
from functools import partial

import pytest
import trio
import trio.testing

from rbeed.download import BLOCK_SIZE, DownloadError, SourceError, VerificationError, _PartFile, download
from rbeed.httpclient import Client

from httpfixture import RecordedRequest, Reply, corrupted, gguf_bytes, serve_files

MiB = 1 << 20
MODEL = gguf_bytes(3 * MiB + 12345)
MODEL_SHA256 = hashlib.sha256(MODEL).hexdigest()


class ProgressLog:
    def __init__(self) -> None:
        self.events: list[tuple[int, int | None, float]] = []
        self.times: list[float] = []

    def __call__(self, done: int, total: int | None, rate: float) -> None:
        self.events.append((done, total, rate))
        self.times.append(trio.current_time())

    def assert_sane(self, total: int) -> None:
        done = [event[0] for event in self.events]
        assert done == sorted(done)
        assert all(event[1] == total for event in self.events)
        assert all(event[2] >= 0 for event in self.events)
        assert self.events[-1][:2] == (total, total)


def part_of(dest: pathlib.Path) -> pathlib.Path:
    return dest.with_name(dest.name + ".part")


def left_part(dest: pathlib.Path, data: bytes, source: str | pathlib.Path, validator: str | None = None) -> None:
    """A .part as a download of `source` leaves it: its bytes, and where they came from beside them."""
    part_of(dest).write_bytes(data)
    origin = {"source": str(source), "validator": validator}
    part_of(dest).with_name(part_of(dest).name + ".from").write_text(json.dumps(origin))


async def test_full_download_verifies_and_installs_atomically(tmp_path):
    dest = tmp_path / "models" / "tiny.gguf"
    progress = ProgressLog()
    async with serve_files({"tiny.gguf": MODEL}) as server:
        result = await download(
            server.url("tiny.gguf"), dest, sha256=MODEL_SHA256.upper(), on_progress=progress, progress_interval=0
        )
    assert dest.read_bytes() == MODEL
    assert not part_of(dest).exists()
    assert (result.path, result.size, result.sha256, result.resumed_from) == (dest, len(MODEL), MODEL_SHA256, 0)
    assert "range" not in server.requests[0].headers
    progress.assert_sane(len(MODEL))
    assert len(progress.events) > 3  # progress_interval=0: a report per received chunk


async def test_progress_is_rate_limited_by_trio_clock(tmp_path, mock_clock):
    """Each 64 KiB the server sends costs 0.1 s of (mock) time: reports are >= 0.25 s apart."""

    async def slow_model(request: RecordedRequest) -> Reply:
        async def body():
            for start in range(0, len(MODEL), 64 * 1024):
                yield MODEL[start : start + 64 * 1024]
                mock_clock.jump(0.1)

        return Reply(200, {}, body())

    progress = ProgressLog()
    async with serve_files() as server:
        server.routes["/slow.gguf"] = slow_model
        await download(server.url("slow.gguf"), tmp_path / "slow.gguf", on_progress=progress, progress_interval=0.25)
    assert len(progress.events) >= 3
    assert all(
        later - earlier >= 0.25 for earlier, later in zip(progress.times[:-2], progress.times[1:-1], strict=True)
    )
    # chunked: the size is unknown until the end, then the final report gives it
    assert all(total is None for _, total, _ in progress.events[:-1])
    assert progress.events[-1][:2] == (len(MODEL), len(MODEL))
    assert 0 < progress.events[-1][2] <= len(MODEL) / 0.25


async def test_dropped_connection_keeps_the_part_and_the_retry_resumes_with_range(tmp_path):
    dest = tmp_path / "m.gguf"
    cut = MiB + MiB // 2 + 7
    async with serve_files({"m.gguf": MODEL}) as server:
        server.drop_after["m.gguf"] = cut
        with pytest.raises(
            DownloadError, match=f"connection closed by .*after {cut} of {len(MODEL)} body bytes"
        ) as caught:
            await download(server.url("m.gguf"), dest, sha256=MODEL_SHA256)
        assert not isinstance(caught.value, VerificationError)
        assert part_of(dest).read_bytes() == MODEL[:cut]
        progress = ProgressLog()
        result = await download(server.url("m.gguf"), dest, sha256=MODEL_SHA256, on_progress=progress)
    assert server.requests[-1].headers["range"] == f"bytes={cut}-"
    assert (result.resumed_from, result.sha256) == (cut, MODEL_SHA256)
    assert dest.read_bytes() == MODEL
    assert not part_of(dest).exists()
    progress.assert_sane(len(MODEL))
    assert progress.events[0][0] >= cut


async def test_with_retries_a_dropped_transfer_resumes_in_the_same_call(tmp_path):
    dest = tmp_path / "m.gguf"
    cut = MiB + MiB // 2 + 7  # mid-block: bytes still pending in memory must reach the disk first
    retries: list[tuple[str, int, float]] = []
    async with serve_files({"m.gguf": MODEL}) as server:
        server.drop_after["m.gguf"] = cut
        progress = ProgressLog()
        result = await download(server.url("m.gguf"), dest, sha256=MODEL_SHA256, on_progress=progress,
                                retries=1, retry_delay=0.01, on_retry=lambda *args: retries.append(args))  # fmt: skip
    assert [request.headers.get("range") for request in server.requests] == [None, f"bytes={cut}-"]
    [(reason, done, delay)] = retries
    assert re.search(f"connection closed by .*after {cut} of {len(MODEL)} body bytes", reason), reason
    assert (done, delay) == (cut, 0.01)
    assert (result.resumed_from, result.sha256, result.size) == (0, MODEL_SHA256, len(MODEL))
    assert dest.read_bytes() == MODEL
    progress.assert_sane(len(MODEL))


async def test_with_retries_a_stalled_transfer_times_out_and_resumes(tmp_path):
    dest = tmp_path / "m.gguf"
    stall = MiB + 3
    reasons: list[str] = []
    async with serve_files({"m.gguf": MODEL}) as server, Client(server.base_url, read_timeout=0.2) as client:
        server.stall_after["m.gguf"] = stall

        def on_retry(reason: str, done: int, delay: float) -> None:
            reasons.append(reason)
            del server.stall_after["m.gguf"]  # the next attempt gets the rest

        result = await download(server.url("m.gguf"), dest, client=client, retries=1, retry_delay=0, on_retry=on_retry)
    assert [request.headers.get("range") for request in server.requests] == [None, f"bytes={stall}-"]
    assert len(reasons) == 1 and "timed out after 0.2s" in reasons[0], reasons
    assert result.sha256 == MODEL_SHA256 and dest.read_bytes() == MODEL


async def test_progress_is_reported_as_soon_as_the_size_is_known(tmp_path):
    """A transfer whose bytes are slow to come still shows its bar (0 of the total) at once."""
    progress, reported = ProgressLog(), trio.Event()

    def on_progress(*event) -> None:
        progress(*event)
        reported.set()

    async with serve_files({"m.gguf": MODEL}) as server, trio.open_nursery() as nursery:
        server.stall_after["m.gguf"] = 0
        nursery.start_soon(partial(download, server.url("m.gguf"), tmp_path / "m.gguf", on_progress=on_progress))
        with trio.fail_after(5):
            await reported.wait()
        nursery.cancel_scope.cancel()
    assert progress.events == [(0, len(MODEL), 0.0)]


async def test_retries_back_off_and_give_up_after_attempts_in_a_row_without_new_bytes(tmp_path):
    dest = tmp_path / "m.gguf"
    answers = iter([Reply(200, {"content-length": str(len(MODEL))}, MODEL, drop_after=1000)])
    retries: list[tuple[str, int, float]] = []

    async def flaky(request: RecordedRequest) -> Reply:
        return next(answers, Reply(503, {"content-type": "text/plain"}, b"overloaded\n"))

    async with serve_files({}) as server:
        server.routes["/m.gguf"] = flaky
        with pytest.raises(DownloadError, match="503") as caught:
            await download(server.url("m.gguf"), dest, retries=2, retry_delay=0.01,
                           on_retry=lambda *args: retries.append(args))  # fmt: skip
    # The drop brought bytes (the count starts afresh), then two 503s are retried and a third is not.
    assert [(done, delay) for _, done, delay in retries] == [(1000, 0.01), (1000, 0.01), (1000, 0.02)]
    assert [request.headers.get("range") for request in server.requests] == [None] + ["bytes=1000-"] * 3
    assert not isinstance(caught.value, VerificationError)
    assert part_of(dest).read_bytes() == MODEL[:1000]


async def test_a_final_answer_or_a_server_never_reached_is_not_retried(tmp_path):
    retries: list[tuple[str, int, float]] = []
    async with serve_files({}) as server:
        with pytest.raises(DownloadError, match="404"):
            await download(server.url("m.gguf"), tmp_path / "m.gguf", retries=3, retry_delay=0,
                           on_retry=lambda *args: retries.append(args))  # fmt: skip
        assert len(server.requests) == 1
        closed = server.base_url  # nothing listens there once the server has stopped
    with pytest.raises(DownloadError, match="cannot connect"):
        await download(f"{closed}/m.gguf", tmp_path / "m.gguf", retries=3, retry_delay=0,
                       on_retry=lambda *args: retries.append(args))  # fmt: skip
    assert retries == []


async def test_cancelled_download_keeps_the_part_and_resumes(tmp_path):
    dest = tmp_path / "m.gguf"
    stall = 2 * MiB + 100
    async with serve_files({"m.gguf": MODEL}) as server:
        server.stall_after["m.gguf"] = stall
        all_received = trio.Event()

        def on_progress(done: int, total: int | None, rate: float) -> None:
            if done == stall:
                all_received.set()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:

                async def run_download() -> None:
                    await download(server.url("m.gguf"), dest, on_progress=on_progress, progress_interval=0)
                    raise AssertionError("the stalled download finished")

                nursery.start_soon(run_download)
                await all_received.wait()
                nursery.cancel_scope.cancel()
        assert part_of(dest).read_bytes() == MODEL[:stall]  # the buffered tail was written on cancel
        assert not dest.exists()
        del server.stall_after["m.gguf"]
        result = await download(server.url("m.gguf"), dest)
    assert server.requests[-1].headers["range"] == f"bytes={stall}-"
    assert (result.resumed_from, result.sha256) == (stall, MODEL_SHA256)
    assert dest.read_bytes() == MODEL


async def test_server_ignoring_range_restarts_from_scratch(tmp_path):
    dest = tmp_path / "m.gguf"
    async with serve_files({"m.gguf": MODEL}) as server:
        left_part(dest, b"stale bytes from another file", server.url("m.gguf"))
        server.ignore_range.add("m.gguf")
        result = await download(server.url("m.gguf"), dest, sha256=MODEL_SHA256)
    assert server.requests[0].headers["range"] == "bytes=29-"
    assert (result.resumed_from, result.size) == (0, len(MODEL))
    assert dest.read_bytes() == MODEL


async def test_complete_part_is_verified_without_downloading_again(tmp_path):
    dest = tmp_path / "m.gguf"
    progress = ProgressLog()
    async with serve_files({"m.gguf": MODEL}) as server:
        left_part(dest, MODEL, server.url("m.gguf"))
        result = await download(server.url("m.gguf"), dest, sha256=MODEL_SHA256, on_progress=progress)
    assert server.requests[0].headers["range"] == f"bytes={len(MODEL)}-"
    assert (result.resumed_from, result.sha256) == (len(MODEL), MODEL_SHA256)
    assert progress.events == [(len(MODEL), len(MODEL), 0.0)]
    assert dest.read_bytes() == MODEL


async def test_part_longer_than_the_file_starts_over(tmp_path):
    dest = tmp_path / "m.gguf"
    async with serve_files({"m.gguf": MODEL}) as server:
        left_part(dest, MODEL + b"extra", server.url("m.gguf"))
        result = await download(server.url("m.gguf"), dest, sha256=MODEL_SHA256)
    assert [r.headers.get("range") for r in server.requests] == [f"bytes={len(MODEL) + 5}-", None]
    assert result.resumed_from == 0
    assert dest.read_bytes() == MODEL


async def test_not_gguf_fails_early_and_removes_the_part(tmp_path):
    dest = tmp_path / "page.gguf"
    html = b"<!doctype html>" + b"x" * (4 * MiB)
    async with serve_files({"page.gguf": html}) as server:
        server.stall_after["page.gguf"] = 2 * MiB  # only an early check can finish
        with trio.fail_after(10), pytest.raises(VerificationError, match=r"not a GGUF file \(magic b'<!do'"):
            await download(server.url("page.gguf"), dest)
    assert not part_of(dest).exists()
    assert not dest.exists()


async def test_wrong_sha256_removes_the_part(tmp_path):
    dest = tmp_path / "m.gguf"
    wrong = "0" * 64
    async with serve_files({"m.gguf": MODEL}) as server:
        with pytest.raises(VerificationError) as caught:
            await download(server.url("m.gguf"), dest, sha256=wrong)
    assert str(caught.value) == f"sha256 mismatch: expected {wrong}, got {MODEL_SHA256}"
    assert not part_of(dest).exists()
    assert not dest.exists()


async def test_sha256_of_the_resumed_prefix_is_recomputed_from_disk(tmp_path):
    dest = tmp_path / "m.gguf"
    tampered = bytearray(MODEL[:MiB])
    tampered[1000] ^= 1
    async with serve_files({"m.gguf": MODEL}) as server:
        left_part(dest, tampered, server.url("m.gguf"))
        with pytest.raises(VerificationError, match=f"sha256 mismatch: expected {MODEL_SHA256}, got "):
            await download(server.url("m.gguf"), dest, sha256=MODEL_SHA256)
    assert server.requests[0].headers["range"] == f"bytes={MiB}-"
    assert not part_of(dest).exists()


@pytest.mark.parametrize("header", ["etag", "x-linked-etag", "digest", "repr-digest"])
@pytest.mark.parametrize("corrupt", [False, True])
async def test_server_announced_sha256_is_checked(tmp_path, header, corrupt):
    dest = tmp_path / "m.gguf"
    async with serve_files({"m.gguf": MODEL}, digest_header=header) as server:
        if not corrupt:
            result = await download(server.url("m.gguf"), dest)
            assert result.sha256 == MODEL_SHA256
            return
        server.corrupt.add("m.gguf")
        with pytest.raises(
            VerificationError, match=f"sha256 mismatch: expected {MODEL_SHA256}, got .* in {header}\\)$"
        ):
            await download(server.url("m.gguf"), dest)
        assert not part_of(dest).exists()
        # a sha256 given by the caller takes precedence over the server's
        served = corrupted(MODEL)
        result = await download(server.url("m.gguf"), dest, sha256=hashlib.sha256(served).hexdigest())
        assert dest.read_bytes() == served


async def test_hugging_face_style_redirect_announces_the_sha256(tmp_path):
    """huggingface.co answers /resolve/... with a 302 carrying X-Linked-Etag; the CDN has no digest."""
    dest = tmp_path / "m.gguf"
    async with serve_files({"cdn/m.gguf": MODEL}) as cdn, serve_files() as hub:

        async def resolve(request: RecordedRequest) -> Reply:
            return Reply(302, {"location": cdn.url("cdn/m.gguf"), "x-linked-etag": f'"{MODEL_SHA256}"'})

        hub.routes["/org/repo/resolve/main/m.gguf"] = resolve
        resolve_url = hub.url("org/repo/resolve/main/m.gguf")
        result = await download(resolve_url, dest)
        assert result.sha256 == MODEL_SHA256
        dest.unlink()
        cdn.corrupt.add("cdn/m.gguf")
        announced = rf"expected {MODEL_SHA256}, .* \(announced by {re.escape(resolve_url)} in x-linked-etag\)$"
        with pytest.raises(VerificationError, match=announced):
            await download(resolve_url, dest)


async def test_http_error_status_is_a_download_error_and_leaves_no_part(tmp_path):
    dest = tmp_path / "m.gguf"
    async with serve_files() as server:
        with pytest.raises(
            DownloadError, match=r"download of .*/absent.gguf failed: GET .*/absent.gguf -> 404 Not Found"
        ):
            await download(server.url("absent.gguf"), dest)
    assert list(tmp_path.iterdir()) == []


async def test_connection_refused_is_a_download_error(tmp_path):
    async with serve_files() as server:
        url = server.url("m.gguf")
    async with Client(url, connect_timeout=2) as client:
        with pytest.raises(DownloadError, match=f"download of {url} failed: cannot connect to .*: connection refused"):
            await download(url, tmp_path / "m.gguf", client=client)


async def test_one_download_per_destination_at_a_time(tmp_path):
    dest = tmp_path / "m.gguf"
    async with serve_files({"m.gguf": MODEL}) as server:
        server.stall_after["m.gguf"] = 100
        stalled = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(download, server.url("m.gguf"), dest, on_progress=lambda *_: stalled.set(), progress_interval=0)
            )
            with trio.fail_after(5):
                await stalled.wait()
            with pytest.raises(DownloadError, match="is being downloaded by another task or process"):
                await download(server.url("m.gguf"), dest)
            nursery.cancel_scope.cancel()
    assert part_of(dest).read_bytes() == MODEL[:100]  # the loser did not touch it


async def test_local_path_and_file_url_are_copied_with_progress(tmp_path):
    source = tmp_path / "source dir" / "model.gguf"
    source.parent.mkdir()
    source.write_bytes(MODEL)
    for origin in (source, str(source), source.as_uri()):
        dest = tmp_path / "out" / "model.gguf"
        progress = ProgressLog()
        result = await download(origin, dest, sha256=MODEL_SHA256, on_progress=progress, progress_interval=0)
        assert (result.size, result.sha256, result.resumed_from) == (len(MODEL), MODEL_SHA256, 0)
        assert dest.read_bytes() == MODEL
        progress.assert_sane(len(MODEL))
        assert len(progress.events) >= 4  # one per MiB block
        dest.unlink()


async def test_local_copy_resumes_a_part(tmp_path):
    source = tmp_path / "model.gguf"
    source.write_bytes(MODEL)
    dest = tmp_path / "out.gguf"
    stat = source.stat()
    left_part(dest, MODEL[: MiB + 5], source, f"{stat.st_size}:{stat.st_mtime_ns}")
    result = await download(source, dest, sha256=MODEL_SHA256)
    assert (result.resumed_from, result.sha256) == (MiB + 5, MODEL_SHA256)
    assert dest.read_bytes() == MODEL
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.gguf", "out.gguf"]


async def test_a_part_is_resumed_only_from_its_own_source_and_version_of_the_file(tmp_path):
    """Resuming a .part with another file's bytes would make a model of two halves."""
    dest = tmp_path / "m.gguf"
    other = gguf_bytes(3 * MiB + 999)
    cut = MiB + MiB // 2 + 7
    async with serve_files({"a/m.gguf": MODEL, "b/m.gguf": other}) as server:
        server.drop_after["a/m.gguf"] = cut
        with pytest.raises(DownloadError):
            await download(server.url("a/m.gguf"), dest)
        result = await download(server.url("b/m.gguf"), dest)  # another source: starts over
        assert "range" not in server.requests[-1].headers
        assert (result.resumed_from, dest.read_bytes()) == (0, other)

        # The same URL, whose file changed meanwhile: If-Range gets it whole.
        dest.unlink()
        server.last_modified["a/m.gguf"] = "Mon, 23 Nov 2026 10:00:00 GMT"
        server.drop_after["a/m.gguf"] = cut
        with pytest.raises(DownloadError):
            await download(server.url("a/m.gguf"), dest)
        server.files["a/m.gguf"], server.last_modified["a/m.gguf"] = other, "Tue, 24 Nov 2026 10:00:00 GMT"
        result = await download(server.url("a/m.gguf"), dest)
    assert server.requests[-1].headers["range"] == f"bytes={cut}-"
    assert server.requests[-1].headers["if-range"] == "Mon, 23 Nov 2026 10:00:00 GMT"
    assert (result.resumed_from, dest.read_bytes()) == (0, other)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.gguf"]  # no .part, nor where it came from

    # A local file too: the same path, another file.
    source = tmp_path / "local.gguf"
    source.write_bytes(MODEL)
    left_part(tmp_path / "l.gguf", MODEL[:cut], source, "1:2")  # not the size and time the file has
    result = await download(source, tmp_path / "l.gguf")
    assert (result.resumed_from, (tmp_path / "l.gguf").read_bytes()) == (0, MODEL)


async def test_a_validator_http_cannot_send_back_is_not_used_to_resume(tmp_path):
    # RFC 9110 lets a validator hold bytes past ASCII; sent back in If-Range, h11 refused the
    # request, and every later download of the file failed on its .part.
    dest, cut = tmp_path / "m.gguf", MiB + 11
    async with serve_files({"m.gguf": MODEL}) as server:
        server.last_modified["m.gguf"] = b"Mon, 23 Nov 2026 10:00:00 GMT \xe9"
        server.drop_after["m.gguf"] = cut
        with pytest.raises(DownloadError):
            await download(server.url("m.gguf"), dest)
        result = await download(server.url("m.gguf"), dest)
    assert server.requests[-1].headers["range"] == f"bytes={cut}-" and "if-range" not in server.requests[-1].headers
    assert (result.resumed_from, dest.read_bytes()) == (cut, MODEL)


async def test_a_range_of_another_version_of_the_file_is_not_appended(tmp_path):
    dest, cut = tmp_path / "m.gguf", MiB + 11
    other = gguf_bytes(len(MODEL) + 1000)
    async with serve_files({"m.gguf": MODEL}) as server:
        server.last_modified["m.gguf"] = "Mon, 23 Nov 2026 10:00:00 GMT"
        server.drop_after["m.gguf"] = cut
        with pytest.raises(DownloadError):
            await download(server.url("m.gguf"), dest)
        # Changed meanwhile, on a server that answers Range whatever If-Range says.
        server.files["m.gguf"], server.last_modified["m.gguf"] = other, "Tue, 24 Nov 2026 10:00:00 GMT"
        server.ignore_if_range.add("m.gguf")
        result = await download(server.url("m.gguf"), dest)
    assert [request.headers.get("range") for request in server.requests[-2:]] == [f"bytes={cut}-", None]
    assert (result.resumed_from, dest.read_bytes()) == (0, other)

    # A 416 that calls the .part whole, from a server that said the file was longer.
    answers = []

    async def shrinking(request: RecordedRequest) -> Reply:
        answers.append(request.headers.get("range"))
        if len(answers) == 1:
            return Reply(200, {"content-length": str(len(MODEL))}, MODEL, drop_after=cut)
        if len(answers) == 2:
            return Reply(416, {"content-range": f"bytes */{cut}", "content-length": "0"})
        return Reply(200, {}, MODEL)

    async with serve_files() as server:
        server.routes["/s.gguf"] = shrinking
        result = await download(server.url("s.gguf"), tmp_path / "s.gguf", retries=1, retry_delay=0.01)
    assert answers == [None, f"bytes={cut}-", None]
    assert (tmp_path / "s.gguf").read_bytes() == MODEL


async def test_a_range_shorter_than_the_rest_is_followed_by_requests_for_what_is_left(tmp_path):
    dest = tmp_path / "m.gguf"
    async with serve_files({"m.gguf": MODEL}) as server:
        server.drop_after["m.gguf"] = 1000
        with pytest.raises(DownloadError):
            await download(server.url("m.gguf"), dest)
        server.range_limit["m.gguf"] = MiB
        result = await download(server.url("m.gguf"), dest, sha256=MODEL_SHA256)
    starts = [1000 + n * MiB for n in range(4)]
    assert [r.headers.get("range") for r in server.requests[1:]] == [f"bytes={start}-" for start in starts]
    assert (result.resumed_from, dest.read_bytes()) == (1000, MODEL)


async def test_a_write_that_fails_leaves_the_blocks_before_it_and_no_hole(tmp_path, monkeypatch):
    dest = tmp_path / "m.gguf"
    write = _PartFile._write_and_hash
    calls = []

    def failing_second(self, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        return write(self, data)

    async with serve_files({"m.gguf": MODEL}) as server:
        monkeypatch.setattr(_PartFile, "_write_and_hash", failing_second)
        with pytest.raises(DownloadError, match="Input/output error"):
            await download(server.url("m.gguf"), dest)
        monkeypatch.undo()
        assert part_of(dest).read_bytes() == MODEL[: calls[0]]  # the first block only, not pending bytes after a gap
        result = await download(server.url("m.gguf"), dest, sha256=MODEL_SHA256)
    assert (result.resumed_from, dest.read_bytes()) == (calls[0], MODEL)


async def test_a_local_source_that_is_no_regular_file_is_a_source_error(tmp_path):
    with pytest.raises(SourceError, match=r"^cannot read .*/nowhere\.gguf: No such file or directory$"):
        await download(tmp_path / "nowhere.gguf", tmp_path / "dest.gguf")
    assert list(tmp_path.iterdir()) == []
    # A pipe no one writes to: opened as a file, it waited for a writer in a thread nothing could cancel.
    os.mkfifo(tmp_path / "pipe.gguf")
    with trio.fail_after(5), pytest.raises(SourceError, match=r"^.*/pipe\.gguf is not a regular file$"):
        await download(tmp_path / "pipe.gguf", tmp_path / "dest.gguf")
    with pytest.raises(SourceError, match=r"^.*/tmp.* is not a regular file$"):
        await download(f"file://{tmp_path}", tmp_path / "dest.gguf")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["pipe.gguf"]


async def test_cancelled_wait_for_the_disk_still_leaves_a_prefix(tmp_path):
    """A block still being written when the download is cancelled lands before the pending bytes."""
    first, second = MODEL[:BLOCK_SIZE], MODEL[BLOCK_SIZE : 2 * BLOCK_SIZE]
    part = await _PartFile.open(tmp_path / "m.gguf.part")
    gate = threading.Event()
    write_and_hash = part._write_and_hash
    part._write_and_hash = lambda data: (gate.wait(), write_and_hash(data))  # a very slow disk
    with trio.CancelScope() as scope:
        await part.write(first)  # now in flight, held at the gate
        scope.cancel()
        await part.write(second)  # waits for the disk: cancelled there
    async with trio.open_nursery() as nursery:
        nursery.start_soon(part.aclose)
        await trio.testing.wait_all_tasks_blocked()
        gate.set()
    assert (tmp_path / "m.gguf.part").read_bytes() == first + second


async def test_malformed_sha256_is_refused_before_any_transfer(tmp_path):
    with pytest.raises(DownloadError, match=r"invalid sha256 'abc': expected 64 hex digits"):
        await download(tmp_path / "unused.gguf", tmp_path / "dest.gguf", sha256="abc")
    assert list(tmp_path.iterdir()) == []


def resident_pages(path: pathlib.Path) -> int:
    """How many of the file's pages are in the page cache (mincore(2) on a fresh mapping)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    with open(path, "rb") as file:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, file.fileno(), 0)
    assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vector = ctypes.create_string_buffer(pages)
        assert libc.mincore(address, size, vector) == 0, os.strerror(ctypes.get_errno())
        return sum(byte & 1 for byte in vector.raw)
    finally:
        libc.munmap(address, size)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux's")
async def test_installed_model_is_left_out_of_the_page_cache(tmp_path):
    # so that the worker's mmap reads it back in large folios (huge-page mappings)
    written = tmp_path / "written.gguf"
    with open(written, "wb") as file:
        file.write(MODEL)
        file.flush()
        os.fsync(file.fileno())
    assert resident_pages(written) > 0  # what write() leaves behind, and what mincore shows
    with open(written, "rb") as file:
        os.posix_fadvise(file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if resident_pages(written) > 0:
        pytest.skip("this filesystem keeps written pages in memory (tmpfs)")
    dest = tmp_path / "models" / "model.gguf"
    async with serve_files({"model.gguf": MODEL}) as server:
        await download(server.url("model.gguf"), dest, sha256=MODEL_SHA256)
    assert resident_pages(dest) == 0
    await download(written, dest.with_name("copy.gguf"), sha256=MODEL_SHA256)
    assert resident_pages(dest.with_name("copy.gguf")) == 0


# Runs in a mount namespace of its own, with the destination on a 2 MiB tmpfs.
_SMALL_DISK_SCRIPT = """
import json, sys, trio
sys.path.insert(0, sys.argv[2])
from httpfixture import gguf_bytes, serve_files
from rbeed.download import DownloadError, download

async def main(small):
    outcomes = {}
    big, fits = gguf_bytes(3 << 20), gguf_bytes(1 << 20)
    (source := small.parent / "big.gguf").write_bytes(big)
    async with serve_files({"big.gguf": big, "fits.gguf": fits}) as server:
        for name, where in [("http", server.url("big.gguf")), ("local", source), ("fits", server.url("fits.gguf"))]:
            try:
                result = await download(where, small / f"{name}.gguf")
                outcomes[name] = result.size
            except DownloadError as exc:
                outcomes[name] = str(exc)
    outcomes["files"] = sorted(path.name for path in small.iterdir())
    print(json.dumps(outcomes))

trio.run(main, __import__("pathlib").Path(sys.argv[1]))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
async def test_a_model_larger_than_the_free_space_fails_before_any_byte_is_written(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    tests = pathlib.Path(__file__).parent
    shell = f'mount -t tmpfs -o size=2m rbeed-test "$1" && exec "$2" -c "$3" "$1" "{tests}"'
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, "sh", str(small), sys.executable,
            _SMALL_DISK_SCRIPT]  # fmt: skip
    result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    outcomes = json.loads(result.stdout)
    for name in ("http", "local"):
        assert re.fullmatch(rf"not enough disk space in {small}: 3\.1 MB more needed, [0-9.]+ MB free", outcomes[name])
    assert outcomes["fits"] == 1 << 20
    assert outcomes["files"] == ["fits.gguf"]  # no partial files left of the two that did not fit
