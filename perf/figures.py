"""The README's performance figures, rendered from committed results files (issue #18 item 4).

    python perf/figures.py              # rewrite the generated blocks from perf/quoted.json's files
    python perf/figures.py --check      # exit 1 when a block differs from what the files say
    python perf/figures.py --measure    # run every tool below, quote its new files, rewrite
    python perf/figures.py --measure harness,rsa_verify   # only some of them

Which results file each figure comes from is declared in one place, ``perf/quoted.json`` (a
name -> path under perf/results/); every file there was written by the tool that measured it
(``MEASUREMENTS``), with its commit, date and machine. The README and perf/README.md hold the
figures between ``<!-- perf:NAME:start -->`` and ``<!-- perf:NAME:end -->`` markers, and each
block says which file, commit and date its figures came from; the prose around the blocks has no
numbers. ``tests/test_readme_figures.py`` fails when a committed block differs from what this
renders from the committed files. Past figures no results file holds are in perf/HISTORY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

PERF_DIR = Path(__file__).resolve().parent
REPO_ROOT = PERF_DIR.parent
QUOTED = "perf/quoted.json"  # name -> results file: the one place the documents' sources are named
DOCUMENTS = {"README.md": ("table", "findings", "hot-path", "rsa-security", "rsa-deps"),
             "perf/README.md": ("rsa-table",)}

sys.path.insert(0, str(PERF_DIR))
import sse_latency  # noqa: E402  (the stamped stream's settings, a latency cell's format)

# name -> (the tool and its arguments, extra environment, the file's name after the date):
# what ``--measure`` runs, each with ``--output perf/results/<date>-<suffix>.json``.
MEASUREMENTS = {
    "harness": (["perf/run.py", "--rounds", "5", "--with-vast", "--with-nginx"], {}, "run"),
    "instructions_dev": (["perf/instructions.py", "--signed", "none"], {}, "instructions-dev"),
    "instructions_url": (["perf/instructions.py", "--signed", "url"], {}, "instructions-url"),
    "instructions_full": (["perf/instructions.py", "--signed", "full"], {}, "instructions-full"),
    "instructions_plain": (["perf/instructions.py", "--signed", "none"],
                           {"VESPA_PURE_PYTHON": "1"}, "instructions-plain"),
    "rsa_verify": (["perf/rsa_verify.py"], {}, "rsa-verify"),
}

Reader = Callable[[str], str]  # a repository path -> its text (the checkout's, or a commit's)


class FiguresError(Exception):
    """A quoted file is missing or does not hold what its block needs."""


# -- sources -------------------------------------------------------------------------------------

class Sources:
    """The quoted results files, read through ``read`` (the working tree or a commit)."""

    def __init__(self, read: Reader):
        self.read = read
        self.paths: dict[str, str] = json.loads(read(QUOTED))
        self._loaded: dict[str, dict] = {}

    def __call__(self, name: str) -> dict:
        if name not in self.paths:
            raise FiguresError(f"{QUOTED} names no {name!r} file")
        if name not in self._loaded:
            self._loaded[name] = json.loads(self.read(self.paths[name]))
        return self._loaded[name]

    def cite(self, *names: str) -> str:
        """Where figures came from: the files, the tool that wrote them, its commit, the date
        and the machine (files written alike are named together)."""
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(provenance(self(name)), []).append(f"`{self.paths[name]}`")
        return "; ".join(f"{and_list(files)}, {written}" for written, files in groups.items())


def and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def provenance(data: dict) -> str:
    """Who wrote a results file, from which commit, when and where."""
    machine = data["machine"]
    commit = (machine.get("commit") or "unknown")[:7]
    if machine.get("uncommitted_changes"):
        commit += " with uncommitted changes"
    return (f"written by `{data.get('tool', 'perf/run.py')}` at commit {commit} on "
            f"{data['timestamp'][:10]}, {machine['cpus']} cores, Python {machine['python']}, "
            f"{machine['platform'].split('-with-')[0]}")


# -- the harness table ---------------------------------------------------------------------------

def display_name(proxy: str, machine: dict) -> str:
    if proxy == "vespa":
        return "vespa (dev mode)"
    if proxy == "vast worker":
        version = f" (vastai {machine['vastai']})" if machine.get("vastai") else ""
        return f"Vast's worker{version}, signed url"
    if proxy == "nginx" and machine.get("nginx"):
        return f"nginx {machine['nginx']}"
    return proxy


def ratio(cell: dict | None, unit: str) -> str:
    if cell is None:
        return "–"
    return f"{cell['value']:.2f}× ({cell['proxied']:,.0f} {unit})"


def verdict(cell: dict | None, shown: str) -> str:
    if cell is None:
        return "–"
    return shown + {True: " (met)", False: " (missed)", None: ""}[cell["pass"]]


def cpu(cell: dict | None, side: str) -> str:
    value = cell["cpu_us_per_request"][side] if cell else None
    return f"{value:,.0f}" if value is not None else "–"


def harness_table(run: dict) -> list[str]:
    machine = run["machine"]
    rows = run["rows"]
    against = {row["proxy"]: row["cells"] for row in run.get("signed_rows", [])}
    first = rows[0]["cells"] if rows else {}
    targets = {key: next((c[key]["target"] for c in against.values()
                          if key in c and c[key]["target"] is not None), None)
               for key in ("json_c32", "p50_c1")}
    # issue #20's targets of the signed rows against dev mode, as the run recorded them
    json_goal = "url ≥ 0.9×, full ≥ 0.8×" if targets["json_c32"] else ""
    p50_goal = f"url ≤ +{targets['p50_c1']:.0f} µs" if targets["p50_c1"] else ""
    header = ["row", "JSON c=32 × direct", f"× vespa ({json_goal})" if json_goal else "× vespa",
              "SSE c=32 × direct", "SSE event latency p50 / p99", "added p50 c=1",
              f"over vespa ({p50_goal})" if p50_goal else "over vespa",
              "CPU µs a request, JSON c=32"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def direct(key: str, unit: str) -> str:
        return f"{first[key]['direct']:,.0f} {unit}" if key in first else "–"

    events = first.get("sse_events")
    lines.append("| " + " | ".join([
        "direct (the backend alone)", direct("json_c32", "req/s"), "",
        direct("sse_c32", "streams/s"),
        sse_latency.format_latency(events["direct"]) if events else "n/a",
        f"{first['p50_c1']['direct']:,.0f} µs" if "p50_c1" in first else "–", "",
        cpu(first.get("json_c32"), "direct")]) + " |")
    for row in rows:
        cells, signed = row["cells"], against.get(row["proxy"], {})
        base = "1" if row["proxy"] == "vespa" and against else ""
        p50 = cells.get("p50_c1")
        lines.append("| " + " | ".join([
            display_name(row["proxy"], machine), ratio(cells.get("json_c32"), "req/s"),
            verdict(signed.get("json_c32"), f"{signed['json_c32']['value']:.2f}×")
            if "json_c32" in signed else base,
            ratio(cells.get("sse_c32"), "streams/s"),
            sse_latency.format_latency(cells["sse_events"]["proxied"])
            if "sse_events" in cells else "n/a",
            f"{p50['value']:+,.0f} µs" if p50 else "–",
            verdict(signed.get("p50_c1"), f"{signed['p50_c1']['value']:+,.0f} µs")
            if "p50_c1" in signed else "",
            cpu(cells.get("json_c32"), "proxy")]) + " |")
    return lines


def settings_note(run: dict) -> str:
    settings = run["settings"]
    command = f"`python {settings['command']}`: " if settings.get("command") else ""
    path = run["machine"].get("vespa_request_path", "unknown")
    load = run["machine"].get("loadavg_at_start")
    return (f"{command}medians of {settings['rounds']} interleaved rounds of "
            f"{settings['duration_s']} s, wrk with one thread, the worker {path}"
            + (f", load average {load[0]:.2f} at the start" if load else ""))


def block_table(sources: Sources) -> str:
    run = sources("harness")
    events = run["settings"].get("sse_events") or {}
    measured = any("sse_events" in row["cells"] for row in run["rows"])
    lines = harness_table(run)
    lines += ["", f"From {sources.cite('harness')}; {settings_note(run)}. Backend, proxies, wrk "
                  "and the harness share the machine, so only ratios within one run mean "
                  "anything."]
    if not measured:
        lines += ["", "SSE event latency is n/a: this run predates it; the next "
                      "`python perf/figures.py --measure harness` fills it in."]
    interval = events.get("interval_ms", sse_latency.EVENT_INTERVAL_S * 1e3)
    count = events.get("events", sse_latency.SSE_EVENTS)
    streams = events.get("connections", 16)
    lines += ["", "What each column means:", "",
              "- **JSON c=32 × direct**: requests a second through the row ÷ to the backend "
              "directly (wrk, 32 connections, a small chat POST); the row's own rate beside it. "
              "On two shared cores a Python proxy is CPU-bound here, so it is the cost of a "
              "request.",
              "- **× vespa**: the same against the vespa row (dev mode) of the same run: what "
              "the production path costs over dev mode, against issue #20's targets.",
              "- **SSE c=32 × direct**: completed streams a second (50 events and `[DONE]`, "
              "written back to back) through the row ÷ direct. It exceeds 1 when the row "
              "relays several events in one write, so wrk has less to read; it says nothing "
              "about how late each event arrives.",
              f"- **SSE event latency p50 / p99**: for each event of a paced stream ({count} "
              f"events, one every {interval:g} ms, {streams} streams at a time), the time from "
              "the backend's write (the send time it carries) to the harness's read of it, "
              "over every event of a round; the medians of the rounds' p50 and p99. The direct "
              "row is the floor; a row that buffers or holds back events shows here, whatever "
              "its streams a second.",
              "- **added p50 c=1**: wrk's median latency at one connection through the row minus "
              "direct: what one request pays for the hop when nothing else runs; **over vespa** "
              "the same minus the vespa row's.",
              "- **CPU µs a request**: the user and system CPU of the row's processes during "
              "the JSON c=32 runs ÷ the requests they answered (the direct row: the backend's "
              "own)."]
    return "\n" + "\n".join(lines) + "\n"


# -- what the rows say against each other --------------------------------------------------------

def instructions_per_request(sources: Sources, name: str, path_starts: str) -> float:
    """The one tree's count of an instructions file, checked to be the build it is quoted for."""
    trees = sources(name)["trees"]
    if len(trees) != 1:
        raise FiguresError(f"{sources.paths[name]} counts {len(trees)} trees; quote a file of one")
    if not trees[0]["request_path"].startswith(path_starts):
        raise FiguresError(f"{sources.paths[name]} ran {trees[0]['request_path']!r}, quoted as "
                           f"{path_starts}")
    return trees[0]["instructions_per_request"]


