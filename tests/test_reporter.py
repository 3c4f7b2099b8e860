"""The reporter against the real autoscaler emulator on loopback: fields, resets, addresses,
delete_requests formats, outages, loadtime, cadence and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import shutil
import time

import aiohttp
import pytest

from vespa.config import load_settings
from vespa.devtools.autoscaler import AutoscalerEmulator, WORKER_STATUS_FIELDS
from vespa.corridor.ledger import FinishedRequest, Ledger, Outcome
from vespa.state import Phase, WorkerState
from vespa.worker import Worker
from vespa.autoscaler.reporter import (NO_DELETE_ADDR, Identity, Reporter, addresses_for, delete_bodies,
                            status_body)

from .conftest import free_port, wait_until
from .fleet import WatchedEmulator, emulator, make_emulator, private_key  # noqa: F401

WORKER_URL = "http://127.0.0.1:3999"
IDENTITY = Identity(worker_id=17, mtoken="master-token", url=WORKER_URL)

TYPES = {  # Vast's worker_status fields (vastai 1.9.1), in its order, and their JSON types
    "id": int, "mtoken": str, "version": str, "loadtime": (int, float), "cur_load": (int, float),
    "rej_load": (int, float), "new_load": (int, float), "error_msg": str,
    "max_perf": (int, float), "cur_perf": (int, float), "cur_capacity": (int, float),
    "max_capacity": (int, float), "num_requests_working": int, "num_requests_recieved": int,
    "additional_disk_usage": (int, float), "disk_usage": float, "working_request_idxs": list,
    "url": str,
}
DISK = {"additional_disk_usage": 0, "disk_usage": 0}


def without_disk(report: dict) -> dict:
    """A report without its disk fields, which move with every log line written."""
    return {**report, **DISK}


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as http:
        yield http


@pytest.fixture
def make_reporter(session):
    def factory(*addrs: str, ledger: Ledger | None = None, state: WorkerState | None = None,
                **options) -> Reporter:
        options = {"interval": 0.02, "max_interval": 0.3, "attempts": 1, "timeout": 2.0,
                   **options}
        return Reporter(tuple(addrs), IDENTITY, ledger or Ledger(), state or ready_state(),
                        session, **options)
    return factory


def ready_state(max_perf: float = 250.0) -> WorkerState:
    state = WorkerState()
    state.max_perf = max_perf
    state.become_ready(time.monotonic())
    return state


def dead_address() -> str:
    return f"http://127.0.0.1:{free_port()}"


async def run_for(reporter: Reporter, predicate, timeout: float = 5.0) -> None:
    task = asyncio.create_task(reporter.run())
    try:
        await wait_until(predicate, timeout)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def serve(ledger: Ledger, idx: int, workload: float, outcome: Outcome = Outcome.SUCCESS,
          status: int = 200) -> None:
    entry = ledger.receive(workload, idx, now=1000.0 + idx)
    ledger.start(entry, now=1000.5 + idx)
    ledger.finish(entry, outcome, status, now=1001.0 + idx)


# -- worker_status -----------------------------------------------------------------------------

async def test_every_worker_status_field_present_and_typed(emulator, make_reporter):
    ledger = Ledger()
    serve(ledger, 1, 10.0)
    queued = ledger.receive(4.0, 2, now=1.0)
    running = ledger.receive(6.0, 3, now=1.0)
    ledger.start(running, now=1.5)
    ledger.reject(3.0, 4, 429, now=2.0)
    reporter = make_reporter(emulator.url, ledger=ledger)
    assert await reporter.report_status()
    assert emulator.validation_errors == []
    [report] = emulator.reports
    assert list(report) == list(WORKER_STATUS_FIELDS) == list(TYPES)  # Vast's, in its order
    for name, expected in TYPES.items():
        assert isinstance(report[name], expected), name
        assert not isinstance(report[name], bool), name
    assert report["id"] == 17 and report["mtoken"] == "master-token"
    assert report["url"] == WORKER_URL and report["version"].startswith("vespa-")
    assert report["cur_load"] == 10.0
    assert report["new_load"] == 20.0
    assert report["rej_load"] == 3.0
    assert report["cur_perf"] == 10.0
    assert report["max_perf"] == 250.0
    assert report["num_requests_working"] == 2
    assert report["num_requests_recieved"] == 4  # the refused request was received too
    assert report["working_request_idxs"] == [2, 3]
    assert report["cur_capacity"] == 0 and report["max_capacity"] == 0
    assert report["error_msg"] == ""
    assert report["loadtime"] > 0
    assert report["disk_usage"] == pytest.approx(shutil.disk_usage("/").used / 2**30, abs=0.5)
    assert all(isinstance(i, int) for i in report["working_request_idxs"])
    assert queued in ledger.in_flight


async def test_loading_and_errored_workers_report_no_max_perf(emulator, make_reporter):
    state = WorkerState()
    state.max_perf = 99.0  # measured, but not ready yet
    reporter = make_reporter(emulator.url, state=state)
    assert await reporter.report_status()
    assert emulator.reports[-1]["max_perf"] == 0 and emulator.reports[-1]["loadtime"] == 0
    state.fail("backend not healthy after 1200s")
    assert await reporter.report_status()
    assert emulator.reports[-1]["error_msg"] == "backend not healthy after 1200s"
    assert emulator.reports[-1]["max_perf"] == 0
    assert state.phase is Phase.ERRORED
    assert emulator.validation_errors == []


def test_status_body_has_exactly_the_fields_of_vasts_worker():
    load, _ = Ledger().load_fields()
    body = status_body(IDENTITY, ready_state(), load, 120.25, 0.5)
    assert list(body) == list(WORKER_STATUS_FIELDS)
    assert body["additional_disk_usage"] == 0.5 and body["disk_usage"] == 120.25


async def test_disk_usage_is_absolute_and_its_change_alone_sends_no_report(
        emulator, make_reporter, monkeypatch):
    """disk_usage is GiB used on / (absolute), additional_disk_usage its change since the last
    report that arrived; disk use that moves (logs) is no reason for a report of its own."""
    used = [100 * 2**30]

    def disk_usage(path):
        used[0] += 2**29  # half a GiB more at every look
        return shutil._ntuple_diskusage(500 * 2**30, used[0], 400 * 2**30)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    reporter = make_reporter(emulator.url, interval=0.02, max_interval=30.0)
    assert reporter.disk_used == 100.5 * 2**30  # the baseline, at start
    task = asyncio.create_task(reporter.run())
    try:
        await wait_until(lambda: len(emulator.reports) == 1)
        looks = used[0]
        await wait_until(lambda: used[0] > looks + 5 * 2**29)  # many ticks, only the disk changes
        assert len(emulator.reports) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert emulator.reports[0]["disk_usage"] == 101.0
    assert emulator.reports[0]["additional_disk_usage"] == 0.5
    assert await reporter.report_status(force=True)
    assert emulator.reports[1]["additional_disk_usage"] == used[0] / 2**30 - 101.0


async def test_counters_reset_only_after_a_successful_send(emulator, make_reporter):
    ledger = Ledger()
    reporter = make_reporter(emulator.url, ledger=ledger)
    emulator.fail_reports = True
    serve(ledger, 1, 5.0)
    ledger.reject(2.0, 2, 429, now=1.0)
    assert not await reporter.report_status()
    serve(ledger, 3, 7.0)
    entry = ledger.receive(1.0, 4, now=1.0)
    ledger.finish(entry, Outcome.CANCELLED, 499, now=2.0)
    assert not await reporter.report_status(force=True)
    assert emulator.reports == []  # the failing emulator recorded nothing
    emulator.fail_reports = False
    assert await reporter.report_status()
    [report] = emulator.reports
    assert report["cur_perf"] == 12.0  # both windows in one report
    assert report["rej_load"] == 2.0
    assert report["new_load"] == 12.0  # received 13, one cancelled
    assert report["num_requests_recieved"] == 4  # the refused request was received too
    assert reporter.failed == 2 and reporter.sent == 1
    assert await reporter.report_status(force=True)
    assert emulator.reports[-1]["cur_perf"] == 0 and emulator.reports[-1]["rej_load"] == 0
    assert emulator.reports[-1]["num_requests_recieved"] == 4  # since start, as Vast's worker


async def test_addresses_tried_in_order(make_emulator, make_reporter):
    first, second = await make_emulator(), await make_emulator()
    reporter = make_reporter(dead_address(), first.url, second.url, ledger=Ledger())
    assert await reporter.report_status()
    assert len(first.reports) == 1 and second.reports == []
    first.fail_reports = True  # answers 500: the next address takes it
    assert await reporter.report_status(force=True)
    assert len(first.reports) == 1 and len(second.reports) == 1
    second.fail_reports = True
    assert not await reporter.report_status(force=True)


async def test_each_address_retried_before_the_next(make_emulator, make_reporter):
    first, second = await make_emulator(), await make_emulator()
    first.fail_reports = True
    reporter = make_reporter(first.url, second.url, attempts=2)
    started = time.monotonic()
    assert await reporter.report_status()
    assert len(second.reports) == 1
    assert time.monotonic() - started >= 0.2  # backed off between the two attempts


async def test_trailing_slash_addresses_work(emulator, make_reporter):
    reporter = make_reporter(emulator.url + "/")
    serve(reporter.ledger, 1, 1.0)
    assert await reporter.report_status()
    assert await reporter.report_finished()
    assert len(emulator.reports) == 1 and emulator.deleted_request_idxs() == [1]


async def test_loadtime_in_every_report_once_loaded(emulator, make_reporter):
    """As Vast's current worker: 0.0 while loading, then the same value in every report (also
    once errored), not once and then 0."""
    state = WorkerState(started_at=time.monotonic() - 12.0)
    reporter = make_reporter(emulator.url, state=state)
    assert await reporter.report_status()
    assert emulator.reports[-1]["loadtime"] == 0.0  # still loading
    state.max_perf = 50.0
    state.become_ready(time.monotonic())
    emulator.fail_reports = True
    assert not await reporter.report_status()
    emulator.fail_reports = False
    for _ in range(3):
        assert await reporter.report_status(force=True)
    state.fail("backend exited")
    assert await reporter.report_status()
    loadtimes = [r["loadtime"] for r in emulator.reports]
    assert loadtimes[0] == 0.0 and loadtimes[1] == pytest.approx(12.0, abs=1.0)
    assert loadtimes[1:] == [loadtimes[1]] * 4
    assert emulator.reports[1]["max_perf"] == 50.0


# -- delete_requests ---------------------------------------------------------------------------

async def test_delete_requests_2026_format(emulator, make_reporter):
    """Records as Vast's current worker sends them: status a word, timestamps floats, 0.0 for a
    step that never happened (a cancelled or rejected request has no completion time)."""
    ledger = Ledger()
    serve(ledger, 1, 1.0)
    serve(ledger, 2, 1.0, Outcome.CANCELLED, 499)
    serve(ledger, 3, 1.0, Outcome.ERROR, 502)
    ledger.reject(1.0, 4, 429, now=2000)
    queued = ledger.receive(1.0, 5, now=3000.0)
    ledger.finish(queued, Outcome.REJECTED, 429, now=3001.0)  # its wait in line ran out
    entry = ledger.receive(1.0, None, now=1.0)  # unsigned: no record
    ledger.finish(entry, Outcome.SUCCESS, 200, now=2.0)
    reporter = make_reporter(emulator.url, ledger=ledger)
    assert await reporter.report_finished()
    assert emulator.validation_errors == []
    [body] = emulator.delete_bodies
    assert set(body) == {"worker_id", "mtoken", "requests"}
    assert body["worker_id"] == 17 and body["mtoken"] == "master-token"
    records = {r["request_idx"]: r for r in body["requests"]}
    assert sorted(records) == [1, 2, 3, 4, 5]
    assert records[1] == {"request_idx": 1, "success": True, "status": "Success",
                          "entered_queue_at": 1001.0, "work_started_at": 1001.5,
                          "work_completed_at": 1002.0}
    assert records[2] == {"request_idx": 2, "success": True, "status": "Cancelled",
                          "entered_queue_at": 1002.0, "work_started_at": 1002.5,
                          "work_completed_at": 0.0}
    assert records[3] == {"request_idx": 3, "success": False, "status": "Error",
                          "entered_queue_at": 1003.0, "work_started_at": 1003.5,
                          "work_completed_at": 1004.0}
    assert records[4] == {"request_idx": 4, "success": False, "status": "Rejected",
                          "entered_queue_at": 2000.0, "work_started_at": 0.0,
                          "work_completed_at": 0.0}
    assert records[5] == {"request_idx": 5, "success": False, "status": "Rejected",
                          "entered_queue_at": 3000.0, "work_started_at": 0.0,
                          "work_completed_at": 0.0}
    assert all(isinstance(records[4][name], float) for name in
               ("entered_queue_at", "work_started_at", "work_completed_at"))
    assert not ledger.outbox
    assert await reporter.report_finished()  # nothing left: nothing sent
    assert len(emulator.delete_bodies) == 1


async def test_delete_requests_legacy_format(emulator, make_reporter):
    ledger = Ledger()
    serve(ledger, 1, 1.0)
    serve(ledger, 2, 1.0, Outcome.ERROR, 500)
    serve(ledger, 3, 1.0, Outcome.CANCELLED, 499)
    ledger.reject(1.0, 4, 429, now=1.0)
    reporter = make_reporter(emulator.url, ledger=ledger, delete_format="legacy")
    assert await reporter.report_finished()
    assert emulator.validation_errors == []
    assert emulator.delete_bodies == [
        {"worker_id": 17, "mtoken": "master-token", "request_idxs": [1, 3], "success": True},
        {"worker_id": 17, "mtoken": "master-token", "request_idxs": [2, 4], "success": False},
    ]


def test_legacy_bodies_skip_an_empty_half():
    batch = [FinishedRequest(1, Outcome.SUCCESS, 200, 0.0, 0.0, 1.0)]
    bodies = delete_bodies(IDENTITY, batch, "legacy")
    assert [json.loads(body) for body, _ in bodies] == [
        {"worker_id": 17, "mtoken": "master-token", "request_idxs": [1], "success": True}]
    assert delete_bodies(IDENTITY, batch, "2026")[0][1] == batch


def test_cloud_api_address_skipped_for_delete_requests_only():
    addrs = (NO_DELETE_ADDR, "http://a:1/", NO_DELETE_ADDR + "/", "http://b:2")
    assert addresses_for("/delete_requests/", addrs) == ["http://a:1", "http://b:2"]
    assert addresses_for("/worker_status/", addrs) == [NO_DELETE_ADDR, "http://a:1",
                                                       NO_DELETE_ADDR, "http://b:2"]
    assert addresses_for("/delete_requests/", (NO_DELETE_ADDR,)) == []


async def test_delete_requests_with_only_the_cloud_address_are_kept(make_reporter):
    """No address takes delete_requests: nothing is contacted and the records stay queued."""
    ledger = Ledger()
    ledger.reject(1.0, 1, 429, now=1.0)
    reporter = make_reporter(NO_DELETE_ADDR, ledger=ledger)
    assert addresses_for("/delete_requests/", reporter.addrs) == []  # else: never contact it
    assert not await reporter.report_finished()
    assert [r.request_idx for r in ledger.outbox] == [1]


async def test_failed_delete_requests_are_kept_in_order(emulator, make_reporter):
    ledger = Ledger()
    for idx in range(5):
        ledger.reject(1.0, idx, 429, now=float(idx))
    reporter = make_reporter(emulator.url, ledger=ledger)
    emulator.fail_deletes = True
    assert not await reporter.report_finished()
    assert [r.request_idx for r in ledger.outbox] == [0, 1, 2, 3, 4]
    emulator.fail_deletes = False
    ledger.reject(1.0, 5, 429, now=5.0)
    assert await reporter.report_finished()
    assert emulator.deleted_request_idxs() == [0, 1, 2, 3, 4, 5]


async def test_cancelled_report_leaves_its_post_to_finish_and_reports_once(emulator,
                                                                          make_reporter):
    """Shutdown cancels the reporter mid-POST: the POST goes on (the autoscaler may already
    have it), the final report waits for its answer, and each record is delivered once."""
    ledger = Ledger()
    for idx in range(3):
        ledger.reject(1.0, idx, 429, now=float(idx))
    reporter = make_reporter(emulator.url, ledger=ledger)
    emulator.delay = 0.5
    task = asyncio.create_task(reporter.report_finished())
    await wait_until(lambda: emulator.arrived["/delete_requests/"] == 1)  # it has the POST
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert not reporter.settled  # still on its way, not back in the outbox to be sent again
    assert await reporter.report_finished()  # the final report
    assert emulator.deleted_request_idxs() == [0, 1, 2]
    assert reporter.settled and len(emulator.delete_bodies) == 1


async def test_a_delivery_failing_after_its_caller_left_keeps_its_records(emulator,
                                                                         make_reporter):
    """A batch must not be lost either: a shielded POST that fails puts its records back."""
    ledger = Ledger()
    for idx in range(3):
        ledger.reject(1.0, idx, 429, now=float(idx))
    reporter = make_reporter(emulator.url, ledger=ledger)
    emulator.delay, emulator.fail_deletes = 0.3, True
    task = asyncio.create_task(reporter.report_finished())
    await wait_until(lambda: emulator.arrived["/delete_requests/"] == 1)  # it has the POST
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await wait_until(lambda: reporter.delivery.done())
    assert [r.request_idx for r in ledger.outbox] == [0, 1, 2]
    emulator.delay, emulator.fail_deletes = 0.0, False
    assert await reporter.report_finished()
    assert emulator.deleted_request_idxs() == [0, 1, 2]


async def test_a_slow_but_alive_autoscaler_counts_each_window_and_record_once(emulator,
                                                                              make_reporter):
    """Connecting has the short timeout; the answer may take ``answer_timeout``: a POST that
    arrived is not sent again because its answer was slow (that would count its load twice)."""
    ledger = Ledger()
    serve(ledger, 1, 100.0)
    reporter = make_reporter(emulator.url, ledger=ledger, attempts=2, timeout=0.2,
                             answer_timeout=3.0)
    emulator.delay = 0.6  # past the 0.2 s connect timeout, within the answer timeout
    assert await reporter.report_status()
    assert await reporter.report_status(force=True)
    assert [r["new_load"] for r in emulator.reports] == [100.0, 0.0]
    assert await reporter.report_finished()
    assert emulator.deleted_request_idxs() == [1]
    assert len(emulator.delete_bodies) == 1


async def test_a_status_answer_past_the_answer_timeout_is_not_retried_at_once(emulator,
                                                                              make_reporter):
    """It may have arrived: the next report carries its counts, no retry doubles them now."""
    ledger = Ledger()
    serve(ledger, 1, 100.0)
    reporter = make_reporter(emulator.url, ledger=ledger, attempts=3, timeout=0.2,
                             answer_timeout=0.3)
    emulator.delay = 0.8
    assert not await reporter.report_status()
    await wait_until(lambda: emulator.reports and not emulator.answering)  # answered, recorded
    assert emulator.arrived["/worker_status/"] == 1  # sent once: not retried
    assert [r["new_load"] for r in emulator.reports] == [100.0]


class SlowDeletes(AutoscalerEmulator):
    """Answers delete_requests once ``release`` is set; worker_status at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = asyncio.Event()

    async def handle_delete_requests(self, request):
        await asyncio.wait_for(self.release.wait(), 30)
        return await super().handle_delete_requests(request)


