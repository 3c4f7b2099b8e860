"""The per-event SSE latency (issue #18 item 5): reading stamped events as their bytes arrive,
the percentiles and medians the harness reports, and the client against the real perf backend's
stamped stream. Nothing here asserts how fast anything is."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestServer

from .perf_scripts import perf_module

sse_latency = perf_module("sse_latency")
perf_backend = perf_module("backend")
report = perf_module("report")


def stamped(sent_ns: int, index: int = 0) -> bytes:
    """An event as perf/backend.py's /sse/stamped writes it."""
    return b'data: {"sent_ns":%d,%s' % (sent_ns, perf_backend.STAMPED_TAILS[index])


def test_each_event_counts_from_its_send_time_to_the_read_that_completed_it():
    reader = sse_latency.StreamReader()
    first, second = stamped(1_000), stamped(2_000, 1)
    reader.feed(first + second[:10], read_ns=5_000)  # the second event is not whole yet
    assert reader.latencies_ns == [4_000]
    reader.feed(second[10:] + b"data: [DONE]\n\n", read_ns=9_000)
    assert reader.latencies_ns == [4_000, 7_000]
    assert reader.done
    assert reader.problem(expected_events=2) is None


def test_a_whole_stamped_stream_from_the_backends_own_bytes_reads_whole():
    reader = sse_latency.StreamReader()
    body = b"".join(stamped(100 + i, i) for i in range(perf_backend.SSE_EVENTS))
    body += perf_backend.SSE_CHUNKS[-1]
    for at in range(0, len(body), 7):  # in small pieces, as a proxy may relay them
        reader.feed(body[at:at + 7], read_ns=10_000)
    assert len(reader.latencies_ns) == sse_latency.SSE_EVENTS
    assert reader.problem() is None
    # the backend's pace and count are the ones the client and the README describe
    assert perf_backend.EVENT_INTERVAL_S == sse_latency.EVENT_INTERVAL_S
    assert perf_backend.SSE_EVENTS == sse_latency.SSE_EVENTS


@pytest.mark.parametrize("body, expected", [
    (stamped(1) + stamped(2, 1), "no [DONE] at the end"),
    (stamped(1) + b"data: [DONE]\n\n", "1 of 2 events"),
    (stamped(1) + b'data: {"no":"stamp"}\n\n' + b"data: [DONE]\n\n",
     "1 events without a send time"),
    (stamped(1) + stamped(2, 1) + b"data: [DONE]\n\ndata: tr", "bytes after the last event"),
])
def test_a_stream_cut_short_or_unstamped_is_not_whole(body, expected):
    reader = sse_latency.StreamReader()
    reader.feed(body, read_ns=10)
    assert reader.problem(expected_events=2) == expected


def test_percentiles_are_nearest_rank():
    values = list(range(100, 0, -1))  # 1..100, unordered
    assert sse_latency.percentile(values, 50) == 50
    assert sse_latency.percentile(values, 99) == 99
    assert sse_latency.percentile(values, 100) == 100
    assert sse_latency.percentile([7], 99) == 7


def test_a_runs_summary_has_a_wrk_runs_shape_in_microseconds():
    run = sse_latency.summary([1_000, 2_000, 3_000, 400_000], streams=2, seconds=0.5,
                              errors={"read": 1})
    assert run["requests"] == 2 and run["rps"] == 4.0 and run["events"] == 4
    assert run["p50_us"] == 2.0 and run["p99_us"] == 400.0
    assert run["errors"] == {"connect": 0, "read": 1, "write": 0, "status": 0, "timeout": 0}
    empty = sse_latency.summary([], streams=0, seconds=1.0, errors={})
    assert empty["p50_us"] is None and sse_latency.format_latency(empty) == "n/a"


def test_a_cell_holds_the_medians_of_the_rounds_p50_and_p99_and_the_tables_show_them():
    def rounds(*pairs):
        return [{"p50_us": p50, "p99_us": p99} for p50, p99 in pairs]

    cell = sse_latency.cell(rounds((100, 900), (300, 700), (200, 5_000)),
                            rounds((400, 1_000), (600, 3_000), (500, 2_000)))
    assert cell["direct"] == {"p50_us": 200, "p99_us": 900}
    assert cell["proxied"] == {"p50_us": 500, "p99_us": 2_000}
    assert report.format_cell(cell) == ("500 / 2,000 µs", "200 / 900 µs")


def test_the_pool_of_signed_requests_is_never_outrun_by_paced_streams():
    # each stream takes its events' pauses at least, so no run reads more than this
    connections, seconds = 16, 5
    fastest = connections * seconds / (sse_latency.SSE_EVENTS * sse_latency.EVENT_INTERVAL_S)
    assert sse_latency.streams_at_most(connections, seconds) > fastest + connections


async def test_the_client_reads_the_backends_stamped_streams_whole():
    server = TestServer(perf_backend.make_app(), host="127.0.0.1")
    await server.start_server()
    try:
        run = await sse_latency.run_client(
            str(server.make_url("")).rstrip("/"),
            lambda: ("GET", sse_latency.STAMPED_SSE_PATH, None, {}), connections=2,
            duration=0.0)  # no time: one stream on each connection
    finally:
        await server.close()
    assert run["requests"] == 2
    assert run["events"] == 2 * sse_latency.SSE_EVENTS
    assert not any(run["errors"].values()), run["errors"]
    assert 0 < run["p50_us"] <= run["p99_us"]  # read after it was sent, on one clock


async def test_a_refused_stream_is_counted_as_an_error_not_a_latency():
    server = TestServer(perf_backend.make_app(), host="127.0.0.1")
    await server.start_server()
    try:
        run = await sse_latency.run_client(
            str(server.make_url("")).rstrip("/"), lambda: ("GET", "/no-such-stream", None, {}),
            connections=1, duration=0.0)
    finally:
        await server.close()
    assert run["requests"] == 0 and run["events"] == 0
    assert run["errors"]["status"] == 1
