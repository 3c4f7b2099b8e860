"""Instructions a request: Vespa under callgrind, a number that does not move with the machine.

    python perf/instructions.py                       # this checkout, JSON POSTs at c=8
    python perf/instructions.py --tree /tmp/before    # another checkout (its .venvs/worker if any)
    python perf/instructions.py --tree /tmp/before --tree .   # an A/B in one go
    python perf/instructions.py --signed url          # signed as Vast's client sends (or full)
    python perf/instructions.py --output perf/results/DATE-instructions-dev.json   # + a file
    python perf/instructions.py --keep /tmp/cg        # and keep its dumps, for callgrind_annotate

Throughput ratios on a shared 2-core machine move by ±10 % from run to run; callgrind counts the
user-space instructions the worker executes, which repeat to within 0.2 % for the same code, so a
change worth 2 % shows. It starts ``perf/backend.py`` and the worker (under ``valgrind
--tool=callgrind``, about 50x slower), warms up, zeroes the counters, runs wrk for a few seconds
and divides the instructions by the requests answered. The worker's clock-driven work (reports,
health checks) is stretched past the counted window (``CLOCK_STRETCH``), so it is left out:
under callgrind it fell on 50 times fewer requests than at full speed. ``--signed url|full`` runs the worker as on Vast
(perf/signed.py's autoscaler holds the key) and sends what Vast's client sends, signed under
that scheme (perf/clients.py). It needs valgrind and wrk
(``apt-get install -y valgrind wrk``). Kernel time (the socket calls) is not counted: compare
with ``perf/run.py``'s CPU column for the whole cost. ``--output FILE`` also writes the counts as
JSON with the commit, date and machine (perf/provenance.py), for the README to quote.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent))
import clients  # noqa: E402
import provenance  # noqa: E402
import signed  # noqa: E402
from run import (LOOPBACK, HarnessError, Processes, check_run, find_wrk, free_port,  # noqa: E402
                 proxy_env, run_wrk, signed_env, start_autoscaler, start_backend, wait_ready)

VALGRIND_READY_TIMEOUT = 180.0  # start-up under callgrind takes a while


def callgrind_total(dump: Path) -> int:
    """The instruction count of one callgrind dump ("totals:" or "summary:" line)."""
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise HarnessError(f"no totals in {dump}")


def tree_python(tree: Path) -> str:
    """The tree's own env (with its own compiled build) when it has one, else this one."""
    python = tree / ".venvs" / "worker" / "bin" / "python"
    return str(python if python.exists() else sys.executable)


# Work the worker does by the clock (a look at the load every second, a report at least every
# ten, a backend health check every ten) falls on about 50 times fewer requests under callgrind
# than at full speed, and its share a request moved with the machine's speed from run to run.
# Stretched past the counted window, it is left out of the count: at full speed thousands of
# requests share each second's reports.
CLOCK_STRETCH: Final = {"VESPA_REPORT_INTERVAL": "50", "VESPA_REPORT_MAX_INTERVAL": "500",
                        "VESPA_HEALTHCHECK_INTERVAL": "500"}


def worker_env(backend_url: str, port: int, env: dict[str, str]) -> dict[str, str]:
    return {**proxy_env(backend_url, port), "VESPA_MAX_THROUGHPUT": "1000000", **CLOCK_STRETCH,
            **env}


