"""Envelope: turn an incoming request into (auth data, what the backend gets, cost); pure.

POST/PUT/PATCH carry ``{"auth_data": {...}, "payload": {...}}``: the payload becomes the backend's
JSON body. GET/DELETE/HEAD carry auth in ``serverless_*`` query parameters; the other parameters
go to the backend untouched. In unsecured mode a request without auth data passes through as-is.
Problems a client caused raise ``EnvelopeError`` (422) with one message per field.
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple
from urllib.parse import unquote_plus

from mypy_extensions import mypyc_attr

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
QUERY_PREFIX = "serverless_"
AUTH_FIELDS = ("cost", "endpoint", "reqnum", "request_idx", "signature", "url")
# The 2024 (legacy) autoscalers send no request_idx: such a request is load like any other, but
# has no record for delete_requests.
REQUIRED_FIELDS = tuple(name for name in AUTH_FIELDS if name != "request_idx")
_NUMERIC_QUERY_FIELDS = frozenset({"cost", "reqnum", "request_idx"})


@mypyc_attr(native_class=False)  # a builtin exception's subclass stays a Python class
class EnvelopeError(ValueError):
    """The request is not a valid envelope; ``problems`` has one message per field."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class Envelope(NamedTuple):  # made once per request: a NamedTuple is 5x cheaper than a dataclass
    auth_data: dict | None
    body: bytes | None = None  # the backend's body; None: the request's own body
    path_qs: str | None = None  # the backend's path and query; None: the request's own
    cost: float | None = None
    request_idx: int | None = None
    session_id: str | None = None  # the session the request belongs to (Vast's sessions)
    reqnum: int | None = None


PASSTHROUGH = Envelope(None)


def _is_cost(value: object) -> bool:
    """A finite number >= 0 that fits a float (a 400-digit integer does not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:
        return False


def check_auth_data(auth_data: object, where: str = "auth_data") -> list[str]:
    """One message per missing or mistyped field; empty when the auth data is well-formed."""
    if not isinstance(auth_data, dict):
        return [f"{where} must be a JSON object"]
    problems = []
    for name in REQUIRED_FIELDS:
        if name not in auth_data:
            problems.append(f"{where}.{name} is missing")
    cost = auth_data.get("cost")
    if "cost" in auth_data and not _is_cost(cost):
        problems.append(f"{where}.cost must be a finite number >= 0")
    for name in ("reqnum", "request_idx"):
        value = auth_data.get(name)
        if name in auth_data and not (isinstance(value, int) and not isinstance(value, bool)
                                      and value >= 0):
            problems.append(f"{where}.{name} must be a whole number >= 0")
    for name in ("endpoint", "signature", "url"):
        if name in auth_data and not isinstance(auth_data[name], str):
            problems.append(f"{where}.{name} must be a string")
    return problems


def _signed(auth_data: dict, **rest) -> Envelope:
    problems = check_auth_data(auth_data)
    if problems:
        raise EnvelopeError(problems)
    return Envelope(auth_data, cost=float(auth_data["cost"]),
                    request_idx=auth_data.get("request_idx"), reqnum=auth_data["reqnum"], **rest)


def open_body(body: bytes, *, unsecured: bool) -> Envelope:
    """The envelope of a POST/PUT/PATCH body."""
    if unsecured and b'"auth_data"' not in body:
        return PASSTHROUGH
    try:
        document = json.loads(body)
    except RecursionError:  # nested deeper than Python's recursion limit: refuse, do not crash
        if unsecured:
            return PASSTHROUGH
        raise EnvelopeError(["body is JSON nested too deeply to be an envelope"]) from None
    except (ValueError, UnicodeDecodeError):
        if unsecured:  # "auth_data" was only text in a body that is no envelope
            return PASSTHROUGH
        raise EnvelopeError(["body must be a JSON envelope "
                             '{"auth_data": {...}, "payload": {...}}, but it is not JSON'])
    if not isinstance(document, dict):
        if unsecured:
            return PASSTHROUGH
        raise EnvelopeError(['body must be a JSON object {"auth_data": ..., "payload": ...}'])
    if "auth_data" not in document:
        if unsecured:
            return PASSTHROUGH
        problems = ["auth_data is missing: send requests through the autoscaler's /route/"]
        if "payload" not in document:
            problems.append("payload is missing")
        raise EnvelopeError(problems)
    problems = check_auth_data(document["auth_data"])
    if "payload" not in document:
        problems.append("payload is missing (it is the JSON body the backend receives)")
    session_id = document.get("session_id")
    if session_id is not None and not isinstance(session_id, str):
        problems.append("session_id must be a string (from /session/create) or null")
    if problems:
        raise EnvelopeError(problems)
    try:
        # a lone surrogate ("\ud800" in the JSON) has no UTF-8: it goes on as the same escape
        payload = json.dumps(document["payload"], separators=(",", ":"),
                             ensure_ascii=False).encode("utf-8", "backslashreplace")
    except RecursionError:
        raise EnvelopeError(["payload is nested too deeply"]) from None
    return _signed(document["auth_data"], body=payload, session_id=session_id)


def _query_value(name: str, raw: str) -> object:
    text = unquote_plus(raw)
    if name in _NUMERIC_QUERY_FIELDS:
        try:  # JSON keeps 100 and 100.0 apart, as the signature does
            return json.loads(text)
        except ValueError:
            return text
    return text


def open_query(raw_path: str, *, unsecured: bool) -> Envelope:
    """The envelope of a GET/DELETE/HEAD: ``serverless_*`` parameters out of the query."""
    path, sep, query = raw_path.partition("?")
    if QUERY_PREFIX not in query:
        if unsecured:
            return PASSTHROUGH
        raise EnvelopeError([f"query parameter {QUERY_PREFIX}{name} is missing"
                             for name in REQUIRED_FIELDS])
    auth_data: dict = {}
    kept = []
    for part in query.split("&"):
        name, _, value = part.partition("=")
        key = unquote_plus(name)
        if key.startswith(QUERY_PREFIX) and key[len(QUERY_PREFIX):] in AUTH_FIELDS:
            field = key[len(QUERY_PREFIX):]
            auth_data[field] = _query_value(field, value)
        elif part:
            kept.append(part)
    if not auth_data and unsecured:  # "serverless_" was only text in the path or a value
        return PASSTHROUGH
    problems = check_auth_data(auth_data, "query")
    if problems:
        raise EnvelopeError([p.replace("query.", f"query parameter {QUERY_PREFIX}")
                             for p in problems])
    return _signed(auth_data, path_qs=path + ("?" + "&".join(kept) if kept else ""))


def open_envelope(method: str, raw_path: str, body: bytes | None, *,
                  unsecured: bool) -> Envelope:
    """Dispatch on the method: body envelope for POST/PUT/PATCH, query envelope otherwise."""
    if method in BODY_METHODS:
        if body is None:
            if unsecured:
                return PASSTHROUGH
            raise EnvelopeError(['body must be a JSON envelope {"auth_data": ..., '
                                 '"payload": ...}, but it is empty'])
        return open_body(body, unsecured=unsecured)
    return open_query(raw_path, unsecured=unsecured)
