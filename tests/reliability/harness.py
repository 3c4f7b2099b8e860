"""Tools of the reliability suite: workers and backends as processes, RSS sampling, cheap
signing for load, signed calls, and the invariant every case checks.

The invariant: every request the worker accepted or rejected is answered once and reported to the
autoscaler exactly once (its request_idx appears once in the emulator's delete_requests); the
worker stays up (answers /_vespa/healthz and a normal request afterwards); memory stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import psutil

from vespa.corridor import auth
from vespa.devtools.autoscaler import AutoscalerEmulator
from vespa.devtools.signing import Signer
from vespa.backend.supervisor import _die_with_parent

from ..conftest import PYTHON, REPO, free_port, wait_until, worker_env

MB = 1024 * 1024
MASTER_TOKEN = "mtoken-secret"


# -- processes -----------------------------------------------------------------------------------

class Process:
    """A child process that dies with the test run (parent-death signal), logging to a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path):
        self.argv, self.env, self.log_path = argv, env, log_path
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait(10)
            self.log_file.close()

    async def wait_exit(self, timeout: float) -> int:
        return await asyncio.to_thread(self.proc.wait, timeout)


async def http_status(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


class BackendProcess(Process):
    """``tests.backend``'s app (plus the extra routes) in its own process, to kill and restart."""

    def __init__(self, tmp_path: Path, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([PYTHON, "-m", "tests.reliability.backend_main", "--port",
                          str(self.port)], worker_env(), tmp_path / f"backend-{self.port}.log")

    async def wait_up(self, session: aiohttp.ClientSession, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while await http_status(session, self.url + "/health") != 200:
            assert self.alive(), self.log_text()
            assert time.monotonic() < deadline, "backend process never answered /health"
            await asyncio.sleep(0.05)

    def sigkill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log_file.close()


class WorkerProcess(Process):
    """``python -m vespa`` on loopback: signed and reporting to ``emulator`` when given one."""

    def __init__(self, tmp_path: Path, backend_url: str, emulator: AutoscalerEmulator | None,
                 port: int | None = None, **env: str):
        self.port = port or free_port()  # an earlier worker's port: the same public URL
        self.url = f"http://127.0.0.1:{self.port}"
        settings = dict(VESPA_BACKEND_URL=backend_url, VESPA_WORKER_PORT=str(self.port),
                        VESPA_WORKER_HOST="127.0.0.1", VESPA_HEALTHCHECK_INTERVAL="0.2",
                        VESPA_CACHE_DIR=str(tmp_path / "cache"))
        if emulator is None:
            settings["VESPA_UNSECURED"] = "true"
        else:
            settings.update(REPORT_ADDR=emulator.url, CONTAINER_ID="7", MASTER_TOKEN=MASTER_TOKEN,
                            VESPA_USE_SSL="false", VESPA_PUBLIC_URL=self.url,
                            VESPA_MAX_THROUGHPUT="1000", VESPA_REPORT_INTERVAL="0.05")
        settings.update(env)
        super().__init__([PYTHON, "-m", "vespa"], worker_env(**settings),
                         tmp_path / f"worker-{self.port}.log")

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while await http_status(session, self.url + "/_vespa/readyz") != 200:
            assert self.alive(), self.log_text()[-3000:]
            assert time.monotonic() < deadline, "worker never became ready"
            await asyncio.sleep(0.05)

    def num_fds(self) -> int:
        return psutil.Process(self.pid).num_fds()


class RssSampler:
    """Samples a process's RSS in the background; ``peak`` is the largest seen."""

    def __init__(self, process: Process, interval: float = 0.2):
        self.process, self.interval = process, interval
        self.samples: list[tuple[float, int]] = []
        self.task: asyncio.Task | None = None

    def __enter__(self) -> "RssSampler":
        self.task = asyncio.get_running_loop().create_task(self.run())
        return self

    def __exit__(self, *exc) -> None:
        self.task.cancel()

    async def run(self) -> None:
        while True:
            try:
                self.samples.append((time.monotonic(), self.process.rss()))
            except psutil.Error:
                return
            await asyncio.sleep(self.interval)

    @property
    def peak(self) -> int:
        return max((rss for _, rss in self.samples), default=0)


# -- signing -------------------------------------------------------------------------------------

class UrlSigner:
    """auth_data under the url-only scheme (2026): one RSA signature serves every request to a
    worker, so 20,000 requests cost one signing operation. Fresh reqnum and request_idx come from
    the emulator's signer, so they never collide with its full-scheme auth_data."""

    def __init__(self, signer: Signer, url: str):
        self.signer, self.url = signer, url
        self.signature = auth.sign(signer.ensure_key(), {"url": url}, "url")

    def auth_data(self, cost: float = 1.0) -> dict:
        self.signer.last_reqnum += 1
        return {"cost": cost, "endpoint": self.signer.endpoint, "reqnum": self.signer.last_reqnum,
                "request_idx": self.signer.next_request_idx(), "url": self.url,
                "signature": self.signature}


def query_auth(auth_data: dict) -> str:
    """auth_data as ``serverless_*`` query parameters."""
    return urlencode({f"serverless_{k}": v for k, v in auth_data.items()})


def envelope(auth_data: dict, payload: object = None) -> bytes:
    return json.dumps({"auth_data": auth_data, "payload": payload or {}}).encode()


# -- the invariant -------------------------------------------------------------------------------

def check_reported_once(emulator: AutoscalerEmulator, must: set[int],
                        never: set[int] = frozenset(), may: set[int] = frozenset()) -> Counter:
    """Every idx in ``must`` was reported exactly once, none in ``never``, at most once in
    ``may``, nothing else; the reports themselves were valid."""
    deleted = Counter(emulator.deleted_request_idxs())
    doubled = {idx: n for idx, n in deleted.items() if n > 1}
    assert not doubled, f"reported more than once: {dict(list(doubled.items())[:20])}"
    missing = must - set(deleted)
    assert not missing, f"{len(missing)} request(s) never reported: {sorted(missing)[:20]}"
    wrongly = never & set(deleted)
    assert not wrongly, f"reported though not accepted or rejected: {sorted(wrongly)[:20]}"
    unknown = set(deleted) - must - may
    assert not unknown, f"reported but never sent by the test: {sorted(unknown)[:20]}"
    assert emulator.validation_errors == [], emulator.validation_errors[:10]
    return deleted


async def reports_settled(emulator: AutoscalerEmulator, must: set[int], timeout: float = 30,
                          quiet: float = 0.3, exited: bool = False) -> None:
    """Wait until every idx in ``must`` was reported. Then, when the worker has ``exited``,
    until the emulator (a ``WatchedEmulator``) has answered every request that reached it: what
    it holds is final. A worker process still running may still send a duplicate, and what it
    has left to send cannot be seen from here: ``quiet`` seconds more for one to show up."""
    await wait_until(lambda: must <= set(emulator.deleted_request_idxs()), timeout=timeout)
    if exited:
        # what the exited worker wrote is in the emulator's sockets: let its loop read it first
        await asyncio.sleep(0.05)
        await wait_until(lambda: not emulator.answering, timeout=timeout,
                         what="the emulator's answers to everything it received")
    else:
        await asyncio.sleep(quiet)


async def assert_serving(session: aiohttp.ClientSession, worker_url: str,
                         signer: Signer | None = None, must: set[int] | None = None,
                         path: str = "/echo") -> None:
    """The worker is up: /_vespa/healthz answers, and so does a normal (signed) request."""
    async with session.get(worker_url + "/_vespa/healthz",
                           timeout=aiohttp.ClientTimeout(total=5)) as health:
        assert health.status == 200, await health.text()
    if signer is None:
        async with session.post(worker_url + path, data=b"{}",
                                timeout=aiohttp.ClientTimeout(total=10)) as response:
            assert response.status == 200, await response.text()
        return
    auth_data = signer.auth_data(worker_url, cost=2)
    async with session.post(worker_url + path, data=envelope(auth_data, {"after": "faults"}),
                            timeout=aiohttp.ClientTimeout(total=10)) as response:
        assert response.status == 200, await response.text()
    if must is not None:
        must.add(auth_data["request_idx"])


async def signed_call(session: aiohttp.ClientSession, worker_url: str, signer: Signer | UrlSigner,
                      method: str, path: str, cost: float = 2.0, *, payload: object = None,
                      auth_data: dict | None = None, timeout: float = 30.0
                      ) -> tuple[int, object, bytes]:
    """One signed request: (request_idx, status or "cut" or "error: ...", body).

    "cut" means the response started and then the connection was cut (a stream broken off)."""
    if auth_data is None:
        auth_data = signer.auth_data(worker_url, cost=cost) if isinstance(signer, Signer) \
            else signer.auth_data(cost)
    idx = auth_data["request_idx"]
    if method in ("GET", "DELETE", "HEAD"):
        sep = "&" if "?" in path else "?"
        context = session.request(method, f"{worker_url}{path}{sep}{query_auth(auth_data)}",
                                  timeout=aiohttp.ClientTimeout(total=timeout))
    else:
        context = session.request(method, worker_url + path, data=envelope(auth_data, payload),
                                  headers={"Content-Type": "application/json"},
                                  timeout=aiohttp.ClientTimeout(total=timeout))
    try:
        async with context as response:
            try:
                body = await response.read()
            except aiohttp.ClientPayloadError:
                return idx, "cut", b""
            return idx, response.status, body
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return idx, f"error: {exc!r}", b""
