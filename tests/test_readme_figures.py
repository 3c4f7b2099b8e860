"""Every figure in the README comes from a results file a measuring tool wrote (issue #18 item
4): the README's copies are compared with their sources here, so a hand-edited or stale number
fails the fast suite. The reliability table comes from tests/reliability/RESULTS.md; the
performance figures from the results files perf/quoted.json names (perf/figures.py renders
them)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from .perf_scripts import perf_module
from .reliability.results import README, RESULTS_PATH, readme_block, readme_section

ROOT = README.parent
figures = perf_module("figures")


def committed(path) -> str:
    """``path`` as the checkout's commit has it: a run of the reliability suite (the full run's
    first pass, say) rewrites RESULTS.md, and the README quotes the committed one."""
    shown = subprocess.run(["git", "show", f"HEAD:{path.relative_to(ROOT).as_posix()}"],
                           cwd=ROOT, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else path.read_text()


def committed_text(relative: str) -> str:
    return committed(ROOT / relative)


def test_the_readmes_reliability_table_is_results_md():
    assert readme_section(committed(README)) == readme_block(committed(RESULTS_PATH)), (
        "README's reliability table differs from tests/reliability/RESULTS.md: run "
        "python tests/reliability/results.py")


def test_results_md_says_when_where_and_from_which_commit():
    written = next(line for line in committed(RESULTS_PATH).splitlines()
                   if line.startswith("Written by"))
    assert "commit " in written and "cores" in written, written


# -- performance --------------------------------------------------------------------------------

@pytest.mark.parametrize("document", sorted(figures.DOCUMENTS))
def test_the_perf_figures_are_what_the_quoted_results_files_say(document):
    assert figures.render(document, committed_text) == committed_text(document), (
        f"{document}'s performance figures differ from the files {figures.QUOTED} names: run "
        "python perf/figures.py (after a new measurement: python perf/figures.py --measure)")


def test_every_quoted_results_file_is_committed_and_says_what_wrote_it_when_and_where():
    quoted = json.loads(committed_text(figures.QUOTED))
    assert set(quoted) == set(figures.MEASUREMENTS)  # every tool's file, and nothing else
    for name, path in quoted.items():
        shown = subprocess.run(["git", "cat-file", "-e", f"HEAD:{path}"], cwd=ROOT)
        assert shown.returncode == 0, f"{path} is quoted but not committed (git add -f {path})"
        data = json.loads(committed_text(path))
        machine = data["machine"]
        assert re.fullmatch(r"[0-9a-f]{40}", machine["commit"]), (path, machine["commit"])
        assert re.match(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}", data["timestamp"]), path
        assert machine["cpus"] and machine["python"] and machine["platform"], path
        tool = figures.MEASUREMENTS[name][0][0]  # the harness's files predate "tool"
        assert data.get("tool", "perf/run.py") == tool, (path, tool)


# figures typed by hand: a number with a unit of speed, cost or ratio
TYPED_FIGURE = re.compile(r"\d[\d,.]*\s?(?:µs|ms a|×|req/s|streams/s|k instructions|"
                          r"M instructions|instructions a request)")


def test_no_perf_figure_is_typed_outside_the_generated_blocks():
    text = committed(README)
    for name in figures.DOCUMENTS["README.md"]:
        text = figures.with_block(text, name, "")
    text = text.replace(readme_section(text), "")  # the reliability block is checked above
    typed = [line for line in text.splitlines() if TYPED_FIGURE.search(line)]
    assert not typed, ("README figures belong in results files and perf/figures.py's blocks "
                       "(or perf/HISTORY.md, for past ones):\n" + "\n".join(typed))


# -- the generator on made-up results -----------------------------------------------------------

def run_file(with_events: bool) -> dict:
    def cell(value, direct, proxied, kind="ratio", target=None, passed=None, cpu=(50.0, 40.0)):
        return {"value": value, "direct": direct, "proxied": proxied, "kind": kind,
                "target": target, "pass": passed,
                "cpu_us_per_request": {"proxy": cpu[0], "direct": cpu[1]}}

    def events(p50, p99):
        return {"kind": "event_latency", "direct": {"p50_us": 300.0, "p99_us": 2_000.0},
                "proxied": {"p50_us": p50, "p99_us": p99}, "value": p50,
                "cpu_us_per_request": {"proxy": None, "direct": None}}

    def cells(ratio, p50, cpu, latency):
        made = {"json_c32": cell(ratio, 1_000.0, ratio * 1_000, cpu=(cpu, 40.0)),
                "sse_c32": cell(0.9, 100.0, 90.0),
                "p50_c1": cell(p50, 100.0, 100.0 + p50, kind="added_us")}
        if with_events:
            made["sse_events"] = events(*latency)
        return made

    return {
        "timestamp": "2026-12-07T01:02:03+0000",
        "machine": {"commit": "a" * 40, "uncommitted_changes": False, "cpus": 2,
                    "python": "3.11.7", "platform": "Linux-6-x86_64-with-glibc2.36",
                    "vespa_request_path": "compiled (mypyc, 23 modules)",
                    "loadavg_at_start": [0.5, 0.5, 0.5], "vastai": "1.9.1"},
        "settings": {"command": "perf/run.py --rounds 3", "rounds": 3, "duration_s": 5,
                     "sse_events": {"events": 50, "interval_ms": 2.0, "connections": 16}},
        "rows": [{"proxy": "vespa", "cells": cells(0.6, 200.0, 60.0, (450.0, 3_000.0))},
                 {"proxy": "vespa signed url", "cells": cells(0.5, 230.0, 70.0,
                                                              (470.0, 3_100.0))},
                 {"proxy": "vast worker", "cells": cells(0.05, 3_000.0, 900.0,
                                                         (99_000.0, 120_000.0))}],
        "signed_rows": [{"proxy": "vespa signed url", "cells": {
            "json_c32": cell(0.83, 600.0, 500.0, target=0.9, passed=False),
            "p50_c1": cell(30.0, 300.0, 330.0, kind="added_us", target=50.0, passed=True)}}],
    }


def sources_of(files: dict[str, dict]) -> object:
    quoted = {name: f"perf/results/{name}.json" for name in files}
    texts = {f"perf/results/{name}.json": json.dumps(data) for name, data in files.items()}
    return figures.Sources(lambda path: json.dumps(quoted) if path == figures.QUOTED
                           else texts[path])


def test_the_table_shows_each_rows_event_latency_and_its_source():
    table = figures.block_table(sources_of({"harness": run_file(with_events=True)}))
    lines = table.splitlines()
    assert "| direct (the backend alone) | 1,000 req/s |  | 100 streams/s | 300 / 2,000 µs |" \
        in table
    vespa = next(line for line in lines if line.startswith("| vespa (dev mode) |"))
    assert "0.60× (600 req/s)" in vespa and "450 / 3,000 µs" in vespa and "+200 µs" in vespa
    url = next(line for line in lines if line.startswith("| vespa signed url |"))
    assert "0.83× (missed)" in url and "+30 µs (met)" in url and "470 / 3,100 µs" in url
    assert any(line.startswith("| Vast's worker (vastai 1.9.1), signed url |") and
               "99,000 / 120,000 µs" in line for line in lines)
    assert ("From `perf/results/harness.json`, written by `perf/run.py` at commit aaaaaaa on "
            "2026-12-07") in table
    assert "`python perf/run.py --rounds 3`" in table
    assert "**SSE event latency p50 / p99**" in table and "one every 2 ms" in table
    assert "predates" not in table


def test_a_run_without_event_latencies_says_so_instead_of_a_figure():
    table = figures.block_table(sources_of({"harness": run_file(with_events=False)}))
    vespa = next(line for line in table.splitlines() if line.startswith("| vespa (dev mode) |"))
    assert "| n/a |" in vespa
    assert "SSE event latency is n/a: this run predates it" in table


def instructions_file(path: str, per_request: float) -> dict:
    return {"tool": "perf/instructions.py", "timestamp": "2026-12-07T00:00:00+0000",
            "machine": {"commit": "b" * 40, "cpus": 2, "python": "3.11.7",
                        "platform": "Linux-6-x86_64"},
            "settings": {"connections": 8},
            "trees": [{"request_path": path, "instructions_per_request": per_request}]}


def test_the_hot_path_figure_refuses_a_file_of_the_wrong_build():
    compiled = instructions_file("compiled (mypyc, 23 modules)", 131_600.0)
    plain = instructions_file("plain Python (VESPA_PURE_PYTHON is set)", 230_400.0)
    said = figures.block_hot_path(sources_of({"instructions_dev": compiled,
                                              "instructions_plain": plain}))
    assert "132k instructions in the worker compiled and 230k as plain Python" in said
    with pytest.raises(figures.FiguresError, match="quoted as compiled"):
        figures.block_hot_path(sources_of({"instructions_dev": plain,
                                           "instructions_plain": plain}))


def test_blocks_are_replaced_between_their_markers_and_nowhere_else():
    text = "a <!-- perf:x:start -->old<!-- perf:x:end --> b"
    assert figures.with_block(text, "x", "new") == "a <!-- perf:x:start -->new<!-- perf:x:end --> b"
    with pytest.raises(figures.FiguresError, match="expected one"):
        figures.with_block(text + text, "x", "new")
    with pytest.raises(figures.FiguresError, match="expected one"):
        figures.block_in("no markers", "x")
