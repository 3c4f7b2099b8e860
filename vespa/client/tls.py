"""TLS to HTTPS workers: verified against Vast's root CA, never unverified.

The CA comes from ``--ca-file``/``VAST_CA_FILE``, else a cached copy, else it is downloaded once
from Vast (over HTTPS checked by the system's trust store, as the Vast SDK does) and cached.
Vast's root has no keyUsage extension, which ``VERIFY_X509_STRICT`` (Python 3.13's default)
rejects: that one flag is cleared; chain, expiry and host name are still checked.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from pathlib import Path
from typing import Mapping

import aiohttp

VAST_ROOT_CA_URL = "https://console.vast.ai/static/jvastai_root.cer"
DOWNLOAD_TIMEOUT = aiohttp.ClientTimeout(total=30)


class TLSSetupError(Exception):
    """The CA for HTTPS workers could not be loaded; the message says what to do."""


def worker_ssl_context(ca_data: bytes) -> ssl.SSLContext:
    """System roots plus ``ca_data`` (PEM or DER), strict X.509 flags off, verification on."""
    context = ssl.create_default_context()
    try:
        if ca_data.lstrip().startswith(b"-----BEGIN"):
            context.load_verify_locations(cadata=ca_data.decode("ascii"))
        else:
            context.load_verify_locations(cadata=ca_data)
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as exc:
        raise TLSSetupError(f"not a CA certificate (PEM or DER): {exc}") from None
    context.verify_flags &= ~ssl.VERIFY_X509_STRICT
    return context


def default_cache_file(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    cache_home = Path(env.get("XDG_CACHE_HOME") or Path(os.path.expanduser("~")) / ".cache")
    return cache_home / "vespa" / "jvastai_root.cer"


def read_bytes(path: Path) -> bytes:
    return path.read_bytes()


def write_cache(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_bytes(data)
    temporary.replace(path)


class WorkerTLS:
    """Builds the SSL context for HTTPS workers once, on first need (file IO off the loop)."""

    def __init__(self, session: aiohttp.ClientSession, ca_file: str | None = None,
                 cache_file: Path | None = None, download_url: str = VAST_ROOT_CA_URL):
        self.session, self.ca_file, self.download_url = session, ca_file, download_url
        self.cache_file = cache_file or default_cache_file()
        self.lock = asyncio.Lock()
        self.ssl_context: ssl.SSLContext | None = None

    async def context(self) -> ssl.SSLContext:
        async with self.lock:
            if self.ssl_context is None:
                data, origin = await self.ca_data()
                try:
                    self.ssl_context = worker_ssl_context(data)
                except TLSSetupError as exc:
                    raise TLSSetupError(f"{origin}: {exc}") from None
            return self.ssl_context

    async def ca_data(self) -> tuple[bytes, str]:
        """The CA bytes and where they came from."""
        if self.ca_file:
            try:
                return await asyncio.to_thread(read_bytes, Path(self.ca_file)), self.ca_file
            except OSError as exc:
                raise TLSSetupError(f"cannot read the CA file {self.ca_file} (--ca-file, "
                                    f"VAST_CA_FILE): {exc}") from None
        try:
            return await asyncio.to_thread(read_bytes, self.cache_file), str(self.cache_file)
        except OSError:
            pass
        data = await self.download()
        try:
            await asyncio.to_thread(write_cache, self.cache_file, data)
        except OSError:
            pass  # an uncached CA still works for this run
        return data, self.download_url

    async def download(self) -> bytes:
        try:
            async with self.session.get(self.download_url, timeout=DOWNLOAD_TIMEOUT) as response:
                data = await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise TLSSetupError(f"cannot download Vast's root CA from {self.download_url}: "
                                f"{exc or type(exc).__name__}; download it yourself and pass "
                                "--ca-file (or VAST_CA_FILE)") from None
        if status != 200:
            raise TLSSetupError(f"Vast's root CA download from {self.download_url} answered "
                                f"{status}; pass --ca-file (or VAST_CA_FILE)")
        return data
