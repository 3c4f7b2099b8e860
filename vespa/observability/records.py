"""Request records, an ingress log for debugging: one JSON file per request, written off the loop.

``record()`` only appends the caller's raw entry to a bounded queue; a writer thread redacts
headers, caps bodies, writes ``<time_ns>-<id>.json`` and removes files past the retention.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import os
import re
import threading
import time
from collections import deque
from typing import Iterable

log = logging.getLogger("vespa.records")

REDACTED = "[redacted]"
# A header whose lower-cased name contains one of these has its value redacted: Authorization,
# Proxy-Authorization, Cookie, Set-Cookie, X-Api-Key, Api-Key, X-Vespa-Logs-Token, ...
SENSITIVE_PARTS = ("auth", "cookie", "token", "secret", "key", "signature", "password", "passwd",
                   "credential")
SIGNATURE_IN_TEXT = re.compile(r'("signature"\s*:\s*)"(?:[^"\\]|\\.)*"')
UNSAFE_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")
RECORD_NAME = re.compile(r"\d{20}-[A-Za-z0-9._-]+\.json")  # what cleanup may remove
MAX_ID_LENGTH = 80
LIST_LIMIT = 1000
FAILURE_LOG_INTERVAL = 60.0
IDLE_POLL_SECONDS = 0.05
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
# Metadata a listing shows (no headers, no bodies).
SUMMARY_KEYS = ("id", "method", "path", "query", "client", "status", "outcome", "timings")


def redact_headers(headers: Iterable[tuple[str, str]]) -> list[list[str]]:
    """Headers (str or bytes pairs) as [name, value] lists, credentials' values replaced by
    "[redacted]"."""
    kept = []
    for name, value in headers:
        if isinstance(name, bytes):  # aiohttp's raw_headers
            name, value = name.decode("latin-1"), value.decode("latin-1")
        lowered = name.lower()
        if any(part in lowered for part in SENSITIVE_PARTS):
            value = REDACTED
        kept.append([name, value])
    return kept


def is_json_type(content_type: str | None, body: bytes) -> bool:
    if content_type:
        return "json" in content_type.lower() and "ndjson" not in content_type.lower()
    return body[:1] in (b"{", b"[")


def redact_envelope(document):
    """A JSON request envelope with ``auth_data.signature`` replaced (the input is not changed)."""
    if isinstance(document, dict) and isinstance(document.get("auth_data"), dict) \
            and "signature" in document["auth_data"]:
        return {**document, "auth_data": {**document["auth_data"], "signature": REDACTED}}
    return document


def body_field(content_type: str | None, body: bytes | None, cap: int) -> dict:
    """A body as a record shows it: parsed JSON up to ``cap`` bytes, truncated text beyond,
    metadata only (content type, size) for anything else."""
    field: dict = {"content_type": content_type}
    if body is None:
        field["captured"] = False
        return field
    field["size"] = len(body)
    if not body or not is_json_type(content_type, body):
        return field
    if len(body) <= cap:
        try:
            field["json"] = redact_envelope(json.loads(body))
            return field
        except ValueError:
            field["invalid_json"] = True
    else:
        field["truncated"] = True
    text = body[:cap].decode("utf-8", errors="replace")
    field["text"] = SIGNATURE_IN_TEXT.sub(rf'\1"{REDACTED}"', text)
    return field


def check_logs_token(expected: str | None, given: str | bytes | None) -> bool:
    """Constant-time token check of the header's bytes (or text); always False when no token
    is configured."""
    if not expected or given is None:
        return False
    if isinstance(given, str):  # surrogateescape: bytes that are not UTF-8, as lone surrogates
        given = given.encode("utf-8", "surrogateescape")
    return hmac.compare_digest(expected.encode(), given)


def safe_id(request_id: str) -> str:
    return UNSAFE_ID_CHARS.sub("_", str(request_id))[:MAX_ID_LENGTH] or "_"


def file_name(entry: dict) -> str:
    received = entry.get("received_at")
    stamp = int(received * 1e9) if isinstance(received, (int, float)) else time.time_ns()
    return f"{stamp:020d}-{safe_id(entry.get('id', ''))}.json"


def write_file(path: str, data: bytes) -> None:
    """open/write/close, no temporary and rename (half the syscalls): a reader meeting a file
    still being written skips it; a file left half-written is removed."""
    fd = os.open(path, FILE_FLAGS, 0o644)
    try:
        if os.write(fd, data) != len(data):
            raise OSError(errno.ENOSPC, "short write")
    except OSError:
        os.unlink(path)
        raise
    finally:
        os.close(fd)


def timings(entry: dict) -> dict:
    """Epoch timestamps as given, and the durations between them."""
    received, started, finished = (entry.get(k) for k in ("received_at", "started_at",
                                                          "finished_at"))
    result = {"received_at": received, "started_at": started, "finished_at": finished}
    for name, begin, end in (("queue_seconds", received, started),
                             ("upstream_seconds", started, finished),
                             ("total_seconds", received, finished)):
        if begin is not None and end is not None:
            result[name] = end - begin
    if entry.get("ttfb_seconds") is not None:
        result["ttfb_seconds"] = entry["ttfb_seconds"]
    return result


RAW_KEYS = frozenset({"id", "method", "path", "query", "client", "status", "outcome",
                      "received_at", "started_at", "finished_at", "ttfb_seconds",
                      "request_headers", "request_body", "request_content_type",
                      "response_headers", "response_body", "response_content_type"})


def document(entry: dict, cap: int) -> dict:
    """The JSON record of one raw entry (see ``RequestRecorder.record``)."""
    doc = {key: entry.get(key) for key in ("id", "method", "path", "query", "client", "status",
                                          "outcome")}
    doc["timings"] = timings(entry)
    for side in ("request", "response"):
        doc[side] = {"headers": redact_headers(entry.get(f"{side}_headers") or ()),
                     "body": body_field(entry.get(f"{side}_content_type"),
                                        entry.get(f"{side}_body"), cap)}
    extra = {k: v for k, v in entry.items() if k not in RAW_KEYS}
    if extra:
        doc["extra"] = extra
    return doc


class CpuShare:
    """The calling thread's CPU time in one-second windows against a share of one core."""

    def __init__(self, share: float | None):
        self.share = share
        self.window_end = 0.0
        self.cpu_at_start = 0.0

    def spent(self) -> bool:
        if self.share is None:
            return False
        now = time.monotonic()
        if now >= self.window_end:
            self.window_end, self.cpu_at_start = now + 1.0, time.thread_time()
            return False
        return time.thread_time() - self.cpu_at_start > self.share

    def rest(self) -> float:
        return max(0.0, self.window_end - time.monotonic())


