"""What an unauthenticated client can make a signed worker spend (issue #17, item 1): an
envelope is read and parsed before its signature is checked, so its size, the JSON values it
holds and the time it may take to arrive are bounded; one client address holds a bounded number
of connections. Against a real in-process worker in signed mode, over loopback sockets."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from .conftest import wait_until
from .fleet import fleet, ready  # noqa: F401  (fixture)


async def post_raw(url: str, body: bytes, session: aiohttp.ClientSession,
                   **headers: str) -> tuple[int, dict]:
    async with session.post(url, data=body, headers={"Content-Type": "application/json",
                                                      **headers}) as response:
        return response.status, await response.json()


async def test_an_envelope_over_its_own_limit_is_413_before_it_is_read(fleet):
    f = await fleet("url", VESPA_MAX_ENVELOPE_BYTES="65536")
    await ready(f)
    big = b'{"auth_data": {}, "payload": "' + b"x" * 70_000 + b'"}'
    status, answer = await post_raw(f.url + "/echo", big, f.session)
    assert status == 413 and "VESPA_MAX_ENVELOPE_BYTES" in answer["error"]
    chunked = (b'{"auth_data": {}, "payload": "' + b"x" * 70_000 + b'"}',)

    async def pieces():
        for piece in chunked:
            yield piece

    status, answer = await post_raw(f.url + "/echo", pieces(), f.session)  # no length given
    assert status == 413 and "VESPA_MAX_ENVELOPE_BYTES" in answer["error"]
    assert not f.worker.ledger.totals.received  # nothing of it is load


async def test_an_envelope_of_too_many_json_values_is_not_parsed(fleet):
    """A body of ``[[],[],...]`` costs little to send and much to parse (every value is a Python
    object); past the limit it is refused unparsed, and a signed request still goes through."""
    f = await fleet("url", VESPA_MAX_ENVELOPE_VALUES="50000")
    await ready(f)
    hostile = b'{"auth_data": {}, "payload": [' + b"[]," * 60_000 + b"[]]}"
    status, answer = await post_raw(f.url + "/echo", hostile, f.session)
    assert status == 413 and "VESPA_MAX_ENVELOPE_VALUES" in answer["error"]
    response = await f.post("/echo", f.auth_data(await f.route()), {"n": [1] * 40_000})
    assert response.status == 200, await response.text()


async def test_an_envelope_that_trickles_in_is_cut_at_its_deadline(fleet):
    """One byte a second never trips the idle timeout; the envelope's own deadline cuts it."""
    f = await fleet("url", VESPA_ENVELOPE_READ_TIMEOUT="1.5", VESPA_BODY_READ_TIMEOUT="5")
    await ready(f)
    reader, writer = await asyncio.open_connection("127.0.0.1", f.server.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: w\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{")
    started = time.monotonic()

    async def trickle():
        for _ in range(20):  # 10 s
            await asyncio.sleep(0.5)
            writer.write(b" ")

    sender = asyncio.create_task(trickle())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    assert head.startswith(b"HTTP/1.1 408"), head
    # the 1.5 s deadline, generously bounded: nothing else could end it before the trickle does
    assert time.monotonic() - started < 6
    sender.cancel()
    writer.close()


async def test_one_client_address_holds_a_bounded_number_of_connections(fleet):
    f = await fleet("url", VESPA_MAX_CLIENT_CONNECTIONS="4")
    await ready(f)
    held = [await asyncio.open_connection("127.0.0.1", f.server.port) for _ in range(4)]
    reader, writer = await asyncio.open_connection("127.0.0.1", f.server.port)
    answer = await asyncio.wait_for(reader.read(), 5)  # answered and closed at once
    assert answer.startswith(b"HTTP/1.1 429") and b"VESPA_MAX_CLIENT_CONNECTIONS" in answer
    writer.close()
    for _, w in held[:2]:
        w.close()
    await wait_until(lambda: f.worker.server.per_client.get("127.0.0.1") == 2)
    async with f.session.get(f.url + "/_vespa/healthz") as response:  # room again
        assert response.status == 200
    for _, w in held[2:]:
        w.close()
