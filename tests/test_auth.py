"""The API key: wanted from TCP clients when set, never from the Unix socket; rbee and hives send it."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import trio

from support import ROOT, end_marker, job_result, logged, run_job, running_daemon

KEY = "s3cret-key_1"
HIVE_LIST = b'{"operation": "hive_list"}'


@pytest.fixture(scope="module")
def keyed():
    with running_daemon(env={"RBEED_API_KEY": KEY}) as daemon:
        yield daemon


async def test_tcp_requests_need_the_key_and_get_a_clear_401(keyed):
    async with keyed.client(unix=False) as client:
        missing = await client.request("POST", "/v1/jobs", body=HIVE_LIST)
        wrong = await client.request("POST", "/v1/jobs", body=HIVE_LIST, headers={"authorization": "Bearer nope"})
        listed = await client.request("GET", "/v1/jobs")  # every job path, not only creation
        models = await client.request("GET", "/v1/models")  # and the OpenAI-compatible routes,
        keyed_models = await client.request("GET", "/v1/models", headers={"authorization": f"Bearer {KEY}"})
        tags = await client.request("GET", "/api/tags")  # and Ollama's
        keyed_tags = await client.request("GET", "/api/tags", headers={"authorization": f"Bearer {KEY}"})
        metrics = await client.request("GET", "/metrics")  # and Prometheus's scrape, which sends it as configured
        keyed_metrics = await client.request("GET", "/metrics", headers={"authorization": f"Bearer {KEY}"})
        upload = await client.request("POST", f"/api/blobs/sha256:{'0' * 64}", body=b"GGUF" * 1000)  # read by its route
        health = await client.request("GET", "/health")  # probed by hives and load balancers
        root = await client.request("HEAD", "/")  # and by Ollama's clients
    assert (missing.status, missing.json()) == (401, {"error": "an API key is required over TCP: send it as "
                                                               "'Authorization: Bearer KEY'"})  # fmt: skip
    assert missing.headers["www-authenticate"] == 'Bearer realm="rbeed"'
    assert (wrong.status, wrong.json()["error"]) == (401, "wrong API key: send it as 'Authorization: Bearer KEY'")
    assert listed.status == 401 and health.status == 200 and root.status == 200
    assert (models.status, keyed_models.status) == (401, 200)  # whose clients send the key as OpenAI's
    assert models.json()["error"] == {"message": "an API key is required over TCP: send it as 'Authorization: Bearer KEY'",
                                      "type": "invalid_request_error", "param": None, "code": None}  # in OpenAI's shape
    assert (tags.status, keyed_tags.status) == (401, 200)
    assert (metrics.status, keyed_metrics.status) == (401, 200)
    assert upload.status == 401 and not (keyed.state_dir / "blobs").exists()


async def test_with_the_key_over_tcp_and_without_it_over_the_unix_socket_jobs_run(keyed):
    for unix, headers in ((False, {"authorization": f"Bearer {KEY}"}), (False, {"authorization": f"bearer {KEY}"}),
                          (True, {})):  # fmt: skip
        async with keyed.client(unix=unix, headers=headers) as client:
            events = await run_job(client, {"operation": "hive_list"})
            assert end_marker(events) == "[DONE]"
            assert [hive["id"] for hive in json.loads(events[-2].data)] == ["localhost"]


def rbee_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RBEE_")}
    return env | {"PYTHONPATH": str(ROOT)} | extra


async def rbee(*args: str, env: dict[str, str]):
    with trio.fail_after(30):
        return await trio.run_process([sys.executable, "-m", "rbeed.cli", *args], capture_stdout=True,
                                      capture_stderr=True, check=False, env=env, cwd=ROOT)  # fmt: skip


async def test_rbee_sends_its_key_over_tcp(keyed):
    refused = await rbee("--url", keyed.url, "hive", "list", env=rbee_env())
    assert refused.returncode == 2
    assert refused.stderr.decode().strip() == ("rbee: error: an API key is required over TCP: send it as "
                                               "'Authorization: Bearer KEY' (rbee sends $RBEE_API_KEY)")
    listed = await rbee("--url", keyed.url, "hive", "list", env=rbee_env(RBEE_API_KEY=KEY))
    assert listed.returncode == 0 and listed.stdout.decode().startswith("ID "), listed


async def test_the_credential_is_read_again_on_sighup(tmp_path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "api-key").write_text("first\n")
    with running_daemon(env={"CREDENTIALS_DIRECTORY": str(credentials)}) as daemon:

        async def status(key: str) -> int:
            async with daemon.client(unix=False, headers={"authorization": f"Bearer {key}"}) as client:
                return (await client.request("GET", "/v1/jobs")).status

        assert (await status("first"), await status("second")) == (200, 401)
        (credentials / "api-key").write_text("second\n")
        os.kill(daemon.proc.pid, signal.SIGHUP)
        await logged(daemon, r"reloaded .*: .*api key")
        assert (await status("first"), await status("second")) == (401, 200)


async def test_the_key_stays_out_of_workers(tiny_model):
    with running_daemon(env={"RBEED_API_KEY": KEY, "HF_TOKEN": "hf_x"}) as daemon:
        async with daemon.client() as client:
            await job_result(client, {"operation": "model_download", "model": str(tiny_model)})
            worker = await job_result(client, {"operation": "worker_spawn", "model": "tiny", "threads": 1})
            environ = Path(f"/proc/{worker['pid']}/environ").read_bytes().split(b"\0")
            await job_result(client, {"operation": "worker_delete", "id": worker["id"]})
    assert any(v.startswith(b"PATH=") for v in environ)  # it was read
    assert not [v for v in environ if v.startswith((b"RBEED_API_KEY=", b"HF_TOKEN="))]


async def test_a_hive_with_a_key_gets_it_from_the_daemon_that_forwards(keyed):
    with running_daemon() as queen:
        async with queen.client() as client:
            hive = {"operation": "hive_create", "id": "keyed", "host": "127.0.0.1", "port": keyed.port, "api_key": KEY}
            created = await job_result(client, hive)
            assert (created["online"], created["api_key"]) == (True, True)  # said to be set, never shown
            assert KEY not in json.dumps(await job_result(client, {"operation": "hive_list"}))
            assert KEY not in queen.log()

            forwarded = await run_job(client, {"operation": "model_list", "hive_id": "keyed"})
            assert end_marker(forwarded) == "[DONE]" and json.loads(forwarded[-2].data) == [], forwarded

            await job_result(client, {"operation": "hive_update", "id": "keyed", "api_key": ""})  # removed
            events = await run_job(client, {"operation": "model_list", "hive_id": "keyed"})
            assert end_marker(events) == ("[ERROR] hive keyed refused the job: an API key is required over TCP: "
                                          "send it as 'Authorization: Bearer KEY'")  # fmt: skip
            body = json.dumps({"operation": "hive_update", "id": "keyed", "api_key": "two words"}).encode()
            refused = await client.request("POST", "/v1/jobs", body=body)
    assert refused.status == 400 and refused.json()["error"].endswith("- at `$.api_key`"), refused.json()


async def test_rbee_registers_a_hive_with_its_key_from_a_file(keyed, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    with running_daemon() as queen:
        env = rbee_env(RBEE_URL=f"unix:{queen.socket_path}")
        created = await rbee("hive", "create", "127.0.0.1", "--id", "k", "--port", str(keyed.port),
                             "--api-key-file", str(key_file), env=env)  # fmt: skip
        assert created.returncode == 0 and "api_key:  yes" in created.stdout.decode(), created
        listed = await rbee("model", "list", "--hive", "k", env=env)
        assert listed.returncode == 0, listed


async def test_an_unreadable_key_credential_stops_the_daemon_at_start(tmp_path):
    (tmp_path / "credentials" / "api-key").mkdir(parents=True)  # there, but not a readable file
    env = {k: v for k, v in os.environ.items() if k != "RBEED_API_KEY"}
    env["CREDENTIALS_DIRECTORY"] = str(tmp_path / "credentials")
    command = [sys.executable, "-m", "rbeed", "serve", "--no-tcp", "--socket", str(tmp_path / "s.sock"),
               "--state-dir", str(tmp_path / "state"), "--runtime-dir", str(tmp_path / "run")]  # fmt: skip
    with trio.fail_after(30):
        done = await trio.run_process(command, capture_stderr=True, check=False, env=env, cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr.decode().rstrip().endswith("cannot read the credential api-key: Is a directory")
    assert not (tmp_path / "s.sock").exists()  # nothing left listening
