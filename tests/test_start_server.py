"""start_server.sh on a (pretend) Vast instance: certificate signing, and failure reports with
valid JSON when the worker cannot start. The autoscaler and Vast's signing service are loopback
servers of the test.

And the local stack (no CONTAINER_ID) as a supervisor: killed by pid it stops everything it
started (no process left, no port bound) with the worker's exit code; a taken port is one line
and exit 2 before anything starts; a worker that exits by itself takes the emulator along; the
ready banner. Its backend is tests/procs/backend_proc.py (a command backend), never vLLM."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import signal
import ssl
import socket
import subprocess
import sys
import time
import uuid

import aiohttp
import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from vespa.devtools.autoscaler import AutoscalerEmulator

from .conftest import PYTHON, REPO, free_port, wait_until, worker_env
from .fleet import autoscaler_key
from .openai_backend import MODEL, make_openai_backend

VENV = os.path.dirname(os.path.dirname(sys.executable))  # worker_env.sh installs nothing new here


def terminal_signals() -> None:
    """In the child before exec: SIGHUP and SIGINT at their default actions, as a terminal
    starts a script (a test run under nohup, or as a shell's background job, passes them on
    ignored, and bash cannot trap a signal ignored when it starts)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_script(tmp_path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", "start_server.sh"], cwd=REPO, stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "start_server.log", "wb"), start_new_session=True,
        preexec_fn=terminal_signals,
        env=worker_env(**{"CONTAINER_ID": "42", "MASTER_TOKEN": "tok", "VESPA_BACKEND": "command",
                          "VESPA_SSL_CERT": str(tmp_path / "instance.crt"),
                          "VESPA_SSL_KEY": str(tmp_path / "instance.key"),
                          "VESPA_VENV": VENV,
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
                        VESPA_UNSECURED="true", VESPA_BACKEND_PORT=str(free_port()),
                        VESPA_BACKEND_COMMAND=f"{PYTHON} tests/procs/backend_proc.py "
                                              "--port {port}")
    trust = ssl.create_default_context(cafile=ca_crt)
    trust.check_hostname = False  # Vast's certificates name 0.0.0.0, not the address dialled
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with session.get(f"https://127.0.0.1:{port}/echo", ssl=trust) as r:
                        if r.status != 502:  # 502: the backend is still starting
                            assert r.status == 200
                            break
                except aiohttp.ClientConnectionError:
                    pass
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
        preexec_fn=terminal_signals,
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
# -- the local stack -----------------------------------------------------------------------------

MARK = "START_SERVER_TEST_MARK"  # in the environment of everything a test's script starts
PORTS = ("VESPA_AUTOSCALER_PORT", "VESPA_WORKER_PORT", "VESPA_WORKER_HTTP_PORT",
         "VESPA_BACKEND_PORT")


class LocalStack:
    """``bash start_server.sh`` off Vast, every port its own, its terminal output in a file."""

    def __init__(self, tmp_path, **env: str):
        self.ports: dict[str, int] = {}
        while len(set(self.ports.values())) < len(PORTS):
            self.ports = {name: free_port() for name in PORTS}
        self.mark = uuid.uuid4().hex
        self.log_path = tmp_path / "terminal.log"
        self.cache = tmp_path / "cache"
        settings = {
            "VESPA_BACKEND": "command", "VESPA_MAX_THROUGHPUT": "100",
            "VESPA_BACKEND_COMMAND": f"{PYTHON} tests/procs/backend_proc.py --port {{port}} "
                                     f"--access-log --child-pidfile {tmp_path / 'pids'}",
            "VESPA_HEALTHCHECK_INTERVAL": "0.2", "VESPA_CACHE_DIR": str(self.cache),
            "VESPA_VENV": VENV, "VESPA_COMPILE": "0", MARK: self.mark,
            **{name: str(port) for name, port in self.ports.items()}, **env}
        environment = worker_env(**settings)
        for name in ("CONTAINER_ID", "REPORT_ADDR", "MASTER_TOKEN"):
            environment.pop(name, None)
        with open(self.log_path, "wb") as terminal:
            self.proc = subprocess.Popen(["bash", "start_server.sh"], cwd=REPO,
                                         stdout=terminal, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=environment,
                                         preexec_fn=terminal_signals)

    @property
    def terminal(self) -> str:
        return self.log_path.read_text()

    def left_running(self) -> list[psutil.Process]:
        """Processes the script started (directly or not) that still run."""
        found = []
        for process in psutil.process_iter():
            try:
                if process.environ().get(MARK) == self.mark \
                        and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found

    def bound_ports(self) -> list[str]:
        taken = []
        for name, port in self.ports.items():
            with socket.socket() as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("0.0.0.0", port))
                except OSError:
                    taken.append(f"{name}={port}")
        return taken

    async def exit_code(self, timeout: float) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)

    async def wait_ready(self, timeout: float = 60) -> None:
        """Until the worker answers readyz 200 and the script said READY."""
        url = f"http://127.0.0.1:{self.ports['VESPA_WORKER_PORT']}/_vespa/readyz"
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    async with session.get(url) as answer:
                        if answer.status == 200 and "READY after" in self.terminal:
                            return
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline and self.proc.poll() is None, self.terminal
                await asyncio.sleep(0.2)

    def cleanup(self) -> None:
        """Whatever a failed test left: SIGKILL, by pid (the backend has a session of its own)."""
        if self.proc.poll() is None:
            self.proc.kill()
        for process in self.left_running():
            process.kill()
        self.proc.wait(10)


