"""Admission: the pure rules (with property tests) and the queue as clients see it."""

from __future__ import annotations

import asyncio
import math

import pytest
from hypothesis import given, settings, strategies as st

from vespa.corridor.admission import MAX_WORKLOAD, Admission, Rejection, Ticket, workload_of
from vespa.corridor.gate import Gate, Overloaded

from .conftest import wait_until


def test_workload_defaults_when_cost_missing_or_small():
    assert workload_of(None, 5.0) == 5.0
    assert workload_of(0.5, 5.0) == 5.0
    assert workload_of(1.0, 5.0) == 5.0
    assert workload_of(float("nan"), 5.0) == 5.0
    assert workload_of(float("inf"), 5.0) == 5.0
    assert workload_of(-3, 5.0) == 5.0
    assert workload_of(250, 5.0) == 250.0


@pytest.mark.parametrize("cost", [1e9 + 1, 1e300, 1.7976931348623157e308, float(10 ** 30)])
def test_absurd_costs_are_clamped(cost):
    assert workload_of(cost, 5.0) == MAX_WORKLOAD


def test_clamped_workloads_keep_admission_finite_and_reusable():
    """Two of the largest signed costs at once: the admitted workload stays finite, the second
    is turned away, and once the first finishes the worker admits again."""
    admission = Admission(limit=None, max_wait_time=5.0, max_throughput=1000.0)
    first = admission.admit(workload_of(1.7976931348623157e308, 1.0))
    assert isinstance(first, Ticket)
    assert isinstance(admission.admit(workload_of(1.7976931348623157e308, 1.0)), Rejection)
    assert math.isfinite(admission.workload) and math.isfinite(admission.estimated_wait())
    admission.finish(first)
    assert admission.workload == 0.0
    assert isinstance(admission.admit(workload_of(3, 1.0)), Ticket)


def test_wait_rule_is_off_until_throughput_known():
    admission = Admission(limit=None, max_wait_time=1.0)
    for _ in range(100):
        assert isinstance(admission.admit(1000.0), Ticket)
    assert admission.estimated_wait() is None


def test_wait_rule_rejects_with_retry_after():
    admission = Admission(limit=None, max_wait_time=10.0, max_throughput=100.0)
    assert isinstance(admission.admit(600.0), Ticket)  # wait before it: 0 s
    assert isinstance(admission.admit(500.0), Ticket)  # wait before it: 6 s
    rejection = admission.admit(1.0)  # wait before it: 11 s > 10 s
    assert isinstance(rejection, Rejection)
    assert rejection.reason == "overload"
    assert rejection.retry_after == 1
    assert "11.0s" in rejection.message
    assert admission.workload == 1100.0  # the rejected request added nothing


def test_fifo_under_limit():
    admission = Admission(limit=1, max_wait_time=10.0)
    first, second, third = (admission.admit(1.0) for _ in range(3))
    assert first.started and not second.started and not third.started
    assert admission.finish(first) == [second]
    assert admission.finish(third) == []  # left the line
    assert admission.finish(second) == []
    assert admission.running == 0 and admission.queued == 0 and admission.workload == 0


def test_finish_twice_is_harmless():
    admission = Admission(limit=2, max_wait_time=1.0)
    ticket = admission.admit(3.0)
    admission.finish(ticket)
    assert admission.finish(ticket) == []
    assert admission.running == 0 and admission.workload == 0


operations = st.lists(
    st.one_of(st.tuples(st.just("admit"), st.floats(0.1, 500.0)),
              st.tuples(st.just("finish"), st.integers(0, 50))),
    max_size=200)


@settings(max_examples=300, deadline=None)
@given(limit=st.one_of(st.none(), st.integers(1, 5)), ops=operations,
       throughput=st.one_of(st.none(), st.floats(1.0, 1000.0)))
