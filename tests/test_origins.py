"""Web pages as clients, on the real daemon: the origins allowed to call it (CORS), and the Host
check against DNS rebinding on its loopback listener."""

from __future__ import annotations

import os
import signal
import socket

import pytest
import trio

from rbeed.origins import _local_host
from support import logged, running_daemon

CONFIG = '[server]\norigins = ["https://*.example.org"]\n'
# What a page's fetch() sends as a "simple" request: no preflight comes before it.
PULL = {"body": b'{"model": "http://127.0.0.1:9/x.gguf"}', "headers": {"content-type": "text/plain"}}


@pytest.fixture(scope="module")
def rbeed(tmp_path_factory):
    with running_daemon(CONFIG) as daemon:
        yield daemon


async def test_a_page_of_another_origin_is_refused_before_anything_runs(rbeed):
    async with rbeed.client(unix=False) as client:
        refused = await client.request("POST", "/api/pull", **PULL | {"headers": PULL["headers"] | {"origin": "https://evil.example"}})
        openai = await client.request("POST", "/v1/completions", headers={"origin": "null"}, body=b"{}")
        jobs = (await client.request("GET", "/v1/jobs")).json()
    assert (refused.status, refused.json()) == (
        403, {"error": "origin 'https://evil.example' may not call this daemon; add it to [server] origins"})  # fmt: skip
    assert "access-control-allow-origin" not in refused.headers
    assert openai.status == 403 and openai.json()["error"]["message"].startswith("origin 'null' may not")
    assert [job["operation"] for job in jobs] == []  # the pull never began: any web page could have had it fetch


@pytest.mark.parametrize("origin", ["http://localhost:3000", "https://127.0.0.1", "http://[::1]:8080",
                                    "tauri://localhost", "https://chat.example.org"])  # fmt: skip
async def test_an_allowed_origin_gets_its_preflight_and_can_read_the_answer(rbeed, origin):
    async with rbeed.client(unix=False) as client:
        preflight = await client.request("OPTIONS", "/api/chat", headers={
            "origin": origin, "access-control-request-method": "POST",
            "access-control-request-headers": "content-type,authorization"})  # fmt: skip
        tags = await client.request("GET", "/api/tags", headers={"origin": origin})
        plain = await client.request("GET", "/api/tags")
    assert (preflight.status, preflight.content) == (204, b"")
    assert "content-length" not in preflight.headers
    assert preflight.headers["access-control-allow-origin"] == origin
    assert preflight.headers["access-control-allow-methods"] == "GET, POST, PUT, DELETE, HEAD, OPTIONS"
    assert preflight.headers["access-control-allow-headers"] == "content-type,authorization"
    assert (tags.status, tags.headers["access-control-allow-origin"], tags.headers["vary"]) == (200, origin, "Origin")
    assert plain.status == 200 and "access-control-allow-origin" not in plain.headers  # not a page: no CORS


async def test_an_allowed_page_can_read_the_servers_own_errors(rbeed):
    # A 413 the server gives before any route: without the header the page saw only "CORS error".
    async with rbeed.client(unix=False) as client:
        too_big = await client.request("POST", "/v1/chat/completions", body=b"{" + b" " * (1 << 20) + b"}",
                                       headers={"origin": "http://localhost:3000"})  # fmt: skip
    assert (too_big.status, too_big.headers["access-control-allow-origin"]) == (413, "http://localhost:3000")
    assert too_big.json()["error"]["message"] == "request body over 1048576 bytes"


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8500", "localhost.evil.example", "[::1].evil", "a.b:"])
async def test_a_rebound_name_is_refused_on_the_loopback_listener_but_not_over_the_socket(rbeed, host):
    async with rbeed.client(unix=False, headers={"host": host}) as client:
        rebound = await client.request("GET", "/api/tags")
    assert rebound.status == 403 and "(DNS rebinding)" in rebound.json()["error"], rebound.json()
    async with rbeed.client(headers={"host": host}) as client:  # the Unix socket: no browser reaches it
        assert (await client.request("GET", "/api/tags")).status == 200


@pytest.mark.parametrize("host", ["localhost", "localhost.", "localhost.:8500", "localhost:8500", "127.0.0.1:8500", "[::1]:8500", "[::1]", "10.1.2.3",
                                  "box.local", "app.localhost", "svc.internal", "nas", socket.gethostname(), socket.getfqdn()])  # fmt: skip
def test_names_of_this_machine_are_local_hosts(host):
    assert _local_host(host)


async def test_origins_read_again_on_sighup_apply_at_once(rbeed):
    config = rbeed.state_dir.parent / "rbeed.toml"
    assert config.read_text() == CONFIG
    async with rbeed.client(unix=False) as client:
        assert (await client.request("GET", "/api/tags", headers={"origin": "https://new.example"})).status == 403
        config.write_text('[server]\norigins = ["https://*.example.org", "https://new.example"]\n')
        try:
            os.kill(rbeed.proc.pid, signal.SIGHUP)
            await logged(rbeed, r"reloaded .*: server\.origins$")
            assert (await client.request("GET", "/api/tags", headers={"origin": "https://new.example"})).status == 200
        finally:
            config.write_text(CONFIG)
            os.kill(rbeed.proc.pid, signal.SIGHUP)
            with trio.fail_after(10):
                while (await client.request("GET", "/api/tags", headers={"origin": "https://new.example"})).status != 403:
                    await trio.sleep(0.02)