def measure(tree: Path, procs: Processes, wrk: str, client: clients.PlainClient,
            backend_url: str, env: dict[str, str], tmp: Path, connections: int,
            seconds: int, keep: Path | None = None) -> tuple[int, int]:
    """(requests answered, instructions executed) by the worker of ``tree``."""
    port = free_port()
    out = tmp / f"callgrind-{port}.out"
    # a cache of its own: no replay mark of an earlier run refuses the pool's reqnums
    env = {**env, "VESPA_CACHE_DIR": str(tmp / f"cache-{port}")}
    proc = procs.start(f"vespa-{port}", [
        "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", tree_python(tree),
        str(tree / "server.py")], env=worker_env(backend_url, port, env))
    url = f"http://{LOOPBACK}:{port}"
    wait_ready(procs, proc, f"vespa ({tree})", url + "/_vespa/readyz", VALGRIND_READY_TIMEOUT)
    target = url + client.path("json_c32")
    script = clients.write_script(tmp, f"instructions-{port}", client.script("json_c32"))
    for duration in (3, seconds):  # a warm-up (caches, pool, route table), then the count
        if duration == seconds:
            subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True,
                           capture_output=True, timeout=60)
        result = run_wrk(wrk, script, target, connections, duration, client.wrk_args())
        client.used(result)
        problem = check_run(result)
        if problem:  # refused requests cost less: a count over them would be wrong
            raise HarnessError(f"{tree}: {problem}; the worker's log:\n{procs.log_tail(proc)}")
    subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True,
                   capture_output=True, timeout=60)
    dumps = sorted(tmp.glob(f"callgrind-{port}.out.*"))
    if not dumps:
        raise HarnessError(f"callgrind wrote no dump for {tree}")
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(dumps[-1], keep / dumps[-1].name)
        print(f"  kept {keep / dumps[-1].name} ({result['requests']:,} requests)")
    return result["requests"], callgrind_total(dumps[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=Path,
                        help="a checkout to measure (repeat for an A/B); default: this one")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--signed", choices=("none", "url", "full"), default="none",
                        help="the worker checks signatures, sent under this scheme")
    parser.add_argument("--output", type=Path, default=None,
                        help="also write the counts, commit, date and machine as JSON here")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="copy each counted callgrind dump here (for callgrind_annotate)")
    args = parser.parse_args(argv)
    trees = [t.resolve() for t in args.tree or [Path(__file__).resolve().parent.parent]]
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("perf: valgrind is not installed:  apt-get install -y valgrind", file=sys.stderr)
        return 1
    counted: list[dict] = []
    started_at, machine = provenance.timestamp(), provenance.machine()
    with tempfile.TemporaryDirectory(prefix="vespa-instructions-") as tmp_name:
        tmp = Path(tmp_name)
        procs = Processes(tmp)
        try:
            wrk = find_wrk()
            backend = start_backend(procs)
            env: dict[str, str] = {}
            if args.signed != "none":
                key, key_path = signed.autoscaler_key()
                env = signed_env(start_autoscaler(procs, key_path), 1)
            for tree in trees:
                client = clients.PlainClient()
                if args.signed == "url":
                    client = clients.EnvelopeClient(signed.url_signed_body(
                        key, signed.PUBLIC_URL, clients.CHAT_PAYLOAD))
                elif args.signed == "full":  # a fresh worker each tree: the pool from line 0
                    client = clients.PoolClient(signed.Pool(key_path, signed.PUBLIC_URL),
                                                restart=lambda: None)
                    client.prepare(20_000)
                started = time.monotonic()
                requests, instructions = measure(tree, procs, wrk, client, backend.base_url,
                                                 env, tmp, args.connections, args.seconds,
                                                 args.keep)
                what = "JSON POSTs" if args.signed == "none" else f"{args.signed}-signed POSTs"
                print(f"{tree}: {instructions / requests:,.0f} instructions a request "
                      f"({requests:,} {what} at c={args.connections}, "
                      f"{time.monotonic() - started:.0f}s)")
                counted.append({
                    "tree": str(tree), **provenance.checkout(tree),
                    "request_path": provenance.request_path(
                        tree_python(tree), tree, worker_env(backend.base_url, 0, env)),
                    "requests": requests, "instructions": instructions,
                    "instructions_per_request": instructions / requests})
        except HarnessError as exc:
            print(f"perf: {exc}", file=sys.stderr)
            return 1
        finally:
            procs.stop_all()
    if args.output:
        provenance.write_json(args.output, {
            "tool": "perf/instructions.py", "timestamp": started_at,
            "machine": {**provenance.checkout(), **machine,
                        "valgrind": provenance.tool_version(["valgrind", "--version"]),
                        "wrk": provenance.tool_version([wrk, "-v"])},
            "settings": {"signed": args.signed, "connections": args.connections,
                         "seconds": args.seconds,
                         "requests": "JSON POSTs" if args.signed == "none"
                         else f"{args.signed}-signed POSTs as Vast's client sends them"},
            "trees": counted})
        print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
