"""The harness's printed tables, from its rows (pure: dicts in, markdown out).

``markdown_table``: each proxy against the backend called directly, with issue #2's targets;
``signed_table``: the production path's rows against Vespa in dev mode, with issue #20's. A
scenario is anything with ``key`` and ``title``; a row is ``{"proxy": name, "cells": {key:
cell}}`` as perf/run.py's ``compare`` (and perf/sse_latency.py's ``cell``) make them.
"""

from __future__ import annotations

import sse_latency

# column titles, by scenario key: the raw figures' column, the targets against direct
RAW = {"json_c32": "req/s direct → proxied", "sse_c32": "streams/s direct → proxied",
       "p50_c1": "p50 direct → proxied", "sse_events": "event latency p50 / p99 direct"}
TARGETS = {"json_c32": " (≥ 0.6×)", "sse_c32": " (≥ 0.85×)", "p50_c1": " (≤ +200 µs)",
           "sse_events": " p50 / p99"}
RAW_AGAINST = {"json_c32": "req/s vespa → this", "sse_c32": "streams/s vespa → this",
               "p50_c1": "p50 vespa → this", "sse_events": "event latency p50 / p99 vespa"}
TITLES_AGAINST = {"json_c32": "JSON c=32 × vespa (url ≥ 0.9×, full ≥ 0.8×)",
                  "sse_c32": "SSE c=32 × vespa", "p50_c1": "p50 c=1 over vespa (url ≤ +50 µs)",
                  "sse_events": "SSE event latency p50 / p99"}


def format_cell(cell: dict) -> tuple[str, str]:
    """A cell's two columns: the comparison (with PASS/FAIL against a target) and the raw."""
    if cell["kind"] == "event_latency":
        return (sse_latency.format_latency(cell["proxied"]),
                sse_latency.format_latency(cell["direct"]))
    verdict = {True: " PASS", False: " FAIL", None: ""}[cell["pass"]]
    if cell["kind"] == "ratio":
        return (f"{cell['value']:.2f}×{verdict}",
                f"{cell['direct']:,.0f} → {cell['proxied']:,.0f}")
    return (f"{cell['value']:+,.0f} µs{verdict}",
            f"{cell['direct']:,.0f} → {cell['proxied']:,.0f} µs")


def table(header: list[str], lines: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(cells) + " |" for cells in lines])


def signed_table(rows: list[dict], scenarios: list) -> str:
    header = ["path"] + [part for s in scenarios
                         for part in (TITLES_AGAINST[s.key], RAW_AGAINST[s.key])]
    return table(header, [[row["proxy"]] + [part for s in scenarios
                                            for part in format_cell(row["cells"][s.key])]
                          for row in rows])


def markdown_table(rows: list[dict], scenarios: list) -> str:
    header = ["proxy"]
    for s in scenarios:
        header += [f"{s.title}{TARGETS[s.key]}", RAW[s.key]]
    with_cpu = any(s.key == "json_c32" for s in scenarios)
    if with_cpu:
        header.append("CPU µs/request, JSON c=32: proxy (backend direct)")
    lines = []
    for row in rows:
        cells = [row["proxy"]]
        for s in scenarios:
            cells += list(format_cell(row["cells"][s.key]))
        if with_cpu:
            cpu = row["cells"]["json_c32"]["cpu_us_per_request"]
            cells.append(f"{cpu['proxy']:.0f} ({cpu['direct']:.0f})"
                         if cpu["proxy"] is not None and cpu["direct"] is not None else "n/a")
        lines.append(cells)
    return table(header, lines)