def kilo(count: float) -> str:
    return f"{count / 1e3:,.0f}k"


def block_findings(sources: Sources) -> str:
    run = sources("harness")
    cells = {row["proxy"]: row["cells"].get("json_c32") for row in run["rows"]}

    def against(row: str, base: str) -> str | None:
        a, b = cells.get(row), cells.get(base)
        if not a or not b:
            return None
        extra = ""
        if a["cpu_us_per_request"]["proxy"] is not None \
                and b["cpu_us_per_request"]["proxy"] is not None:
            extra = (f", {a['cpu_us_per_request']['proxy'] - b['cpu_us_per_request']['proxy']:+,.0f}"
                     " µs of CPU a request")
        return f"{a['proxied'] / b['proxied']:.2f}× the throughput{extra}"

    lines = ["Row against row in that run, at JSON c=32:", ""]
    for row, base, what in (
            ("vespa unsigned", "vespa", "**Envelope and reports** (vespa unsigned against dev "
             "mode)"),
            ("vespa signed url", "vespa unsigned", "**The url-only signature check** (signed "
             "url against unsigned)"),
            ("vespa signed full", "vespa signed url", "**A full signature's RSA operation** "
             "(signed full against signed url)"),
            ("vast worker", "vespa signed url", "**Vast's own worker** (against vespa signed "
             "url)")):
        said = against(row, base)
        if said:
            lines.append(f"- {what}: {said}.")
    floor = full_scheme_floor(sources, cells.get("vespa"), cells.get("vespa signed url"))
    if floor:
        lines += ["", floor]
    dev = instructions_per_request(sources, "instructions_dev", "compiled")
    url = instructions_per_request(sources, "instructions_url", "compiled")
    full = instructions_per_request(sources, "instructions_full", "compiled")
    settings = sources("instructions_dev")["settings"]
    lines += ["", f"Instructions a request in the worker under callgrind (the worker compiled, "
                  f"POSTs at c={settings['connections']}, user space only; they repeat from run "
                  f"to run where the throughput does not): dev mode {kilo(dev)}, signed url-only "
                  f"{kilo(url)}, signed full {kilo(full)}. The envelope, the reports and the "
                  f"url-only check add {kilo(url - dev)}; a full signature {kilo(full - url)} "
                  f"more. From "
                  f"{sources.cite('instructions_dev', 'instructions_url', 'instructions_full')}."]
    return "\n" + "\n".join(lines) + "\n"


