"""The supervised backend: launched, logged, its death reported, restarted, stopped with no orphans."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import aiohttp
import psutil

from .conftest import PYTHON, REPO, free_port, wait_until, worker_env
from .fleet import fleet, ready  # noqa: F401  (fixture)

BACKEND = f"{PYTHON} tests/procs/backend_proc.py --port {{port}}"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_pids(path) -> tuple[int, int]:
    backend_pid, child_pid = open(path).read().split()
    return int(backend_pid), int(child_pid)


async def get_status(session: aiohttp.ClientSession, url: str) -> tuple[int | None, dict]:
    try:
        async with session.get(url) as response:
            return response.status, await response.json()
    except aiohttp.ClientError:
        return None, {}


async def test_worker_launches_backend_logs_it_and_sigterm_leaves_no_orphans(tmp_path):
    port = free_port()
    pidfile, log = tmp_path / "pids", tmp_path / "backend.log"
    proc = subprocess.Popen(
        [PYTHON, "-m", "vespa"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=worker_env(VESPA_WORKER_PORT=str(port), VESPA_BACKEND_PORT=str(free_port()),
                       VESPA_BACKEND_COMMAND=f"{BACKEND} --child-pidfile {pidfile}",
                       VESPA_BACKEND_LOG=str(log), VESPA_HEALTHCHECK_INTERVAL="0.2"))
    try:
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 20
            while (await get_status(session, f"http://127.0.0.1:{port}/_vespa/readyz"))[0] != 200:
                assert time.monotonic() < deadline and proc.poll() is None
                await asyncio.sleep(0.1)
            backend_pid, child_pid = read_pids(pidfile)
            async with session.post(f"http://127.0.0.1:{port}/echo", data=b"hi") as response:
                assert (await response.json()) == {"pid": backend_pid, "body": "hi"}
        assert "backend ready on" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0
        await wait_until(lambda: not alive(backend_pid) and not alive(child_pid), timeout=5)
    finally:
        proc.kill()


async def test_killed_worker_takes_its_backend_along(tmp_path):
    pidfile = tmp_path / "pids"
    proc = subprocess.Popen(
        [PYTHON, "-m", "vespa"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=worker_env(VESPA_WORKER_PORT=str(free_port()), VESPA_BACKEND_PORT=str(free_port()),
                       VESPA_BACKEND_COMMAND=f"{BACKEND} --child-pidfile {pidfile}",
                       VESPA_BACKEND_LOG=str(tmp_path / "log")))
    try:
        await wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=20)
        backend_pid, _ = read_pids(pidfile)
        assert alive(backend_pid)
        proc.kill()  # SIGKILL: the worker gets no chance to clean up
        proc.wait(10)
        await wait_until(lambda: not alive(backend_pid), timeout=5)
    finally:
        proc.kill()
        if pidfile.exists():  # the grandchild is the backend's own business; don't leak it here
            _, child_pid = read_pids(pidfile)
            if alive(child_pid):
                os.kill(child_pid, signal.SIGKILL)


async def test_backend_crash_is_reported_to_the_autoscaler(fleet, tmp_path):
    f = await fleet("full", VESPA_BACKEND_PORT=str(free_port()),
                    VESPA_BACKEND_COMMAND=f"{BACKEND} --crash-after 0.3",
                    VESPA_BACKEND_LOG=str(tmp_path / "log"), VESPA_REPORT_MAX_INTERVAL="0.2")
    await wait_until(lambda: any(r["error_msg"] for r in f.emulator.reports), timeout=20)
    error = next(r["error_msg"] for r in f.emulator.reports if r["error_msg"])
    assert "exited with code 3" in error
    assert "something terrible happened" in error
    status, body = await get_status(f.session, f"{f.url}/_vespa/readyz")
    assert status == 503 and "exited with code 3" in body["error"]


async def test_backend_restarts_and_the_worker_recovers(fleet, tmp_path):
    f = await fleet("full", VESPA_BACKEND_PORT=str(free_port()), VESPA_BACKEND_RESTARTS="1",
                    VESPA_BACKEND_COMMAND=f"{BACKEND} --crash-once {tmp_path / 'crashed'} "
                                          "--crash-after 0.1",
                    VESPA_BACKEND_LOG=str(tmp_path / "log"), VESPA_HEALTHCHECK_FAILURES="1")
    await wait_until(lambda: (tmp_path / "crashed").exists(), timeout=20)
    await wait_until(lambda: f.worker.supervisor.restarts == 1, timeout=20)
    await wait_until(lambda: (tmp_path / "log").read_text().count("backend ready on") == 2,
                     timeout=20)
    await wait_until(lambda: f.worker.state.ready, timeout=20)
    auth_data = f.emulator.signer.auth_data(f.url, cost=3)
    response = await f.post("/echo", auth_data, {"after": "restart"})
    assert response.status == 200
    assert json.loads((await response.json())["body"]) == {"after": "restart"}
    assert (tmp_path / "log").read_text().count("backend starting") == 2


async def test_missing_backend_venv_is_a_clear_error(fleet, tmp_path):
    f = await fleet("full", VESPA_BACKEND="tts", VESPA_TTS_VENV=str(tmp_path / "nope"),
                    VESPA_REPORT_MAX_INTERVAL="0.2")
    await wait_until(lambda: any(r["error_msg"] for r in f.emulator.reports), timeout=10)
    error = next(r["error_msg"] for r in f.emulator.reports if r["error_msg"])
    assert "run backends/setup_tts.sh" in error


def test_the_backends_log_of_the_workers_own_polls_is_recognised():
    """vLLM (uvicorn) logs every GET of /health and /metrics the worker makes, every few seconds:
    those lines go to the backend's log file only (the kill test in test_start_server checks the
    terminal); everything else still reaches the worker's log."""
    from vespa.backend.supervisor import polls_pattern

    quiet = polls_pattern(["/health", "/metrics"])
    polls = ['(APIServer pid=1) INFO:     127.0.0.1:51234 - "GET /metrics HTTP/1.1" 200 OK',
             'INFO:     127.0.0.1:51234 - "GET /health HTTP/1.1" 200 OK',
             '127.0.0.1 [06/Dec/2026:21:30:05 +0000] "GET /health?probe=1 HTTP/1.1" 200 2 "-"']
    others = ['INFO:     127.0.0.1:51234 - "POST /v1/chat/completions HTTP/1.1" 200 OK',
              'INFO:     127.0.0.1:51234 - "GET /healthz HTTP/1.1" 404 Not Found',
              'INFO:     127.0.0.1:51234 - "GET /v1/models HTTP/1.1" 200 OK',
              "INFO 12-06 21:30:05 [loggers.py:123] Avg prompt throughput: 0.0 tokens/s"]
    assert [bool(quiet.search(line)) for line in polls] == [True] * len(polls)
    assert [bool(quiet.search(line)) for line in others] == [False] * len(others)


