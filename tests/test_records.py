"""Request records: header redaction, body caps, files written and read back, retention, failures
that never reach the caller, and a record() that leaves all the work to the writer thread."""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from vespa.observability.records import (REDACTED, RequestRecorder, body_field, check_logs_token, file_name,
                           redact_headers)

from .conftest import wait_until

SENSITIVE = [
    ("Authorization", "Bearer sk-live-1"),
    ("proxy-authorization", "Basic dXNlcjpwYXNz"),
    ("Cookie", "session=abc"),
    ("Set-Cookie", "session=abc; HttpOnly"),
    ("X-Api-Key", "key-1"),
    ("api-key", "key-2"),
    ("X-Vespa-Logs-Token", "logs-1"),
    ("X-Client-Secret", "s-1"),
    ("X-Goog-Api-Key", "key-3"),
    ("X-Signature", "sig-1"),
    ("X-DB-Password", "pw-1"),
    ("X-AUTH-TOKEN", "tok-1"),
]
HARMLESS = [("Content-Type", "application/json"), ("Accept", "*/*"),
            ("X-Request-Id", "r-1"), ("Connection", "keep-alive"), ("User-Agent", "curl/8")]


def test_every_sensitive_header_kind_is_redacted():
    redacted = redact_headers(SENSITIVE + HARMLESS)
    assert [name for name, _ in redacted] == [name for name, _ in SENSITIVE + HARMLESS]
    assert all(value == REDACTED for _, value in redacted[:len(SENSITIVE)])
    assert redacted[len(SENSITIVE):] == [list(pair) for pair in HARMLESS]


def test_raw_byte_headers_are_redacted_too():
    raw = ((b"Authorization", b"Bearer x"), (b"Content-Type", b"text/plain"))
    assert redact_headers(raw) == [["Authorization", REDACTED], ["Content-Type", "text/plain"]]


def test_json_body_under_the_cap_is_kept_parsed():
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    field = body_field("application/json; charset=utf-8", body, cap=1024)
    assert field["json"]["messages"][0]["content"] == "hi"
    assert field["size"] == len(body) and "truncated" not in field


def test_json_body_over_the_cap_is_truncated_text():
    body = json.dumps({"prompt": "x" * 5000}).encode()
    field = body_field("application/json", body, cap=100)
    assert field["truncated"] is True
    assert field["text"] == body[:100].decode()
    assert field["size"] == len(body) and "json" not in field


def test_body_exactly_at_the_cap_is_kept():
    body = b'{"a": "' + b"y" * 91 + b'"}'
    assert len(body) == 100
    assert body_field("application/json", body, cap=100)["json"] == {"a": "y" * 91}
    assert body_field("application/json", body, cap=99)["truncated"] is True


@pytest.mark.parametrize("content_type", ["audio/wav", "application/octet-stream",
                                          "text/event-stream", "application/x-ndjson"])
def test_non_json_bodies_are_metadata_only(content_type):
    body = b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(range(256)) * 10
    assert body_field(content_type, body, cap=1 << 20) == {"content_type": content_type,
                                                           "size": len(body)}


def test_untyped_body_that_looks_like_json_is_parsed_and_missing_body_is_marked():
    assert body_field(None, b'{"x": 1}', cap=100)["json"] == {"x": 1}
    assert body_field(None, b"plain", cap=100) == {"content_type": None, "size": 5}
    assert body_field("application/json", None, cap=100) == {"content_type": "application/json",
                                                             "captured": False}


def test_invalid_json_is_kept_as_text():
    field = body_field("application/json", b'{"broken": ', cap=100)
    assert field["invalid_json"] is True and field["text"] == '{"broken": '


def test_envelope_signature_is_redacted_parsed_and_truncated():
    envelope = {"auth_data": {"signature": "c2lnbmF0dXJl", "reqnum": 7, "url": "http://w"},
                "payload": {"prompt": "p" * 300}}
    body = json.dumps(envelope).encode()
    parsed = body_field("application/json", body, cap=10_000)["json"]
    assert parsed["auth_data"] == {"signature": REDACTED, "reqnum": 7, "url": "http://w"}
    assert parsed["payload"] == envelope["payload"]
    truncated = body_field("application/json", body, cap=200)["text"]
    assert "c2lnbmF0dXJl" not in truncated and f'"signature": "{REDACTED}"' in truncated


def test_logs_token_check():
    assert check_logs_token("s3cret-token", "s3cret-token") is True
    assert check_logs_token("s3cret-token", "s3cret-tokeN") is False
    assert check_logs_token("s3cret-token", None) is False
    assert check_logs_token("s3cret-token", "") is False
    assert check_logs_token(None, "anything") is False
    assert check_logs_token("", "") is False
    assert check_logs_token("s3cret-token", "ünïcode") is False
    assert check_logs_token("s3cret-token", b"\xff\xfe".decode("utf-8", "surrogateescape")) \
        is False  # a header that is not UTF-8: refused, not a crash


