"""``timeout(seconds)``: ``asyncio.timeout`` on Python 3.11+, the async-timeout backport on 3.10.

Both raise ``asyncio.TimeoutError`` when the time is up (on 3.11+ that is the builtin
``TimeoutError``; on 3.10 it is not, so catch ``asyncio.TimeoutError``).
"""

from __future__ import annotations

import asyncio
import sys

if sys.version_info >= (3, 11):
    timeout = asyncio.timeout
else:  # pragma: no cover - exercised on 3.10 only
    from async_timeout import timeout

__all__ = ["timeout"]
