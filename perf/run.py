"""Vespa performance harness: one command, one interleaved run, ratios against the backend.

    python perf/run.py                      # the backend direct, vespa unsecured and signed
    python perf/run.py --with-vast --with-nginx   # + Vast's own worker and nginx
    python perf/run.py --with-records       # + vespa with request records on (VESPA_REQUEST_LOG_DIR)
    python perf/run.py --proxy-cmd "{python} perf/naive_proxy.py --port {port} --backend {backend}"
    python perf/run.py --profile            # + a py-spy profile of vespa under JSON c=32 load

Starts ``perf/backend.py`` and each proxy on free loopback ports, then runs wrk (one thread)
against the backend DIRECTLY and THROUGH each proxy, interleaved round by round, for three
scenarios: small JSON POST throughput at c=32, SSE (50 events) streams/s at c=32, and p50
latency at c=1; and, in the same rounds, each SSE event's latency from the backend's write to the
client's read (perf/sse_latency.py's client, paced streams). Vespa runs unsecured and, as on
Vast, signed: envelopes and signatures as Vast's client sends them, under the url-only and the
full scheme (perf/signed.py, perf/clients.py). Prints markdown tables of medians and ratios
(against the backend, and the signed rows against Vespa unsecured; perf/report.py) with their
targets and writes everything to ``perf/results/latest.json``. Exit code 0 unless a measurement
failed: the harness measures, it does not gate. See perf/README.md; perf/figures.py puts a
committed run's figures in the README.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PERF_DIR = Path(__file__).resolve().parent
REPO_ROOT = PERF_DIR.parent
RESULTS_DIR = PERF_DIR / "results"
LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 30.0

sys.path.insert(0, str(PERF_DIR))
import backend as perf_backend  # noqa: E402  (the bodies we expect back, for the sanity check)
import clients  # noqa: E402
import profiling  # noqa: E402
import provenance  # noqa: E402
import report  # noqa: E402
import signed  # noqa: E402
import sse_latency  # noqa: E402

PERF_MARK = clients.PERF_MARK


# -- scenarios -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    connections: int
    metric: str          # "rps" (higher is better), "p50_us" (lower is better) or "events"
    target: float | None  # ratio floor for rps metrics, added-µs ceiling for p50
    tool: str = "wrk"    # or "events": perf/sse_latency.py's client


# the requests themselves (paths, bodies, signatures) are each target's client's: perf/clients.py
SCENARIOS = (
    Scenario("json_c32", "JSON c=32", 32, "rps", 0.6),
    Scenario("sse_c32", "SSE c=32", 32, "rps", 0.85),
    Scenario("p50_c1", "added p50 c=1", 1, "p50_us", 200.0),
    Scenario("sse_events", "SSE event latency", sse_latency.CONNECTIONS, "events", None,
             tool="events"),
)

# The production path's rows, by what they send: "unsigned" is Vast's unsecured mode
# (UNSECURED=true: the same envelopes, reports on, no signature checked), "url" and "full" the
# signed ones. Against Vespa unsecured in dev mode (the "vespa" row: plain requests, no
# autoscaler), issue #20's targets: JSON c=32 ratio floor, added p50 ceiling.
SIGNED_TARGETS = {"unsigned": (None, None), "url": (0.9, 50.0), "full": (0.8, None)}


# -- processes -----------------------------------------------------------------------------------

def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the harness dies (Linux), so nothing is orphaned."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Processes:
    """Every process the harness starts; ``stop_all`` ends them (process group, TERM then KILL)."""

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.started: list[tuple[str, subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], env: dict | None = None,
              cwd: Path = REPO_ROOT) -> subprocess.Popen:
        log_path = self.log_dir / f"{name.replace(' ', '_')}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        self.started.append((name, proc, log_path))
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        """End one process (and its group) that this harness started."""
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=5)
        self.started = [entry for entry in self.started if entry[1] is not proc]

    def log_tail(self, proc: subprocess.Popen, lines: int = 20) -> str:
        for _, p, path in self.started:
            if p is proc:
                return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop_all(self) -> None:
        for _, proc, _ in reversed(self.started):
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _, proc, _ in reversed(self.started):
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=5)
        self.started.clear()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the child's whole process group (its own children too, e.g. nginx workers)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 2.0, data: bytes | None = None) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(procs: Processes, proc: subprocess.Popen, name: str, url: str,
               timeout: float = READY_TIMEOUT) -> None:
    """Poll ``url`` until it answers 200; fail clearly if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"{name} exited with code {proc.returncode} before it was ready.\n"
                               f"--- last lines of its output ---\n{procs.log_tail(proc)}")
        try:
            status, _ = http_get(url, timeout=1.0)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise HarnessError(f"{name} not ready at {url} after {timeout:g}s (last: {last}).\n"
                       f"--- last lines of its output ---\n{procs.log_tail(proc)}")


