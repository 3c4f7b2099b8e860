"""start_server.sh on a (pretend) Vast instance: certificate signing, and failure reports with
valid JSON when the worker cannot start. The autoscaler and Vast's signing service are loopback
servers of the test."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time

import aiohttp
import pytest
from aiohttp import web

from vespa.devtools.autoscaler import AutoscalerEmulator

from .conftest import REPO, free_port, wait_until, worker_env
from .fleet import autoscaler_key


def start_script(tmp_path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", "start_server.sh"], cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "start_server.log", "wb"), start_new_session=True,
        env=worker_env(**{"CONTAINER_ID": "42", "MASTER_TOKEN": "tok", "VESPA_BACKEND": "command",
                          "VESPA_SSL_CERT": str(tmp_path / "instance.crt"),
                          "VESPA_SSL_KEY": str(tmp_path / "instance.key"),
                          "VESPA_VENV": os.path.dirname(os.path.dirname(sys.executable)),
                          "VESPA_COMPILE": "0",  # the tests' own set-up compiled it, or not
                          **env}))


def stop_script(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


async def test_worker_that_cannot_start_is_reported_with_valid_json(tmp_path):
    emulator = AutoscalerEmulator(private_key=autoscaler_key())
    await emulator.start()
    proc = start_script(tmp_path, REPORT_ADDR=f"http://127.0.0.1:1,{emulator.url}",
                        USE_SSL="false", VESPA_MAX_WAIT_TIME="soon",
                        VESPA_BACKEND_COMMAND="true")
    try:
        await wait_until(lambda: emulator.reports, timeout=60)
        report = emulator.reports[0]
        assert report["id"] == 42 and report["mtoken"] == "tok"
        assert "exited with code 2" in report["error_msg"]
        assert emulator.validation_errors == []
    finally:
        stop_script(proc)
        await emulator.stop()


async def test_fronts_a_backend_you_run_when_only_its_url_is_given(tmp_path, backend):
    """VESPA_BACKEND_URL without VESPA_BACKEND: nothing is launched, the worker fronts that URL;
    VESPA_USE_SSL=false wins over TLS-on-Vast (no certificate is asked for: the signer here is
    unreachable, and asking would be a start-up failure)."""
    port = free_port()
    proc = start_script(tmp_path, VESPA_BACKEND="", VESPA_BACKEND_URL=str(backend.make_url("")),
                        REPORT_ADDR="http://127.0.0.1:1", VESPA_USE_SSL="false",
                        VESPA_CERT_SIGN_URL="http://127.0.0.1:1/sign_cert/",
                        WORKER_PORT=str(port), VESPA_UNSECURED="true")
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/echo") as r:
                        assert r.status == 200
                        assert (await r.json())["path"] == "/echo"
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline and proc.poll() is None, \
                        (tmp_path / "start_server.log").read_text()
                    await asyncio.sleep(0.2)
        log = (tmp_path / "start_server.log").read_text()
        assert "fronting the backend at" in log and "startup failed" not in log
    finally:
        stop_script(proc)


def make_ca(tmp_path) -> tuple[str, str]:
    ca_key, ca_crt = tmp_path / "ca.key", tmp_path / "ca.crt"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=test-vast-ca", "-keyout", str(ca_key), "-out", str(ca_crt)],
                   check=True, capture_output=True)
    return str(ca_key), str(ca_crt)


async def signing_service(tmp_path, ca_key: str, ca_crt: str, fail: bool):
    """A stand-in for Vast's certificate signer: signs the instance's CSR with a test CA."""
    seen = []

    async def sign(request: web.Request) -> web.Response:
        seen.append(request.query.get("instance_id"))
        if fail:
            return web.Response(status=500, text="signer is down")
        csr = tmp_path / "in.csr"
        csr.write_bytes(await request.read())
        out = tmp_path / "signed.crt"
        await asyncio.to_thread(subprocess.run, [
            "openssl", "x509", "-req", "-in", str(csr), "-CA", ca_crt, "-CAkey", ca_key,
            "-CAcreateserial", "-days", "1", "-out", str(out)], check=True, capture_output=True)
        return web.Response(body=out.read_bytes())

    app = web.Application()
    app.router.add_post("/sign_cert/", sign)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/sign_cert/", seen


async def test_certificate_is_signed_and_the_worker_serves_https(tmp_path, backend):
    ca_key, ca_crt = make_ca(tmp_path)
    runner, sign_url, seen = await signing_service(tmp_path, ca_key, ca_crt, fail=False)
    port = free_port()
    proc = start_script(tmp_path, REPORT_ADDR="http://127.0.0.1:1", USE_SSL="true",
                        VESPA_CERT_SIGN_URL=sign_url, WORKER_PORT=str(port),
                        VESPA_UNSECURED="true",
                        VESPA_BACKEND_COMMAND="sleep 600", VESPA_BACKEND_PORT=str(backend.port))
    trust = ssl.create_default_context(cafile=ca_crt)
    trust.check_hostname = False  # Vast's certificates name 0.0.0.0, not the address dialled
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with session.get(f"https://127.0.0.1:{port}/echo", ssl=trust) as r:
                        assert r.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline and proc.poll() is None, \
                        (tmp_path / "start_server.log").read_text()
                    await asyncio.sleep(0.2)
        assert seen == ["42"]
        assert oct(os.stat(tmp_path / "instance.key").st_mode & 0o777) == "0o600"
    finally:
        stop_script(proc)
        await runner.cleanup()


async def test_failed_signing_is_an_error_not_a_certificate(tmp_path):
    ca_key, ca_crt = make_ca(tmp_path)
    runner, sign_url, _ = await signing_service(tmp_path, ca_key, ca_crt, fail=True)
    emulator = AutoscalerEmulator(private_key=autoscaler_key())
    await emulator.start()
    proc = start_script(tmp_path, REPORT_ADDR=emulator.url, USE_SSL="true",
                        VESPA_CERT_SIGN_URL=sign_url, VESPA_BACKEND_COMMAND="true")
    try:
        await wait_until(lambda: emulator.reports, timeout=60)
        assert "TLS certificate signing failed" in emulator.reports[0]["error_msg"]
        assert not (tmp_path / "instance.crt").exists()
    finally:
        stop_script(proc)
        await runner.cleanup()
        await emulator.stop()


def git(cwd, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com",
                           *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def commit_version(checkout, version: str) -> str:
    """A commit in ``checkout`` that changes only the version the worker shows."""
    init = checkout / "vespa" / "__init__.py"
    init.write_text(re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"',
                           init.read_text()))
    git(checkout, "commit", "-qam", version)
    return git(checkout, "rev-parse", "HEAD")


async def version_served(session: aiohttp.ClientSession, port: int) -> str | None:
    try:
        async with session.get(f"http://127.0.0.1:{port}/_vespa/status") as r:
            return (await r.json())["version"]
    except aiohttp.ClientConnectionError:
        return None


async def test_an_update_request_moves_the_checkout_and_restarts_the_worker(tmp_path, backend):
    """POST /pyworker/update writes the flag; start_server.sh sees it, fetches the branch,
    drains the worker and runs again from the new code. A flag left from before a start is
    acted on first. The instance is a clone of a copy of this checkout: this one is untouched."""
    venv = os.path.dirname(os.path.dirname(sys.executable))
    stamp = hashlib.sha256((REPO / "pyproject.toml").read_bytes() + b"\n").hexdigest()[:16]
    if not os.path.exists(os.path.join(venv, f".installed-{stamp}")):
        pytest.skip("the worker env was installed from another pyproject.toml: worker_env.sh "
                    "would install the instance's copy into it")
    origin, instance = tmp_path / "origin", tmp_path / "instance"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True, check=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (REPO / name).is_file():
            (origin / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, origin / name)
    git(origin, "init", "-q", "-b", "main")
    git(origin, "add", "-A")
    git(origin, "commit", "-qm", "start")
    git(tmp_path, "clone", "-q", str(origin), str(instance))
    second = commit_version(origin, "0.0.0-second")
    flag = tmp_path / "force_update"
    flag.touch()  # asked for before this start
    port = free_port()
    proc = subprocess.Popen(
        ["bash", "start_server.sh"], cwd=instance, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "start_server.log", "wb"), start_new_session=True,
        env={**worker_env(CONTAINER_ID="42", MASTER_TOKEN="tok", VESPA_VENV=venv,
                          VESPA_COMPILE="0", VESPA_BACKEND_URL=str(backend.make_url("")),
                          REPORT_ADDR="http://127.0.0.1:1", VESPA_USE_SSL="false",
                          VESPA_UNSECURED="true", WORKER_PORT=str(port),
                          VESPA_UPDATE_FLAG=str(flag), VESPA_DRAIN_TIMEOUT="5"),
             "PYTHONPATH": str(instance)})
    log = lambda: (tmp_path / "start_server.log").read_text()  # noqa: E731
    try:
        async with aiohttp.ClientSession() as session:
            async def serving(version: str) -> None:
                deadline = time.monotonic() + 90
                while await version_served(session, port) != version:
                    assert time.monotonic() < deadline and proc.poll() is None, log()
                    await asyncio.sleep(0.3)

            await serving("0.0.0-second")
            assert git(instance, "rev-parse", "HEAD") == second and not flag.exists()
            third = commit_version(origin, "0.0.0-third")
            async with session.post(f"http://127.0.0.1:{port}/pyworker/update",
                                    headers={"Authorization": "Bearer tok"}) as r:
                assert r.status == 200
            await serving("0.0.0-third")
            assert git(instance, "rev-parse", "HEAD") == third
            assert git(instance, "symbolic-ref", "--short", "HEAD") == "main"
            assert log().count("update: fetching main from origin") == 2
            assert "update: draining the worker (SIGTERM)" in log()
            assert "startup failed" not in log()
    finally:
        stop_script(proc)