async def test_a_slow_delete_holds_up_no_status_report(private_key, make_reporter):
    emulator = SlowDeletes(private_key=private_key)
    await emulator.start()
    try:
        ledger = Ledger()
        reporter = make_reporter(emulator.url, ledger=ledger, max_interval=0.05)
        serve(ledger, 1, 1.0)
        task = asyncio.create_task(reporter.run())
        try:
            await wait_until(lambda: reporter.delivery is not None)
            reports_before = len(emulator.reports)
            await wait_until(lambda: len(emulator.reports) >= reports_before + 3)
            assert emulator.deleted_request_idxs() == []  # the delete is still unanswered
            emulator.release.set()
            await wait_until(lambda: reporter.settled and emulator.deleted_request_idxs() == [1])
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        emulator.release.set()
        await emulator.stop()


async def test_many_records_go_in_batches(emulator, make_reporter):
    ledger = Ledger()
    for idx in range(1200):
        ledger.reject(1.0, idx, 429, now=float(idx))
    reporter = make_reporter(emulator.url, ledger=ledger)
    assert await reporter.report_finished()
    assert emulator.deleted_request_idxs() == list(range(1200))
    assert len(emulator.delete_bodies) == 3  # batches of 500
    assert emulator.validation_errors == []


# -- outages -----------------------------------------------------------------------------------

