"""Reports to the autoscaler: ``worker_status`` (load, capacity, errors) and ``delete_requests``
(finished requests), to each REPORT_ADDR in order, with retries; ledger counters are reset only
by a report that reached the autoscaler, finished records are re-queued when delivery fails.
Finished records travel in their own task, so a slow delete_requests never holds up status."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from typing import Callable

import aiohttp

from .. import __version__
from ..corridor.ledger import FinishedRequest, Ledger
from ..state import WorkerState

log = logging.getLogger("vespa.reporter")
NO_DELETE_ADDR = "https://cloud.vast.ai/api/v0"  # takes worker_status, not delete_requests
DELETE_BATCH = 500
# How long an autoscaler's answer may take. A POST whose answer is late may well have been
# received, and re-sending it counts its contents twice: a worker_status window's load, a
# delete_requests batch's records. So connecting gets the usual short timeout (nothing was sent
# yet: a retry is safe), while the answer gets this long one, for an autoscaler that is slow but
# alive. Past it, a delete_requests batch is sent again (a duplicate is the lesser harm: a lost
# record would leave the autoscaler counting that request as in flight for good); a
# worker_status report is not retried, the next one carries its counts and what came since.
ANSWER_TIMEOUT = 30.0
JSON_HEADERS = {"Content-Type": "application/json"}  # what aiohttp's json= sends
# Disk use moves all the time (logs): on its own it is no reason for a report.
DISK_FIELDS = {"additional_disk_usage": 0, "disk_usage": 0}


@dataclass
class Identity:
    """Who the worker is to the autoscaler."""

    worker_id: int
    mtoken: str
    url: str
    version: str = field(default=f"vespa-{__version__}")


def status_body(identity: Identity, state: WorkerState, load: dict, disk_usage_gb: float,
                disk_delta_gb: float) -> dict:
    """The worker_status body: the fields of Vast's current worker, in its order."""
    return {
        "id": identity.worker_id,
        "mtoken": identity.mtoken,
        "version": identity.version,
        "loadtime": state.loadtime or 0.0,  # in every report once loaded, as Vast's worker
        "cur_load": load["cur_load"],
        "rej_load": load["rej_load"],
        "new_load": load["new_load"],
        "error_msg": state.error_msg,
        "max_perf": state.max_perf if state.ready else 0.0,
        "cur_perf": load["cur_perf"],
        "cur_capacity": 0,
        "max_capacity": 0,
        "num_requests_working": load["num_requests_working"],
        "num_requests_recieved": load["num_requests_recieved"],
        "additional_disk_usage": disk_delta_gb,
        "disk_usage": disk_usage_gb,
        "working_request_idxs": load["working_request_idxs"],
        "url": identity.url,
    }


def delete_bodies(identity: Identity, batch: list[FinishedRequest], fmt: str
                  ) -> list[tuple[bytes, list[FinishedRequest]]]:
    """The delete_requests POST bodies (JSON) for a batch, each with the records it carries.
    Each record is written as JSON directly (``FinishedRequest.vast_json``): a signed request
    costs one, and json.dumps of a dict per record cost more than the rest of its reporting."""
    head = {"worker_id": identity.worker_id, "mtoken": identity.mtoken}
    if fmt == "2026":
        records = ", ".join([r.vast_json() for r in batch])
        return [(f'{json.dumps(head)[:-1]}, "requests": [{records}]}}'.encode(), batch)]
    bodies = []
    for success in (True, False):
        part = [r for r in batch if r.success is success]
        if part:
            bodies.append((json.dumps({**head, "request_idxs": [r.request_idx for r in part],
                                       "success": success}).encode(), part))
    return bodies


def addresses_for(path: str, addrs: tuple[str, ...]) -> list[str]:
    """The addresses to try for ``path``, in order; delete_requests skips ``NO_DELETE_ADDR``."""
    bases = [addr.rstrip("/") for addr in addrs]
    if path == "/delete_requests/":
        bases = [base for base in bases if base != NO_DELETE_ADDR]
    return bases


