"""Envelope: turn an incoming request into (auth data, what the backend gets, cost); pure.

POST/PUT/PATCH carry ``{"auth_data": {...}, "payload": {...}}``: the payload becomes the backend's
JSON body. GET/DELETE/HEAD carry auth in ``serverless_*`` query parameters; the other parameters
go to the backend untouched. In unsecured mode a request without auth data passes through as-is.
Problems a client caused raise ``EnvelopeError`` (422) with one message per field.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_plus

from mypy_extensions import mypyc_attr

BODY_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})
QUERY_PREFIX: Final = "serverless_"
AUTH_FIELDS: Final = ("cost", "endpoint", "reqnum", "request_idx", "signature", "url")
# The 2024 (legacy) autoscalers send no request_idx: such a request is load like any other, but
# has no record for delete_requests.
REQUIRED_FIELDS: Final = ("cost", "endpoint", "reqnum", "signature", "url")  # no request_idx
_NUMERIC_QUERY_FIELDS = frozenset({"cost", "reqnum", "request_idx"})
_MAX_FLOAT: Final = sys.float_info.max


@mypyc_attr(native_class=False)  # a builtin exception's subclass stays a Python class
class EnvelopeError(ValueError):
    """The request is not a valid envelope; ``problems`` has one message per field."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


# Made once or twice per request: ``__init__`` is written out, so the compiled build makes it
# as a native object (500 instructions; a NamedTuple's interpreted ``__new__`` costs about
# 3,000, a dataclass's generated ``__init__`` more). The decorator adds ``__eq__``, ``__repr__``.
@dataclass(init=False)
class Envelope:
    auth_data: dict | None
    body: bytes | None  # the backend's body; None: the request's own body
    path_qs: str | None  # the backend's path and query; None: the request's own
    cost: float | None
    request_idx: int | None
    session_id: str | None  # the session the request belongs to (Vast's sessions)
    reqnum: int | None

    def __init__(self, auth_data: dict | None, body: bytes | None = None,
                 path_qs: str | None = None, cost: float | None = None,
                 request_idx: int | None = None, session_id: str | None = None,
                 reqnum: int | None = None) -> None:
        self.auth_data = auth_data
        self.body = body
        self.path_qs = path_qs
        self.cost = cost
        self.request_idx = request_idx
        self.session_id = session_id
        self.reqnum = reqnum


PASSTHROUGH = Envelope(None)