def test_admission_invariants(limit, ops, throughput):
    admission = Admission(limit=limit, max_wait_time=5.0, max_throughput=throughput)
    live: list[Ticket] = []
    start_order: list[Ticket] = []
    admit_order: list[Ticket] = []
    for op, arg in ops:
        if op == "admit":
            wait = admission.estimated_wait()
            result = admission.admit(arg)
            if isinstance(result, Rejection):
                assert wait is not None and wait > 5.0 and result.retry_after >= 1
                continue
            admit_order.append(result)
            live.append(result)
            if result.started:
                start_order.append(result)
        elif live:
            ticket = live.pop(arg % len(live))
            start_order.extend(admission.finish(ticket))
        running = [t for t in live if t.started]
        assert admission.running == len(running)
        assert limit is None or admission.running <= limit
        assert admission.queued == len(live) - len(running)
        assert math.isclose(admission.workload, sum(t.workload for t in live), abs_tol=1e-6)
        # work-conserving: nobody waits while a slot is free
        assert admission.queued == 0 or admission.running == limit
    # strict FIFO: tickets start in the order they were admitted (skipping those that left)
    started_positions = [admit_order.index(t) for t in start_order]
    assert started_positions == sorted(started_positions)


async def test_gate_queue_timeout_and_leaving_frees_the_place():
    gate = Gate(Admission(limit=1, max_wait_time=0.2))
    holder = await gate.enter(1.0)
    with pytest.raises(Overloaded) as caught:
        await gate.enter(1.0)
    assert caught.value.rejection.reason == "queue_timeout"
    waiter = asyncio.create_task(gate.enter(1.0))
    await wait_until(lambda: gate.admission.queued == 1)  # it waits in line
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.admission.queued == 0
    gate.leave(holder)
    assert gate.admission.running == 0 and gate.admission.workload == 0


# -- through the worker -----------------------------------------------------------------------

async def test_fifo_start_order_under_limit_of_one(make_worker, backend):
    client, worker = await make_worker(VESPA_ALLOW_PARALLEL="false", VESPA_MAX_WAIT_TIME="30")
    tasks = []
    for i in range(6):
        delay = 0.5 if i == 0 else 0.02  # r0 holds the slot while the others line up
        tasks.append(asyncio.create_task(client.get(f"/slow?delay={delay}&name=r{i}")))
        await wait_until(lambda: len(worker.ledger.in_flight) == i + 1)
    responses = await asyncio.gather(*tasks)
    assert [r.status for r in responses] == [200] * 6
    assert backend.log.finished == [f"r{i}" for i in range(6)]


async def test_overload_is_429_with_retry_after(make_worker, backend):
    client, worker = await make_worker(VESPA_MAX_THROUGHPUT="10", VESPA_DEFAULT_COST="50",
                                       VESPA_MAX_WAIT_TIME="6")
    # each request is 50 units at 10 units/s: 5 s of work. The 2nd waits 5 s (ok), the 3rd 10 s.
    first = asyncio.create_task(client.get("/slow?delay=1&name=a"))
    second = asyncio.create_task(client.get("/slow?delay=1&name=b"))
    await wait_until(lambda: len(worker.ledger.in_flight) == 2)
    third = await client.get("/slow?delay=1&name=c")
    assert third.status == 429
    assert third.headers["Retry-After"] == "4"
    assert "estimated wait 10.0s" in (await third.json())["error"]
    assert [r.status for r in await asyncio.gather(first, second)] == [200, 200]
    assert worker.ledger.totals.rejected == 1
    assert "c" not in backend.log.finished


async def test_queued_request_waits_no_longer_than_max_wait(make_worker):
    client, worker = await make_worker(VESPA_MAX_CONCURRENCY="1", VESPA_MAX_WAIT_TIME="0.3")
    busy = asyncio.create_task(client.get("/slow?delay=1.5"))
    await wait_until(lambda: len(worker.ledger.in_flight) == 1)
    queued = await client.get("/slow?delay=0.01")
    assert queued.status == 429
    assert "waited 0.3s in line" in (await queued.json())["error"]
    assert (await busy).status == 200


async def test_client_leaving_the_line_frees_its_place(make_worker, backend):
    client, worker = await make_worker(VESPA_MAX_CONCURRENCY="1", VESPA_MAX_WAIT_TIME="30")
    busy = asyncio.create_task(client.get("/slow?delay=0.4&name=busy"))
    await wait_until(lambda: len(worker.ledger.in_flight) == 1)
    leaver = asyncio.create_task(client.get("/slow?delay=0.01&name=leaver"))
    await wait_until(lambda: worker.admission.queued == 1)
    leaver.cancel()
    await wait_until(lambda: worker.admission.queued == 0)
    stayer = await client.get("/slow?delay=0.01&name=stayer")
    assert stayer.status == 200
    assert (await busy).status == 200
    assert backend.log.finished == ["busy", "stayer"]
    assert worker.ledger.totals.outcomes["cancelled"] == 1