FULL_TARGET = 0.8  # issue #20: signed full >= 0.8x of dev mode at JSON c=32


def full_scheme_floor(sources: Sources, dev: dict | None, url: dict | None) -> str | None:
    """What the full scheme may add to the url-only path and still reach ``FULL_TARGET`` of dev
    mode, if throughput follows the worker's CPU a request (both from the harness's run),
    against one RSA operation alone (perf/rsa_verify.py, a tight loop: its best case)."""
    rsa = rsa_rows(sources).get("cryptography_recover", {}).get("full")
    if not rsa or dev is None or url is None:
        return None
    dev_cpu, url_cpu = dev["cpu_us_per_request"]["proxy"], url["cpu_us_per_request"]["proxy"]
    if not dev_cpu or not url_cpu:
        return None
    allowed = dev_cpu / FULL_TARGET
    left = allowed - url_cpu
    leaves = f"leaves {left:,.0f} µs" if left >= 0.5 else "leaves nothing"
    verdict = "less than" if left < rsa else "as much as"
    return (f"**What the full scheme may cost**: at {FULL_TARGET}× of dev mode a worker bound by "
            f"its CPU may spend {allowed:,.0f} µs a request (dev mode's {dev_cpu:,.0f} µs ÷ "
            f"{FULL_TARGET}); the url-only path spends {url_cpu:,.0f} µs, which {leaves} for "
            f"what full signatures add: {verdict} one RSA operation alone, {rsa:,.0f} µs at best "
            f"(the `cryptography_recover` row of {sources.cite('rsa_verify')}).")


