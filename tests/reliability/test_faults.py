"""Faults: the backend dies, restarts, hangs, trickles or speaks broken HTTP; the autoscaler is
unreachable, answers 500s or dawdles; the key server is down at start; the disk is full.

Every case ends with the invariant: each request the worker accepted or rejected was answered once
and reported exactly once, and the worker still answers /_vespa/healthz and a normal request.
Outages are scaled from "a minute" down to VESPA_RELIABILITY_OUTAGE_SECONDS (default 3 s).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter

import aiohttp
import pytest

from vespa.devtools.autoscaler import AutoscalerEmulator

from ..conftest import wait_until
from ..fleet import Fleet, WatchedEmulator, autoscaler_key, ready
from .backend_main import make_app
from .harness import assert_serving, check_reported_once, query_auth, signed_call
from .rawhttp import CannedBackend

OUTAGE = float(os.environ.get("VESPA_RELIABILITY_OUTAGE_SECONDS", "3"))


def base_url(server) -> str:
    return str(server.make_url("")).rstrip("/")


async def settle(f: Fleet, timeout: float = 30) -> None:
    """Nothing in flight, every finished record delivered, a last status report sent."""
    ledger = f.worker.ledger
    await wait_until(lambda: not ledger.in_flight, timeout=timeout)
    await wait_until(lambda: f.worker.reporter.settled, timeout=timeout)
    await f.worker.reporter.report_status(force=True)


def success_of(f: Fleet) -> dict[int, bool]:
    return {d["request_idx"]: d["success"] for d in f.emulator.deleted}


@pytest.fixture
async def rich_backend():
    """The test backend with the reliability routes (/trickle), in this process."""
    from aiohttp.test_utils import TestServer
    server = TestServer(make_app(), host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


# -- the backend dies ----------------------------------------------------------------------------

async def test_backend_killed_mid_stream_and_mid_queue_then_restarted(signed, backend_process,
                                                                     measure):
    backend = backend_process()
    f = await signed(backend.url, VESPA_MAX_CONCURRENCY="6", VESPA_MAX_WAIT_TIME="30",
                     VESPA_HEALTHCHECK_FAILURES="2")
    await backend.wait_up(f.session)
    await ready(f)
    signer = f.emulator.signer
    streams = []
    for i in range(4):  # relaying a stream when the backend dies
        auth_data = signer.auth_data(f.url, cost=5)
        response = await f.session.get(
            f"{f.url}/slow-stream?name=s{i}&n=400&delay=0.05&{query_auth(auth_data)}")
        assert response.status == 200
        assert await response.content.readline() == b"data: 0\n"
        streams.append((auth_data["request_idx"], response))
    # two waiting for the backend's answer, five waiting in the worker's line
    waiting = [asyncio.create_task(signed_call(f.session, f.url, signer, "GET",
                                               "/slow?delay=60", 3)) for _ in range(2)]
    await wait_until(lambda: f.worker.admission.running == 6)
    queued = [asyncio.create_task(signed_call(f.session, f.url, signer, "POST", "/echo", 3))
              for _ in range(5)]
    await wait_until(lambda: f.worker.admission.queued == 5)
    # the four streams' and the two waiting requests' connections to the backend are open
    await wait_until(lambda: len(f.worker.upstream.pool.open) >= 6)

    killed_at = time.monotonic()
    backend.sigkill()
    cut = []
    for idx, response in streams:
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), 10)
        cut.append(idx)
    answered = await asyncio.wait_for(asyncio.gather(*waiting, *queued), 15)
    assert time.monotonic() - killed_at < 10
    statuses = Counter(status for _, status, _ in answered)
    assert statuses == {502: 7}, statuses

    backend.start()  # the same port: the backend restarts
    await backend.wait_up(f.session)
    await wait_until(lambda: f.worker.state.ready, timeout=15)
    must = set(cut) | {idx for idx, _, _ in answered}
    await assert_serving(f.session, f.url, signer, must)
    await settle(f)
    check_reported_once(f.emulator, must)
    success = success_of(f)
    assert not any(success[idx] for idx in set(cut) | {idx for idx, _, _ in answered})
    measure(requests=len(must), cut_streams=len(cut), failed_502=statuses[502])


async def test_supervised_backend_restarts_under_steady_traffic(signed, measure, tmp_path):
    from ..conftest import PYTHON, free_port
    port = free_port()  # the launched backend's, so its URL is the one given
    f = await signed(f"http://127.0.0.1:{port}", VESPA_BACKEND_PORT=str(port),
                     VESPA_BACKEND_COMMAND=f"{PYTHON} tests/procs/backend_proc.py --port {{port}}",
                     VESPA_BACKEND_RESTARTS="2", VESPA_BACKEND_LOG=str(tmp_path / "backend.log"),
                     VESPA_HEALTHCHECK_FAILURES="1")
    await wait_until(lambda: f.worker.state.ready, timeout=20)
    signer = f.emulator.signer
    results: list[tuple[int, object, bytes]] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            results.append(await signed_call(f.session, f.url, signer, "POST", "/echo", 2,
                                             timeout=10))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(traffic())
    await wait_until(lambda: sum(s == 200 for _, s, _ in results) >= 10)  # served, steadily
    first_pid = f.worker.supervisor.process.pid
    f.worker.supervisor.process.kill()  # SIGKILL, no goodbye
    await wait_until(lambda: f.worker.supervisor.restarts == 1, timeout=10)
    await wait_until(lambda: f.worker.supervisor.process.pid != first_pid, timeout=10)
    await wait_until(lambda: f.worker.state.ready and any(
        s == 200 for _, s, _ in results[-3:]) and results[-1][1] == 200, timeout=20)
    served_again = len(results)
    await wait_until(lambda: len(results) >= served_again + 10)  # and steadily again
    stop.set()
    await asyncio.wait_for(task, 15)

    statuses = Counter(status for _, status, _ in results)
    assert set(statuses) <= {200, 502}, statuses
    assert statuses[502] > 0, "the traffic never met the dead backend"
    must = {idx for idx, _, _ in results}
    await assert_serving(f.session, f.url, signer, must)
    await settle(f)
    check_reported_once(f.emulator, must)
    success = success_of(f)
    assert all(success[idx] == (status == 200) for idx, status, _ in results)
    measure(requests=len(results), ok=statuses[200], failed_502=statuses[502])


# -- the backend hangs, trickles, lies -----------------------------------------------------------

async def test_backend_that_hangs_is_504_after_the_request_timeout(signed, backend, measure):
    f = await signed(base_url(backend), VESPA_REQUEST_TIMEOUT="0.5")
    await ready(f)
    signer = f.emulator.signer
    started = time.monotonic()
    hung = await asyncio.gather(*(signed_call(f.session, f.url, signer, "POST",
                                              f"/hang?name=h{i}", 4) for i in range(5)),
                                *(signed_call(f.session, f.url, signer, "GET",
                                              f"/hang?name=g{i}", 4) for i in range(5)))
    assert time.monotonic() - started < 5  # the 0.5 s timeout, generously (the backend: 1 h)
    assert [status for _, status, _ in hung] == [504] * 10
    # the worker hung up on the backend: it saw every request cancelled
    await wait_until(lambda: len(backend.log.cancelled) == 10, timeout=5)
    must = {idx for idx, _, _ in hung}
    await assert_serving(f.session, f.url, signer, must)
    await settle(f)
    check_reported_once(f.emulator, must)
    assert not any(success_of(f)[idx] for idx, _, _ in hung)
    measure(requests=len(hung), answered_504=10)


def trickled(data: bytes, every: float) -> list[tuple[bytes, float]]:
    return [(data[i:i + 1], every) for i in range(len(data))]


async def test_backend_that_trickles_is_not_cut_while_bytes_flow(signed, rich_backend, measure):
    """One byte a second, and a head one byte at a time: slow is not silent, so no 504."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    canned = await CannedBackend({"slow-head": trickled(head, 0.05),
                                  "silent": [(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\na",
                                              5.0)]}).start()
    try:
        body_fleet = await signed(base_url(rich_backend), VESPA_REQUEST_TIMEOUT="1.5")
        head_fleet = await signed(canned.url, VESPA_REQUEST_TIMEOUT="0.5")
        await ready(body_fleet)
        await ready(head_fleet)
        started = time.monotonic()
        body_case = signed_call(body_fleet.session, body_fleet.url, body_fleet.emulator.signer,
                                "GET", "/trickle?n=6&interval=1", 3)
        head_case = signed_call(head_fleet.session, head_fleet.url, head_fleet.emulator.signer,
                                "GET", "/m/slow-head", 3)
        silent_case = signed_call(head_fleet.session, head_fleet.url,
                                  head_fleet.emulator.signer, "GET", "/m/silent", 3)
        (b_idx, b_status, b_body), (h_idx, h_status, h_body), (s_idx, s_status, _) = \
            await asyncio.gather(body_case, head_case, silent_case)
        took = time.monotonic() - started
        assert (b_status, b_body) == (200, b"012345"), (b_status, b_body)
        assert (h_status, h_body) == (200, b"abc"), (h_status, h_body)
        assert s_status == 502, "a body that stops for longer than the timeout must end"
        assert took >= 5, "the trickle was not slow: the test proves nothing"
        for f, must, ok in ((body_fleet, {b_idx}, True), (head_fleet, {h_idx, s_idx}, None)):
            await assert_serving(f.session, f.url, f.emulator.signer, must)
            await settle(f)
            check_reported_once(f.emulator, must)
        assert success_of(body_fleet)[b_idx] and success_of(head_fleet)[h_idx]
        measure(trickle_seconds=round(took, 1))
    finally:
        await canned.stop()


