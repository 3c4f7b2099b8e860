"""What the reliability suite measured, collected while it runs and rendered as a markdown table.

Tests add numbers through the ``measure`` fixture (inputs tried, load figures); the conftest hooks
add each test's outcome and write ``RESULTS.md`` at the end of the session.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"
# Which table row a test module feeds.
CATEGORIES = {"test_faults": "fault", "test_drain": "fault", "test_hostile": "input",
              "test_smuggling": "input", "test_connections": "input",
              "test_targets": "input", "test_load": "load", "test_preauth": "preauth"}


@dataclass
class Case:
    nodeid: str
    category: str
    outcome: str = "not run"
    seconds: float = 0.0
    numbers: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.nodeid.split("::", 1)[-1]


@dataclass
class Run:
    cases: dict[str, Case] = field(default_factory=dict)
    collected: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)

    def case(self, nodeid: str) -> Case:
        if nodeid not in self.cases:
            module = nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
            self.cases[nodeid] = Case(nodeid, CATEGORIES.get(module, "other"))
        return self.cases[nodeid]

    def outcome(self, nodeid: str, outcome: str, seconds: float) -> None:
        case = self.case(nodeid)
        if case.outcome in ("failed", "error") and outcome == "passed":
            return  # teardown after a failed call does not make the test pass
        case.outcome = outcome
        case.seconds += seconds

    # -- rendering ---------------------------------------------------------------------------
    def render(self) -> str:
        cases = [c for c in self.cases.values() if c.outcome != "not run"]
        faults = [c for c in cases if c.category == "fault"]
        inputs = [c for c in cases if c.category == "input"]
        loads = [c for c in cases if c.category == "load" and c.numbers.get("requests")]
        lines = ["# Reliability suite results", "",
                 f"Written by `tests/reliability/conftest.py` at the end of a pytest session "
                 f"({time.strftime('%Y-%m-%d %H:%M:%S')}, commit {commit()}, {machine()}; "
                 f"{len(cases)} reliability tests ran, "
                 f"{time.monotonic() - self.started:.0f} s session).", "",
                 "| | measured |", "|---|---|"]
        survived = ", ".join(sorted({short(c) for c in faults if c.outcome == "passed"}))
        lines.append(f"| Faults survived | {passed(faults)} of {len(faults)} fault cases "
                     f"({survived or '-'}){failed_note(faults)} |")
        tried = sum(c.numbers.get("inputs", 0) for c in inputs)
        five_xx = sum(c.numbers.get("5xx", 0) for c in inputs)
        lines.append(f"| Hostile inputs tried | {tried:,} inputs in {len(inputs)} cases, "
                     f"{passed(inputs)} cases held; answered 5xx: {five_xx}"
                     f"{failed_note(inputs)} |")
        for load in loads:
            n = load.numbers
            expected = ", ".join(f"{k} {v:,}" for k, v in sorted(n.get("expected", {}).items()))
            lines.append(
                f"| Load held ({short(load)}, {load.outcome}) | {num(n['requests'])} requests at "
                f"{n['concurrency']} connections in {n['seconds']:.0f} s "
                f"({n['requests'] / max(n['seconds'], 1e-9):,.0f} req/s); errors expected "
                f"{num(n['expected_total'])} ({expected}), unexpected {num(n['unexpected'])}; "
                f"worker RSS {n['rss_before_mb']:.0f} MB before, {n['rss_after_mb']:.0f} MB "
                f"after, peak {n['rss_peak_mb']:.0f} MB; reported {num(n['reported'])}, lost "
                f"{num(n['lost'])}, reported twice {num(n['doubled'])} |")
        if not loads:
            lines.append("| Load held | not run in this session |")
        for case in (c for c in cases if c.category == "preauth"):
            n = case.numbers
            stalls = ", ".join(f"{k.removeprefix('stall_ms_').replace('_', ' ')} {v} ms"
                               for k, v in n.items() if k.startswith("stall_ms_"))
            lines.append(f"| Pre-auth cost ({case.outcome}) | one unauthenticated client "
                         f"sending the largest envelopes a signed worker reads: RSS grew "
                         f"{fmt(n.get('rss_growth_mb', '-'))} MB at most; longest stall other "
                         f"clients saw: {stalls or '-'} |")
        lines += ["", "| case | result | time | numbers |", "|---|---|---|---|"]
        for case in sorted(cases, key=lambda c: (c.category, c.nodeid)):
            numbers = ", ".join(f"{k}={fmt(v)}" for k, v in case.numbers.items()
                                if not isinstance(v, dict))
            lines.append(f"| {case.category}: `{case.name}` | {case.outcome} | "
                         f"{case.seconds:.1f} s | {numbers} |")
        return "\n".join(lines) + "\n"


def commit() -> str:
    """The checkout's commit, with ``+`` when its tracked files differ from it."""
    root = RESULTS_PATH.parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, text=True, capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    dirty = "\n".join(line for line in dirty.splitlines() if not line.endswith("RESULTS.md"))
    return (head or "unknown") + ("+" if dirty.strip() else "")


def machine() -> str:
    return (f"{os.cpu_count()} cores, Python {platform.python_version()}, "
            f"{platform.machine()}")


def passed(cases: list[Case]) -> int:
    return sum(c.outcome == "passed" for c in cases)


def failed_note(cases: list[Case]) -> str:
    bad = sorted({short(c) for c in cases if c.outcome in ("failed", "error")})
    skipped = sorted({short(c) for c in cases if c.outcome == "skipped"})
    note = f"; **failed: {', '.join(bad)}**" if bad else ""
    return note + (f"; skipped: {', '.join(skipped)}" if skipped else "")


def short(case: Case) -> str:
    return case.name.removeprefix("test_").split("[", 1)[0].replace("_", " ")


def num(value) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


RUN = Run()


# -- the README's copy ---------------------------------------------------------------------------
README = RESULTS_PATH.parents[2] / "README.md"
START, END = "<!-- reliability:start -->", "<!-- reliability:end -->"


def readme_block(results: str) -> str:
    """What the README shows of a RESULTS.md: when and where it was written, and its summary
    table (the per-case table stays in RESULTS.md)."""
    lines = results.splitlines()
    written = next(line for line in lines if line.startswith("Written by"))
    table = []
    for line in lines[lines.index("| | measured |"):]:
        if not line.startswith("|"):
            break
        table.append(line)
    note = written.replace("Written by `tests/reliability/conftest.py` at the end of a pytest "
                           "session", "From `tests/reliability/RESULTS.md`, written by the suite")
    return "\n".join([note, "", *table])


def readme_section(readme: str) -> str:
    return readme.split(START, 1)[1].split(END, 1)[0].strip()


def rewrite_readme() -> bool:
    """Put RESULTS.md's summary into the README; True when it changed."""
    text = README.read_text()
    head, rest = text.split(START, 1)
    new = f"{head}{START}\n{readme_block(RESULTS_PATH.read_text())}\n{END}{rest.split(END, 1)[1]}"
    if new != text:
        README.write_text(new)
    return new != text


if __name__ == "__main__":  # python tests/reliability/results.py: the README from RESULTS.md
    print("README.md: reliability table " + ("rewritten" if rewrite_readme() else "current"))
