"""``POST /pyworker/update`` on the worker's own port: Vast's platform asks for an update with
``Authorization: Bearer <MASTER_TOKEN>``; the worker writes the flag file start_server.sh
watches. Anything but that exact header is 401, and so is every request while the instance has
no master token (Vast's worker lets a request without the header through then)."""

from __future__ import annotations

import pytest

TOKEN = "mt-0123456789"


@pytest.fixture
async def updatable(make_worker, tmp_path):
    flag = tmp_path / "force_update"
    client, worker = await make_worker(MASTER_TOKEN=TOKEN, VESPA_UPDATE_FLAG=str(flag))
    return client, flag


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer mt-wrong"},
    {"Authorization": TOKEN},  # Vast's worker takes a raw token too
    {"Authorization": f"bearer {TOKEN}"},
    {"Authorization": f"Bearer {TOKEN[:-1]}"},
    {"Authorization": "Bearer "},
])
async def test_anything_but_the_master_token_is_401(updatable, backend, headers):
    client, flag = updatable
    response = await client.post("/pyworker/update", headers=headers)
    assert response.status == 401
    assert (await response.json())["error"].startswith("unauthorized")
    assert not flag.exists() and backend.log.requests == []


async def test_the_master_token_writes_the_flag(updatable, backend):
    client, flag = updatable
    response = await client.post("/pyworker/update?from=vast",
                                 headers={"Authorization": f"Bearer {TOKEN}"}, data=b"{}")
    assert response.status == 200 and await response.json() == {"ok": True}
    assert flag.exists() and flag.read_bytes() == b""
    again = await client.post("/pyworker/update", headers={"Authorization": f"Bearer {TOKEN}"})
    assert again.status == 200  # the file is there already: fine
    # the same connection goes on serving; the route never reached the backend
    assert (await client.get("/echo")).status == 200
    assert [r["path"] for r in backend.log.requests] == ["/echo"]


@pytest.mark.parametrize("token", ["", None])
async def test_without_a_master_token_nothing_is_accepted(make_worker, tmp_path, token):
    flag = tmp_path / "force_update"
    env = {"VESPA_UPDATE_FLAG": str(flag)} | ({} if token is None else {"MASTER_TOKEN": token})
    client, _ = await make_worker(**env)
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": ""}):
        assert (await client.post("/pyworker/update", headers=headers)).status == 401
    assert not flag.exists()


async def test_other_methods_are_405(updatable):
    client, flag = updatable
    response = await client.get("/pyworker/update", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 405 and response.headers["Allow"] == "POST"
    assert not flag.exists()


async def test_a_flag_that_cannot_be_written_is_a_500(make_worker, tmp_path):
    client, _ = await make_worker(MASTER_TOKEN=TOKEN,
                                  VESPA_UPDATE_FLAG=str(tmp_path / "missing" / "flag"))
    response = await client.post("/pyworker/update", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status == 500
    assert (await response.json())["error"].startswith("failed to write file")


async def test_other_pyworker_paths_belong_to_the_backend(updatable):
    client, _ = updatable
    for path in ("/pyworker/updates", "/pyworker/update/", "/pyworker/other"):
        response = await client.post(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert (response.status, await response.text()) == (404, "404: Not Found")  # aiohttp's