class HarnessError(Exception):
    """A setup or measurement step failed; the message says what to do."""


# -- targets: the backend and the proxies in front of it ------------------------------------------

@dataclass
class Target:
    name: str
    base_url: str
    pid: int | None = None
    rounds: dict[str, list[dict]] = field(default_factory=dict)
    client: clients.PlainClient = field(default_factory=clients.PlainClient)
    scripts: dict[str, Path] = field(default_factory=dict)  # scenario key -> wrk script
    warmup: dict[str, float] = field(default_factory=dict)  # scenario key -> req/s warming up


def start_backend(procs: Processes) -> Target:
    port = free_port()
    proc = procs.start("backend", [sys.executable, str(PERF_DIR / "backend.py"),
                                   "--host", LOOPBACK, "--port", str(port)])
    url = f"http://{LOOPBACK}:{port}"
    wait_ready(procs, proc, "backend", url + "/health")
    return Target("direct", url, proc.pid)


def proxy_env(backend_url: str, port: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(VESPA_UNSECURED="true", VESPA_BACKEND_URL=backend_url,
               VESPA_WORKER_PORT=str(port), VESPA_WORKER_HOST=LOOPBACK,
               VESPA_LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1")
    return env


def start_command_proxy(procs: Processes, name: str, template: str, ready_path: str,
                        backend_url: str, port: int | None = None, **env: str) -> Target:
    """Start a proxy from a command template with {port}, {backend} and {python} placeholders."""
    port = port or free_port()
    argv = shlex.split(template.format(port=port, backend=backend_url,
                                       python=shlex.quote(sys.executable)))
    proc = procs.start(name, argv, env={**proxy_env(backend_url, port), **env})
    url = f"http://{LOOPBACK}:{port}"
    wait_ready(procs, proc, name, url + ready_path)
    return Target(name, url, proc.pid)


# -- the signed path: an autoscaler holding the key, Vespa signed, Vast's own worker ---------------

MASTER_TOKEN = "perf-master-token"


def start_autoscaler(procs: Processes, key_path: Path) -> str:
    """perf/signed.py's minimal autoscaler; its URL."""
    port = free_port()
    proc = procs.start("autoscaler", [sys.executable, str(PERF_DIR / "signed.py"), "autoscaler",
                                      "--port", str(port), "--key", str(key_path)])
    url = f"http://{LOOPBACK}:{port}"
    wait_ready(procs, proc, "autoscaler", url + "/pubkey/")
    return url


def signed_env(autoscaler_url: str, worker_id: int) -> dict[str, str]:
    """A Vespa worker as on Vast: signatures checked (VESPA_SIGNATURE_SCHEME's default, auto),
    the key from the autoscaler, which also gets every report. The public URL is a fixed name
    (the signatures bind it; the pool of full-scheme signatures is made for it once); the
    throughput is given so no benchmark runs against the perf backend."""
    return {"VESPA_UNSECURED": "false", "REPORT_ADDR": autoscaler_url,
            "CONTAINER_ID": str(worker_id), "MASTER_TOKEN": MASTER_TOKEN,
            "VESPA_PUBLIC_URL": signed.PUBLIC_URL, "VESPA_WORKER_HTTP_PORT": "0",
            "VESPA_USE_SSL": "false",  # CONTAINER_ID means a Vast instance: TLS by default
            "VESPA_MAX_THROUGHPUT": "1000000"}


def start_signed_vespa(procs: Processes, scheme: str, backend_url: str, autoscaler_url: str,
                       key, pool_dir: Path) -> Target:
    """Vespa checking signatures, sent as Vast's client sends them under ``scheme`` ("unsigned":
    the url-only requests to a worker in Vast's unsecured mode, which checks none)."""
    name = "vespa unsigned" if scheme == "unsigned" else f"vespa signed {scheme}"
    worker_id = {"unsigned": 4, "url": 1, "full": 2}[scheme]
    env = signed_env(autoscaler_url, worker_id)
    # its own cache: the replay mark it writes (the highest reqnum served) is its own, and goes
    # when it restarts, so the pool's reqnums count from 1 again
    cache = procs.log_dir / f"cache-{worker_id}"
    env["VESPA_CACHE_DIR"] = str(cache)
    if scheme == "unsigned":
        env["VESPA_UNSECURED"] = "true"
    target = start_command_proxy(procs, name, "{python} -m vespa", "/_vespa/readyz",
                                 backend_url, **env)
    if scheme in ("unsigned", "url"):
        target.client = clients.EnvelopeClient(
            signed.url_signed_body(key, signed.PUBLIC_URL, clients.CHAT_PAYLOAD))
        return target
    port = int(target.base_url.rsplit(":", 1)[1])

    def restart() -> None:  # the same worker afresh: its replay window empty, no mark kept
        proc = next(p for _, p, _ in procs.started if p.pid == target.pid)
        procs.stop(proc)
        (cache / "replay-mark").unlink(missing_ok=True)
        fresh = start_command_proxy(procs, name, "{python} -m vespa", "/_vespa/readyz",
                                    backend_url, port=port, **env)
        target.pid = fresh.pid

    key_path = signed.autoscaler_key(pool_dir)[1]
    target.client = clients.PoolClient(signed.Pool(key_path, signed.PUBLIC_URL, pool_dir),
                                       restart)
    return target


VAST_WORKER_ID = 3


def start_vast_worker(procs: Processes, backend_url: str, autoscaler_url: str, key,
                      tmp: Path) -> Target | None:
    """Vast's own worker (PyPI vastai), url-only signatures from the same key."""
    try:
        import vastai.serverless.server.worker  # noqa: F401
    except ImportError as exc:
        print(f"note: Vast's worker is not importable here ({exc}): pip install "
              "'vastai==1.9.1' (the test extra has it); skipping its row", file=sys.stderr)
        return None
    port, http_port = free_port(), free_port()
    workdir = tmp / "vast-worker"
    workdir.mkdir()
    env = {**os.environ, "WORKER_PORT": str(port), "WORKER_HTTP_PORT": str(http_port),
           "CONTAINER_ID": str(VAST_WORKER_ID), "REPORT_ADDR": autoscaler_url,
           "PUBLIC_IPADDR": LOOPBACK, f"VAST_TCP_PORT_{port}": str(port),
           "MASTER_TOKEN": MASTER_TOKEN, "PYTHONUNBUFFERED": "1"}
    env.pop("USE_SSL", None)
    env.pop("UNSECURED", None)
    proc = procs.start("vast worker", [sys.executable, str(PERF_DIR / "vast_worker.py"),
                                       "--backend", backend_url], env=env, cwd=workdir)
    url = f"http://{LOOPBACK}:{port}"
    # ready once it has reported itself loaded (after its benchmark); it has no route for it
    wait_ready(procs, proc, "vast worker", f"{autoscaler_url}/_perf/ready/{VAST_WORKER_ID}",
               timeout=90)
    target = Target("vast worker", url, proc.pid)
    target.client = clients.EnvelopeClient(
        signed.url_signed_body(key, f"http://{LOOPBACK}:{port}", clients.CHAT_PAYLOAD))
    return target


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream perf_backend {{
        server {backend_hostport};
        keepalive 64;
    }}
    server {{
        listen {listen};
        location / {{
            proxy_pass http://perf_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


def start_nginx(procs: Processes, backend_url: str, tmp: Path) -> Target | None:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if nginx is None:
        print("note: nginx is not installed (apt-get install -y nginx); skipping the nginx row",
              file=sys.stderr)
        return None
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=tmp, listen=f"{LOOPBACK}:{port}",
                                      backend_hostport=backend_url.split("://", 1)[1]))
    proc = procs.start("nginx", [nginx, "-p", str(tmp), "-c", str(conf),
                                 "-e", str(tmp / "nginx-error.log")])
    url = f"http://{LOOPBACK}:{port}"
    wait_ready(procs, proc, "nginx", url + "/health")
    return Target("nginx", url, proc.pid)


def sanity_check(target: Target) -> None:
    """One JSON request and one SSE stream through ``target`` must come back whole."""
    for key, expected in (("json_c32", perf_backend.CHAT_BODY),
                          ("sse_c32", b"".join(perf_backend.SSE_CHUNKS))):
        data, headers = target.client.sanity_request(key)
        path = target.client.path(key)
        status, body = clients.http(target.base_url + path, data, headers)
        if status != 200 or body != expected:
            raise HarnessError(f"{target.name}: {'POST' if data else 'GET'} {path} gave HTTP "
                               f"{status}, {len(body)} bytes (expected 200 and the backend's "
                               f"{len(expected)} bytes): {body[:200]!r}")
    target.client.prepare(1)
    problem = sse_latency.one_stream(target.base_url, target.client.event_request)
    if problem:
        raise HarnessError(f"{target.name}: {clients.STAMPED_SSE_PATH}: {problem}")


# -- wrk -----------------------------------------------------------------------------------------

def find_wrk() -> str:
    """The wrk binary; installed with apt-get when running as root with CI=true."""
    wrk = shutil.which("wrk")
    if wrk:
        return wrk
    if os.geteuid() == 0 and os.environ.get("CI", "").lower() == "true":
        print("wrk not found; CI=true and root: apt-get install -y wrk", file=sys.stderr)
        subprocess.run(["apt-get", "update"], check=False, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, timeout=600)
        wrk = shutil.which("wrk")
        if wrk:
            return wrk
    raise HarnessError("wrk is not installed. Install it with:  apt-get install -y wrk")


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU of a process and its children (nginx works in children), or None."""
    if pid is None:
        return None
    try:
        import psutil
        process = psutil.Process(pid)
        return sum(sum(p.cpu_times()[:2]) for p in [process, *process.children(recursive=True)])
    except Exception:  # psutil missing or the process gone: the column stays empty
        return None


def run_wrk(wrk: str, script: Path, url: str, connections: int, duration: int,
            extra: list[str] | None = None) -> dict:
    """One wrk run (one thread); returns its summary plus rps, or raises HarnessError."""
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
            "-s", str(script), url] + (extra or [])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"wrk did not finish within {duration + 30}s: {url}") from None
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith(PERF_MARK)), None)
    if done.returncode != 0 or line is None:
        raise HarnessError(f"wrk failed (exit {done.returncode}) on {url}:\n"
                           f"{done.stdout}\n{done.stderr}")
    result = json.loads(line[len(PERF_MARK):])
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    return result


def check_run(result: dict) -> str | None:
    """Why a wrk run cannot be trusted, or None when it is fine."""
    errors = result["errors"]
    if result["requests"] == 0:
        return "no request completed"
    if errors["status"]:
        return f"{errors['status']} non-2xx/3xx responses"
    socket_errors = errors["connect"] + errors["read"] + errors["write"] + errors["timeout"]
    if socket_errors > 0.01 * result["requests"]:
        return f"{socket_errors} socket errors for {result['requests']} requests"
    return None


# -- measuring -----------------------------------------------------------------------------------

def write_scripts(tmp: Path, targets: list[Target]) -> None:
    for target in targets:
        for scenario in (s for s in SCENARIOS if s.tool == "wrk"):
            target.scripts[scenario.key] = clients.write_script(
                tmp, f"{target.name}-{scenario.key}", target.client.script(scenario.key))


def expected_requests(targets: list[Target], scenario: Scenario, seconds: int) -> int:
    """How many requests a wrk run of ``seconds`` may send to a signed Vespa worker (at most what
    Vespa unsecured answers, measured or warming up), with a margin; paced streams: at most
    what their pace allows."""
    if scenario.tool == "events":
        return sse_latency.streams_at_most(scenario.connections, seconds)
    rates = [run["rps"] for t in targets if t.name.startswith("vespa")
             for run in t.rounds.get(scenario.key, [])]
    rates += [t.warmup[scenario.key] for t in targets
              if t.name.startswith("vespa") and scenario.key in t.warmup]
    if not rates and scenario.key == "p50_c1":  # one connection: never more than at 32
        return expected_requests(targets, SCENARIOS[0], seconds)
    rate = max(rates) if rates else 20_000.0
    return int(rate * seconds * 1.3) + 2 * scenario.connections + 200


def one_run(wrk: str, targets: list[Target], target: Target, scenario: Scenario,
            duration: int) -> dict:
    """One wrk run of ``scenario`` against ``target`` (its client prepared and told after), or
    one run of the per-event latency client."""
    target.client.prepare(expected_requests(targets, scenario, duration))
    if scenario.tool == "events":  # each stream takes its own request from the client
        return sse_latency.measure(target.base_url, target.client.event_request,
                                   scenario.connections, duration)
    result = run_wrk(wrk, target.scripts[scenario.key],
                     target.base_url + target.client.path(scenario.key),
                     scenario.connections, duration, target.client.wrk_args())
    target.client.used(result)
    return result


def warm_up(wrk: str, targets: list[Target], seconds: int) -> None:
    for target in targets:
        for scenario in SCENARIOS[:2]:
            target.warmup[scenario.key] = one_run(wrk, targets, target, scenario, seconds)["rps"]


def measure(wrk: str, targets: list[Target], scenarios: list[Scenario], rounds: int,
            duration: int) -> list[str]:
    """Interleaved rounds; fills ``target.rounds`` and returns the problems found."""
    problems = []
    for r in range(rounds):
        # Alternate the order each round so slow drift of the machine hits every target alike.
        order = targets if r % 2 == 0 else list(reversed(targets))
        for scenario in scenarios:
            for target in order:
                target.client.prepare(expected_requests(targets, scenario, duration))
                cpu_before = cpu_seconds(target.pid)
                result = one_run(wrk, targets, target, scenario, duration)
                cpu_after = cpu_seconds(target.pid)
                if cpu_before is not None and cpu_after is not None and result["requests"]:
                    # CPU per request barely moves with the machine's noise, unlike req/s
                    result["cpu_us_per_request"] = (cpu_after - cpu_before) / result["requests"] * 1e6
                target.rounds.setdefault(scenario.key, []).append(result)
                problem = check_run(result)
                if problem:
                    problems.append(f"round {r + 1} {scenario.key} {target.name}: {problem}")
                p50 = result["p50_us"]
                print(f"  round {r + 1}/{rounds}  {scenario.title:<17} {target.name:<18} "
                      f"{result['rps']:>9.0f} req/s  p50 "
                      + (f"{p50:>7.0f} µs" if p50 is not None else "    n/a")
                      + (f"  !! {problem}" if problem else ""), flush=True)
    return problems


def median_of(target: Target, scenario: Scenario) -> float:
    return statistics.median(run[scenario.metric] for run in target.rounds[scenario.key])


def compare(direct: Target, proxy: Target, scenario: Scenario,
            target: float | None = -1.0) -> dict:
    """One table cell: the direct (or base) and proxied medians, their ratio (or difference),
    pass/fail against ``target`` (the scenario's by default; None: no target)."""
    cpu = {"direct": _cpu(direct, scenario), "proxy": _cpu(proxy, scenario)}
    if scenario.tool == "events":  # latencies, not a ratio: p50 and p99 of each side
        return {**sse_latency.cell(direct.rounds[scenario.key], proxy.rounds[scenario.key]),
                "cpu_us_per_request": cpu}
    d, p = median_of(direct, scenario), median_of(proxy, scenario)
    goal = scenario.target if target == -1.0 else target
    if scenario.metric == "rps":
        value = p / d if d else 0.0
        passed = None if goal is None else value >= goal
    else:
        value = p - d
        passed = None if goal is None else value <= goal
    return {"direct": d, "proxied": p, "value": value, "target": goal,
            "pass": passed, "kind": "ratio" if scenario.metric == "rps" else "added_us",
            "per_round": _per_round(direct, proxy, scenario), "cpu_us_per_request": cpu}


def _cpu(target: Target, scenario: Scenario) -> float | None:
    """Median CPU µs per request of the target's own process(es) in this scenario."""
    values = [run["cpu_us_per_request"] for run in target.rounds[scenario.key]
              if "cpu_us_per_request" in run]
    return statistics.median(values) if values else None


def _per_round(direct: Target, proxy: Target, scenario: Scenario) -> list[float]:
    """Round-by-round ratios (or added µs): their spread shows how noisy the run was."""
    pairs = zip(direct.rounds[scenario.key], proxy.rounds[scenario.key])
    if scenario.metric == "rps":
        return [round(p["rps"] / d["rps"], 3) for d, p in pairs]
    return [round(p["p50_us"] - d["p50_us"], 1) for d, p in pairs]


# -- report --------------------------------------------------------------------------------------

def signed_rows(base: Target, proxies: list[Target], scenarios: list[Scenario]) -> list[dict]:
    """The signed rows (and Vast's worker) against Vespa unsecured, with issue #20's targets."""
    rows = []
    for proxy in proxies:
        if proxy is base or not (proxy.name.startswith(("vespa signed", "vespa unsigned"))
                                 or proxy.name == "vast worker"):
            continue
        scheme = proxy.name.rsplit(" ", 1)[1] if proxy.name.startswith("vespa signed") \
            else "unsigned" if proxy.name == "vespa unsigned" else ""
        ratio, added = SIGNED_TARGETS.get(scheme, (None, None))
        goals = {"json_c32": ratio, "p50_c1": added}
        rows.append({"proxy": proxy.name, "against": base.name,
                     "cells": {s.key: compare(base, proxy, s, goals.get(s.key))
                               for s in scenarios}})
    return rows


def machine_info(wrk: str) -> dict:
    try:
        import aiohttp
        aiohttp_version = aiohttp.__version__
    except ImportError:
        aiohttp_version = None
    try:
        from importlib.metadata import PackageNotFoundError, version
        vastai_version = version("vastai")
    except PackageNotFoundError:
        vastai_version = None
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    nginx_version = provenance.tool_version([nginx, "-v"]) if os.path.exists(nginx) else None
    return {**provenance.checkout(), **provenance.machine(), "aiohttp": aiohttp_version,
            "wrk": provenance.tool_version([wrk, "-v"]),
            "nginx": nginx_version.rsplit("/", 1)[-1] if nginx_version else None,
            "vastai": vastai_version,
            # compiled or plain Python (vespa/compiled.py), as the worker started here will see it
            "vespa_request_path": provenance.request_path()}


# -- profiling -----------------------------------------------------------------------------------

def find_py_spy() -> str:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise HarnessError("--profile needs py-spy:  pip install py-spy")
    return py_spy


def profile(procs: Processes, wrk: str, targets: list[Target], target: Target,
            duration: int, native: bool) -> dict:
    """Load ``target`` with JSON c=32 while py-spy samples it; save speedscope + top functions."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS_DIR / f"profile-{target.name.replace(' ', '-')}-{stamp}.speedscope.json"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    rate = 200
    py_spy = find_py_spy()
    target.client.prepare(expected_requests(targets, SCENARIOS[0], duration + 2))  # may restart
    argv = [py_spy, "record", "--pid", str(target.pid), "--duration", str(duration),
            "--rate", str(rate), "--format", "speedscope", "--function", "--subprocesses",
            "--output", str(out)] + (["--native"] if native else [])
    spy = procs.start("py-spy", argv)
    time.sleep(0.5)  # py-spy attaches; the load then runs a little longer than the sampling
    result = one_run(wrk, targets, target, SCENARIOS[0], duration + 1)
    try:
        spy.wait(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        raise HarnessError("py-spy did not finish; see its log:\n" + procs.log_tail(spy)) from None
    if spy.returncode != 0 or not out.exists():
        raise HarnessError(f"py-spy failed (exit {spy.returncode}):\n{procs.log_tail(spy)}")
    top_path = out.with_name(out.name.replace(".speedscope.json", ".top.txt"))
    top_path.write_text(profiling.top_functions(out, duration) + "\n")
    print(f"\nprofile of {target.name} under JSON c=32 ({result['rps']:.0f} req/s while sampled):"
          f"\n  {out.relative_to(REPO_ROOT)}  (open at https://www.speedscope.app)"
          f"\n  {top_path.relative_to(REPO_ROOT)}")
    print("\n".join(top_path.read_text().splitlines()[:22]))
    return {"speedscope": str(out), "top": str(top_path), "rps_while_profiled": result["rps"]}


# -- main ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure Vespa (and reference proxies) against the backend called directly.")
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (5)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up seconds per target (1)")
    parser.add_argument("--only", default=",".join(s.key for s in SCENARIOS),
                        help="comma-separated scenarios to run (default: all four)")
    parser.add_argument("--proxy-cmd", help="measure this command instead of `python -m vespa`; "
                        "placeholders {port}, {backend}, {python}")
    parser.add_argument("--proxy-name", default=None, help="row name for --proxy-cmd (custom)")
    parser.add_argument("--proxy-ready-path", default=None,
                        help="path answering 200 when the proxy is ready "
                        "(/_vespa/readyz for vespa, /health through the proxy otherwise)")
    parser.add_argument("--with-records", action="store_true",
                        help="add a vespa row with request records on (VESPA_REQUEST_LOG_DIR)")
    parser.add_argument("--with-tree", action="append", type=Path, default=[],
                        help="add a vespa row run from another checkout (with its own "
                             ".venvs/worker when it has one): an A/B in one run")
    parser.add_argument("--with-naive", action="store_true",
                        help="add perf/naive_proxy.py as a reference row")
    parser.add_argument("--with-nginx", action="store_true",
                        help="add nginx as a reference row (skipped if nginx is not installed)")
    parser.add_argument("--signed", default="unsigned,url,full",
                        help="vespa rows as on Vast, by what they are sent: unsigned (Vast's "
                        "unsecured mode), url, full (signed under that scheme); default all "
                        "three, or none")
    parser.add_argument("--with-vast", action="store_true",
                        help="add Vast's own worker (PyPI vastai), signed url-only, as a "
                        "reference row")
    parser.add_argument("--signing-dir", type=Path, default=signed.SIGNING_DIR,
                        help="where the autoscaler key and the full-scheme pool are kept")
    parser.add_argument("--profile", action="store_true",
                        help="after measuring, py-spy the first proxy under JSON c=32 load")
    parser.add_argument("--profile-target", default=None,
                        help="with --profile: the row to profile (default: the first proxy)")
    parser.add_argument("--profile-native", action="store_true",
                        help="with --profile: include C frames (py-spy --native)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json")
    args = parser.parse_args(argv)
    args.command = shlex.join(["perf/run.py", *without_output(
        sys.argv[1:] if argv is None else argv)])
    if args.duration < 1 or args.rounds < 1 or args.duration > 120 or args.rounds > 20:
        parser.error("--duration must be 1..120 and --rounds 1..20")
    args.signed = [] if args.signed in ("", "none") else args.signed.split(",")
    if not set(args.signed) <= set(SIGNED_TARGETS) or len(set(args.signed)) != len(args.signed):
        parser.error("--signed takes some of unsigned,url,full, or none")
    if args.proxy_cmd:  # another proxy instead of vespa: no vespa rows beside it
        args.signed = []
    known = {s.key for s in SCENARIOS}
    args.scenarios = [s for s in SCENARIOS if s.key in set(args.only.split(","))]
    if not args.scenarios or not set(args.only.split(",")) <= known:
        parser.error(f"--only takes a comma-separated subset of {', '.join(sorted(known))}")
    return args


def without_output(argv: list[str]) -> list[str]:
    """The arguments as a command to repeat: where the results went is not part of it."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--output":
            skip = True
        elif not arg.startswith("--output="):
            kept.append(arg)
    return kept


def start_proxies(procs: Processes, args: argparse.Namespace, backend_url: str,
                  tmp: Path) -> list[Target]:
    if args.proxy_cmd:
        proxies = [start_command_proxy(procs, args.proxy_name or "custom", args.proxy_cmd,
                                       args.proxy_ready_path or "/health", backend_url)]
    else:
        proxies = [start_command_proxy(procs, "vespa", "{python} -m vespa",
                                       args.proxy_ready_path or "/_vespa/readyz", backend_url)]
    for tree in args.with_tree:  # another checkout, e.g. a git worktree of the base commit
        python = tree / ".venvs" / "worker" / "bin" / "python"  # its env, with its own build
        proxies.append(start_command_proxy(
            procs, f"vespa@{tree.name}",
            f"{shlex.quote(str(python if python.exists() else sys.executable))} "
            f"{shlex.quote(str(tree / 'server.py'))}", "/_vespa/readyz", backend_url))
    if args.with_records:
        proxies.append(start_command_proxy(
            procs, "vespa+records", "{python} -m vespa", "/_vespa/readyz", backend_url,
            VESPA_REQUEST_LOG_DIR=str(tmp / "records")))
    if args.with_naive:
        proxies.append(start_command_proxy(
            procs, "naive", "{python} perf/naive_proxy.py --port {port} --backend {backend}",
            "/health", backend_url))
    if args.signed or args.with_vast:
        key, key_path = signed.autoscaler_key(args.signing_dir)
        autoscaler_url = start_autoscaler(procs, key_path)
        for scheme in args.signed:
            proxies.append(start_signed_vespa(procs, scheme, backend_url, autoscaler_url, key,
                                              args.signing_dir))
        if args.with_vast:
            vast = start_vast_worker(procs, backend_url, autoscaler_url, key, tmp)
            if vast:
                proxies.append(vast)
    if args.with_nginx:
        nginx = start_nginx(procs, backend_url, tmp)
        if nginx:
            proxies.append(nginx)
    return proxies


def run(args: argparse.Namespace, procs: Processes, tmp: Path) -> int:
    wrk = find_wrk()
    info = machine_info(wrk)
    print(f"{info['cpus']} CPUs, load average {info['loadavg_at_start'][0]:.2f}, "
          f"{info['wrk']}, aiohttp {info['aiohttp']}; vespa's request path: "
          f"{info['vespa_request_path']}")
    direct = start_backend(procs)
    proxies = start_proxies(procs, args, direct.base_url, tmp)
    targets = [direct] + proxies
    write_scripts(tmp, targets)
    for target in targets:
        sanity_check(target)
    print("targets: " + ", ".join(f"{t.name} {t.base_url}" for t in targets))
    if args.warmup:
        warm_up(wrk, targets, args.warmup)
    problems = measure(wrk, targets, args.scenarios, args.rounds, args.duration)

    rows = [{"proxy": p.name, "cells": {s.key: compare(direct, p, s) for s in args.scenarios}}
            for p in proxies]
    table = report.markdown_table(rows, args.scenarios)
    print(f"\nMedians of {args.rounds} interleaved rounds of {args.duration}s, wrk -t1, "
          f"{info['cpus']} CPUs (backend, proxy and wrk share them):\n")
    print(table)
    unsecured = next((p for p in proxies if p.name == "vespa"), None)
    against = signed_rows(unsecured, proxies, args.scenarios) if unsecured else []
    against_table = report.signed_table(against, args.scenarios) if against else ""
    if against:
        print("\nThe production path against Vespa unsecured in dev mode (the vespa row; same "
              "run):\n")
        print(against_table)
    payload = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
        "settings": {"command": args.command, "duration_s": args.duration,
                     "rounds": args.rounds, "warmup_s": args.warmup,
                     "scenarios": [s.key for s in args.scenarios], "proxy_cmd": args.proxy_cmd,
                     "signed": args.signed, "with_vast": args.with_vast,
                     "sse_events": sse_latency.settings()},
        "rows": rows, "table_markdown": table, "problems": problems,
        "signed_rows": against, "signed_table_markdown": against_table,
        "raw": {t.name: t.rounds for t in targets},
    }
    if args.profile:
        chosen = [p for p in proxies if p.name == args.profile_target] if args.profile_target \
            else proxies[:1]
        if not chosen:
            raise HarnessError(f"--profile-target {args.profile_target!r} is not one of "
                               f"{', '.join(p.name for p in proxies)}")
        payload["profile"] = profile(procs, wrk, targets, chosen[0], args.duration,
                                     args.profile_native)
    provenance.write_json(args.output, payload)
    print(f"\nresults: {args.output}")
    if problems:
        print("\nmeasurement problems (numbers above are not trustworthy):\n  "
              + "\n  ".join(problems), file=sys.stderr)
        return 1
    return 0


def _raise_exit(signum, frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started in background
    signal.signal(signal.SIGTERM, _raise_exit)
    signal.signal(signal.SIGHUP, _raise_exit)
    with tempfile.TemporaryDirectory(prefix="vespa-perf-") as tmp_name:
        tmp = Path(tmp_name)
        procs = Processes(tmp)
        try:
            return run(args, procs, tmp)
        except HarnessError as exc:
            print(f"\nperf: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("\nperf: interrupted", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()


if __name__ == "__main__":
    sys.exit(main())