def block_hot_path(sources: Sources) -> str:
    compiled = instructions_per_request(sources, "instructions_dev", "compiled")
    plain = instructions_per_request(sources, "instructions_plain", "plain")
    return (f"Under callgrind a JSON request costs {kilo(compiled)} instructions in the worker "
            f"compiled and {kilo(plain)} as plain Python (from "
            f"{sources.cite('instructions_dev', 'instructions_plain')}).")


# -- signature verification ----------------------------------------------------------------------

def rsa_rows(sources: Sources) -> dict[str, dict[str, float]]:
    return {row["key"]: row["us_per_request"] for row in sources("rsa_verify")["rows"]}


def span(values, unit: str = "") -> str:
    low, high = min(values), max(values)
    return f"{low:,.0f}{unit}" if round(low) == round(high) else f"{low:,.0f}–{high:,.0f}{unit}"


def block_rsa_security(sources: Sources) -> str:
    rows = rsa_rows(sources)
    return (f"{span(rows['vespa_fresh'].values(), ' µs')} here against "
            f"{span(rows['pycryptodome_public'].values(), ' µs')} through pycryptodome's public "
            f"API, the design's first choice (from {sources.cite('rsa_verify')})")


def block_rsa_deps(sources: Sources) -> str:
    rows = rsa_rows(sources)
    faster = [rows["pycryptodome_public"][case] / rows["vespa_fresh"][case]
              for case in rows["vespa_fresh"]]
    return (f"{span(faster, '×')} faster here than pycryptodome's public API, "
            f"`{sources.paths['rsa_verify']}`")


def block_rsa_table(sources: Sources) -> str:
    data = sources("rsa_verify")
    cases = data["settings"]["cases"]
    lines = ["| way | library | " + " | ".join(cases) + " |",
             "|---|---|" + "---:|" * len(cases)]
    for row in data["rows"]:
        lines.append(f"| {row['way']} | {row['library']} | "
                     + " | ".join(f"{row['us_per_request'][c]:,.1f}" for c in cases) + " |")
    settings = data["settings"]
    lines += ["", f"µs a request, best of {settings['repeat']} × {settings['number']} calls, "
                  f"{settings['key_bits']}-bit key; from {sources.cite('rsa_verify')}."]
    return "\n" + "\n".join(lines) + "\n"


