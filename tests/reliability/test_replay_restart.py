"""Issue #17 item 3: replays after a restart, on real worker processes.

The replay window lives in memory; the highest reqnum the autoscaler's key signed is written to
the cache dir before its request is served. After a clean stop or a kill, a worker on the same
port and cache dir refuses every request signed at or below that reqnum (served or not: which
were served is not known) and serves new ones; a mark written under another key is ignored.
"""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import pytest

from ..conftest import free_port, wait_until
from .harness import reports_settled, signed_call
from .test_drain import base_url


async def post(session, worker, auth_data: dict) -> tuple[int, bytes]:
    _, status, body = await signed_call(session, worker.url, None, "POST", "/echo",
                                        auth_data=auth_data)
    return status, body


@pytest.mark.time_limit(90)
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGKILL"])
async def test_a_request_signed_before_a_restart_is_refused_after_it(
        worker_process, emulator, backend, session, stop, measure):
    first = worker_process(base_url(backend), emulator)
    await first.wait_ready(session)
    signer = emulator.signer
    never_sent = signer.auth_data(first.url, cost=2)  # signed, lost on its way, then replayed
    served = [signer.auth_data(first.url, cost=2) for _ in range(3)]
    assert [(await post(session, first, a))[0] for a in served] == [200] * 3
    assert (await post(session, first, served[-1]))[0] == 401  # in memory: a replay
    await reports_settled(emulator, {a["request_idx"] for a in served}, timeout=10)
    if stop == "SIGTERM":
        first.proc.send_signal(signal.SIGTERM)
        assert await first.wait_exit(30) == 0, first.log_text()[-3000:]
    else:
        first.kill()  # no clean stop: the mark was written before each request was served

    again = worker_process(base_url(backend), emulator, port=first.port)
    await again.wait_ready(session)
    after = [await post(session, again, a) for a in [*served, never_sent]]
    assert [status for status, _ in after] == [401] * 4
    assert all(b"too old" in body and b"route the request again" in body for _, body in after)
    fresh = signer.auth_data(again.url, cost=2)
    assert (await post(session, again, fresh))[0] == 200
    assert (await post(session, again, fresh))[0] == 401
    assert "reqnums up to" in again.log_text()
    assert "verified but were refused as too old" in again.log_text()  # the operator is told

    must = {a["request_idx"] for a in [*served, fresh]}
    await reports_settled(emulator, must, timeout=10)
    deleted = Counter(emulator.deleted_request_idxs())
    assert deleted == Counter(must), "each served request reported once, no refusal reported"
    assert emulator.validation_errors == []
    measure(stop=stop, served_before=len(served), replays_after_restart=len(after),
            replays_served=sum(status == 200 for status, _ in after))


@pytest.mark.time_limit(60)
async def test_a_mark_written_under_another_key_is_not_applied(worker_process, emulator,
                                                                backend, session, tmp_path):
    """A cache dir that outlived a key (a new endpoint, a rotated key) must not refuse the new
    key's requests: its reqnums start wherever its autoscaler's do."""
    cache = tmp_path / "cache"
    cache.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    (cache / "replay-mark").write_text(f"sha256:0123456789abcdef {url} 999999999\n")
    worker = worker_process(base_url(backend), emulator, port=port)
    await worker.wait_ready(session)
    auth_data = emulator.signer.auth_data(worker.url, cost=2)
    assert (await post(session, worker, auth_data))[0] == 200
    assert "written under another autoscaler key or worker URL" in worker.log_text()
    words = (cache / "replay-mark").read_text().split()
    assert words[1:] == [url, str(auth_data["reqnum"])]
    assert words[0] != "sha256:0123456789abcdef"


@pytest.mark.time_limit(60)
async def test_the_mark_is_written_before_the_request_is_served(worker_process, emulator,
                                                                backend, session):
    """Killed while the backend has the request (nothing reported, no clean stop): its reqnum
    was written down before the worker let it through, so after the restart it is refused."""
    first = worker_process(base_url(backend), emulator)
    await first.wait_ready(session)
    auth_data = emulator.signer.auth_data(first.url, cost=2)
    call = asyncio.ensure_future(signed_call(session, first.url, None, "POST", "/hang?name=h1",
                                             auth_data=auth_data, timeout=20))
    await wait_until(lambda: backend.log.hanging == ["h1"], timeout=10)
    first.kill()
    await call  # cut
    again = worker_process(base_url(backend), emulator, port=first.port)
    await again.wait_ready(session)
    status, body = await post(session, again, auth_data)
    assert status == 401 and b"too old" in body