# -- how the backend is stopped (Supervisor.stop, in-process) ----------------------------------

def sigwait_backend(tmp_path, *flags: str, stop_group: bool = True, grace: float = 10.0):
    """A Supervisor of backend_proc with a child that records who sends it SIGTERM."""
    from vespa.backend.supervisor import ProcessSpec, Supervisor

    witness = tmp_path / "sigterm-from"
    argv = [PYTHON, "tests/procs/backend_proc.py", "--port", str(free_port()),
            "--sigwait-child", str(witness), *flags]
    spec = ProcessSpec("fake", argv, cwd=str(REPO), stop_group=stop_group, stop_grace=grace)
    return Supervisor(spec, str(tmp_path / "backend.log")), witness


async def started(supervisor, witness) -> tuple[asyncio.Task, int]:
    """The supervisor's run task once the backend and its waiting child are up; the child's pid."""
    task = asyncio.ensure_future(supervisor.run())
    ready = witness.with_name(witness.name + ".ready")
    await wait_until(lambda: ready.exists() and ready.read_text().strip(), timeout=20)
    return task, int(ready.read_text())


async def test_a_backend_that_stops_its_children_gets_sigterm_alone(tmp_path, caplog):
    """vLLM's way: SIGTERM to the API server only; it stops its engine processes itself."""
    supervisor, witness = sigwait_backend(tmp_path, "--stop-child-on-sigterm", stop_group=False)
    task, child = await started(supervisor, witness)
    backend = supervisor.process.pid
    await supervisor.stop()
    await asyncio.wait_for(task, 10)
    assert supervisor.process.returncode == 0
    assert int(witness.read_text()) == backend  # the child heard from its parent, not from us
    assert not alive(child) and not alive(backend)
    log = (tmp_path / "backend.log").read_text()
    assert "backend: stopping its child" in log and "backend: stopped" in log
    assert "killing" not in caplog.text


async def test_by_default_the_whole_group_gets_sigterm(tmp_path):
    supervisor, witness = sigwait_backend(tmp_path)
    task, child = await started(supervisor, witness)
    await supervisor.stop()
    await asyncio.wait_for(task, 10)
    assert int(witness.read_text()) == os.getpid()  # the supervisor signalled the child itself
    assert not alive(child)


