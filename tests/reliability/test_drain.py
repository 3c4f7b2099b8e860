"""SIGTERM with 50 streams in flight, on a real worker process: they all complete (or, past the
drain timeout, are cut cleanly), the process exits 0, and each request is reported once, also
when a report to the autoscaler is on its way at that moment."""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

import aiohttp
import pytest

from ..conftest import wait_until
from ..fleet import WatchedEmulator, autoscaler_key
from .harness import (UrlSigner, check_reported_once, query_auth, reports_settled,
                      signed_call)

STREAMS = 50


def base_url(server) -> str:
    return str(server.make_url("")).rstrip("/")


async def open_streams(session, worker, signer: UrlSigner, n_events: int, delay: float):
    """``STREAMS`` signed SSE streams, each past its first event."""
    async def one(i: int):
        auth_data = signer.auth_data(cost=3)
        response = await session.get(f"{worker.url}/slow-stream?name=s{i}&n={n_events}"
                                     f"&delay={delay}&{query_auth(auth_data)}")
        assert response.status == 200, await response.text()
        assert await response.content.readline() == b"data: 0\n"
        return auth_data["request_idx"], response

    return await asyncio.gather(*(one(i) for i in range(STREAMS)))


async def read_rest(response: aiohttp.ClientResponse) -> tuple[str, bytes]:
    try:
        return "complete", await asyncio.wait_for(response.read(), 30)
    except aiohttp.ClientPayloadError:
        return "cut", b""


@pytest.mark.time_limit(90)
async def test_sigterm_with_50_streams_in_flight_all_complete(worker_process, emulator, backend,
                                                              session, measure):
    worker = worker_process(base_url(backend), emulator, VESPA_DRAIN_TIMEOUT="20")
    await worker.wait_ready(session)
    signer = UrlSigner(emulator.signer, worker.url)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as streams_session:
        streams = await open_streams(streams_session, worker, signer, n_events=40, delay=0.05)
        term_at = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        await wait_until(lambda: "draining:" in worker.log_text(), timeout=10)
        # new work during the drain is refused, and that refusal is reported too
        refused = [await signed_call(session, worker.url, signer, "POST", "/echo", 2)
                   for _ in range(5)]
        ends = await asyncio.gather(*(read_rest(response) for _, response in streams))
        code = await worker.wait_exit(30)
        took = time.monotonic() - term_at
    assert code == 0, worker.log_text()[-3000:]
    assert [status for _, status, _ in refused] == [503] * 5
    assert [kind for kind, _ in ends] == ["complete"] * STREAMS
    assert all(body.endswith(b"data: 39\n\n") for _, body in ends)
    assert sorted(backend.log.finished) == sorted(f"s{i}" for i in range(STREAMS))
    streamed = {idx for idx, _ in streams}
    rejected = {idx for idx, _, _ in refused}
    await reports_settled(emulator, streamed | rejected, timeout=10, exited=True)
    check_reported_once(emulator, streamed | rejected)
    success = {d["request_idx"]: d["success"] for d in emulator.deleted}
    assert all(success[idx] for idx in streamed) and not any(success[idx] for idx in rejected)
    measure(streams=STREAMS, refused_during_drain=len(refused), exit_code=code,
            seconds_to_exit=round(took, 1))


@pytest.mark.time_limit(90)
async def test_sigterm_past_the_drain_timeout_cuts_cleanly(worker_process, emulator, backend,
                                                           session, measure):
    worker = worker_process(base_url(backend), emulator, VESPA_DRAIN_TIMEOUT="1")
    await worker.wait_ready(session)
    signer = UrlSigner(emulator.signer, worker.url)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as streams_session:
        streams = await open_streams(streams_session, worker, signer, n_events=1000, delay=0.05)
        term_at = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        ends = await asyncio.gather(*(read_rest(response) for _, response in streams))
        cut_within = time.monotonic() - term_at
        code = await worker.wait_exit(30)
        took = time.monotonic() - term_at
    assert code == 0, worker.log_text()[-3000:]
    assert [kind for kind, _ in ends] == ["cut"] * STREAMS, "a stream ended as if complete"
    # the drain timeout, then up to aiohttp's 1 s shutdown grace, then the cut
    assert cut_within < 1 + 5, f"streams cut {cut_within:.1f}s after SIGTERM (drain timeout 1s)"
    assert took < 1 + 10
    streamed = {idx for idx, _ in streams}
    await reports_settled(emulator, streamed, timeout=10, exited=True)
    check_reported_once(emulator, streamed)
    measure(streams=STREAMS, cut_after_seconds=round(cut_within, 1), exit_code=code,
            seconds_to_exit=round(took, 1))


class SlowDeletes(WatchedEmulator):
    """Takes every delete_requests body at once but answers it ``slow`` seconds later."""

    slow = 0.8

    async def handle_delete_requests(self, request):
        await request.read()
        await asyncio.sleep(self.slow)
        return await super().handle_delete_requests(request)


@pytest.mark.time_limit(60)
async def test_sigterm_while_a_delete_report_is_in_flight_reports_once(worker_process, backend,
                                                                      session, measure):
    """The autoscaler answers delete_requests in 0.8 s (well inside the reporter's timeout);
    SIGTERM arrives while one is on its way. Shutting down must not send those records again."""
    emulator = SlowDeletes(private_key=autoscaler_key())
    await emulator.start()
    try:
        worker = worker_process(base_url(backend), emulator, VESPA_DRAIN_TIMEOUT="5")
        await worker.wait_ready(session)
        signer = UrlSigner(emulator.signer, worker.url)
        served = [await signed_call(session, worker.url, signer, "POST", "/echo", 2)
                  for _ in range(10)]
        assert [status for _, status, _ in served] == [200] * 10
        # the reporter has posted records and waits for the answer (0.8 s from now)
        await wait_until(lambda: emulator.arrived["/delete_requests/"] >= 1, timeout=10)
        worker.proc.send_signal(signal.SIGTERM)
        code = await worker.wait_exit(30)
        assert code == 0, worker.log_text()[-3000:]
        must = {idx for idx, _, _ in served}
        await reports_settled(emulator, must, timeout=10, exited=True)
        deleted = Counter(emulator.deleted_request_idxs())
        measure(requests=len(must), reported_more_than_once=sum(n - 1 for n in deleted.values()))
        check_reported_once(emulator, must)
    finally:
        await emulator.stop()