@pytest.mark.parametrize("sig, group", [(signal.SIGTERM, False), (signal.SIGHUP, False),
                                        (signal.SIGINT, True), (signal.SIGHUP, True)],
                         ids=["SIGTERM to its pid", "SIGHUP to its pid", "Ctrl-C",
                              "terminal closed"])
async def test_killed_by_pid_the_stack_stops_whole_and_the_ready_banner_says_how_to_call_it(
        tmp_path, sig, group):
    """What systemd, supervisord or a shell's ``kill <pid>`` does: one signal to the script
    alone (and a terminal's Ctrl-C or hang-up: SIGINT or SIGHUP to its whole process group,
    the worker included, which must drain all the same, not die of the SIGHUP). The worker drains
    (exit 0, the script's code), its backend and the backend's child go with it, then the
    emulator: no process and no port is left. Before that: the how-to-call block is printed
    again once the worker is ready, and the backend's access log of the worker's own health
    checks stays in its log file, out of the terminal."""
    stack = LocalStack(tmp_path)
    try:
        await stack.wait_ready()
        started = stack.left_running()
        # the emulator, the worker, the backend and its child (and the ready watcher, ending)
        assert len(started) >= 4, [p.cmdline() for p in started]
        command_log = stack.cache / "logs" / "command.log"
        # a few of the worker's health checks (every 0.2 s) in the backend's log
        await wait_until(lambda: command_log.exists()
                         and command_log.read_text().count('"GET /health') >= 3, timeout=10)
        if group:
            os.killpg(stack.proc.pid, sig)
        else:
            os.kill(stack.proc.pid, sig)
        assert await stack.exit_code(40) == 0
        terminal = stack.terminal
        assert stack.left_running() == []
        assert stack.bound_ports() == []
        assert f"SIG{sig.name[3:]}: stopping" in terminal and "draining" in terminal
        assert "unbound variable" not in terminal

        lines = terminal.splitlines()
        ready = next(i for i, line in enumerate(lines) if "[start_server] READY after" in line)
        worker_ready = next(i for i, line in enumerate(lines)
                            if "vespa.lifecycle: ready after" in line)
        assert worker_ready < ready
        emulator = f"http://127.0.0.1:{stack.ports['VESPA_AUTOSCALER_PORT']}"
        client = f"client.py --autoscaler-url {emulator} --endpoint vespa-dev --api-key dev-key"
        assert client in lines[ready + 2]  # the block again, right under the ready line
        assert sum(client in line for line in lines) == 2  # at start, and once ready
        assert f"kill {stack.proc.pid}" in "\n".join(lines[ready:])
        assert '"GET /health' not in terminal
        assert '"GET /health' in (stack.cache / "logs" / "command.log").read_text()
    finally:
        stack.cleanup()