def entry(rid: str, received: float, **extra) -> dict:
    return {"id": rid, "method": "POST", "path": "/v1/chat/completions", "query": "a=1",
            "client": "127.0.0.1", "status": 200, "outcome": "success",
            "received_at": received, "started_at": received + 0.5,
            "finished_at": received + 2.0, "ttfb_seconds": 0.1,
            "request_headers": [("Authorization", "Bearer sk-1"),
                                ("Content-Type", "application/json")],
            "request_body": b'{"prompt": "hello"}', "request_content_type": "application/json",
            "response_headers": [("Content-Type", "audio/wav")],
            "response_body": b"RIFF....", "response_content_type": "audio/wav", **extra}


@pytest.fixture
async def recorder(tmp_path):
    rec = RequestRecorder(tmp_path / "records", max_body_bytes=1024)
    rec.start()
    yield rec
    await rec.stop()


async def wait_written(rec: RequestRecorder, count: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while rec.written + rec.failures < count:
        assert time.monotonic() < deadline, f"only {rec.written} written"
        await asyncio.sleep(0.01)


async def test_records_are_written_and_read_back(recorder):
    now = time.time()
    for i in range(5):
        recorder.record(entry(f"req-{i}", now + i, backend="vllm"))
    await wait_written(recorder, 5)
    listed = await recorder.list(limit=3)
    assert [r["id"] for r in listed] == ["req-4", "req-3", "req-2"]
    assert set(listed[0]) == {"id", "method", "path", "query", "client", "status", "outcome",
                              "timings"}
    assert listed[0]["timings"]["total_seconds"] == pytest.approx(2.0)
    assert listed[0]["timings"]["queue_seconds"] == pytest.approx(0.5)
    full = await recorder.get("req-1")
    assert full["id"] == "req-1" and full["query"] == "a=1"
    assert full["request"]["headers"] == [["Authorization", REDACTED],
                                          ["Content-Type", "application/json"]]
    assert full["request"]["body"]["json"] == {"prompt": "hello"}
    assert full["response"]["body"] == {"content_type": "audio/wav", "size": 8}
    assert full["timings"]["upstream_seconds"] == pytest.approx(1.5)
    assert full["extra"] == {"backend": "vllm"}
    assert await recorder.get("req-404") is None
    names = sorted(os.listdir(recorder.directory))
    assert len(names) == 5 and all(n.endswith(".json") for n in names)


async def test_ids_are_sanitised_in_file_names_but_found_by_the_real_id(recorder):
    recorder.record(entry("../../etc/passwd", time.time()))
    recorder.record(entry("a b/c", time.time() + 1))
    await wait_written(recorder, 2)
    assert all("/" not in n and " " not in n for n in os.listdir(recorder.directory))
    assert (await recorder.get("../../etc/passwd"))["id"] == "../../etc/passwd"
    assert (await recorder.get("a b/c"))["id"] == "a b/c"
    assert await recorder.get("a_b_c") is None  # same file-name form, a different id


async def test_stop_flushes_what_is_queued(tmp_path):
    rec = RequestRecorder(tmp_path, max_per_second=None, max_cpu_share=None)
    rec.start()
    for i in range(200):
        rec.record(entry(f"r{i}", time.time()))
    await rec.stop()
    assert rec.written == 200
    assert len(os.listdir(tmp_path)) == 200


async def test_retention_removes_old_files(tmp_path):
    rec = RequestRecorder(tmp_path, retention_hours=1, cleanup_interval=0.05)
    rec.start()
    try:
        rec.record(entry("old", time.time() - 7200))
        rec.record(entry("new", time.time()))
        await wait_written(rec, 2)
        old_file = next(p for p in tmp_path.iterdir() if p.name.endswith("-old.json"))
        two_hours_ago = time.time() - 7200
        os.utime(old_file, (two_hours_ago, two_hours_ago))
        await wait_until(lambda: not old_file.exists(), what="the old record removed")
        assert [r["id"] for r in await rec.list(10)] == ["new"]
        assert rec.removed == 1
    finally:
        await rec.stop()


def test_cleanup_keeps_recent_records_and_foreign_files(tmp_path):
    rec = RequestRecorder(tmp_path, retention_hours=24)
    recent, old, older = (f"{n:020d}-r{n}.json" for n in (3, 2, 1))
    for age_hours, name in ((23, recent), (25, old), (48, older), (48, "notes.json")):
        path = tmp_path / name
        path.write_text("{}")
        stamp = time.time() - age_hours * 3600
        os.utime(path, (stamp, stamp))
    assert rec.cleanup() == 2
    assert sorted(os.listdir(tmp_path)) == [recent, "notes.json"]


async def test_unwritable_directory_counts_failures_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rec = RequestRecorder(blocker / "records")  # cannot be created: its parent is a file
    rec.start()
    try:
        for i in range(20):
            rec.record(entry(f"r{i}", time.time()))  # must not raise
        await wait_written(rec, 20)
        assert rec.failures == 20 and rec.written == 0
        assert await rec.list(10) == [] and await rec.get("r1") is None
        warnings = [r for r in caplog.records if "cannot write" in r.getMessage()]
        assert len(warnings) == 1  # rate-limited
        rec.record(entry("after", time.time()))
        await wait_written(rec, 21)
        assert rec.thread.is_alive()  # the writer survived
    finally:
        await rec.stop()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_a_full_disk_loses_the_record_and_leaves_no_partial_file(tmp_path, caplog):
    full = entry("full", 1_700_000_000.0)
    target = tmp_path / file_name(full)
    target.symlink_to("/dev/full")  # every write there fails with ENOSPC
    rec = RequestRecorder(tmp_path)
    rec.start()
    rec.record(full)
    rec.record(entry("fine", time.time()))
    await wait_written(rec, 2)
    await rec.stop()
    assert rec.failures == 1 and rec.written == 1
    assert not os.path.lexists(target)
    assert any("No space left" in r.getMessage() for r in caplog.records)
    assert [r["id"] for r in await rec.list(10)] == ["fine"]


async def test_an_odd_entry_does_not_stop_the_writer(recorder):
    recorder.record({"id": "odd", "received_at": "not a number", "request_headers": 42})
    recorder.record(entry("fine", time.time()))
    await wait_written(recorder, 2)
    assert recorder.failures == 1 and recorder.written == 1
    assert (await recorder.get("fine"))["status"] == 200


async def test_record_leaves_all_the_work_to_the_writer_thread(tmp_path):
    """record() runs on the event loop: it only queues the caller's entry, as it is (no copy, no
    redaction, no JSON, no file); the writer thread does the rest. (What records cost under
    load is measured by perf/run.py --with-records, not asserted here.)"""
    rec = RequestRecorder(tmp_path, queue_limit=20_000, max_per_second=None, max_cpu_share=None)
    entries = [entry(f"r{i}", time.time()) for i in range(10_000)]
    for e in entries:
        rec.record(e)  # the writer has not started: whatever record() did is all there is
    assert len(rec.queue) == len(entries)
    assert all(queued is e for queued, e in zip(rec.queue, entries))
    assert entries[0]["request_headers"][0] == ("Authorization", "Bearer sk-1")  # untouched
    assert os.listdir(tmp_path) == [] and rec.written == 0
    assert rec.dropped == rec.over_budget == 0
    rec.start()
    try:
        await wait_written(rec, 10)  # the writer thread takes them from there
    finally:
        rec.queue.clear()  # writing all 10,000 files is not what this test is about
        await rec.stop()
    assert rec.written >= 10 and rec.failures == 0


async def test_the_writer_keeps_to_its_cpu_share_and_stop_still_flushes(tmp_path):
    rec = RequestRecorder(tmp_path, max_per_second=None, max_cpu_share=0.0)
    rec.start()
    for i in range(50):
        rec.record(entry(f"r{i}", time.time()))
    await wait_until(lambda: not rec.queue, what="the writer through its queue")
    await rec.stop()
    assert rec.over_budget >= 49 and rec.written <= 1  # a CPU share of 0 writes (almost) none
    assert rec.written + rec.over_budget == 50
    # what is queued when stopping is written whatever the share
    written, over_budget = rec.written, rec.over_budget
    for i in range(5):
        rec.record(entry(f"s{i}", time.time()))
    rec.stopping.set()
    rec.write_loop()  # returns once the queue is empty
    assert rec.written == written + 5 and rec.over_budget == over_budget


def test_a_full_queue_drops_and_counts(tmp_path):
    rec = RequestRecorder(tmp_path, queue_limit=10, max_per_second=None)  # nothing drains
    for i in range(15):
        rec.record({"id": str(i)})
    assert len(rec.queue) == 10 and rec.dropped == 5
    assert not rec.wanted()


def test_a_budget_caps_records_per_second_and_counts_the_rest(tmp_path):
    rec = RequestRecorder(tmp_path, max_per_second=50)  # not started: the queue shows what's kept
    assert rec.wanted()
    for i in range(300):
        rec.record({"id": str(i)})
    assert len(rec.queue) == 50 and rec.over_budget == 250
    assert [e["id"] for e in rec.queue] == [str(i) for i in range(50)]  # the first ones
    assert not rec.wanted()
    rec.window_end = 0.0  # the next second
    assert rec.wanted()
    rec.record({"id": "next"})
    assert len(rec.queue) == 51
