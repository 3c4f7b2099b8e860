"""Keys: where the account key is found, and the account-key -> endpoint-key lookup.

Vast has two kinds of key. The *account key* (``vastai set api-key`` stores it in
``~/.config/vastai/vast_api_key``, formerly ``~/.vast_api_key``) manages the account and lists
endpoints: ``GET {console}/api/v0/endptjobs/?client_id=me`` answers ``{"success": true,
"results": [{"id", "endpoint_name", "api_key", "endpoint_state", ...}]}``. The *endpoint key*
(that ``api_key`` field) is what ``/route/`` accepts. This is how the Vast SDK resolves it.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import aiohttp

ENDPOINT_LIST_PATH = "/api/v0/endptjobs/"
LOOKUP_TIMEOUT = aiohttp.ClientTimeout(total=30)


class KeyLookupError(Exception):
    """The endpoint list could not be read, or has no such endpoint; the message says why."""


@dataclass(frozen=True)
class EndpointInfo:
    id: object
    name: str
    api_key: str
    state: str


def account_key_files(env: Mapping[str, str], home: Path) -> list[Path]:
    """Where the Vast CLI keeps the account key, newest location first."""
    config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    return [config_home / "vastai" / "vast_api_key", home / ".vast_api_key"]


def read_account_key_file(env: Mapping[str, str], home: Path) -> tuple[str, str] | None:
    """(key, path) from the first key file that has one; runs before the event loop starts."""
    for path in account_key_files(env, home):
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if key:
            return key, str(path)
    return None


async def list_endpoints(session: aiohttp.ClientSession, console_url: str,
                         account_key: str) -> list[EndpointInfo]:
    """The account's endpoints, as ``vastai show endpoints`` reads them."""
    url = console_url + ENDPOINT_LIST_PATH
    try:
        async with session.get(url, params={"client_id": "me"}, timeout=LOOKUP_TIMEOUT,
                               headers={"Authorization": f"Bearer {account_key}"}) as response:
            text = await response.text()
            status = response.status
    except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
        raise KeyLookupError(f"cannot reach the Vast API at {url}: "
                             f"{exc or type(exc).__name__}") from None
    if status in (401, 403):
        raise KeyLookupError(
            f"the Vast API at {url} refused the account key ({status}): listing endpoints "
            "needs your Vast account API key (cloud.vast.ai > Keys), not an endpoint key")
    return parse_endpoint_list(url, status, text)


def parse_endpoint_list(url: str, status: int, text: str) -> list[EndpointInfo]:
    """The rows of an endpoint-list answer, or KeyLookupError naming what came back."""
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if status != 200 or not isinstance(document, dict) or not document.get("success", True):
        if isinstance(document, dict):
            detail = document.get("msg") or document.get("error") or text[:200]
        else:
            detail = text[:200]
        raise KeyLookupError(f"the Vast API at {url} answered {status}: {detail}")
    rows = document.get("results") or []
    return [EndpointInfo(row.get("id"), str(row.get("endpoint_name", "")),
                         str(row.get("api_key") or ""), str(row.get("endpoint_state") or ""))
            for row in rows if isinstance(row, dict)]


async def endpoint_key(session: aiohttp.ClientSession, console_url: str, account_key: str,
                       endpoint: str) -> str:
    """The endpoint key of ``endpoint``, looked up with the account key."""
    endpoints = await list_endpoints(session, console_url, account_key)
    for info in endpoints:
        if info.name == endpoint:
            if not info.api_key:
                raise KeyLookupError(f"the Vast API lists endpoint {endpoint!r} without its key")
            return info.api_key
    names = ", ".join(repr(info.name) for info in endpoints) or "none"
    raise KeyLookupError(f"your account has no endpoint named {endpoint!r} "
                         f"(its endpoints: {names})")


def refused_key_message(endpoint: str, autoscaler_url: str, status: int, source: str,
                        looked_up: bool) -> str:
    """Why /route/ said 401/403, and which key it wants."""
    head = (f"the autoscaler at {autoscaler_url} refused the key for endpoint {endpoint!r} "
            f"({status}). /route/ needs the endpoint's own API key (the api_key field of "
            "`vastai show endpoints`), not your account key.")
    if looked_up:
        return (f"{head} The key was looked up with your account key ({source}); the endpoint "
                "may have been recreated since: restart the client to look it up again.")
    return (f"{head} The key came from {source}. If that is your account key, pass it as "
            "--account-key (or VAST_ACCOUNT_KEY) and the client looks up the endpoint key.")


def home_dir() -> Path:
    return Path(os.path.expanduser("~"))