BLOCKS: dict[str, Callable[[Sources], str]] = {
    "table": block_table, "findings": block_findings, "hot-path": block_hot_path,
    "rsa-security": block_rsa_security, "rsa-deps": block_rsa_deps,
    "rsa-table": block_rsa_table,
}


# -- the documents -------------------------------------------------------------------------------

def markers(name: str) -> tuple[str, str]:
    return f"<!-- perf:{name}:start -->", f"<!-- perf:{name}:end -->"


def block_in(text: str, name: str) -> str:
    """What a document holds between a block's markers."""
    start, end = markers(name)
    if text.count(start) != 1 or text.count(end) != 1:
        raise FiguresError(f"expected one {start} and one {end}")
    return text.split(start, 1)[1].split(end, 1)[0]


def with_block(text: str, name: str, content: str) -> str:
    start, end = markers(name)
    block_in(text, name)  # both markers, once each
    head, rest = text.split(start, 1)
    return f"{head}{start}{content}{end}{rest.split(end, 1)[1]}"


def render(document: str, read: Reader) -> str:
    """``document`` with every block it holds rendered from the quoted files."""
    sources = Sources(read)
    text = read(document)
    for name in DOCUMENTS[document]:
        text = with_block(text, name, BLOCKS[name](sources))
    return text


def stale(read: Reader) -> list[str]:
    """The documents whose blocks differ from what their quoted files say."""
    return [document for document in DOCUMENTS if render(document, read) != read(document)]


def working_tree(path: str) -> str:
    return (REPO_ROOT / path).read_text()


def rewrite() -> list[str]:
    """Rewrite every document from the quoted files; the ones that changed."""
    changed = []
    for document in DOCUMENTS:
        text = render(document, working_tree)
        if text != working_tree(document):
            (REPO_ROOT / document).write_text(text)
            changed.append(document)
    return changed


# -- measuring ------------------------------------------------------------------------------------

def measure(names: list[str]) -> int:
    """Run each tool, quote the files of those that succeeded, rewrite the documents."""
    quoted = json.loads(working_tree(QUOTED))
    date, failed, written = time.strftime("%Y-%m-%d"), [], []
    for name in names:
        argv, env, suffix = MEASUREMENTS[name]
        output = f"perf/results/{date}-{suffix}.json"
        print(f"\n== {name}: {' '.join(argv)} --output {output}", flush=True)
        done = subprocess.run([sys.executable, *argv, "--output", output], cwd=REPO_ROOT,
                              env={**os.environ, **env})
        if done.returncode != 0 or not (REPO_ROOT / output).exists():
            failed.append(f"{name} (exit {done.returncode})")
            continue
        quoted[name] = output
        written.append(output)
    (REPO_ROOT / QUOTED).write_text(json.dumps(quoted, indent=2) + "\n")
    changed = rewrite()
    print(f"\nquoted: {', '.join(written) or 'nothing new'}; rewritten: "
          f"{', '.join(changed) or 'nothing'}")
    if written:
        print("commit them:  git add -f " + " ".join(written) + f" {QUOTED} "
              + " ".join(DOCUMENTS))
    if failed:
        print("not quoted (the tool failed; its old file stays quoted): " + ", ".join(failed),
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a document differs from its quoted files")
    parser.add_argument("--measure", nargs="?", const=",".join(MEASUREMENTS), default=None,
                        help=f"run these tools first (default all: {','.join(MEASUREMENTS)})")
    args = parser.parse_args(argv)
    try:
        if args.check:
            differ = stale(working_tree)
            for document in differ:
                print(f"{document}: its perf figures differ from {QUOTED}'s files: "
                      "run python perf/figures.py", file=sys.stderr)
            return 1 if differ else 0
        if args.measure is not None:
            names = args.measure.split(",")
            unknown = set(names) - set(MEASUREMENTS)
            if unknown:
                parser.error(f"--measure takes some of {','.join(MEASUREMENTS)}")
            return measure(names)
        changed = rewrite()
        print(f"rewritten: {', '.join(changed)}" if changed else "current")
        return 0
    except FiguresError as exc:
        print(f"perf/figures.py: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