class RequestRecorder:
    """Writes request records to ``directory`` from a background thread."""

    def __init__(self, directory: str, max_body_bytes: int = 1 << 20,
                 retention_hours: float = 24.0, cleanup_interval: float = 600.0,
                 queue_limit: int = 1000, max_per_second: float | None = 200.0,
                 max_cpu_share: float | None = 0.02, max_disk_bytes: int | None = 1 << 30):
        self.directory = os.fspath(directory)
        self.max_body_bytes = max_body_bytes
        self.retention_seconds = retention_hours * 3600.0
        self.cleanup_interval = cleanup_interval
        self.queue_limit = queue_limit
        # Two bounds keep records from slowing the proxy under full load (a GPU backend serves
        # far fewer requests per second): a count per second, checked cheaply on the loop, and
        # the writer thread's own CPU time (a file costs 20 µs to 1 ms of kernel time, ext4
        # being slow to find inodes after mass deletions). None: no limit. Stop flushes all.
        self.max_per_second = max_per_second
        self.cpu = CpuShare(max_cpu_share)
        self.window_end = 0.0
        self.window_left = 0.0
        self.queue: deque[dict] = deque()
        self.written = 0
        self.dropped = 0  # queue full
        self.over_budget = 0  # past max_per_second or max_cpu_share
        self.failures = 0  # could not write (disk full, unwritable directory, ...)
        self.removed = 0  # past the retention
        # the directory's records take at most this much disk: the oldest go first
        self.max_disk_bytes = max_disk_bytes
        self.disk_bytes: int | None = None  # known once the writer has looked
        self.removed_over_disk = 0
        self.last_failure_log = -FAILURE_LOG_INTERVAL
        self.stopping = threading.Event()
        self.thread: threading.Thread | None = None

    # -- the caller's side (event loop) ------------------------------------------------------
    def wanted(self) -> bool:
        """Whether a record made now would be kept (budget left, queue not full): lets the
        caller skip building the entry. No side effects."""
        if len(self.queue) >= self.queue_limit:
            return False
        return (not self.max_per_second or self.window_left >= 1
                or time.monotonic() >= self.window_end)

    def record(self, entry: dict) -> None:
        """Queue one raw entry; never blocks, never raises. Keys: id, method, path, query,
        client, status, outcome, received_at/started_at/finished_at (epoch seconds),
        ttfb_seconds, {request,response}_headers (name/value pairs), {request,response}_body
        (bytes or None), {request,response}_content_type; other keys are kept under "extra"."""
        if self.max_per_second:
            if self.window_left < 1:
                now = time.monotonic()
                if now < self.window_end:
                    self.over_budget += 1
                    return
                self.window_end, self.window_left = now + 1.0, self.max_per_second
            self.window_left -= 1
        if len(self.queue) >= self.queue_limit:
            self.dropped += 1
            return
        self.queue.append(entry)

    def start(self) -> None:
        if self.thread is None:
            self.stopping.clear()
            self.thread = threading.Thread(target=self.write_loop, name="request-records",
                                           daemon=True)
            self.thread.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then end the writer."""
        thread, self.thread = self.thread, None
        if thread is not None:
            self.stopping.set()
            await asyncio.to_thread(thread.join, timeout)

    async def list(self, limit: int = 50) -> list[dict]:
        """The newest ``limit`` records, newest first, metadata only."""
        return await asyncio.to_thread(self.read_summaries, max(1, min(int(limit), LIST_LIMIT)))

    async def get(self, request_id: str) -> dict | None:
        """The newest full record of ``request_id``, or None."""
        return await asyncio.to_thread(self.read_record, request_id)

    # -- the writer thread ---------------------------------------------------------------------
    def write_loop(self) -> None:
        next_cleanup = time.monotonic() + self.cleanup_interval
        while True:
            if time.monotonic() >= next_cleanup:
                self.cleanup()
                next_cleanup = time.monotonic() + self.cleanup_interval
            try:
                entry = self.queue.popleft()
            except IndexError:
                if self.stopping.is_set():
                    return
                self.stopping.wait(IDLE_POLL_SECONDS)
                continue
            if not self.stopping.is_set() and self.cpu.spent():
                self.over_budget += 1
                continue
            self.write(entry)

    def write(self, entry: dict) -> None:
        try:
            # a lone surrogate (a JSON body's "\ud800", a raw byte in the path) as its escape
            data = json.dumps(document(entry, self.max_body_bytes), ensure_ascii=False,
                              default=str).encode("utf-8", "backslashreplace")
            path = os.path.join(self.directory, file_name(entry))
            try:
                write_file(path, data)
            except FileNotFoundError:
                os.makedirs(self.directory, exist_ok=True)
                write_file(path, data)
            self.count_disk(len(data))
            self.written += 1  # counted once the records are back within their disk limit
        except Exception as exc:  # disk full, permissions, odd entry: drop it, keep going
            self.failures += 1
            now = time.monotonic()
            if now - self.last_failure_log >= FAILURE_LOG_INTERVAL:
                self.last_failure_log = now
                log.warning("request records: cannot write to %s: %s (%d record(s) lost so "
                            "far)", self.directory, exc, self.failures)

    def count_disk(self, added: int) -> None:
        """Keep the records within ``max_disk_bytes``: past it, the oldest are removed until
        they take nine tenths of it."""
        if self.max_disk_bytes is None:
            return
        if self.disk_bytes is None:
            self.disk_bytes = sum(size for _, size in self.sized_records())
        else:
            self.disk_bytes += added
        if self.disk_bytes <= self.max_disk_bytes:
            return
        records = self.sized_records()  # oldest first: names start with the time received
        total = sum(size for _, size in records)
        for path, size in records:
            if total <= self.max_disk_bytes * 0.9:
                break
            try:
                os.unlink(path)
            except OSError:
                continue
            total -= size
            self.removed_over_disk += 1
        self.disk_bytes = total

    def sized_records(self) -> list[tuple[str, int]]:
        """(path, size) of every record in the directory, oldest first."""
        found = []
        try:
            with os.scandir(self.directory) as entries:
                for item in entries:
                    if RECORD_NAME.fullmatch(item.name):
                        try:
                            found.append((item.path, item.stat().st_size))
                        except OSError:
                            continue
        except OSError:
            return []
        found.sort()
        return found

    def cleanup(self, now: float | None = None) -> int:
        """Remove records older than the retention (by mtime; other files are left alone);
        returns how many."""
        cutoff = (time.time() if now is None else now) - self.retention_seconds
        removed = 0
        try:
            with os.scandir(self.directory) as entries:
                for item in entries:
                    try:
                        if (RECORD_NAME.fullmatch(item.name) and item.is_file()
                                and item.stat().st_mtime < cutoff):
                            os.unlink(item.path)
                            removed += 1
                    except OSError:
                        continue
                    if self.cpu.spent():  # thousands of unlinks: spread them out
                        time.sleep(self.cpu.rest())
        except OSError as exc:
            log.debug("request records: cleanup of %s failed: %s", self.directory, exc)
        self.removed += removed
        return removed

    # -- reading (in a thread) -----------------------------------------------------------------
    def newest_names(self) -> list[str]:
        try:
            names = [n for n in os.listdir(self.directory) if RECORD_NAME.fullmatch(n)]
        except OSError:
            return []
        names.sort(reverse=True)
        return names

    def load(self, name: str) -> dict | None:
        try:
            with open(os.path.join(self.directory, name), "rb") as file:
                return json.load(file)
        except (OSError, ValueError):
            return None  # removed meanwhile, or not ours

    def read_summaries(self, limit: int) -> list[dict]:
        summaries = []
        for name in self.newest_names():
            if len(summaries) >= limit:
                break
            doc = self.load(name)
            if doc is not None:
                summaries.append({key: doc.get(key) for key in SUMMARY_KEYS})
        return summaries

    def read_record(self, request_id: str) -> dict | None:
        suffix = f"-{safe_id(request_id)}.json"
        for name in self.newest_names():
            if name.endswith(suffix):
                doc = self.load(name)
                if doc is not None and doc.get("id") == request_id:
                    return doc
        return None
