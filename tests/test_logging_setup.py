"""Logging set-up: JSON lines that parse and carry the request id; secrets redacted everywhere."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest
from vespa.http.server import FrontServer, Request
from vespa.observability.logs import Redactor, current_request_id, mask, setup_logging

MASTER_TOKEN = "mt-5f1e9c2d7a3b4e6f8a0b1c2d3e4f5a6b"
LOGS_TOKEN = "logs-secret-0123456789"
SHORT_KEY = "k9x7q2"


@pytest.fixture
def capture():
    """setup_logging into a buffer; gives a function returning what was written so far."""
    root, access = logging.getLogger(), logging.getLogger("vespa.access")
    saved_level, saved, saved_access = root.level, list(root.handlers), access.level
    stream = io.StringIO()

    def configure(fmt: str, level: str = "INFO", secrets=(MASTER_TOKEN, LOGS_TOKEN, SHORT_KEY)):
        setup_logging(level, fmt, list(secrets), stream=stream)
        return stream.getvalue

    yield configure
    for handler in [h for h in root.handlers if h not in saved]:
        root.removeHandler(handler)
    root.setLevel(saved_level)
    access.setLevel(saved_access)


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line]


def test_json_lines_parse_and_carry_the_request_id(capture):
    output = capture("json")
    log = logging.getLogger("vespa.test")
    log.info("before any request")
    token = current_request_id.set("req-42")
    try:
        log.warning("relaying %s to %s", "POST /v1/chat/completions", "backend")
    finally:
        current_request_id.reset(token)
    log.info("after")
    first, second, third = lines(output())
    assert "request_id" not in first
    assert second["request_id"] == "req-42"
    assert second["message"] == "relaying POST /v1/chat/completions to backend"
    assert second["level"] == "WARNING" and second["logger"] == "vespa.test"
    assert second["time"].endswith("Z") and "T" in second["time"]
    assert "request_id" not in third


async def test_request_ids_follow_each_task(capture):
    output = capture("json")
    log = logging.getLogger("vespa.test")

    async def handle(rid: str):
        current_request_id.set(rid)
        await asyncio.sleep(0.01)
        log.info("done %s", rid)

    await asyncio.gather(*(handle(f"r{i}") for i in range(5)))
    records = lines(output())
    assert len(records) == 5
    assert all(r["message"] == f"done {r['request_id']}" for r in records)


def test_json_exception_text(capture):
    output = capture("json")
    try:
        raise ValueError("broken thing")
    except ValueError:
        logging.getLogger("vespa.test").exception("it failed")
    (record,) = lines(output())
    assert record["level"] == "ERROR"
    assert "ValueError: broken thing" in record["exception"]
    assert "Traceback" in record["exception"]


def test_text_format_shows_the_request_id(capture):
    output = capture("text")
    token = current_request_id.set("abc-1")
    logging.getLogger("vespa.test").info("hello")
    current_request_id.reset(token)
    assert "INFO vespa.test [abc-1]: hello" in output()


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secrets_are_redacted_in_messages_args_and_exceptions(capture, fmt):
    output = capture(fmt)
    log = logging.getLogger("vespa.test")
    log.info(f"token in the message {MASTER_TOKEN}")
    log.info("token as an argument %s and %r", MASTER_TOKEN, {"logs": LOGS_TOKEN})
    log.info("short key %s", SHORT_KEY)
    try:
        raise RuntimeError(f"auth failed with {MASTER_TOKEN}")
    except RuntimeError:
        log.exception("report failed for %s", LOGS_TOKEN)
    text = output()
    for secret in (MASTER_TOKEN, LOGS_TOKEN, SHORT_KEY):
        assert secret not in text
    assert text.count(mask(MASTER_TOKEN)) == 3  # message, argument, exception
    assert "mt-5…" in text and "logs…" in text
    assert "RuntimeError: auth failed with mt-5…" in text
    if fmt == "json":
        assert len(lines(text)) == 4


def test_mask_shows_at_most_a_short_prefix():
    assert mask(MASTER_TOKEN) == "mt-5…"
    assert mask(SHORT_KEY) == "…"  # too short to show any of it


def test_empty_and_missing_secrets_are_ignored(capture):
    output = capture("text", secrets=["", None, MASTER_TOKEN])
    logging.getLogger("vespa.test").info("plain message")
    assert "plain message" in output()


def test_the_longer_secret_wins_when_one_contains_another(capture):
    inner = MASTER_TOKEN[:16]
    output = capture("text", secrets=[inner, MASTER_TOKEN])
    logging.getLogger("vespa.test").info("value %s", MASTER_TOKEN)
    text = output()
    assert MASTER_TOKEN[16:] not in text and inner not in text


def test_bytes_lose_their_secrets_and_keep_every_other_byte():
    """A process's output as it wrote it: each secret's UTF-8 bytes masked, the longer secret
    first; bytes that are not UTF-8 kept."""
    accented = "clé-secrète-42"
    redact = Redactor([MASTER_TOKEN, MASTER_TOKEN[:16], accented, SHORT_KEY]).redact_bytes
    raw = b"\xff\xe9 " + MASTER_TOKEN.encode() + b" " + accented.encode() + b" " + \
        SHORT_KEY.encode() + b"\r\n"
    assert redact(raw) == b"\xff\xe9 " + mask(MASTER_TOKEN).encode() + b" " + \
        mask(accented).encode() + b" " + mask(SHORT_KEY).encode() + b"\r\n"
    assert redact(accented.encode("latin-1")) == accented.encode("latin-1")  # not its UTF-8
    assert Redactor([]).redact_bytes(b"caf\xe9") == b"caf\xe9"


def test_setup_twice_keeps_one_handler_and_the_access_log_quiet(capture):
    capture("text")
    output = capture("json")
    ours = [h for h in logging.getLogger().handlers if getattr(h, "vespa_handler", False)]
    assert len(ours) == 1
    logging.getLogger("vespa.test").info("once")
    assert len(lines(output())) == 1
    assert logging.getLogger("vespa.access").level == logging.WARNING
    capture("json", level="DEBUG")
    assert logging.getLogger("vespa.access").level == logging.INFO


def test_bad_format_is_refused_and_changes_nothing(capture):
    capture("text")
    before = list(logging.getLogger().handlers)
    with pytest.raises(ValueError, match="log format"):
        setup_logging("INFO", "yaml", [])
    assert logging.getLogger().handlers == before


async def test_malformed_requests_are_one_line_each_minute_not_tracebacks(capture):
    written = capture("text")

    async def ok(request: Request) -> None:
        request.reply.send(200, [], b"ok")

    loop = asyncio.get_running_loop()
    server = await loop.create_server(FrontServer(ok), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for target in [b"/a b c"] * 30 + [b"/\x01"] * 20:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await reader.read(100)).startswith(b"HTTP/1.1 400")
            writer.close()
    finally:
        server.close()
    text = written()
    assert "Traceback" not in text
    refused = [line for line in text.splitlines() if "refused a request from" in line]
    assert len(refused) == 1 and "WARNING" in refused[0] and "127.0.0.1" in refused[0], text