MALFORMED = {
    # name: (reply steps, what the client may see)
    "not-http": ([(b"SSH-2.0-OpenSSH_9.6\r\n", 0.05), (None, 0)], {502}),
    "close-at-once": ([(None, 0)], {502}),
    "http09-body-only": ([(b"hello there\r\n", 0.05), (None, 0)], {502}),
    "bad-status-code": ([(b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n", 0)], {502}),
    "bad-content-length": ([(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nxx", 0)], {502}),
    "negative-content-length": ([(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nxx", 0)],
                                {502}),
    "two-content-lengths": ([(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 4\r\n"
                              b"\r\nokok", 0)], {502}),
    "length-and-chunked": ([(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: "
                             b"chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", 0)],
                           {502, (200, b"hello")}),
    "bad-chunk-size": ([(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello"
                         b"\r\n0\r\n\r\n", 0)], {502, "cut"}),
    "chunk-size-overflow": ([(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"fffffffffffffffffffff\r\nhello\r\n", 0)], {502, "cut"}),
    "short-body-then-close": ([(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
                                0.05), (None, 0)], {502}),
    "short-big-body-then-close": ([(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n"
                                    + b"x" * 300_000, 0.05), (None, 0)], {"cut"}),
    "chunked-then-close": ([(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"5\r\nhello\r\n", 0.05), (None, 0)], {"cut"}),
    "head-then-silence": ([(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"5\r\nhello\r\n", 30)], {"cut"}),
    "interim-forever": ([(b"HTTP/1.1 100 Continue\r\n\r\n" * 3, 30)], {504}),
    "binary-reason": ([(b"HTTP/1.1 200 \xff\xfe\r\nContent-Length: 2\r\n\r\nok", 0)],
                      {502, (200, b"ok")}),
    "control-char-header": ([(b"HTTP/1.1 200 OK\r\nX-Bin: a\x01\x7fb\r\nContent-Length: 2"
                              b"\r\n\r\nok", 0)], {502, (200, b"ok")}),
    "space-in-header-name": ([(b"HTTP/1.1 200 OK\r\nBad Header: x\r\nContent-Length: 2\r\n\r\n"
                               b"ok", 0)], {502}),
    "lf-only": ([(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", 0)], {502, (200, b"ok")}),
    "status-999": ([(b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\nok", 0)],
                   {502, (999, b"ok")}),
    "status-600": ([(b"HTTP/1.1 600 Odder\r\nContent-Length: 2\r\n\r\nok", 0)],
                   {502, (600, b"ok")}),
    "status-099": ([(b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok", 0)], {502}),
    "huge-header": ([(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * 200_000 + b"\r\n"
                      b"Content-Length: 2\r\n\r\nok", 0)], {502, "client refused the head"}),
    "http10-until-close": ([(b"HTTP/1.0 200 OK\r\n\r\nuntil close", 0.05), (None, 0)],
                           {(200, b"until close")}),
    "two-responses-for-one": ([(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                                b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil", 0)],
                              {(200, b"ok")}),
}


async def test_backend_speaking_malformed_http_is_502_never_500(signed, measure):
    canned = await CannedBackend({name: steps for name, (steps, _) in MALFORMED.items()}).start()
    try:
        f = await signed(canned.url, VESPA_REQUEST_TIMEOUT="1")
        await ready(f)
        signer = f.emulator.signer
        wrong, must = [], set()
        for name, (_, allowed) in MALFORMED.items():
            idx, status, body = await signed_call(f.session, f.url, signer, "POST", f"/m/{name}",
                                                  2, timeout=10)
            must.add(idx)
            if isinstance(status, str) and "ClientResponseError" in status \
                    and "client refused the head" in allowed:
                status = "client refused the head"
            seen = status if status in allowed else (status, body)
            if seen not in allowed:
                wrong.append(f"{name}: got {status!r} {body[:80]!r}, allowed {allowed}")
            # after each lie the worker still answers the next request right
            ok_idx, ok_status, ok_body = await signed_call(f.session, f.url, signer, "GET", "/ok")
            must.add(ok_idx)
            if (ok_status, ok_body) != (200, b"ok"):
                wrong.append(f"after {name}: the next request got {ok_status!r} {ok_body!r}")
        await assert_serving(f.session, f.url, signer, must, path="/ok")
        await settle(f)
        check_reported_once(f.emulator, must)
        assert not wrong, "\n".join(wrong)
        measure(inputs=len(MALFORMED))
    finally:
        await canned.stop()


# -- the autoscaler is unreachable, failing, slow -----------------------------------------------

async def traffic_during(f: Fleet, seconds: float, every: float = 0.05,
                         took: list[float] | None = None) -> list[tuple]:
    """Signed requests of every kind for ``seconds``: served, failed, blocked, streamed.
    Returns (request_idx, status, cost) per request; the seconds each took go to ``took``."""
    signer = f.emulator.signer
    kinds = [("POST", "/echo", 3), ("GET", "/slow-stream?n=3&delay=0.01", 4),
             ("POST", "/status/500", 5), ("POST", "/blocked/x", 6)]
    results = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        method, path, cost = kinds[len(results) % len(kinds)]
        started = time.monotonic()
        idx, status, _ = await signed_call(f.session, f.url, signer, method, path, cost)
        if took is not None:
            took.append(time.monotonic() - started)
        results.append((idx, status, cost))
        await asyncio.sleep(every)
    return results


def expected_statuses(results: list[tuple]) -> None:
    assert {status for _, status, _ in results} <= {200, 500, 403}, \
        Counter(status for _, status, _ in results)


def served_workload(results: list[tuple]) -> float:
    return sum(cost for _, status, cost in results if status == 200)


async def test_autoscaler_unreachable_for_a_while_then_back(signed, backend, measure):
    f = await signed(base_url(backend), VESPA_BLOCKED_PATHS="/blocked/*")
    await ready(f)
    await f.emulator.stop()  # connection refused, as when the autoscaler is down
    during = await traffic_during(f, OUTAGE)
    assert f.worker.ledger.outbox, "nothing waited for the autoscaler: the test proves nothing"
    assert f.worker.reporter.failed > 0
    await f.emulator.start()  # back, on the same address
    after = await traffic_during(f, 0.5)
    results = during + after
    expected_statuses(results)
    must = {idx for idx, _, _ in results}
    await assert_serving(f.session, f.url, f.emulator.signer, must)
    await settle(f)
    check_reported_once(f.emulator, must)
    # the load counters kept through the outage: cur_perf adds up to what was served
    assert sum(r["cur_perf"] for r in f.emulator.reports) == \
        pytest.approx(served_workload(results) + 2)
    measure(outage_seconds=OUTAGE, requests=len(results), queued_during_outage=len(during))


async def test_autoscaler_answering_500s_then_recovering(signed, backend, measure):
    f = await signed(base_url(backend), VESPA_BLOCKED_PATHS="/blocked/*")
    await ready(f)
    f.emulator.fail_reports = f.emulator.fail_deletes = True
    reports_before = len(f.emulator.reports)
    during = await traffic_during(f, OUTAGE)
    assert len(f.emulator.reports) == reports_before and not f.emulator.deleted
    f.emulator.fail_reports = f.emulator.fail_deletes = False
    results = during + await traffic_during(f, 0.5)
    expected_statuses(results)
    must = {idx for idx, _, _ in results}
    await assert_serving(f.session, f.url, f.emulator.signer, must)
    await settle(f)
    check_reported_once(f.emulator, must)
    measure(outage_seconds=OUTAGE, requests=len(results))


async def test_slow_autoscaler_within_the_reporters_timeout(signed, backend, measure):
    f = await signed(base_url(backend), VESPA_BLOCKED_PATHS="/blocked/*")
    await ready(f)
    f.emulator.delay = 2.0  # every report and delete takes 2 s to be answered
    took: list[float] = []
    results = await traffic_during(f, OUTAGE, took=took)
    # a request that waited for a report would have taken the 2 s of its answer
    assert max(took) < f.emulator.delay, f"a request waited {max(took):.1f}s for the autoscaler"
    expected_statuses(results)
    must = {idx for idx, _, _ in results}
    await assert_serving(f.session, f.url, f.emulator.signer, must)
    await settle(f, timeout=60)
    await wait_until(lambda: not f.emulator.answering, timeout=10)  # nothing more to record
    f.emulator.delay = 0
    check_reported_once(f.emulator, must)
    measure(delay_seconds=2.0, requests=len(results))


class SlowFirstDelete(WatchedEmulator):
    """Answers the first delete_requests after ``slow`` seconds (it does receive it at once);
    ``answered`` is set once that slow answer went out."""

    slow = 6.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answered = asyncio.Event()

    async def handle_delete_requests(self, request):
        await request.read()
        if self.slow:
            slow, self.slow = self.slow, 0.0
            await asyncio.sleep(slow)
            try:
                return await super().handle_delete_requests(request)
            finally:
                self.answered.set()
        return await super().handle_delete_requests(request)


async def test_autoscaler_slow_to_answer_within_the_reporters_answer_timeout(signed, backend,
                                                                               measure):
    """One delete_requests answer takes 6 s, well past the 5 s a connection may take but within
    the 30 s an answer may (ANSWER_TIMEOUT): the reporter waits for it, and the records it
    carried are delivered once, never sent again."""
    emulator = SlowFirstDelete(private_key=autoscaler_key())
    f = await signed(base_url(backend), emulator=emulator)
    await ready(f)
    results = [await signed_call(f.session, f.url, emulator.signer, "POST", "/echo", 3)
               for _ in range(5)]
    assert [status for _, status, _ in results] == [200] * 5
    await wait_until(lambda: emulator.slow == 0, timeout=10)
    must = {idx for idx, _, _ in results}
    await asyncio.wait_for(emulator.answered.wait(), 20)  # the slow answer went out
    await assert_serving(f.session, f.url, emulator.signer, must)
    await settle(f, timeout=60)
    await wait_until(lambda: not emulator.answering, timeout=10)  # nothing more to record
    deleted = Counter(emulator.deleted_request_idxs())
    assert must <= set(deleted), "a request was never reported"
    doubled = sum(n - 1 for n in deleted.values())
    measure(requests=len(must), reported_more_than_once=doubled)
    assert doubled == 0, (
        f"{doubled} request(s) reported twice (counts {dict(deleted)}): the reporter re-sent a "
        f"delete_requests the autoscaler had received and was still answering")


# -- the key server is down at start -------------------------------------------------------------

@pytest.mark.parametrize("how", ["answering 500", "unreachable"])
async def test_public_key_server_down_at_start(signed, backend, measure, how):
    emulator = AutoscalerEmulator(scheme="full", private_key=autoscaler_key())
    emulator.fail_pubkey = how == "answering 500"
    f = await signed(base_url(backend), emulator=emulator,
                     start_emulator=how == "answering 500")
    signer = emulator.signer
    refused = []
    deadline = time.monotonic() + OUTAGE
    while time.monotonic() < deadline:
        refused.append(await signed_call(f.session, f.url, signer, "POST", "/echo", 2))
        await asyncio.sleep(0.1)
    assert {status for _, status, _ in refused} == {503}
    assert not f.worker.state.ready
    async with f.session.get(f"{f.url}/_vespa/readyz") as readyz:
        assert readyz.status == 503
    if how == "unreachable":
        await emulator.start()
    emulator.fail_pubkey = False
    keyless_reports = list(emulator.reports)
    await wait_until(lambda: f.worker.state.ready, timeout=40)  # the key fetch backs off
    assert all(r["max_perf"] == 0 for r in keyless_reports), "loaded without a key"
    served = [await signed_call(f.session, f.url, signer, "POST", "/echo", 2) for _ in range(5)]
    assert {status for _, status, _ in served} == {200}
    must = {idx for idx, _, _ in served}
    await assert_serving(f.session, f.url, signer, must)
    await settle(f)
    # refused for want of a key: not load, never reported
    check_reported_once(emulator, must, never={idx for idx, _, _ in refused})
    measure(refused_503=len(refused), served=len(served))


# -- the disk is full ----------------------------------------------------------------------------

BENCH = "async def benchmark(url, session):\n    return 321.0\n"


async def test_benchmark_cache_on_an_unwritable_disk(signed, backend, measure, tmp_path,
                                                     monkeypatch):
    (tmp_path / "reliability_bench.py").write_text(BENCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file where a directory should be: every write fails")
    f = await signed(base_url(backend), VESPA_MAX_THROUGHPUT="",
                     VESPA_BENCHMARK="reliability_bench:benchmark",
                     VESPA_CACHE_DIR=str(blocker / "cache"))
    await ready(f)
    assert f.worker.state.max_perf == 321.0 and f.worker.state.error_msg == ""
    assert max(r["max_perf"] for r in f.emulator.reports) == 321.0
    served = [await signed_call(f.session, f.url, f.emulator.signer, "POST", "/echo", 2)
              for _ in range(5)]
    assert {status for _, status, _ in served} == {200}
    must = {idx for idx, _, _ in served}
    await assert_serving(f.session, f.url, f.emulator.signer, must)
    await settle(f)
    check_reported_once(f.emulator, must)
    assert blocker.read_text().startswith("a regular file")
    measure(served=len(served))


async def test_request_records_on_an_unwritable_disk(signed, backend, measure, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file where a directory should be: every write fails")
    f = await signed(base_url(backend), VESPA_REQUEST_LOG_DIR=str(blocker / "records"))
    await ready(f)
    served = [await signed_call(f.session, f.url, f.emulator.signer, "POST", "/echo", 2)
              for _ in range(50)]
    assert {status for _, status, _ in served} == {200}
    must = {idx for idx, _, _ in served}
    await assert_serving(f.session, f.url, f.emulator.signer, must)
    await settle(f)
    check_reported_once(f.emulator, must)
    assert blocker.read_text().startswith("a regular file")
    # every write was tried, failed, and was counted; the worker said so once in its status
    await wait_until(lambda: f.worker.recorder.failures > 0, timeout=10)
    async with f.session.get(f.url + "/_vespa/status") as response:
        records = (await response.json())["request_records"]
    assert records["written"] == 0 and records["failed"] == f.worker.recorder.failures
    measure(served=len(served), record_write_failures=records["failed"])