class Reporter:
    def __init__(self, addrs: tuple[str, ...], identity: Identity, ledger: Ledger,
                 state: WorkerState, session: aiohttp.ClientSession, *, interval: float = 1.0,
                 max_interval: float = 10.0, delete_format: str = "2026",
                 attempts: int = 3, timeout: float = 5.0, answer_timeout: float = ANSWER_TIMEOUT,
                 on_report: Callable[[str, bool], None] = lambda kind, ok: None):
        self.addrs = addrs
        self.on_report = on_report  # (kind, delivered) after each report: metrics
        self.identity = identity
        self.ledger = ledger
        self.state = state
        self.session = session
        self.interval = interval
        self.max_interval = max_interval
        self.delete_format = delete_format
        self.attempts = attempts
        self.timeout = aiohttp.ClientTimeout(total=max(timeout, answer_timeout),
                                             sock_connect=timeout)
        self.delivery: asyncio.Task | None = None  # finished records on their way
        self.status_turn = asyncio.Lock()  # one worker_status at a time, each its own window
        self.reports: set[asyncio.Task] = set()  # worker_status reports on their way
        self.wake = asyncio.Event()
        self.last_sent: dict | None = None
        self.last_sent_at = float("-inf")
        self.disk_used = shutil.disk_usage("/").used
        self.sent = 0
        self.failed = 0

    async def post(self, path: str, body: dict | bytes) -> bool:
        """POST to the first address that takes it (each tried a few times); ``body`` is
        JSON-encoded, or its JSON already."""
        delivered = False
        try:
            delivered = await self._post(path, body if isinstance(body, bytes) else
                                         json.dumps(body).encode())
        finally:  # one cancelled (given up at shutdown) is counted as not delivered
            self.on_report(path.strip("/"), delivered)
        return delivered

    async def _post(self, path: str, body: bytes) -> bool:
        for addr in addresses_for(path, self.addrs):
            for attempt in range(self.attempts):
                try:
                    async with self.session.post(addr + path, data=body, headers=JSON_HEADERS,
                                                 timeout=self.timeout) as response:
                        await response.read()
                        if 200 <= response.status < 300:
                            return True
                        log.warning("%s%s answered %d", addr, path, response.status)
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    log.warning("%s%s failed: %s", addr, path, exc or type(exc).__name__)
                    late = isinstance(exc, asyncio.TimeoutError) \
                        and not isinstance(exc, aiohttp.ConnectionTimeoutError)  # sent nothing
                    if late and path == "/worker_status/":
                        return False  # it may have arrived: the next report carries its counts
                if attempt + 1 < self.attempts:
                    await asyncio.sleep(0.2 * 2 ** attempt)
        return False

    async def report_status(self, force: bool = False) -> bool:
        """Send worker_status when something changed (or ``force``); False when it failed.

        One at a time, and shielded: two reports taking the same window (the periodic one and
        the final one, or a test's) would count its load twice; a report whose caller is
        cancelled (shutdown) finishes, so the next one waits for it and carries only what
        came after (``abandon`` ends it at shutdown, when the time for it is up)."""
        report = asyncio.ensure_future(self._report_status_in_turn(force))
        self.reports.add(report)
        report.add_done_callback(self.reports.discard)
        return await asyncio.shield(report)

    async def _report_status_in_turn(self, force: bool) -> bool:
        async with self.status_turn:
            return await self._report_status(force)

    async def _report_status(self, force: bool) -> bool:
        load, window = self.ledger.load_fields()
        disk_used = shutil.disk_usage("/").used
        # disk_usage (used on /) and additional_disk_usage in GiB, as Vast's own worker counts them
        body = status_body(self.identity, self.state, load, disk_used / 2**30,
                           (disk_used - self.disk_used) / 2**30)
        # new work since the last report always goes out; its counts are per window, so two
        # windows with the same traffic have equal bodies
        news = window.new_load or window.rej_load or window.cur_perf
        unchanged = self.last_sent is not None \
            and {**body, **DISK_FIELDS} == {**self.last_sent, **DISK_FIELDS}
        due = time.monotonic() - self.last_sent_at >= self.max_interval
        if unchanged and not news and not due and not force:
            return True
        try:
            delivered = await self.post("/worker_status/", body)
        except asyncio.CancelledError:
            self.failed += 1  # given up (``abandon``): its window stays in the ledger
            raise
        if not delivered:
            self.failed += 1
            return False
        self.sent += 1
        self.ledger.reported(window)
        self.disk_used = disk_used
        self.last_sent, self.last_sent_at = body, time.monotonic()
        return True

    async def abandon(self) -> None:
        """Cancel the reports still on their way and wait for them to end: at shutdown, once
        the final report's time is up, before the session they use is closed (under a closed
        session a POST fails, and a retry raises in a task nobody awaits any more). A cancelled
        worker_status is not counted as sent and its window stays in the ledger; a cancelled
        delivery puts its records back in the outbox: whether they arrived, nobody knows, and
        the process ends with them."""
        pending = list(self.reports)
        if self.delivery is not None:
            pending.append(self.delivery)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    @property
    def settled(self) -> bool:
        """Every finished record delivered: none waits in the outbox, none is on its way."""
        return not self.ledger.outbox and (self.delivery is None or self.delivery.done())

    def deliver(self) -> asyncio.Task | None:
        """The delivery of finished records on its way, else a new one if records wait."""
        if self.delivery is not None and not self.delivery.done():
            return self.delivery
        self.delivery = None
        if self.ledger.outbox:
            self.delivery = asyncio.create_task(self._deliver(), name="delete_requests")
        return self.delivery

    async def report_finished(self) -> bool:
        """Deliver every finished-request record; False when a delivery failed (its records are
        back at the front of the outbox).

        A delivery is shielded: cancelling this (shutdown) leaves a POST on its way to finish, so
        that the final report waits for its answer instead of sending its records again."""
        while (delivery := self.deliver()) is not None:
            if not await asyncio.shield(delivery):
                return False
        return True

    async def _deliver(self) -> bool:
        """POST the records the outbox holds now, in batches; undelivered records go back to its
        front. Records that finish meanwhile wait for the next delivery (the next report, or the
        next round of ``report_finished``), as Vast's worker sends a snapshot once a second:
        under load, going on until the outbox is empty was one POST after another, each with the
        few records that finished during the last one."""
        left = len(self.ledger.outbox)
        while left > 0 and self.ledger.outbox:
            batch = self.ledger.take_finished(min(DELETE_BATCH, left))
            left -= len(batch)
            bodies = delete_bodies(self.identity, batch, self.delete_format)
            for i, (body, _) in enumerate(bodies):
                delivered = False
                try:
                    delivered = await self.post("/delete_requests/", body)
                except Exception:  # a reporting bug must not lose records
                    log.exception("delete_requests failed")
                finally:  # failed, or the loop stops mid-POST: keep the records
                    if not delivered:
                        self.ledger.put_back([r for _, records in bodies[i:] for r in records])
                if not delivered:
                    return False
        return True

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), self.interval)
            except asyncio.TimeoutError:
                pass
            forced = self.wake.is_set()
            self.wake.clear()
            try:
                await self.report_status(force=forced)
                self.deliver()  # in the background: a slow answer holds up no status report
            except Exception:  # a reporting bug must not stop reporting
                log.exception("report failed")
            if self.ledger.dropped:
                log.error("%d finished-request records were dropped: the autoscaler was "
                          "unreachable for too long", self.ledger.dropped)
                self.ledger.dropped = 0
