"""The worker's operational routes on a public port (issue #17 item 4): a backend's secrets never
reach an error a route or a report shows, and status and metrics (the backend's URL, the
worker's identity, load and traffic) are for operators: loopback, or the ops token."""

from __future__ import annotations

import sys

from .conftest import wait_until
from .fleet import fleet  # noqa: F401  (fixture)

SECRET = "hf_0123456789abcdefSECRET"
LEAKY = f"{sys.executable} -c \"print('settings: token={SECRET} api_key={SECRET}'); exit(3)\""


async def test_a_backends_secret_never_reaches_error_msg(fleet):
    f = await fleet("url", VESPA_BACKEND="command", VESPA_BACKEND_COMMAND=LEAKY,
                    HF_TOKEN=SECRET, VESPA_MAX_THROUGHPUT="")
    await wait_until(lambda: f.worker.state.error_msg, timeout=20)
    assert "exited with code 3" in f.worker.state.error_msg
    assert SECRET not in f.worker.state.error_msg and "hf_0…" in f.worker.state.error_msg
    await wait_until(lambda: any(r["error_msg"] for r in f.emulator.reports), timeout=20)
    assert not any(SECRET in r["error_msg"] for r in f.emulator.reports)
    for route in ("status", "readyz"):
        async with f.session.get(f"{f.url}/_vespa/{route}") as response:
            assert SECRET not in await response.text()


async def test_status_and_metrics_need_the_ops_token_off_loopback(fleet):
    f = await fleet("url", VESPA_OPS_OPEN_ON_LOOPBACK="false", VESPA_OPS_TOKEN="ops-token-1234")
    for route in ("status", "metrics"):
        async with f.session.get(f"{f.url}/_vespa/{route}") as response:
            assert response.status == 401
        async with f.session.get(f"{f.url}/_vespa/{route}",
                                 headers={"x-vespa-ops-token": "ops-token-1234"}) as response:
            assert response.status == 200
        async with f.session.get(f"{f.url}/_vespa/{route}",
                                 headers={"Authorization": "Bearer ops-token-1234"}) as response:
            assert response.status == 200
    async with f.session.get(f"{f.url}/_vespa/healthz") as response:
        assert response.status == 200  # public


async def test_without_a_token_they_are_loopback_only_and_readyz_tells_no_error(fleet):
    f = await fleet("url", VESPA_OPS_OPEN_ON_LOOPBACK="false")
    f.worker.state.fail("the backend said something private")
    async with f.session.get(f"{f.url}/_vespa/status") as response:
        assert response.status == 403 and "VESPA_OPS_TOKEN" in (await response.json())["error"]
    async with f.session.get(f"{f.url}/_vespa/readyz") as response:
        assert response.status == 503
        assert "error" not in await response.json()
