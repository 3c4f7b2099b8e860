"""Vespa performance harness: one command, one interleaved run, ratios against the backend.

    python perf/run.py                      # vespa vs. the backend called directly
    python perf/run.py --with-naive --with-nginx
    python perf/run.py --with-records       # + vespa with request records on (VESPA_REQUEST_LOG_DIR)
    python perf/run.py --proxy-cmd "{python} perf/naive_proxy.py --port {port} --backend {backend}"
    python perf/run.py --profile            # + a py-spy profile of vespa under JSON c=32 load

Starts ``perf/backend.py`` and each proxy on free loopback ports, then runs wrk (one thread)
against the backend DIRECTLY and THROUGH each proxy, interleaved round by round, for three
scenarios: small JSON POST throughput at c=32, SSE (50 events) streams/s at c=32, and p50
latency at c=1. Prints a markdown table of medians and ratios with the Worker-core targets and
writes everything to ``perf/results/latest.json``. Exit code 0 unless a measurement failed: the
harness measures, it does not gate. See perf/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
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
PERF_MARK = "PERF_JSON "

sys.path.insert(0, str(PERF_DIR))
import backend as perf_backend  # noqa: E402  (the bodies we expect back, for the sanity check)
import profiling  # noqa: E402


# -- scenarios -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    path: str
    connections: int
    post_json: bool
    metric: str          # "rps" (higher is better) or "p50_us" (lower is better)
    target: float        # ratio floor for rps metrics, added-µs ceiling for p50


SCENARIOS = (
    Scenario("json_c32", "JSON c=32", "/v1/chat/completions", 32, True, "rps", 0.6),
    Scenario("sse_c32", "SSE c=32", "/sse", 32, False, "rps", 0.85),
    Scenario("p50_c1", "added p50 c=1", "/v1/chat/completions", 1, True, "p50_us", 200.0),
)

CHAT_REQUEST = json.dumps({"model": "perf-model", "max_tokens": 16,
                           "messages": [{"role": "user", "content": "Say hello."}]})

LUA_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%.1f,"p99_us":%.1f,'
    .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\\n',
    "PERF_JSON ", summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""  # prints one line starting with PERF_MARK


def lua_script(post_json: bool) -> str:
    """A wrk script: the POST body and headers when asked, and a machine-readable summary."""
    if not post_json:
        return LUA_DONE
    return (f'wrk.method = "POST"\nwrk.body = [[{CHAT_REQUEST}]]\n'
            'wrk.headers["Content-Type"] = "application/json"\n' + LUA_DONE)


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

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        self.started.append((name, proc, log_path))
        return proc

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
                        backend_url: str, **env: str) -> Target:
    """Start a proxy from a command template with {port}, {backend} and {python} placeholders."""
    port = free_port()
    argv = shlex.split(template.format(port=port, backend=backend_url,
                                       python=shlex.quote(sys.executable)))
    proc = procs.start(name, argv, env={**proxy_env(backend_url, port), **env})
    url = f"http://{LOOPBACK}:{port}"
    wait_ready(procs, proc, name, url + ready_path)
    return Target(name, url, proc.pid)


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
    status, body = http_get(target.base_url + "/v1/chat/completions", timeout=5,
                            data=CHAT_REQUEST.encode())
    if status != 200 or body != perf_backend.CHAT_BODY:
        raise HarnessError(f"{target.name}: POST /v1/chat/completions gave HTTP {status}, "
                           f"{len(body)} bytes (expected 200 and the backend's "
                           f"{len(perf_backend.CHAT_BODY)} bytes): {body[:200]!r}")
    status, body = http_get(target.base_url + "/sse", timeout=5)
    expected = b"".join(perf_backend.SSE_CHUNKS)
    if status != 200 or body != expected:
        raise HarnessError(f"{target.name}: GET /sse gave HTTP {status}, {len(body)} bytes "
                           f"(expected 200 and {len(expected)} bytes of SSE)")


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


def run_wrk(wrk: str, script: Path, url: str, connections: int, duration: int) -> dict:
    """One wrk run (one thread); returns its summary plus rps, or raises HarnessError."""
    argv = [wrk, "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s",
            "-s", str(script), url]
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

def write_scripts(tmp: Path) -> dict[str, Path]:
    scripts = {}
    for scenario in SCENARIOS:
        path = tmp / f"{scenario.key}.lua"
        path.write_text(lua_script(scenario.post_json))
        scripts[scenario.key] = path
    return scripts


def warm_up(wrk: str, scripts: dict[str, Path], targets: list[Target], seconds: int) -> None:
    for target in targets:
        for scenario in SCENARIOS[:2]:
            run_wrk(wrk, scripts[scenario.key], target.base_url + scenario.path,
                    scenario.connections, seconds)


def measure(wrk: str, scripts: dict[str, Path], targets: list[Target], scenarios: list[Scenario],
            rounds: int, duration: int) -> list[str]:
    """Interleaved rounds; fills ``target.rounds`` and returns the problems found."""
    problems = []
    for r in range(rounds):
        # Alternate the order each round so slow drift of the machine hits every target alike.
        order = targets if r % 2 == 0 else list(reversed(targets))
        for scenario in scenarios:
            for target in order:
                cpu_before = cpu_seconds(target.pid)
                result = run_wrk(wrk, scripts[scenario.key], target.base_url + scenario.path,
                                 scenario.connections, duration)
                cpu_after = cpu_seconds(target.pid)
                if cpu_before is not None and cpu_after is not None and result["requests"]:
                    # CPU per request barely moves with the machine's noise, unlike req/s
                    result["cpu_us_per_request"] = (cpu_after - cpu_before) / result["requests"] * 1e6
                target.rounds.setdefault(scenario.key, []).append(result)
                problem = check_run(result)
                if problem:
                    problems.append(f"round {r + 1} {scenario.key} {target.name}: {problem}")
                print(f"  round {r + 1}/{rounds}  {scenario.title:<14} {target.name:<8} "
                      f"{result['rps']:>9.0f} req/s  p50 {result['p50_us']:>7.0f} µs"
                      + (f"  !! {problem}" if problem else ""), flush=True)
    return problems


def median_of(target: Target, scenario: Scenario) -> float:
    return statistics.median(run[scenario.metric] for run in target.rounds[scenario.key])


def compare(direct: Target, proxy: Target, scenario: Scenario) -> dict:
    """One table cell: the direct and proxied medians, their ratio (or difference), pass/fail."""
    d, p = median_of(direct, scenario), median_of(proxy, scenario)
    if scenario.metric == "rps":
        value = p / d if d else 0.0
        passed = value >= scenario.target
    else:
        value = p - d
        passed = value <= scenario.target
    return {"direct": d, "proxied": p, "value": value, "target": scenario.target,
            "pass": passed, "kind": "ratio" if scenario.metric == "rps" else "added_us",
            "per_round": _per_round(direct, proxy, scenario),
            "cpu_us_per_request": {"direct": _cpu(direct, scenario), "proxy": _cpu(proxy, scenario)}}


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

def format_cell(cell: dict) -> tuple[str, str]:
    verdict = "PASS" if cell["pass"] else "FAIL"
    if cell["kind"] == "ratio":
        return (f"{cell['value']:.2f}× {verdict}",
                f"{cell['direct']:,.0f} → {cell['proxied']:,.0f}")
    return (f"{cell['value']:+,.0f} µs {verdict}",
            f"{cell['direct']:,.0f} → {cell['proxied']:,.0f} µs")


def markdown_table(rows: list[dict], scenarios: list[Scenario]) -> str:
    raw_names = {"json_c32": "req/s direct → proxied", "sse_c32": "streams/s direct → proxied",
                 "p50_c1": "p50 direct → proxied"}
    targets = {"json_c32": "≥ 0.6×", "sse_c32": "≥ 0.85×", "p50_c1": "≤ +200 µs"}
    header = ["proxy"]
    for s in scenarios:
        header += [f"{s.title} ({targets[s.key]})", raw_names[s.key]]
    with_cpu = any(s.key == "json_c32" for s in scenarios)
    if with_cpu:
        header.append("CPU µs/request, JSON c=32: proxy (backend direct)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["proxy"]]
        for s in scenarios:
            cells += list(format_cell(row["cells"][s.key]))
        if with_cpu:
            cpu = row["cells"]["json_c32"]["cpu_us_per_request"]
            cells.append(f"{cpu['proxy']:.0f} ({cpu['direct']:.0f})"
                         if cpu["proxy"] is not None and cpu["direct"] is not None else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_info(wrk: str) -> dict:
    try:
        import aiohttp
        aiohttp_version = aiohttp.__version__
    except ImportError:
        aiohttp_version = None
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    # compiled or plain Python (vespa/compiled.py), as the worker started here will see it
    request_path = subprocess.run([sys.executable, "-c", "import vespa; print(vespa.HOT_PATH)"],
                                  cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
            "platform": platform.platform(), "python": platform.python_version(),
            "aiohttp": aiohttp_version, "wrk": wrk_version.strip(),
            "vespa_request_path": request_path or "unknown"}


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


# -- profiling -----------------------------------------------------------------------------------

def find_py_spy() -> str:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise HarnessError("--profile needs py-spy:  pip install py-spy")
    return py_spy


def profile(procs: Processes, wrk: str, scripts: dict[str, Path], target: Target,
            duration: int, native: bool) -> dict:
    """Load ``target`` with JSON c=32 while py-spy samples it; save speedscope + top functions."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = RESULTS_DIR / f"profile-{target.name}-{stamp}.speedscope.json"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    rate = 200
    argv = [find_py_spy(), "record", "--pid", str(target.pid), "--duration", str(duration),
            "--rate", str(rate), "--format", "speedscope", "--function", "--subprocesses",
            "--output", str(out)] + (["--native"] if native else [])
    spy = procs.start("py-spy", argv)
    time.sleep(0.5)  # py-spy attaches; the load then runs a little longer than the sampling
    scenario = SCENARIOS[0]
    result = run_wrk(wrk, scripts[scenario.key], target.base_url + scenario.path,
                     scenario.connections, duration + 1)
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
    parser.add_argument("--only", default="json_c32,sse_c32,p50_c1",
                        help="comma-separated scenarios to run (default: all three)")
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
    parser.add_argument("--profile", action="store_true",
                        help="after measuring, py-spy the first proxy under JSON c=32 load")
    parser.add_argument("--profile-native", action="store_true",
                        help="with --profile: include C frames (py-spy --native)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "latest.json")
    args = parser.parse_args(argv)
    if args.duration < 1 or args.rounds < 1 or args.duration > 120 or args.rounds > 20:
        parser.error("--duration must be 1..120 and --rounds 1..20")
    known = {s.key for s in SCENARIOS}
    args.scenarios = [s for s in SCENARIOS if s.key in set(args.only.split(","))]
    if not args.scenarios or not set(args.only.split(",")) <= known:
        parser.error(f"--only takes a comma-separated subset of {', '.join(sorted(known))}")
    return args


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
    if args.with_nginx:
        nginx = start_nginx(procs, backend_url, tmp)
        if nginx:
            proxies.append(nginx)
    return proxies


def run(args: argparse.Namespace, procs: Processes, tmp: Path) -> int:
    wrk = find_wrk()
    scripts = write_scripts(tmp)
    info = machine_info(wrk)
    print(f"{info['cpus']} CPUs, load average {info['loadavg_at_start'][0]:.2f}, "
          f"{info['wrk']}, aiohttp {info['aiohttp']}; vespa's request path: "
          f"{info['vespa_request_path']}")
    direct = start_backend(procs)
    proxies = start_proxies(procs, args, direct.base_url, tmp)
    targets = [direct] + proxies
    for target in targets:
        sanity_check(target)
    print("targets: " + ", ".join(f"{t.name} {t.base_url}" for t in targets))
    if args.warmup:
        warm_up(wrk, scripts, targets, args.warmup)
    problems = measure(wrk, scripts, targets, args.scenarios, args.rounds, args.duration)

    rows = [{"proxy": p.name, "cells": {s.key: compare(direct, p, s) for s in args.scenarios}}
            for p in proxies]
    table = markdown_table(rows, args.scenarios)
    print(f"\nMedians of {args.rounds} interleaved rounds of {args.duration}s, wrk -t1, "
          f"{info['cpus']} CPUs (backend, proxy and wrk share them):\n")
    print(table)
    payload = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": info,
        "settings": {"duration_s": args.duration, "rounds": args.rounds,
                     "warmup_s": args.warmup, "proxy_cmd": args.proxy_cmd},
        "rows": rows, "table_markdown": table, "problems": problems,
        "raw": {t.name: t.rounds for t in targets},
    }
    if args.profile:
        payload["profile"] = profile(procs, wrk, scripts, proxies[0], args.duration,
                                     args.profile_native)
    write_json(args.output, payload)
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
