"""perf/run.py's pure parts: the event-latency scenario among the others, its cells in both
tables, and the command a results file records (no wrk, no timing)."""

from __future__ import annotations

from .perf_scripts import perf_module

run = perf_module("run")
report = perf_module("report")


def event_round(p50: float, p99: float, cpu: float) -> dict:
    return {"requests": 10, "rps": 20.0, "p50_us": p50, "p99_us": p99,
            "cpu_us_per_request": cpu}


def test_the_event_latency_scenario_runs_by_default_beside_wrks():
    args = run.parse_args(["--rounds", "1"])
    assert [s.key for s in args.scenarios] == ["json_c32", "sse_c32", "p50_c1", "sse_events"]
    events = args.scenarios[-1]
    assert events.tool == "events" and events.connections == run.sse_latency.CONNECTIONS


def test_the_command_a_run_records_leaves_out_where_its_results_went():
    args = run.parse_args(["--rounds", "2", "--output", "/tmp/x.json", "--with-nginx",
                           "--output=/tmp/y.json"])
    assert args.command == "perf/run.py --rounds 2 --with-nginx"


def test_an_event_cell_compares_latencies_and_both_tables_show_them():
    scenario = next(s for s in run.SCENARIOS if s.key == "sse_events")
    direct = run.Target("direct", "http://127.0.0.1:1",
                        rounds={"sse_events": [event_round(300, 2_000, 40.0)]})
    vespa = run.Target("vespa", "http://127.0.0.1:2",
                       rounds={"sse_events": [event_round(500, 4_000, 60.0)]})
    signed = run.Target("vespa signed url", "http://127.0.0.1:3",
                        rounds={"sse_events": [event_round(550, 4_500, 70.0)]})
    cell = run.compare(direct, vespa, scenario)
    assert cell["kind"] == "event_latency" and cell["pass"] is None
    assert cell["proxied"] == {"p50_us": 500, "p99_us": 4_000}
    assert cell["cpu_us_per_request"] == {"direct": 40.0, "proxy": 60.0}
    table = report.markdown_table([{"proxy": "vespa", "cells": {"sse_events": cell}}],
                                  [scenario])
    assert "| vespa | 500 / 4,000 µs | 300 / 2,000 µs |" in table
    against = run.signed_rows(vespa, [vespa, signed], [scenario])
    assert [row["proxy"] for row in against] == ["vespa signed url"]
    assert "| vespa signed url | 550 / 4,500 µs | 500 / 4,000 µs |" in report.signed_table(
        against, [scenario])


def test_a_paced_run_asks_a_signing_client_for_no_more_than_its_pace_allows():
    scenario = next(s for s in run.SCENARIOS if s.key == "sse_events")
    need = run.expected_requests([], scenario, 5)
    assert need == run.sse_latency.streams_at_most(scenario.connections, 5)
    assert need < 5_000  # not the 20,000 a second a wrk scenario assumes before it has a rate