def _is_cost(value: object) -> bool:
    """A finite number >= 0 that fits a float (a 400-digit integer does not)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:
        return False


def _is_count(value: object) -> bool:
    """A whole number >= 0 (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _well_formed(auth_data: dict) -> bool:
    """True only when ``check_auth_data`` finds nothing wrong: the usual auth data, checked in a
    few steps (False: it says what is wrong)."""
    cost = auth_data.get("cost")
    if type(cost) is float:  # as JSON has it; NaN and infinity are not <= max
        real: float = cost
        if not 0.0 <= real <= _MAX_FLOAT:
            return False
    elif not _is_cost(cost):
        return False
    return (_is_count(auth_data.get("reqnum"))
            and ("request_idx" not in auth_data or _is_count(auth_data["request_idx"]))
            and isinstance(auth_data.get("endpoint"), str)
            and isinstance(auth_data.get("signature"), str)
            and isinstance(auth_data.get("url"), str))


def check_auth_data(auth_data: object, where: str = "auth_data") -> list[str]:
    """One message per missing or mistyped field; empty when the auth data is well-formed."""
    if not isinstance(auth_data, dict):
        return [f"{where} must be a JSON object"]
    if _well_formed(auth_data):
        return []
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


def _signed(auth_data: dict, body: bytes | None = None, path_qs: str | None = None,
            session_id: str | None = None) -> Envelope:
    """The envelope of auth data ``check_auth_data`` found well-formed."""
    return Envelope(auth_data, body, path_qs, float(auth_data["cost"]),
                    auth_data.get("request_idx"), session_id, auth_data["reqnum"])


def with_path(envelope: Envelope, path_qs: str) -> Envelope:
    """``envelope`` with the backend's path and query ``path_qs`` (dataclasses.replace is
    interpreted Python, and many times the cost)."""
    return Envelope(envelope.auth_data, envelope.body, path_qs, envelope.cost,
                    envelope.request_idx, envelope.session_id, envelope.reqnum)


# The top level of a body envelope is read here with json's own C scanner (the one json.loads
# uses), value by value, so that the payload's span is known: its bytes go to the backend as the
# client wrote them, with no decode -> encode round trip. Anything this does not read directly
# (not UTF-8, a byte-order mark, invalid JSON) goes to json.loads, whose answer stands.
# (value, end) of the JSON value at an index; (string, end) of a JSON string after its quote
_scan_value: Final[Callable[[str, int], tuple[object, int]]] = getattr(json.JSONDecoder(),
                                                                       "scan_once")
_scan_string: Final[Callable[[str, int, bool], tuple[str, int]]] = getattr(json.decoder,
                                                                           "scanstring")
_SPACE: Final = re.compile(r"[ \t\n\r]*")  # JSON's whitespace, as json.decoder skips it


def _skip_space(text: str, at: int) -> int:
    """The index of the first character at or after ``at`` that is not JSON whitespace."""
    size = len(text)
    for _ in range(4):  # usually none or one space: a regex call costs more than these looks
        if at >= size:
            return at
        code = ord(text[at])
        if code != 32 and code != 10 and code != 13 and code != 9:  # space \n \r \t
            return at
        at += 1
    found = _SPACE.match(text, at)
    return at if found is None else found.end()


ENVELOPE_KEYS: Final = frozenset({"auth_data", "payload", "session_id"})


def _key_at(text: str, at: int) -> tuple[str, int]:
    """The object key whose text starts at ``at`` (after its opening quote) and where it ends;
    an envelope key written plainly is taken as it is, any other key is json's to read."""
    close = text.find('"', at)
    if close >= 0:
        key = text[at:close]
        if key in ENVELOPE_KEYS:
            return key, close + 1
    return _scan_string(text, at, True)


def _read_object(text: str) -> tuple[dict, int, int] | None:
    """The top-level JSON object in ``text`` and where its (last) "payload" value starts and
    ends (-1, -1 without one); None when ``text`` is not a JSON object."""
    end = _skip_space(text, 0)
    if text[end:end + 1] != "{":
        return None
    document: dict = {}
    payload_at = payload_end = -1
    end = _skip_space(text, end + 1)
    if text[end:end + 1] == "}":
        end += 1
    else:
        while True:
            if text[end:end + 1] != '"':
                return None
            key, end = _key_at(text, end + 1)
            end = _skip_space(text, end)
            if text[end:end + 1] != ":":
                return None
            start = _skip_space(text, end + 1)
            if text[start:start + 4] == "null":  # "session_id": null, as json's scanner reads it
                value: object = None
                end = start + 4
            else:
                value, end = _scan_value(text, start)
            document[key] = value
            if key == "payload":
                payload_at, payload_end = start, end
            end = _skip_space(text, end)
            separator = text[end:end + 1]
            end += 1
            if separator == "}":
                break
            if separator != ",":
                return None
            end = _skip_space(text, end)
    if _skip_space(text, end) != len(text):
        return None
    return document, payload_at, payload_end


# (the top-level object, as json.loads makes it (the last of a repeated key), and the "payload"
# value's own bytes, None when there is none)
_Members = tuple[dict, bytes | None]


def _members(body: bytes) -> _Members | None:
    """The envelope's top level and the payload's bytes cut from it; None when the body is not
    UTF-8 JSON read this way (json.loads then decides)."""
    try:
        text = body.decode("utf-8")
        found = _read_object(text)
    except (UnicodeDecodeError, ValueError, StopIteration, RecursionError, IndexError):
        return None
    if found is None:
        return None
    document, start, end = found
    if start < 0:
        return document, None
    if len(text) == len(body):  # ASCII: characters are bytes
        return document, body[start:end]
    return document, text[start:end].encode("utf-8")


def _loads(body: bytes, unsecured: bool) -> object:
    """json.loads of a body that must be an envelope; EnvelopeError (or, unsecured, PASSTHROUGH)
    when it is not JSON."""
    try:
        return json.loads(body)
    except RecursionError:  # nested deeper than Python's recursion limit: refuse, do not crash
        if unsecured:
            return PASSTHROUGH
        raise EnvelopeError(["body is JSON nested too deeply to be an envelope"]) from None
    except (ValueError, UnicodeDecodeError):
        if unsecured:  # "auth_data" was only text in a body that is no envelope
            return PASSTHROUGH
        raise EnvelopeError(["body must be a JSON envelope "
                             '{"auth_data": {...}, "payload": {...}}, but it is not JSON'])


def _encoded(payload: object) -> bytes:
    """A payload json.loads made, as JSON bytes (when its bytes could not be cut from the body)."""
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    except RecursionError:
        raise EnvelopeError(["payload is nested too deeply"]) from None
    except UnicodeEncodeError:  # a lone surrogate (\ud800) in a string: keep it escaped
        return json.dumps(payload, separators=(",", ":")).encode("ascii")


def open_body(body: bytes, *, unsecured: bool) -> Envelope:
    """The envelope of a POST/PUT/PATCH body: read once, the payload's bytes passed on as sent."""
    if unsecured and b'"auth_data"' not in body:
        return PASSTHROUGH
    members = _members(body)
    payload: bytes | None = None
    if members is not None:
        document: object = members[0]
        payload = members[1]
    else:
        document = _loads(body, unsecured)
        if document is PASSTHROUGH:
            return PASSTHROUGH
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
    if payload is None:
        payload = _encoded(document["payload"])
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
        raise EnvelopeError([problem.replace("query.", f"query parameter {QUERY_PREFIX}")
                             for problem in problems])
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
