"""The ledger (pure): load fields of worker_status as PROTOCOL.md defines them, finished records."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import example, given, settings, strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, invariant, rule,
                                 initialize)

from vespa.corridor.ledger import (DistinctReqnums, FinishedRequest, Ledger, LoadWindow, Outcome,
                                   json_time)

LOAD_FIELDS = {"cur_load", "new_load", "rej_load", "cur_perf", "num_requests_working",
               "num_requests_recieved", "working_request_idxs"}


def fields(ledger: Ledger) -> dict:
    return ledger.load_fields()[0]


def test_empty_ledger_reports_zeroes():
    load, window = Ledger().load_fields()
    assert set(load) == LOAD_FIELDS
    assert load == {"cur_load": 0, "new_load": 0, "rej_load": 0, "cur_perf": 0,
                    "num_requests_working": 0, "num_requests_recieved": 0,
                    "working_request_idxs": []}
    assert window == LoadWindow()


def test_received_requests_are_load_queued_or_running():
    ledger = Ledger()
    queued = ledger.receive(10.0, 5, now=1.0)
    running = ledger.receive(4.0, 3, now=2.0)
    ledger.start(running, now=2.5)
    load = fields(ledger)
    assert load["cur_load"] == 14.0  # queued included
    assert load["new_load"] == 14.0
    assert load["num_requests_working"] == 2
    assert load["num_requests_recieved"] == 2
    assert load["working_request_idxs"] == [3, 5]
    assert load["cur_perf"] == 0 and load["rej_load"] == 0
    assert queued.started_at is None and running.started_at == 2.5


def test_success_moves_workload_to_cur_perf():
    ledger = Ledger()
    entry = ledger.receive(10.0, 1, now=1.0)
    ledger.start(entry, now=1.5)
    ledger.finish(entry, Outcome.SUCCESS, 200, now=3.0)
    load = fields(ledger)
    assert load["cur_load"] == 0
    assert load["cur_perf"] == 10.0
    assert load["new_load"] == 10.0  # received, not cancelled
    assert load["num_requests_working"] == 0 and load["working_request_idxs"] == []
    assert load["num_requests_recieved"] == 1
    assert ledger.totals.workload_served == 10.0
    assert ledger.totals.outcomes["success"] == 1


def test_error_is_not_served_and_not_cancelled():
    ledger = Ledger()
    entry = ledger.receive(6.0, 1, now=1.0)
    ledger.finish(entry, Outcome.ERROR, 502, now=2.0)
    load = fields(ledger)
    assert load["cur_perf"] == 0 and load["new_load"] == 6.0 and load["rej_load"] == 0
    assert load["cur_load"] == 0
    assert ledger.totals.outcomes["error"] == 1 and ledger.totals.workload_served == 0


def test_cancel_takes_workload_out_of_new_load():
    ledger = Ledger()
    kept = ledger.receive(3.0, 1, now=1.0)
    cancelled = ledger.receive(5.0, 2, now=1.0)
    ledger.finish(cancelled, Outcome.CANCELLED, 499, now=2.0)
    load = fields(ledger)
    assert load["new_load"] == 3.0  # received minus cancelled
    assert load["cur_load"] == 3.0
    assert load["cur_perf"] == 0 and load["rej_load"] == 0
    assert load["working_request_idxs"] == [1]
    assert load["num_requests_recieved"] == 2
    assert kept in ledger.in_flight


def test_rejected_after_queueing_is_rej_load_not_new_load():
    ledger = Ledger()
    entry = ledger.receive(8.0, 9, now=1.0)
    ledger.finish(entry, Outcome.REJECTED, 429, now=2.0)
    load = fields(ledger)
    assert load["rej_load"] == 8.0
    assert load["new_load"] == 0
    assert load["cur_load"] == 0 and load["cur_perf"] == 0
    assert ledger.totals.rejected == 1


def test_reject_before_admission_is_rej_load_only():
    ledger = Ledger()
    ledger.reject(7.0, 11, 429, now=1.0)
    load = fields(ledger)
    assert load["rej_load"] == 7.0
    assert load["new_load"] == 0 and load["cur_load"] == 0 and load["cur_perf"] == 0
    assert load["num_requests_working"] == 0
    assert ledger.totals.rejected == 1 and ledger.totals.outcomes["rejected"] == 1


def test_reported_subtracts_only_what_was_sent():
    ledger = Ledger()
    first = ledger.receive(2.0, 1, now=0.0)
    ledger.finish(first, Outcome.SUCCESS, 200, now=0.5)
    ledger.reject(1.0, 2, 429, now=0.6)
    load, sent = ledger.load_fields()
    assert (load["cur_perf"], load["new_load"], load["rej_load"]) == (2.0, 2.0, 1.0)
    # while the report is on its way, more happens
    during = ledger.receive(4.0, 3, now=0.7)
    ledger.finish(during, Outcome.SUCCESS, 200, now=0.8)
    ledger.reject(0.5, 4, 503, now=0.9)
    ledger.reported(sent)
    after = fields(ledger)
    assert after["cur_perf"] == 4.0
    assert after["new_load"] == 4.0
    assert after["rej_load"] == 0.5
    assert after["num_requests_recieved"] == 4  # since start, not per report
    ledger.reported(ledger.load_fields()[1])
    assert ledger.window == LoadWindow()


def test_a_request_cancelled_after_its_receipt_was_reported_sends_no_negative_load():
    """new_load is received minus cancelled since the last report: the cancel of a request
    received before it would make it negative. It is sent as 0 (Vast's own worker clamps it)
    and the next window starts from 0."""
    ledger = Ledger()
    early = ledger.receive(50.0, 1, now=1.0)
    queued = ledger.receive(30.0, 2, now=1.0)
    ledger.reported(ledger.load_fields()[1])
    ledger.finish(early, Outcome.CANCELLED, 499, now=2.0)
    ledger.finish(queued, Outcome.REJECTED, 429, now=2.0)  # its queue wait timed out
    load, sent = ledger.load_fields()
    assert load["new_load"] == 0.0 and load["rej_load"] == 30.0
    ledger.reported(sent)
    later = ledger.receive(5.0, 3, now=3.0)
    assert fields(ledger)["new_load"] == 5.0
    ledger.finish(later, Outcome.SUCCESS, 200, now=4.0)


def test_unreported_windows_accumulate():
    """A report that did not reach the autoscaler is never subtracted: the next one carries it."""
    ledger = Ledger()
    for idx in range(3):
        entry = ledger.receive(1.0, idx, now=idx)
        ledger.finish(entry, Outcome.SUCCESS, 200, now=idx + 0.5)
        ledger.load_fields()  # built but never sent
    assert fields(ledger)["cur_perf"] == 3.0
    assert fields(ledger)["num_requests_recieved"] == 3


def test_in_flight_fields_are_not_windowed():
    ledger = Ledger()
    entry = ledger.receive(5.0, 1, now=0.0)
    ledger.reported(ledger.load_fields()[1])
    load = fields(ledger)
    assert load["cur_load"] == 5.0 and load["num_requests_working"] == 1
    assert load["working_request_idxs"] == [1]
    assert load["new_load"] == 0 and load["num_requests_recieved"] == 1
    ledger.finish(entry, Outcome.CANCELLED, 499, now=1.0)
    assert fields(ledger)["new_load"] == 0.0  # cancelled after its receipt was reported: not -5


def test_num_requests_recieved_counts_distinct_reqnums_since_start():
    """As Vast's worker counts it: distinct reqnums (a replayed envelope carries the same one),
    rejected requests included, never reset by a report; a request without a reqnum (unsigned)
    counts once."""
    ledger = Ledger()
    ledger.receive(1.0, 10, now=0.0, reqnum=500)
    ledger.reject(1.0, 11, 429, now=0.0, reqnum=501)
    ledger.reported(ledger.load_fields()[1])
    assert fields(ledger)["num_requests_recieved"] == 2
    ledger.receive(1.0, 10, now=1.0, reqnum=500)  # the same envelope again
    ledger.reject(1.0, 11, 503, now=1.0, reqnum=501)
    assert fields(ledger)["num_requests_recieved"] == 2
    ledger.receive(1.0, None, now=2.0)
    ledger.receive(1.0, None, now=2.0)
    ledger.receive(1.0, 12, now=2.0, reqnum=502)
    assert fields(ledger)["num_requests_recieved"] == 5
    assert ledger.totals.received == 7  # every request, for the worker's own status


def test_distinct_reqnums_remember_a_bounded_number():
    received = DistinctReqnums(remember=3)
    for reqnum in (1, 2, 3, 3, 2, 4):
        received.add(reqnum)
    assert received.count == 4
    assert received.recent == {2, 3, 4} and len(received.order) == 3
    received.add(1)  # forgotten: it counts again
    received.add(4)
    assert received.count == 5


def test_finished_records_for_delete_requests():
    ledger = Ledger()
    outcomes = [(Outcome.SUCCESS, 200), (Outcome.CANCELLED, 499), (Outcome.ERROR, 502),
                (Outcome.REJECTED, 429)]
    for idx, (outcome, status) in enumerate(outcomes):
        entry = ledger.receive(1.0, idx, now=10.0 + idx)
        if outcome is not Outcome.REJECTED:
            ledger.start(entry, now=20.0 + idx)
        ledger.finish(entry, outcome, status, now=30.0 + idx)
    ledger.reject(1.0, 4, 503, now=40.0)
    records = ledger.take_finished(100)
    assert [r.request_idx for r in records] == [0, 1, 2, 3, 4]
    assert [r.success for r in records] == [True, True, False, False, False]
    assert [r.outcome for r in records] == [*(o for o, _ in outcomes), Outcome.REJECTED]
    assert [r.status for r in records] == [200, 499, 502, 429, 503]
    assert records[0] == FinishedRequest(0, Outcome.SUCCESS, 200, 10.0, 20.0, 30.0)
    assert records[3].work_started_at is None and records[3].entered_queue_at == 13.0
    assert records[4] == FinishedRequest(4, Outcome.REJECTED, 503, 40.0, None, 40.0)
    assert not ledger.outbox


def test_unsigned_requests_produce_no_record_but_count_as_load():
    ledger = Ledger()
    entry = ledger.receive(2.0, None, now=0.0)
    assert fields(ledger)["working_request_idxs"] == []
    assert fields(ledger)["num_requests_working"] == 1
    ledger.finish(entry, Outcome.SUCCESS, 200, now=1.0)
    ledger.reject(1.0, None, 429, now=1.0)
    assert not ledger.outbox
    assert fields(ledger)["cur_perf"] == 2.0 and fields(ledger)["rej_load"] == 1.0


def test_finish_twice_is_ignored():
    ledger = Ledger()
    entry = ledger.receive(3.0, 1, now=0.0)
    ledger.finish(entry, Outcome.SUCCESS, 200, now=1.0)
    ledger.finish(entry, Outcome.SUCCESS, 200, now=2.0)
    ledger.finish(entry, Outcome.CANCELLED, 499, now=3.0)
    load = fields(ledger)
    assert load["cur_perf"] == 3.0 and load["new_load"] == 3.0
    assert len(ledger.outbox) == 1
    assert sum(ledger.totals.outcomes.values()) == 1


def test_outbox_is_bounded_and_counts_what_it_drops():
    ledger = Ledger(outbox_limit=3)
    for idx in range(5):
        ledger.reject(1.0, idx, 429, now=float(idx))
    assert [r.request_idx for r in ledger.outbox] == [2, 3, 4]  # oldest dropped first
    assert ledger.dropped == 2
    assert fields(ledger)["rej_load"] == 5.0  # the load still counts


def test_take_finished_respects_limit_and_put_back_keeps_order():
    ledger = Ledger()
    for idx in range(5):
        ledger.reject(1.0, idx, 429, now=float(idx))
    batch = ledger.take_finished(3)
    assert [r.request_idx for r in batch] == [0, 1, 2]
    ledger.reject(1.0, 5, 429, now=5.0)  # finished while the batch was on its way
    ledger.put_back(batch[1:])  # the first record was delivered, the rest failed
    assert [r.request_idx for r in ledger.outbox] == [1, 2, 3, 4, 5]
    assert [r.request_idx for r in ledger.take_finished(10)] == [1, 2, 3, 4, 5]
    assert ledger.take_finished(10) == []


def test_working_request_idxs_sorted():
    ledger = Ledger()
    for idx in (9, 2, 7):
        ledger.receive(1.0, idx, now=0.0)
    assert fields(ledger)["working_request_idxs"] == [2, 7, 9]


# -- property: ground truth vs reported ----------------------------------------------------------

class LedgerMachine(RuleBasedStateMachine):
    """Random receive/start/finish/reject/report sequences against the ground truth."""

    entries = Bundle("entries")

    @initialize()
    def setup(self):
        self.ledger = Ledger()
        self.now = 0.0
        self.next_idx = 0
        self.served = 0.0  # ground truth
        self.rejected = 0.0
        self.net_new = 0.0
        self.reported_perf = self.reported_rej = self.reported_new = 0.0
        self.received_count = 0
        self.in_flight: dict[int, float] = {}
        self.finished_idxs: list[int] = []
        self.pending_send = None
        self.delivered = []

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    def new_idx(self) -> int:
        self.next_idx += 1
        return self.next_idx

    @rule(target=entries, workload=st.integers(0, 1000), signed=st.booleans())
    def receive(self, workload, signed):
        idx = self.new_idx() if signed else None
        entry = self.ledger.receive(float(workload), idx, self.tick())
        self.in_flight[id(entry)] = float(workload)
        self.net_new += workload
        self.received_count += 1
        return (entry, idx)

    @rule(item=entries)
    def start(self, item):
        self.ledger.start(item[0], self.tick())

    @rule(item=consumes(entries), outcome=st.sampled_from(list(Outcome)))
    def finish(self, item, outcome):
        entry, idx = item
        workload = self.in_flight.pop(id(entry))
        self.ledger.finish(entry, outcome, 200, self.tick())
        if outcome is Outcome.SUCCESS:
            self.served += workload
        elif outcome is Outcome.CANCELLED:
            self.net_new -= workload
        elif outcome is Outcome.REJECTED:
            self.net_new -= workload
            self.rejected += workload
        if idx is not None:
            self.finished_idxs.append(idx)

    @rule(workload=st.integers(0, 1000), signed=st.booleans())
    def reject(self, workload, signed):
        idx = self.new_idx() if signed else None
        self.ledger.reject(float(workload), idx, 429, self.tick())
        self.rejected += workload
        self.received_count += 1
        if idx is not None:
            self.finished_idxs.append(idx)

    @rule()
    def build_report(self):
        """A report is built and goes out (one at a time, as the reporter sends them)."""
        if self.pending_send is None:
            self.pending_send = self.ledger.load_fields()

    @rule(arrived=st.booleans())
    def report_outcome(self, arrived):
        """The report in flight arrived (subtract what it carried) or failed (subtract nothing)."""
        if self.pending_send is None:
            return
        (load, window), self.pending_send = self.pending_send, None
        if arrived:
            self.ledger.reported(window)
            self.reported_perf += load["cur_perf"]
            self.reported_rej += load["rej_load"]
            self.reported_new += window.new_load  # what it settled (it sent that, or 0)
            assert load["new_load"] == max(window.new_load, 0.0)

    @rule(limit=st.integers(1, 5))
    def deliver_some(self, limit):
        batch = self.ledger.take_finished(limit)
        if len(batch) > 1:  # the tail failed: back to the front
            self.ledger.put_back(batch[1:])
            batch = batch[:1]
        self.delivered += batch

    @invariant()
    def ground_truth(self):
        load, _ = self.ledger.load_fields()
        assert self.reported_perf + load["cur_perf"] == self.served
        assert self.ledger.totals.workload_served == self.served
        assert self.reported_rej + load["rej_load"] == self.rejected
        assert self.reported_new + self.ledger.window.new_load == self.net_new
        assert load["new_load"] >= 0
        assert load["num_requests_recieved"] == self.received_count  # distinct reqnums: all
        assert load["cur_load"] == sum(self.in_flight.values())
        assert load["num_requests_working"] == len(self.in_flight)

    @invariant()
    def every_finished_idx_exactly_once(self):
        delivered = [r.request_idx for r in self.delivered]
        queued = [r.request_idx for r in self.ledger.outbox]
        assert sorted(delivered + queued) == sorted(self.finished_idxs)
        assert len(set(delivered + queued)) == len(delivered + queued)


LedgerMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40,
                                           deadline=None)
test_ledger_ground_truth = LedgerMachine.TestCase


@settings(max_examples=200, deadline=None)
@given(workloads=st.lists(st.floats(0, 1e6, allow_nan=False), max_size=30),
       report_every=st.integers(1, 5))
def test_float_workloads_sum_to_served(workloads, report_every):
    ledger = Ledger()
    reported = 0.0
    for n, workload in enumerate(workloads):
        entry = ledger.receive(workload, n, now=float(n))
        ledger.finish(entry, Outcome.SUCCESS, 200, now=float(n))
        if n % report_every == 0:
            load, window = ledger.load_fields()
            assert load["cur_perf"] >= 0
            reported += load["cur_perf"]
            ledger.reported(window)
    reported += fields(ledger)["cur_perf"]
    assert reported == pytest.approx(sum(workloads), rel=1e-9, abs=1e-6)
    assert len(ledger.take_finished(100)) == len(workloads)


# -- a record as delete_requests carries it ----------------------------------------------------

TIMES = st.floats(min_value=0.0, max_value=4e9)  # 0.0 (never) up to the year 2096


@given(idx=st.integers(0, 2**63), outcome=st.sampled_from(list(Outcome)), queued=TIMES,
       started=st.none() | TIMES, completed=TIMES)
def test_a_record_is_the_json_vasts_worker_sends(idx, outcome, queued, started, completed):
    """Field for field, in order and type, what the record's dict was before it wrote its own
    JSON; timestamps to the microsecond."""
    import json

    from vespa.corridor.ledger import VAST_STATUS
    parsed = json.loads(FinishedRequest(idx, outcome, 200, queued, started,
                                        completed).vast_json())
    finished = outcome in (Outcome.SUCCESS, Outcome.ERROR)
    expected = {"request_idx": idx,
                "success": outcome in (Outcome.SUCCESS, Outcome.CANCELLED),
                "status": VAST_STATUS[outcome], "entered_queue_at": queued,
                "work_started_at": started or 0.0,
                "work_completed_at": completed if finished else 0.0}
    assert list(parsed) == list(expected)
    assert {k: parsed[k] for k in ("request_idx", "success", "status")} == \
        {k: expected[k] for k in ("request_idx", "success", "status")}
    assert type(parsed["request_idx"]) is int and type(parsed["success"]) is bool
    for name in ("entered_queue_at", "work_started_at", "work_completed_at"):
        assert type(parsed[name]) is float, name
        assert abs(parsed[name] - expected[name]) <= 1e-6, (name, parsed[name], expected[name])


def micros_written(text: str) -> int:
    """The microseconds a JSON float of json_time's spells, read from its digits (not parsed:
    a float would round them again)."""
    whole, _, fraction = text.partition(".")
    assert 1 <= len(fraction) <= 6 and (fraction == "0" or not fraction.endswith("0")), text
    return int(whole) * 10**6 + int(fraction.ljust(6, "0"))


@example(1746562265.4378104)  # 2025: x.4378104 was written .437811
@example(4694335671.699831)  # 2118: seconds * 1e6 + 0.5 is a tie there, rounded to even
@example(1765065432.0078125)  # an exact half microsecond: up
@example(16384.9999995)  # into the next second
@given(st.floats(min_value=2.0**14, max_value=9e9, exclude_max=True))
def test_a_timestamp_is_written_rounded_to_the_nearest_microsecond(seconds):
    """Rounded from the float's exact value (a half up), up to 9e9 s (the year 2255); beyond
    that json.dumps writes it."""
    nearest = math.floor(Fraction(seconds) * 10**6 + Fraction(1, 2))
    assert micros_written(json_time(seconds)) == nearest