class Truth:
    """What really happened, to hold the reports against."""

    def __init__(self):
        self.served = 0.0
        self.rejected = 0.0


async def traffic(ledger: Ledger, truth: Truth, first_idx: int, count: int) -> None:
    """Mixed finished requests: successes, errors, cancels, rejects before and after queueing."""
    outcomes = [Outcome.SUCCESS, Outcome.ERROR, Outcome.CANCELLED, Outcome.REJECTED]
    for n in range(count):
        idx = first_idx + n
        if n % 5 == 4:
            ledger.reject(2.0, idx, 429, now=time.time())
            truth.rejected += 2.0
            continue
        outcome, workload = outcomes[n % 4], float(n % 7 + 1)
        entry = ledger.receive(workload, idx, now=time.time())
        ledger.start(entry, now=time.time())
        ledger.finish(entry, outcome, 200, now=time.time())
        if outcome is Outcome.SUCCESS:
            truth.served += workload
        elif outcome is Outcome.REJECTED:
            truth.rejected += workload
        if n % 10 == 0:
            await asyncio.sleep(0)


def totals(reports: list[dict], name: str) -> float:
    return sum(report[name] for report in reports)


@pytest.mark.parametrize("delete_format", ["2026", "legacy"])
async def test_autoscaler_failing_then_back_loses_and_doubles_nothing(
        emulator, make_reporter, delete_format):
    ledger, truth = Ledger(), Truth()
    reporter = make_reporter(emulator.url, ledger=ledger, delete_format=delete_format)
    task = asyncio.create_task(reporter.run())
    try:
        await traffic(ledger, truth, 0, 100)
        await wait_until(lambda: len(emulator.deleted) == 100)
        emulator.fail_reports = emulator.fail_deletes = True
        await traffic(ledger, truth, 100, 150)
        await wait_until(lambda: reporter.failed >= 3)  # several failed rounds
        assert len(emulator.deleted) == 100
        assert reporter.failed > 0
        emulator.fail_reports = emulator.fail_deletes = False
        await traffic(ledger, truth, 250, 50)
        await wait_until(lambda: len(emulator.deleted) == 300 and not ledger.outbox)
        await wait_until(lambda: totals(emulator.reports, "cur_perf") == truth.served
                         and totals(emulator.reports, "rej_load") == truth.rejected)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sorted(emulator.deleted_request_idxs()) == list(range(300))  # each exactly once
    assert emulator.reports[-1]["num_requests_recieved"] == ledger.totals.received
    assert ledger.totals.workload_served == truth.served
    assert emulator.validation_errors == []


