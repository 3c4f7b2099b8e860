"""Request ids: the client's own when sane, else a new process-unique one."""

from __future__ import annotations

import contextvars
import itertools
import os

_PREFIX = os.urandom(4).hex()
_COUNTER = itertools.count(1)
_MAX_CLIENT_ID = 200

# the id of the request being served (log lines carry it: observability.logs)
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "current_request_id", default=None)


def request_id(client_value: str | None) -> str:
    """The client's ``X-Request-Id`` when it sent a sane one, else a new process-unique id."""
    if client_value and len(client_value) <= _MAX_CLIENT_ID and client_value.isprintable():
        return client_value
    return f"{_PREFIX}-{next(_COUNTER):x}"
