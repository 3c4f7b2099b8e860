"""Wrapping: turn a caller's plain HTTP request into a signed worker request, and back (pure).

Owns the workload estimate (``X-Serverless-Cost``, else the payload's token or character count,
else a default), the JSON envelope for POST/PUT/PATCH, the ``serverless_*`` query for other
methods, and which headers cross the proxy in each direction (hop-by-hop never, Vast keys never).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from urllib.parse import urlencode

BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
AUTH_FIELDS = ("cost", "endpoint", "reqnum", "request_idx", "signature", "url")
QUERY_PREFIX = "serverless_"
COST_HEADER = "X-Serverless-Cost"
# The TTS benchmark measures input characters per second: its requests cost len(text).
SPEECH_TEXT_FIELDS = {"/v1/audio/speech": "input", "/synthesize": "text"}
LLM_TOKEN_FIELDS = ("max_completion_tokens", "max_tokens")
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})
# Recomputed for the worker request (the envelope changes the body), or ours alone.
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect", COST_HEADER.lower()}
RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


class WrapError(Exception):
    """The caller's request cannot be sent through the serverless protocol; ``status`` says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class CallerRequest:
    """What the caller sent, parsed once: method, raw path and query, headers, JSON payload."""

    method: str
    path_qs: str
    headers: list[tuple[str, str]]
    payload: object = None  # the JSON body of a POST/PUT/PATCH ({} when it had none)

    @property
    def path(self) -> str:
        return self.path_qs.partition("?")[0]


@dataclass(frozen=True)
class WorkerRequest:
    """The request to send to the worker: ``url`` is already percent-encoded."""

    method: str
    url: str
    headers: list[tuple[str, str]]
    body: bytes | None


def read_caller_request(method: str, path_qs: str, headers: list[tuple[str, str]],
                        body: bytes) -> CallerRequest:
    """Parse the caller's body as the JSON payload; only JSON bodies fit the envelope."""
    if method not in BODY_METHODS:
        return CallerRequest(method, path_qs, headers)
    if not body.strip():
        return CallerRequest(method, path_qs, headers, {})
    encoding = header_value(headers, "Content-Encoding")
    if encoding and encoding.lower() != "identity":
        raise WrapError(415, f"request body is {encoding}-encoded; the Vast serverless envelope "
                             "carries plain JSON bodies only")
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        kind = header_value(headers, "Content-Type") or "not JSON"
        raise WrapError(415, f"request body is {kind}: the Vast serverless protocol carries "
                             "JSON bodies only (the payload of its envelope)") from None
    return CallerRequest(method, path_qs, headers, payload)


def header_value(headers: list[tuple[str, str]], name: str) -> str | None:
    lowered = name.lower()
    return next((value for key, value in headers if key.lower() == lowered), None)


def estimate_workload(request: CallerRequest, default: float) -> float:
    """The request's workload in the benchmark's unit: the caller's header, else an estimate."""
    declared = header_value(request.headers, COST_HEADER)
    if declared is not None:
        try:
            cost = float(declared)
        except ValueError:
            cost = -1.0
        if not math.isfinite(cost) or cost < 0:
            raise WrapError(400, f"{COST_HEADER} must be a finite number >= 0, got {declared!r}")
        return cost
    payload = request.payload
    if not isinstance(payload, dict):
        return default
    speech_field = SPEECH_TEXT_FIELDS.get(request.path)
    if speech_field is not None and isinstance(payload.get(speech_field), str):
        return float(max(1, len(payload[speech_field])))
    tokens = token_budget(payload)
    return float(tokens) if tokens is not None else default


def token_budget(payload: dict) -> int | None:
    """Tokens an LLM call may generate: max_(completion_)tokens (TGI: max_new_tokens) times n."""
    parameters = payload.get("parameters")
    candidates = [payload.get(name) for name in LLM_TOKEN_FIELDS]
    if isinstance(parameters, dict):
        candidates.append(parameters.get("max_new_tokens"))
    tokens = next((c for c in candidates if is_count(c) and c > 0), None)
    if tokens is None:
        return None
    choices = payload.get("n")
    return tokens * choices if is_count(choices) and choices > 1 else tokens


def is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def auth_data_of(route: dict) -> dict:
    """The signed fields of a /route/ answer, JSON types kept (100 and 100.0 sign differently)."""
    return {name: route[name] for name in AUTH_FIELDS}


def build_worker_request(request: CallerRequest, route: dict,
                         secrets: tuple[str, ...] = ()) -> WorkerRequest:
    """The worker request for ``request`` routed by ``route``: envelope or query auth."""
    auth_data = auth_data_of(route)
    base = str(route["url"]).rstrip("/")
    headers = forward_request_headers(request.headers, secrets)
    if request.method in BODY_METHODS:
        envelope = {"auth_data": auth_data, "payload": request.payload}
        body = json.dumps(envelope, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        headers = [(k, v) for k, v in headers if k.lower() != "content-type"]
        headers.append(("Content-Type", "application/json"))
        return WorkerRequest(request.method, base + request.path_qs, headers, body)
    return WorkerRequest(request.method, base + with_query_auth(request.path_qs, auth_data),
                         headers, None)


def with_query_auth(path_qs: str, auth_data: dict) -> str:
    """``path_qs`` with the ``serverless_*`` parameters appended; the caller's query kept raw."""
    pairs = [(QUERY_PREFIX + name, query_value(auth_data[name])) for name in AUTH_FIELDS]
    separator = "&" if "?" in path_qs else "?"
    if path_qs.endswith(("?", "&")):
        separator = ""
    return path_qs + separator + urlencode(pairs)


def query_value(value: object) -> str:
    """Numbers as JSON writes them (the worker parses them back as JSON), strings as they are."""
    return value if isinstance(value, str) else json.dumps(value)


def connection_tokens(headers: list[tuple[str, str]]) -> set[str]:
    return {token.strip().lower() for name, value in headers if name.lower() == "connection"
            for token in value.split(",") if token.strip()}


def forward_request_headers(headers: list[tuple[str, str]],
                            secrets: tuple[str, ...]) -> list[tuple[str, str]]:
    """The caller's headers for the worker: no hop-by-hop, none that carries a Vast key."""
    drop = REQUEST_DROP | connection_tokens(headers)
    return [(name, value) for name, value in headers
            if name.lower() not in drop and not any(s and s in value for s in secrets)]


def relay_response_headers(headers: list[tuple[str, str]]) -> tuple[list[tuple[str, str]],
                                                                     int | None]:
    """The worker's response headers for the caller minus hop-by-hop, and its Content-Length."""
    drop = RESPONSE_DROP | connection_tokens(headers)
    kept, length = [], None
    for name, value in headers:
        lowered = name.lower()
        if lowered == "content-length" and value.strip().isdigit():
            length = int(value)
        if lowered not in drop:
            kept.append((name, value))
    return kept, length
