"""Per-event SSE latency: how long each event takes from the backend's write to the client's read.

A proxy's SSE streams/s (wrk, ``sse_c32``) can exceed the backend's own by coalescing events into
fewer writes, and a proxy that buffered whole streams would score well there too. This measures
what a streaming client sees: perf/backend.py's ``/sse/stamped`` writes ``SSE_EVENTS`` events
spaced by ``EVENT_INTERVAL_S``, each carrying the CLOCK_MONOTONIC time it was written
(``"sent_ns"``; the backend and the harness run on one machine, so the clock is the same); the
client here reads streams, ``connections`` at a time for ``duration`` seconds, and records for each
event the time its last byte was read minus the time it was written. A run reports the p50 and p99
of those latencies (and streams/s); the table shows their medians across rounds.

The pure parts come first (reading events from chunks, percentiles, a run's summary, a table
cell); the aiohttp client after them.
"""

from __future__ import annotations

import asyncio
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

SSE_EVENTS = 50             # stamped events a stream carries, then ``data: [DONE]``
EVENT_INTERVAL_S = 0.002    # the backend's pause before each event: a token stream, not a burst
CONNECTIONS = 16            # streams read at a time: a modest load, so the latency is the hop's
STAMPED_SSE_PATH = "/sse/stamped"
STREAM_TIMEOUT_S = 30.0
STAMP = re.compile(rb'"sent_ns":(\d+)')
DONE = b"data: [DONE]"


# -- pure: events, percentiles, summaries ---------------------------------------------------------

@dataclass
class StreamReader:
    """One stream's events as its bytes arrive: the latency of each stamped event (read time
    minus its ``sent_ns``), whether ``[DONE]`` came, and what could not be read."""

    latencies_ns: list[int] = field(default_factory=list)
    done: bool = False
    unstamped: int = 0
    _pending: bytes = b""

    def feed(self, data: bytes, read_ns: int) -> None:
        """Bytes read at ``read_ns``: every event they complete was read then."""
        *events, self._pending = (self._pending + data).split(b"\n\n")
        for event in events:
            if event.startswith(DONE):
                self.done = True
                continue
            stamp = STAMP.search(event)
            if stamp is None:
                self.unstamped += 1
            else:
                self.latencies_ns.append(read_ns - int(stamp.group(1)))

    def problem(self, expected_events: int = SSE_EVENTS) -> str | None:
        """Why this stream does not count as whole, or None."""
        if self.unstamped:
            return f"{self.unstamped} events without a send time"
        if len(self.latencies_ns) != expected_events:
            return f"{len(self.latencies_ns)} of {expected_events} events"
        if not self.done or self._pending.strip():
            return "no [DONE] at the end" if not self.done else "bytes after the last event"
        return None


def percentile(values: list[int] | list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile of ``values`` (not empty)."""
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)])


def summary(latencies_ns: list[int], streams: int, seconds: float, errors: dict[str, int]) -> dict:
    """One run, in the shape of a wrk run's summary (``requests`` are streams, ``rps`` streams
    per second, ``p50_us``/``p99_us`` the per-event latencies), so the harness treats both alike."""
    known = {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0}
    return {"requests": streams, "duration_us": round(seconds * 1e6),
            "rps": streams / seconds if seconds > 0 else 0.0,
            "events": len(latencies_ns),
            "p50_us": percentile(latencies_ns, 50) / 1e3 if latencies_ns else None,
            "p99_us": percentile(latencies_ns, 99) / 1e3 if latencies_ns else None,
            "errors": {**known, **errors}}


def cell(direct_runs: list[dict], proxy_runs: list[dict]) -> dict:
    """A table cell: the medians across rounds of each run's p50 and p99, direct and proxied."""
    def medians(runs: list[dict]) -> dict:
        return {q: statistics.median(r[q] for r in runs) if all(r[q] is not None for r in runs)
                else None for q in ("p50_us", "p99_us")}

    direct, proxied = medians(direct_runs), medians(proxy_runs)
    return {"kind": "event_latency", "direct": direct, "proxied": proxied,
            "value": proxied["p50_us"], "target": None, "pass": None,
            "per_round": [[r["p50_us"], r["p99_us"]] for r in proxy_runs]}


