"""The body of ``GET /_vespa/status``: what the worker is doing, in one JSON document.

Built from plain reads of the worker's parts; nothing here waits or writes. The master token in
the last report is never shown.
"""

from __future__ import annotations

import time

from .. import HOT_PATH, __version__
from ..autoscaler.reporter import Reporter
from ..backend.insight import BackendInsight
from ..backend.supervisor import Supervisor
from ..corridor.admission import Admission
from ..corridor.ledger import Ledger
from ..corridor.sessions import Sessions
from ..state import WorkerState
from .records import RequestRecorder

HIDDEN_REPORT_FIELDS = frozenset({"mtoken"})


def last_report(reporter: Reporter | None) -> dict | None:
    """The last worker_status the autoscaler accepted, with when it was sent (epoch seconds)."""
    if reporter is None:
        return None
    sent = reporter.last_sent
    body = None if sent is None else {k: v for k, v in sent.items()
                                      if k not in HIDDEN_REPORT_FIELDS}
    sent_at = None if sent is None else time.time() - (time.monotonic() - reporter.last_sent_at)
    return {"sent_at": sent_at, "body": body, "sent": reporter.sent, "failed": reporter.failed}


def worker_status(*, state: WorkerState, admission: Admission, ledger: Ledger,
                  backend_url: str, backend: str | None, reporter: Reporter | None,
                  supervisor: Supervisor | None, insight: BackendInsight | None,
                  recorder: RequestRecorder | None, sessions: Sessions | None = None) -> dict:
    queued = admission.queued_workload
    status = {
        "version": __version__,
        "hot_path": HOT_PATH,
        "state": state.phase.value,
        "ready": state.ready,
        "error": state.error_msg or None,
        "uptime_seconds": round(time.monotonic() - state.started_at, 3),
        "throughput": admission.max_throughput or None,
        "estimated_wait_seconds": admission.estimated_wait(),
        "in_flight": {"requests": len(ledger.in_flight), "workload": admission.workload},
        "running": {"requests": admission.running, "workload": admission.workload - queued},
        "queued": {"requests": admission.queued, "workload": queued},
        "totals": {"received": ledger.totals.received, "rejected": ledger.totals.rejected,
                   **ledger.totals.outcomes},
        "last_report": last_report(reporter),
        "backend": {
            "url": backend_url,
            "kind": backend,
            "healthy": state.backend_healthy,
            "restarts": supervisor.restarts if supervisor is not None else None,
            "queue": insight.snapshot() if insight is not None else None,
        },
    }
    if sessions is not None:
        status["sessions"] = {"open": len(sessions.open), "limit": sessions.limit,
                              "created": sessions.created, "ended": dict(sessions.ends)}
    if recorder is not None:
        status["request_records"] = {
            "directory": recorder.directory, "written": recorder.written,
            "skipped_over_budget": recorder.over_budget, "dropped_queue_full": recorder.dropped,
            "failed": recorder.failures, "removed_past_retention": recorder.removed,
            "removed_over_disk_limit": recorder.removed_over_disk}
    return status