@pytest.mark.parametrize("setting", PORTS)
async def test_a_taken_port_is_one_line_and_exit_2_before_anything_starts(tmp_path, setting):
    stack = None
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        stack = LocalStack(tmp_path, **{setting: str(port)})
        assert await stack.exit_code(30) == 2
        assert stack.terminal.splitlines() == [
            f"[start_server] port {port} is taken (something already listens there, an earlier "
            f"start_server.sh?): stop it, or set {setting} to a free port"]
        assert stack.left_running() == []
    finally:
        holder.close()
        if stack is not None:
            stack.cleanup()


async def test_the_worker_exiting_by_itself_stops_the_emulator_with_the_workers_code(tmp_path):
    """A bad setting: the worker exits 2 at start; the emulator it was started against stops
    too, and the script exits 2 (not 1, and no "unbound variable" from its EXIT trap)."""
    stack = LocalStack(tmp_path, VESPA_MAX_WAIT_TIME="soon")
    try:
        assert await stack.exit_code(60) == 2
        terminal = stack.terminal
        assert "vespa: invalid VESPA_MAX_WAIT_TIME='soon'" in terminal
        assert "unbound variable" not in terminal
        assert "autoscaler emulator on" in terminal  # it was up before the worker started
        assert stack.left_running() == []
        assert stack.bound_ports() == []
    finally:
        stack.cleanup()


@pytest.mark.parametrize("setting", ["VESPA_WORKER_PORT", "VESPA_BACKEND_PORT"])
async def test_the_worker_itself_checks_its_ports_before_launching_the_backend(tmp_path, setting):
    """Taken after the script looked (or no script at all): one line, exit 2, and no backend
    launched (not a traceback once vLLM is up, nor health checks of whatever holds its port)."""
    pidfile = tmp_path / "pids"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        ports = {"VESPA_WORKER_PORT": str(free_port()), "VESPA_BACKEND_PORT": str(free_port()),
                 setting: str(holder.getsockname()[1])}
        command = f"{PYTHON} tests/procs/backend_proc.py --port {{port}} --child-pidfile {pidfile}"
        done = await asyncio.to_thread(
            subprocess.run, [PYTHON, "-m", "vespa"], cwd=REPO, capture_output=True, timeout=30,
            env=worker_env(**ports, VESPA_BACKEND_COMMAND=command))
    assert done.returncode == 2
    assert done.stderr.decode().splitlines() == [
        f"vespa: invalid {setting}='{ports[setting]}': expected a port this worker can listen on: "
        f"{ports[setting]} is taken (something already listens there); stop that, or set "
        f"{setting} to another port"]
    assert not pidfile.exists()


async def test_a_backend_url_without_a_benchmark_says_what_to_set(tmp_path, backend):
    """VESPA_BACKEND_URL off Vast: signed mode needs a throughput; a backend without
    /v1/models is not benchmarked blind: one line says what to set, exit 2."""
    stack = LocalStack(tmp_path, VESPA_BACKEND="", VESPA_BACKEND_COMMAND="",
                       VESPA_MAX_THROUGHPUT="", VESPA_BACKEND_URL=str(backend.make_url("")))
    try:
        assert await stack.exit_code(30) == 2
        [line] = stack.terminal.splitlines()
        assert "set VESPA_BENCHMARK=module:function" in line and "VESPA_MAX_THROUGHPUT=" in line
        assert stack.left_running() == []
    finally:
        stack.cleanup()


async def test_an_openai_backend_url_gets_the_openai_benchmark_and_a_call_that_names_its_model(
        tmp_path):
    app, _ = make_openai_backend()
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    stack = LocalStack(tmp_path, VESPA_BACKEND="", VESPA_BACKEND_COMMAND="",
                       VESPA_MAX_THROUGHPUT="", VESPA_BACKEND_URL=str(server.make_url("")))
    try:
        await stack.wait_ready()
        terminal = stack.terminal
        assert "VESPA_BENCHMARK=benchmarks.openai_chat:benchmark" in terminal
        assert "benchmark cache hit" not in terminal and "benchmark: " in terminal
        ready = terminal.index("READY after")
        assert f'-d \'{{"model": "{MODEL}", "messages"' in terminal[ready:]
        os.kill(stack.proc.pid, signal.SIGINT)
        assert await stack.exit_code(40) == 0
        assert stack.left_running() == []
    finally:
        stack.cleanup()
        await server.close()