async def test_a_backend_that_ignores_sigterm_is_killed_after_its_grace(tmp_path, caplog):
    supervisor, witness = sigwait_backend(tmp_path, "--ignore-sigterm", stop_group=False, grace=0.5)
    task, child = await started(supervisor, witness)
    began = time.monotonic()
    await supervisor.stop()
    took = time.monotonic() - began
    await asyncio.wait_for(task, 10)
    assert 0.5 <= took < 5, took
    assert supervisor.process.returncode == -signal.SIGKILL
    assert "fake did not stop in 0s: killing it" in caplog.text
    assert "backend ignores SIGTERM" in (tmp_path / "backend.log").read_text()
    assert not witness.exists()  # its child got no SIGTERM: SIGKILL, with the whole group
    await wait_until(lambda: not alive(child), timeout=5)


async def test_what_outlives_the_backend_is_killed_after_a_moment(tmp_path, caplog):
    """The backend exits on SIGTERM but leaves its child (which ignores a SIGTERM it never got):
    a short wait for it to end by itself, then SIGKILL, named in the log."""
    supervisor, witness = sigwait_backend(tmp_path, stop_group=False)
    supervisor.leftover_grace = 0.3
    task, child = await started(supervisor, witness)
    await supervisor.stop()
    await asyncio.wait_for(task, 10)
    assert supervisor.process.returncode == -signal.SIGTERM
    await wait_until(lambda: not alive(child), timeout=5)
    assert not witness.exists()
    assert f"1 process(es) of fake still running 0s after it stopped: killing them ({child} " \
        in caplog.text


# -- the backend's output in its log file: kept whole, the worker's secrets masked ---------------

TOKEN = "hf_0123456789abcdefghijklmnop"


def test_a_secret_split_between_two_pieces_of_a_long_line_is_masked_whole():
    from vespa.backend.supervisor import MaskedOutput
    from vespa.observability.logs import Redactor, mask

    output = MaskedOutput(Redactor([TOKEN]))
    pieces = [b"\xff" * 100 + TOKEN[:5].encode(), TOKEN[5:].encode() + b"\xfe" * 100,
              b" end\n", b"no newline at the end, " + TOKEN[:3].encode()]
    written = b"".join(output.feed(piece) for piece in pieces) + output.end()
    assert written == b"".join(pieces).replace(TOKEN.encode(), mask(TOKEN).encode())
    # nothing held back after a whole line, nor after the last piece of the output
    assert output.feed(b"a whole line " + TOKEN.encode() + b"\n") == \
        b"a whole line " + mask(TOKEN).encode() + b"\n"
    assert output.feed(b"the last line, " + TOKEN.encode(), last=True) == \
        b"the last line, " + mask(TOKEN).encode() and output.end() == b""


def test_without_secrets_the_output_passes_as_it_came():
    from vespa.backend.supervisor import MaskedOutput
    from vespa.observability.logs import Redactor

    output = MaskedOutput(Redactor([None, ""]))
    piece = b"a piece of a long line, not UTF-8: \xe9"
    assert output.feed(piece) is piece and output.end() == b""


async def test_a_line_longer_than_the_buffer_reaches_the_log_file_whole_and_masked(tmp_path):
    """A line of 3 MiB comes in 64 KiB pieces (the read buffer holds 1 MiB); a secret straddles
    the first two: the file has every byte of the line, the secret masked whole."""
    from vespa.backend.supervisor import PIECE, ProcessSpec, Supervisor
    from vespa.observability.logs import Redactor, mask

    head, tail = PIECE - 10, 3 << 20  # the secret begins 10 bytes before the first piece ends
    line = b"x" * head + TOKEN.encode() + b"\xe9" * tail + b"\n"
    script = tmp_path / "long_line.py"
    script.write_text(f"import sys; sys.stdout.buffer.write(b'x' * {head} + {TOKEN.encode()!r} "
                      f"+ b'\\xe9' * {tail} + b'\\nafter it\\n')")
    log = tmp_path / "backend.log"
    supervisor = Supervisor(ProcessSpec("long", [PYTHON, str(script)]), str(log),
                            secrets=Redactor([TOKEN]))
    await asyncio.wait_for(supervisor.run(), 30)
    assert supervisor.process.returncode == 0
    assert log.read_bytes() == line.replace(TOKEN.encode(), mask(TOKEN).encode()) + b"after it\n"