def settings() -> dict:
    """What a run's streams were, for its results file."""
    return {"events": SSE_EVENTS, "interval_ms": EVENT_INTERVAL_S * 1e3,
            "connections": CONNECTIONS, "path": STAMPED_SSE_PATH}


def streams_at_most(connections: int, seconds: float) -> int:
    """More streams than ``connections`` can read in ``seconds`` (each takes its events' pauses
    at least), for a client that signs each stream's request ahead."""
    return int(connections * (seconds / (SSE_EVENTS * EVENT_INTERVAL_S) + 2) * 1.5) + 10


def format_latency(latency: dict) -> str:
    """``p50 / p99 µs`` of a cell's side, or n/a when a run lost its events."""
    if latency.get("p50_us") is None or latency.get("p99_us") is None:
        return "n/a"
    return f"{latency['p50_us']:,.0f} / {latency['p99_us']:,.0f} µs"


# -- the client -----------------------------------------------------------------------------------

# What one stream is sent: (method, path, body, headers); a new one per stream (a pool client
# gives each its own signature).
RequestMaker = Callable[[], tuple[str, str, bytes | None, dict[str, str]]]


async def read_stream(session, base_url: str, make_request: RequestMaker,
                      errors: dict[str, int]) -> StreamReader | None:
    """One stream, read as it arrives; None (and ``errors`` counted) when it failed."""
    import aiohttp

    method, path, body, headers = make_request()
    reader = StreamReader()
    try:
        async with session.request(method, base_url + path, data=body,
                                   headers=headers) as response:
            if response.status != 200:
                await response.read()
                errors["status"] = errors.get("status", 0) + 1
                return None
            async for data in response.content.iter_any():
                reader.feed(data, time.monotonic_ns())
    except asyncio.TimeoutError:
        errors["timeout"] = errors.get("timeout", 0) + 1
        return None
    except aiohttp.ClientConnectorError:
        errors["connect"] = errors.get("connect", 0) + 1
        return None
    except aiohttp.ClientError:
        errors["read"] = errors.get("read", 0) + 1
        return None
    if reader.problem():
        errors["read"] = errors.get("read", 0) + 1
        return None
    return reader


async def run_client(base_url: str, make_request: RequestMaker, connections: int,
                     duration: float) -> dict:
    """``connections`` streams at a time, each starting another until ``duration`` is over."""
    import aiohttp

    latencies: list[int] = []
    errors: dict[str, int] = {}
    streams = 0
    deadline = time.monotonic() + duration

    async def one_connection(session) -> None:
        nonlocal streams
        while True:  # at least one stream each, then more until the deadline
            reader = await read_stream(session, base_url, make_request, errors)
            if reader is not None:
                latencies.extend(reader.latencies_ns)
                streams += 1
            if time.monotonic() >= deadline:
                return

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=STREAM_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout,
                                     auto_decompress=False) as session:
        await asyncio.gather(*(one_connection(session) for _ in range(connections)))
    return summary(latencies, streams, time.monotonic() - started, errors)


def measure(base_url: str, make_request: RequestMaker, connections: int,
            duration: float) -> dict:
    """One run (on uvloop when it is installed, as the backend and the worker run)."""
    coro = run_client(base_url, make_request, connections, duration)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def one_stream(base_url: str, make_request: RequestMaker) -> str | None:
    """The sanity check: one stream read whole, or why not."""
    result = measure(base_url, make_request, 1, 0.0)  # no time: one stream, then stop
    if result["requests"] == 1:
        return None
    return f"the stamped stream failed: {result['errors']}"
