"""How the harness talks to a target: the wrk script, path and arguments per scenario, and the
one request of each scenario the sanity check sends.

- ``PlainClient``: the backend's own requests (a small chat POST; GET /sse), for the backend
  called directly and every unsecured proxy.
- ``EnvelopeClient``: what Vast's client sends a worker, one signed body for the whole run (the
  url-only scheme: the same signature for every request routed to one worker).
- ``PoolClient``: the same with a new reqnum and signature per request (the full scheme), read
  from a ``signed.Pool``; ``prepare`` restarts the worker (its replay window then starts empty)
  when the run could need more pre-signed lines than are left, signing more first if need be.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import signed

CHAT_PAYLOAD = {"model": "perf-model", "max_tokens": 16,
                "messages": [{"role": "user", "content": "Say hello."}]}
CHAT_REQUEST = json.dumps(CHAT_PAYLOAD)
CHAT_PATH = "/v1/chat/completions"
SSE_PATH = "/sse"
STAMPED_SSE_PATH = "/sse/stamped"  # perf/sse_latency.py's streams
PERF_MARK = "PERF_JSON "

# Prints one line starting with PERF_MARK; ``made`` counts the requests a script's request()
# built (pool scripts: the pre-signed lines used), 0 for a static request.
LUA_DONE = """
local threads = {}
setup = function(thread) table.insert(threads, thread) end
done = function(summary, latency, requests)
  local e = summary.errors
  local made = 0
  for _, thread in ipairs(threads) do made = made + (thread:get("made") or 0) end
  io.write(string.format(
    '%s{"requests":%d,"duration_us":%d,"bytes":%d,"p50_us":%.1f,"p99_us":%.1f,"made":%d,'
    .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}}\\n',
    "PERF_JSON ", summary.requests, summary.duration, summary.bytes,
    latency:percentile(50), latency:percentile(99), made,
    e.connect, e.read, e.write, e.status, e.timeout))
end
"""


def lua_string(text: str) -> str:
    """A Lua string literal of ``text`` (a long bracket: nothing inside is an escape)."""
    assert "]==]" not in text
    return "[==[" + text + "]==]"


def lua_headers(headers: dict[str, str]) -> str:
    return "".join(f"wrk.headers[ {lua_string(k)} ] = {lua_string(v)}\n"
                   for k, v in headers.items())


def static_script(method: str, body: str | None, headers: dict[str, str]) -> str:
    """A wrk script sending one fixed request (wrk builds it once)."""
    lines = [f'wrk.method = "{method}"']
    if body is not None:
        lines.append(f"wrk.body = {lua_string(body)}")
    return "\n".join(lines) + "\n" + lua_headers(headers) + LUA_DONE


def http(url: str, data: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class PlainClient:
    kind = "plain"

    def path(self, scenario_key: str) -> str:
        return SSE_PATH if scenario_key == "sse_c32" else CHAT_PATH

    def script(self, scenario_key: str) -> str:
        if scenario_key == "sse_c32":
            return static_script("GET", None, {})
        return static_script("POST", CHAT_REQUEST, {"Content-Type": "application/json"})

    def wrk_args(self) -> list[str]:
        return []

    def prepare(self, need: int) -> None:
        """Before a wrk run that may send ``need`` requests."""

    def used(self, result: dict) -> None:
        """After a wrk run (``result`` is its summary)."""

    def sanity_request(self, scenario_key: str) -> tuple[bytes | None, dict[str, str]]:
        if scenario_key == "sse_c32":
            return None, {}
        return CHAT_REQUEST.encode(), {"Content-Type": "application/json"}

    def event_request(self) -> tuple[str, str, bytes | None, dict[str, str]]:
        """One stamped stream's request for perf/sse_latency.py: (method, path, body, headers)."""
        return "GET", STAMPED_SSE_PATH, None, {}


class EnvelopeClient(PlainClient):
    """Vast's client with a url-only signature: ``body`` serves every request of the run."""

    kind = "envelope"

    def __init__(self, body: bytes):
        self.body = body

    def path(self, scenario_key: str) -> str:
        return signed.client_path(super().path(scenario_key))

    def script(self, scenario_key: str) -> str:
        return static_script("POST", self.body.decode(), signed.CLIENT_HEADERS)

    def sanity_request(self, scenario_key: str) -> tuple[bytes | None, dict[str, str]]:
        return self.body, signed.CLIENT_HEADERS

    def event_request(self) -> tuple[str, str, bytes | None, dict[str, str]]:
        return "POST", signed.client_path(STAMPED_SSE_PATH), self.body, signed.CLIENT_HEADERS


class PoolClient(EnvelopeClient):
    """Vast's client with full-scheme signatures: one pre-signed pool line per request."""

    kind = "pool"

    def __init__(self, pool: signed.Pool, restart: Callable[[], None],
                 say: Callable[[str], None] = print):
        super().__init__(b"")
        self.pool = pool
        self.restart = restart  # a fresh worker: an empty replay window, the pool from line 0
        self.say = say

    def script(self, scenario_key: str) -> str:
        return signed.pool_script(self.pool.url, CHAT_PAYLOAD,
                                  lua_headers(signed.CLIENT_HEADERS), LUA_DONE)

    def wrk_args(self) -> list[str]:
        return ["--", str(self.pool.path), str(self.pool.offsets[self.pool.cursor])]

    def prepare(self, need: int) -> None:
        if self.pool.left >= need:
            return
        if len(self.pool) < need:
            self.say(f"  signing full-scheme requests for the pool: {len(self.pool):,} -> "
                     f"{need:,} (kept in {self.pool.path.parent}; about a millisecond each)")
            seconds = self.pool.grow(need)
            self.say(f"  signed in {seconds:.0f}s")
        if self.pool.cursor > 0:  # the worker has seen these reqnums: a fresh one has not
            self.restart()
            self.pool.cursor = 0

    def used(self, result: dict) -> None:
        self.pool.cursor = min(len(self.pool), self.pool.cursor + result["made"])

    def sanity_request(self, scenario_key: str) -> tuple[bytes | None, dict[str, str]]:
        self.prepare(1)
        return self.pool.take(CHAT_PAYLOAD), signed.CLIENT_HEADERS

    def event_request(self) -> tuple[str, str, bytes | None, dict[str, str]]:
        """A new pool line for each stream (``prepare`` made sure enough are left)."""
        return ("POST", signed.client_path(STAMPED_SSE_PATH), self.pool.take(CHAT_PAYLOAD),
                signed.CLIENT_HEADERS)


def write_script(directory: Path, name: str, text: str) -> Path:
    path = directory / (name.replace(" ", "_").replace("/", "_") + ".lua")
    path.write_text(text)
    return path
