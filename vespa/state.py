"""The worker's phase (loading, benchmarking, ready, errored, draining) and error: what every
room reads (the corridor, the reporter, the routes) and start-up moves along."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable


class Phase(str, Enum):
    LOADING = "loading"
    BENCHMARKING = "benchmarking"
    READY = "ready"
    ERRORED = "errored"
    DRAINING = "draining"


@dataclass
class WorkerState:
    phase: Phase = Phase.LOADING
    error_msg: str = ""
    backend_healthy: bool = False
    started_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None
    max_perf: float = 0.0
    loadtime: float | None = None  # seconds from start to ready: in every report once set
    redact: Callable[[str], str] = str  # masks secrets in an error before it is kept

    @property
    def draining(self) -> bool:
        return self.phase is Phase.DRAINING

    @property
    def ready(self) -> bool:
        """Ready for work: started up, the backend answers its health check, not shutting down."""
        return self.phase is Phase.READY and self.backend_healthy and not self.error_msg

    def become_ready(self, now: float) -> None:
        self.phase = Phase.READY
        self.backend_healthy = True
        self.ready_at = now
        self.loadtime = max(now - self.started_at, 1e-3)

    def fail(self, message: str) -> None:
        if not self.draining:
            self.phase = Phase.ERRORED
        self.error_msg = self.redact(message)