async def test_autoscaler_down_then_back_on_the_same_port(make_emulator, make_reporter):
    emulator = await make_emulator()
    port = emulator.port
    ledger, truth = Ledger(), Truth()
    reporter = make_reporter(emulator.url, ledger=ledger)
    task = asyncio.create_task(reporter.run())
    try:
        await traffic(ledger, truth, 0, 40)
        await wait_until(lambda: len(emulator.deleted) == 40)
        await emulator.stop()  # connection refused from now on
        await traffic(ledger, truth, 40, 60)
        await wait_until(lambda: reporter.failed > 0)  # it tried and failed
        back = await make_emulator(port=port)
        await wait_until(lambda: len(back.deleted) == 60 and not ledger.outbox)
        both = lambda: emulator.reports + back.reports  # noqa: E731
        await wait_until(lambda: totals(both(), "cur_perf") == truth.served
                         and totals(both(), "rej_load") == truth.rejected)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    all_idxs = emulator.deleted_request_idxs() + back.deleted_request_idxs()
    assert sorted(all_idxs) == list(range(100))  # each exactly once
    assert back.validation_errors == [] and emulator.validation_errors == []


async def test_slow_autoscaler_within_timeout_gets_everything_once(emulator, make_reporter):
    ledger = Ledger()
    reporter = make_reporter(emulator.url, ledger=ledger, timeout=2.0)
    emulator.delay = 0.05
    await traffic(ledger, Truth(), 0, 20)
    assert await reporter.report_finished()
    assert await reporter.report_status()
    assert sorted(emulator.deleted_request_idxs()) == list(range(20))


