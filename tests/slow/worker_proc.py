"""The product path for the slow tests: ``python -m vespa`` as a real process that launches a real
backend (``VESPA_BACKEND=vllm|tts``), benchmarks it and reports to an autoscaler emulator running
in the test process. Everything on loopback, free ports, a private VESPA_CACHE_DIR.

Every process the worker starts inherits a marker variable, so the orphan check finds the whole
tree (engine processes, grandchildren) by environment even after it was re-parented, without
confusing it with another vLLM that shares the machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
MARKER = "VESPA_SLOW_TEST_TREE"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_setup(problem: str | None) -> None:
    """Fail in CI, skip elsewhere, when a backend's venv or model is missing."""
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"backend is not set up in CI: {problem}")
    pytest.skip(problem)


async def wait_for(predicate, timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(interval)


class WorkerProcess:
    """One worker process, its ports, its logs, and every process it ever started."""

    def __init__(self, tmp: Path, backend: str, report_addr: str, **env: str):
        self.port, self.backend_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.backend_url = f"http://127.0.0.1:{self.backend_port}"
        self.cache_dir = tmp / "cache"
        self.log_path = tmp / "worker.log"
        self.backend_log_path = self.cache_dir / "logs" / f"{backend}.log"
        self.marker = uuid.uuid4().hex
        self.request_idxs: list[int] = []  # every signed request this test sent through it
        self.started = time.time()
        base = {k: v for k, v in os.environ.items() if not k.startswith("VESPA_")}
        base.update({
            "PYTHONPATH": str(ROOT), MARKER: self.marker,
            "VESPA_BACKEND": backend, "VESPA_BACKEND_PORT": str(self.backend_port),
            "VESPA_WORKER_PORT": str(self.port), "VESPA_WORKER_HOST": "127.0.0.1",
            "VESPA_CACHE_DIR": str(self.cache_dir),
            "REPORT_ADDR": report_addr, "CONTAINER_ID": "41", "MASTER_TOKEN": "slow-mtoken",
            "VESPA_USE_SSL": "false",
            "VESPA_PUBLIC_URL": self.url, "VESPA_REPORT_INTERVAL": "0.2",
            "VESPA_HEALTHCHECK_INTERVAL": "1", **env})
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - written until the end
        self.proc = subprocess.Popen([PYTHON, "-m", "vespa"], cwd=ROOT, env=base,
                                     stdout=self.log_file, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    # -- what it wrote ----------------------------------------------------------------------
    def log(self, chars: int = 6000) -> str:
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")

    def backend_log(self) -> str:
        try:
            return self.backend_log_path.read_bytes().decode(errors="replace")
        except OSError:
            return ""

    # -- its processes ----------------------------------------------------------------------
    def tree(self) -> list[psutil.Process]:
        """Live (non-zombie) processes that carry this worker's marker, or descend from it while
        it runs (vLLM's engine processes retitle themselves, which can hide their environment),
        the worker excluded."""
        found = {}
        for process in psutil.process_iter(["pid"]):
            if process.pid in (os.getpid(), self.proc.pid):
                continue
            try:
                if process.environ().get(MARKER) == self.marker \
                        and process.status() != psutil.STATUS_ZOMBIE:
                    found[process.pid] = process
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                continue
        try:
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            descendants = []
        for process in descendants:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    found.setdefault(process.pid, process)
            except psutil.NoSuchProcess:
                continue
        return list(found.values())

    def on_backend_port(self) -> list[psutil.Process]:
        """Live processes whose command line names the backend port (``--port N``)."""
        found = []
        for process in psutil.process_iter(["pid", "cmdline"]):
            cmdline = process.info.get("cmdline") or []
            if any(a == "--port" and b == str(self.backend_port) for a, b in zip(cmdline, cmdline[1:])):
                try:
                    if process.status() != psutil.STATUS_ZOMBIE:
                        found.append(process)
                except psutil.NoSuchProcess:
                    continue
        return found

    def port_listening(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", self.backend_port)) == 0

    # -- requests ---------------------------------------------------------------------------
    def sign(self, emulator, cost: float) -> dict:
        auth_data = emulator.signer.auth_data(self.url, cost=cost)
        self.request_idxs.append(auth_data["request_idx"])
        return auth_data

    def envelope(self, emulator, payload: dict, cost: float) -> dict:
        return {"auth_data": self.sign(emulator, cost), "payload": payload}

    def query_auth(self, emulator, cost: float) -> str:
        return urlencode({f"serverless_{k}": v for k, v in self.sign(emulator, cost).items()})

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float) -> float:
        """Seconds until /_vespa/readyz answers 200; fails early when the worker errors or dies."""
        started = time.monotonic()
        while True:
            assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}:\n{self.log()}"
            try:
                async with session.get(f"{self.url}/_vespa/readyz") as response:
                    body = await response.json()
                    if response.status == 200:
                        return time.monotonic() - started
                    assert not body.get("error"), f"worker start-up failed: {body}\n{self.log()}"
            except aiohttp.ClientError:
                pass
            assert time.monotonic() - started < timeout, \
                f"worker not ready after {timeout} s:\n{self.log()}"
            await asyncio.sleep(0.5)

    # -- the end ----------------------------------------------------------------------------
    async def terminate(self, timeout: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, timeout)

    def kill_everything(self) -> None:
        """Teardown: whatever is still alive of this worker's tree goes, whatever the test did."""
        leftovers = self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for process in leftovers + self.tree():
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        self.log_file.close()


def benchmark_cache(worker: WorkerProcess) -> list[dict]:
    """The entries of the worker's benchmark cache file (its private VESPA_CACHE_DIR)."""
    return list(json.loads((worker.cache_dir / "benchmark.json").read_text()).values())


def ready_reports(emulator) -> list[dict]:
    return [r for r in emulator.reports if r["max_perf"] > 0]


async def check_sigterm_leaves_nothing(worker: WorkerProcess, settle: float = 5.0) -> float:
    """SIGTERM the worker: exit code 0, and no process of its tree or on the backend port is
    left (a short settle time for the kernel to reap). Returns the seconds the stop took."""
    tree = worker.tree()
    assert tree, "the worker runs no backend process to begin with"
    print(f"worker tree before SIGTERM: {[(p.pid, p.name()) for p in tree]}")
    started = time.monotonic()
    code = await worker.terminate()
    took = time.monotonic() - started
    assert code == 0, f"worker exited with {code}:\n{worker.log()}"
    deadline = time.monotonic() + settle
    while (worker.tree() or worker.on_backend_port()) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    left = {p.pid: " ".join(p.cmdline())[:200] for p in worker.tree() + worker.on_backend_port()
            if p.is_running()}
    assert not left, f"processes left after the worker stopped: {left}"
    assert not worker.port_listening(), "something still listens on the backend port"
    survivors = []
    for process in tree:  # the very processes seen before (is_running also checks create time)
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                survivors.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    assert not survivors, f"backend processes survived the worker: {survivors}"
    return took


def metric_values(text: str) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value} summed over the engine/model labels."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:"):
            key, value = line.rsplit(" ", 1)
            key = re.sub(r'(engine|model_name)="[^"]*",?', "", key).replace(",}", "}").replace("{}", "")
            values[key] = values.get(key, 0.0) + float(value)
    return values
