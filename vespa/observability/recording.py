"""A request record's raw entry, made from the request and its visit through the corridor
(``records.RequestRecorder`` redacts, caps and writes it off the event loop)."""

from __future__ import annotations

import time

from ..corridor.visit import Visit
from ..http.messages import Request
from ..http.target import redacted
from .records import REDACTED



def header(pairs, name: str) -> str | None:
    """The first value of header ``name`` in (name, value) pairs of str or bytes."""
    wanted = name.lower()
    for key, value in pairs or ():
        if isinstance(key, bytes):
            key, value = key.decode("latin-1"), value.decode("latin-1")
        if key.lower() == wanted:
            return value
    return None


def record_entry(request: Request, visit: Visit, ttfb: float | None) -> dict:
    """The raw entry ``RequestRecorder.record`` takes, for an answered request."""
    exchange, envelope, response = visit.exchange, visit.envelope, visit.response
    path_qs = envelope.path_qs or request.target
    path, _, query = path_qs.partition("?")
    query = redacted(query)  # a signature (GET auth) or an endpoint key (api_key) in the query
    if exchange.headers is not None:  # relayed from the backend
        response_headers = exchange.headers
        response_body = bytes(exchange.body) if exchange.body is not None else None
    elif response is not None:  # answered by the worker itself
        response_headers = response.headers
        response_body = response.body
    else:
        response_headers, response_body = [], None
    if visit.outcome is None:  # refused before it was load (often before its signature was
        # checked): what anyone may send is kept as metadata only, never its headers or body
        request_headers: list = []
        request_body = None
    else:
        request_headers, request_body = request.raw_headers, envelope.body
    entry = {
        "id": visit.rid, "method": request.method, "path": path, "query": query,
        "client": request.remote, "status": visit.status,
        "outcome": visit.outcome.value if visit.outcome is not None else "refused",
        "received_at": visit.received_at, "started_at": visit.started_at,
        "finished_at": time.time(), "ttfb_seconds": ttfb,
        "request_headers": request_headers,
        "request_body": request_body, "request_content_type": request.header(b"content-type"),
        "response_headers": response_headers, "response_body": response_body,
        "response_content_type": header(response_headers, "Content-Type"),
        "bytes": {"in": exchange.bytes_in, "out": exchange.bytes_out},
    }
    if envelope.auth_data is not None:
        entry["auth_data"] = {**envelope.auth_data, "signature": REDACTED}
    return entry
