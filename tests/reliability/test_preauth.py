"""Pre-auth cost: what one unauthenticated client can make a signed worker process spend (issue
#17 item 1). While it sends the largest envelopes the worker will read, a prober asks
``/_vespa/healthz`` every 10 ms: the longest gap between its answers is the stall every other
client sees; the worker's RSS is sampled throughout. Numbers go to RESULTS.md (pre-auth row)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from .harness import RssSampler

MiB = 1024 * 1024


async def probe(session, url: str, stop: asyncio.Event, probing: asyncio.Event) -> float:
    """The longest time between two answers of ``url`` (seconds) until ``stop``; ``probing`` is
    set at the first answer."""
    longest, last = 0.0, time.monotonic()
    while not stop.is_set():
        async with session.get(url) as response:
            assert response.status == 200
        now = time.monotonic()
        longest, last = max(longest, now - last), now
        probing.set()
        await asyncio.sleep(0.01)
    return longest


def send(port: int, body: bytes) -> int:
    """POST ``body`` as an envelope over a blocking socket; the status of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body))
        try:
            sock.sendall(body)
        except OSError:  # refused before the body: the worker closed
            pass
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
        return int(head.split(b" ", 2)[1])


ENVELOPES = {
    # the most JSON values the worker parses before a signature (VESPA_MAX_ENVELOPE_VALUES)
    "values_at_the_limit": b'{"auth_data": {}, "payload": [' + b"[]," * 49_990 + b"[]]}",  # 2 per value
    # the most bytes it reads (VESPA_MAX_ENVELOPE_BYTES), as one string: cheap to parse
    "bytes_at_the_limit": b'{"auth_data": {}, "payload": "' + b"x" * (4 * MiB - 64) + b'"}',
    # what took 2.7 GB and 34 s before the limits: refused unread or unparsed now
    "hostile_99_mib": b'{"auth_data": {}, "payload": [' + b"[]," * (33 * MiB) + b"[]]}",
}


@pytest.mark.time_limit(120)
async def test_one_unauthenticated_client_costs_a_bounded_stall_and_memory(
        worker_process, emulator, backend, session, measure):
    worker = worker_process(str(backend.make_url("")).rstrip("/"), emulator)
    await worker.wait_ready(session)
    rss_before = worker.rss()
    statuses, stalls = {}, {}
    with RssSampler(worker, interval=0.05) as rss:
        for name, body in ENVELOPES.items():
            stop, probing = asyncio.Event(), asyncio.Event()
            prober = asyncio.create_task(probe(session, worker.url + "/_vespa/healthz", stop,
                                               probing))
            await asyncio.wait_for(probing.wait(), 10)
            for _ in range(3):  # from a thread: the test's own loop only probes
                statuses[name] = await asyncio.to_thread(send, worker.port, body)
            stop.set()
            stalls[name] = await prober
    assert statuses["hostile_99_mib"] == 413
    assert statuses["values_at_the_limit"] == 422  # parsed, then refused: not load
    assert statuses["bytes_at_the_limit"] == 422
    growth_mb = (rss.peak - rss_before) / MiB
    assert growth_mb < 200, f"RSS grew {growth_mb:.0f} MB"
    assert max(stalls.values()) < 2.0, stalls  # a sanity bound: the number is the measure
    measure(preauth=True, rss_growth_mb=round(growth_mb, 1),
            **{f"stall_ms_{name}": round(seconds * 1000) for name, seconds in stalls.items()})