async def test_dropped_records_are_logged_and_reset(emulator, make_reporter, caplog):
    ledger = Ledger(outbox_limit=2)
    for idx in range(5):
        ledger.reject(1.0, idx, 429, now=float(idx))
    reporter = make_reporter(emulator.url, ledger=ledger)
    with caplog.at_level("ERROR", logger="vespa.autoscaler.reporter"):
        await run_for(reporter, lambda: ledger.dropped == 0 and len(emulator.deleted) == 2)
    assert emulator.deleted_request_idxs() == [3, 4]
    assert any("3 finished-request records were dropped" in r.getMessage()
               for r in caplog.records)


# -- cadence -----------------------------------------------------------------------------------

async def test_unchanged_status_is_not_resent_every_tick(emulator, make_reporter):
    reporter = make_reporter(emulator.url, state=WorkerState(), interval=0.02, max_interval=0.4)
    task = asyncio.create_task(reporter.run())
    try:
        await wait_until(lambda: len(emulator.reports) == 1)
        first = time.monotonic()
        await asyncio.sleep(1.0)  # 50 ticks, nothing changes
        count = len(emulator.reports)
        assert 2 <= count <= 5, count  # the first, then about every max_interval
        assert time.monotonic() - first >= 0.9
        reporter.ledger.receive(3.0, 7, now=time.time())  # a change is sent at the next tick
        await wait_until(lambda: emulator.reports[-1]["cur_load"] == 3.0, timeout=0.5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_equal_traffic_in_the_next_window_is_reported_at_the_next_tick(emulator,
                                                                             make_reporter):
    """The load counts are per window: two windows with the same traffic have equal bodies,
    and the second must not wait for max_interval."""
    ledger = Ledger()
    reporter = make_reporter(emulator.url, ledger=ledger, interval=0.02, max_interval=30.0)
    task = asyncio.create_task(reporter.run())
    try:
        for n in range(1, 4):
            serve(ledger, n, 5.0)
            await wait_until(lambda: [r["cur_perf"] for r in emulator.reports] == [5.0] * n,
                             timeout=1)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    # the load counts of the three bodies are the same; only the count since start grows
    assert [r["num_requests_recieved"] for r in emulator.reports] == [1, 2, 3]
    assert len({str({**without_disk(r), "num_requests_recieved": 0})
                for r in emulator.reports}) == 1


async def test_unchanged_status_is_sent_at_least_every_max_interval(emulator, make_reporter):
    reporter = make_reporter(emulator.url, state=WorkerState(), interval=0.02, max_interval=0.2)
    task = asyncio.create_task(reporter.run())
    try:
        await wait_until(lambda: len(emulator.reports) >= 5, timeout=3.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    first = without_disk(emulator.reports[0])
    assert all(without_disk(r) == first for r in emulator.reports)


async def test_wake_sends_at_once(emulator, make_reporter):
    state = WorkerState()
    reporter = make_reporter(emulator.url, state=state, interval=30.0, max_interval=60.0)
    task = asyncio.create_task(reporter.run())
    try:
        await asyncio.sleep(0.05)
        assert emulator.reports == []  # the first tick is 30 s away
        state.max_perf = 10.0
        state.become_ready(time.monotonic())
        reporter.wake.set()  # what the lifecycle's on_ready does
        await wait_until(lambda: len(emulator.reports) == 1, timeout=1.0)
        assert emulator.reports[0]["max_perf"] == 10.0 and emulator.reports[0]["loadtime"] > 0
        reporter.wake.set()  # forced, even though nothing changed
        await wait_until(lambda: len(emulator.reports) == 2, timeout=1.0)
        assert emulator.reports[1]["loadtime"] == emulator.reports[0]["loadtime"]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_loading_worker_reports_while_loading(emulator, make_reporter):
    state = WorkerState()
    reporter = make_reporter(emulator.url, state=state, interval=0.02, max_interval=0.1)
    await run_for(reporter, lambda: len(emulator.reports) >= 3, timeout=2.0)
    assert all(r["max_perf"] == 0 and r["error_msg"] == "" for r in emulator.reports)
    assert state.phase is Phase.LOADING


async def test_a_legacy_delivery_half_done_resends_only_the_undelivered_half(make_reporter):
    """Issue #18 item 2: the legacy format is two POSTs (successes, failures); when the first
    reaches the autoscaler and the second fails, only the second half is sent again."""
    from aiohttp import web

    received: list[dict] = []
    failing = {"second": True}

    async def delete(request: web.Request) -> web.Response:
        body = await request.json()
        if failing["second"] and not body["success"]:
            return web.json_response({"error": "down"}, status=500)
        received.append(body)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/delete_requests/", delete)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        ledger = Ledger()
        serve(ledger, 1, 1.0)
        serve(ledger, 2, 1.0, Outcome.ERROR, 500)
        reporter = make_reporter(f"http://127.0.0.1:{port}", ledger=ledger,
                                 delete_format="legacy")
        assert not await reporter.report_finished()
        failing["second"] = False
        assert await reporter.report_finished()
        assert [(b["request_idxs"], b["success"]) for b in received] == [([1], True),
                                                                         ([2], False)]
    finally:
        await runner.cleanup()


async def test_two_status_reports_at_once_count_each_window_once(emulator, make_reporter):
    """The periodic report and a forced one (the final report, a test's) at the same moment:
    each takes its own window, so the served load reaches the autoscaler once."""
    ledger = Ledger()
    serve(ledger, 1, 100.0)
    reporter = make_reporter(emulator.url, ledger=ledger)
    emulator.delay = 0.3  # both are on their way together
    assert await asyncio.gather(reporter.report_status(), reporter.report_status(force=True)) \
        == [True, True]
    assert sorted(r["cur_perf"] for r in emulator.reports) == [0.0, 100.0]
    assert sorted(r["new_load"] for r in emulator.reports) == [0.0, 100.0]


async def test_a_cancelled_status_report_finishes_and_the_final_one_carries_only_what_is_new(
        emulator, make_reporter):
    """Shutdown cancels the reporter mid-POST: that POST still counts its window, and the
    final report waits for it instead of sending the same window again."""
    ledger = Ledger()
    serve(ledger, 1, 100.0)
    reporter = make_reporter(emulator.url, ledger=ledger)
    emulator.delay = 0.3
    task = asyncio.create_task(reporter.report_status())
    await wait_until(lambda: emulator.runner.server.connections)  # the POST is on its way
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    serve(ledger, 2, 5.0)
    assert await reporter.report_status(force=True)
    assert [r["cur_perf"] for r in emulator.reports] == [100.0, 5.0]


# -- shutdown ----------------------------------------------------------------------------------

class HeldReports(WatchedEmulator):
    """Holds each POST to the path ``held`` (until ``release``, 30 s at most)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held: str | None = None
        self.release = asyncio.Event()

    async def hold(self, request) -> None:
        if request.path == self.held:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.release.wait(), 30)

    async def handle_worker_status(self, request):
        await self.hold(request)
        return await super().handle_worker_status(request)

    async def handle_delete_requests(self, request):
        await self.hold(request)
        return await super().handle_delete_requests(request)


@pytest.mark.parametrize("held", ["/worker_status/", "/delete_requests/"])
async def test_a_report_stuck_past_the_final_reports_time_is_cancelled_before_the_session_closes(
        held, private_key, backend, tmp_path, caplog):
    """A report whose answer does not come within the final report's time: stop cancels it and
    waits for it before closing the session it uses, so nothing runs on under a closed session
    (it logged "Task exception was never retrieved ... Session is closed"), and what did not
    arrive is not counted as delivered."""
    emulator = HeldReports(private_key=private_key)
    await emulator.start()
    worker = Worker(load_settings({
        "REPORT_ADDR": emulator.url, "VESPA_UNSECURED": "true", "CONTAINER_ID": "7",
        "MASTER_TOKEN": "mtoken-secret", "VESPA_MAX_THROUGHPUT": "1000",
        "VESPA_BACKEND_URL": str(backend.make_url("")).rstrip("/"),
        "VESPA_REPORT_INTERVAL": "0.05", "VESPA_HEALTHCHECK_INTERVAL": "0.2",
        "VESPA_CACHE_DIR": str(tmp_path / "cache")}))
    stopped = False
    try:
        await worker.start()
        port = free_port()
        await worker.listen("127.0.0.1", port)
        await wait_until(lambda: any(r["max_perf"] > 0 for r in emulator.reports), timeout=10)
        emulator.held = held
        auth_data = emulator.signer.auth_data(f"http://127.0.0.1:{port}", 5.0, 42)
        async with aiohttp.ClientSession() as client:
            async with client.post(f"http://127.0.0.1:{port}/echo",
                                   json={"auth_data": auth_data, "payload": {}}) as response:
                assert response.status == 200
        await wait_until(lambda: emulator.arrived[held] and emulator.answering)  # it is held
        answered = len(emulator.reports)
        stopped = True
        await worker.stop(report_timeout=0.5)
        assert not [task for task in asyncio.all_tasks()
                    if "Reporter." in repr(task.get_coro())], "left running"
        await asyncio.sleep(0.5)  # what would have run on fails now: a retry's pause is 0.2 s
        gc.collect()  # a task's exception nobody retrieved is logged when it is collected
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], [r.getMessage() for r in errors]
        delivered = {kind: n for (kind, ok), n in worker.metrics.reports.items() if ok}
        given_up = {kind: n for (kind, ok), n in worker.metrics.reports.items() if not ok}
        if held == "/worker_status/":  # not counted as sent; its load still to be reported
            assert worker.reporter.sent == delivered["worker_status"] == answered
            assert worker.ledger.window.cur_perf == 5.0
            assert worker.reporter.failed >= 1 and given_up["worker_status"] >= 1
        else:  # the record is still the worker's to deliver
            assert [r.request_idx for r in worker.ledger.outbox] == [42]
            assert delivered["delete_requests"] == 0 and emulator.deleted == []
            assert given_up["delete_requests"] >= 1
    finally:
        emulator.release.set()
        if not stopped:
            await worker.stop(report_timeout=0.5)
        await emulator.stop()
