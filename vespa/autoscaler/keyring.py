"""The autoscaler's public key: fetched at start from each REPORT_ADDR in order, with backoff,
and again (at most once a minute) when a signature fails, in case the key was rotated."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from ..corridor.auth import PublicKey

log = logging.getLogger("vespa.keyring")


class KeyRing:
    def __init__(self, addrs: tuple[str, ...], session: aiohttp.ClientSession, *,
                 refresh_interval: float = 60.0, fetch_timeout: float = 10.0,
                 on_key: Callable[[PublicKey], None] | None = None):
        self.addrs = addrs
        self.on_key = on_key  # told of a new key before any request is checked with it
        self.session = session
        self.refresh_interval = refresh_interval
        self.fetch_timeout = fetch_timeout
        self.key: PublicKey | None = None
        self.last_fetch = float("-inf")
        self.ready = asyncio.Event()
        self.refreshing: asyncio.Task | None = None

    async def fetch(self) -> PublicKey | None:
        """The key from the first address that serves a valid one, or None."""
        self.last_fetch = time.monotonic()
        for addr in self.addrs:
            url = f"{addr}/pubkey/"
            try:
                async with self.session.get(
                        url, timeout=aiohttp.ClientTimeout(total=self.fetch_timeout)) as response:
                    text = await response.text()
                    if response.status != 200:
                        log.warning("public key from %s: HTTP %d", url, response.status)
                        continue
                key = PublicKey.from_pem(text.strip())
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                log.warning("public key from %s failed: %s", url, exc or type(exc).__name__)
                continue
            if self.key is None or key.pem != self.key.pem:
                log.info("public key loaded from %s", url)
                if self.on_key is not None:
                    self.on_key(key)
            self.key = key
            self.ready.set()
            return key
        return None

    async def run(self, first_delay: float = 1.0, max_delay: float = 30.0) -> None:
        """Fetch until a key is there (retries with backoff)."""
        delay = first_delay
        while await self.fetch() is None:
            log.warning("no public key yet from %s; retrying in %.0fs", ", ".join(self.addrs),
                        delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay)

    async def refresh_after_failure(self) -> bool:
        """Fetch again if the last fetch is a minute old; True when the key changed."""
        if time.monotonic() - self.last_fetch < self.refresh_interval:
            return False
        if self.refreshing is None or self.refreshing.done():
            self.refreshing = asyncio.ensure_future(self.fetch())
        before = self.key
        await asyncio.shield(self.refreshing)
        return self.key is not None and (before is None or self.key.pem != before.pem)
