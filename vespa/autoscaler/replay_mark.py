"""The highest reqnum the autoscaler's key signed for this worker, kept across restarts.

Under the schemes that sign reqnum (full, legacy) a replayed request is refused, but the replay
window lives in memory: after a restart, every signature it had seen would work once more. So
each new highest reqnum is written to a small file in the cache dir *before* its request is let
through, and at start the reqnums at or below the one written for the same key and worker URL
are refused as too old (which of them were served is not known; the client routes such a
request again).

One ``pwrite`` of a fixed-width line per new highest reqnum, no fsync: the mark survives the
process, a crash or a kill included, not a crash of the machine. A mark written under another
key, or for another worker URL, is not applied: that key's signatures no longer verify, and a
request signed for another URL is refused anyway. When the file cannot be read the worker says
so; when it cannot be written the worker says so (once a minute at most), keeps its protection
in memory and tries again with the next request.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("vespa.replay")

WIDTH = 160  # every line is padded to this, so a shorter one overwrites a longer one whole
WARN_INTERVAL = 60.0


class ReplayMark:
    def __init__(self, path: str, url: str = ""):
        self.path = path
        self.url = url or "-"  # the worker URL requests are signed for ("-": not checked)
        self.fingerprint = ""  # the key the next marks are written under
        self.fd: int | None = None
        self.size = 0  # the file's length
        self.warned_at = float("-inf")
        self.failures = 0  # writes that failed since the last warning

    def load(self, fingerprint: str) -> int | None:
        """The mark written under the key ``fingerprint`` for this URL, or None (no mark,
        another key's or URL's, or an unreadable file: then it says why)."""
        try:
            with open(self.path, encoding="ascii") as file:
                text = file.read(4 * WIDTH)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("replay mark %s unreadable (%s): earlier reqnums are not refused",
                        self.path, exc)
            return None
        words = text.split()
        if len(words) != 3 or not words[2].isdigit():
            log.warning("replay mark %s holds %r, not '<key fingerprint> <url> <reqnum>': "
                        "earlier reqnums are not refused", self.path, text.strip()[:200])
            return None
        if words[0] != fingerprint or words[1] != self.url:
            log.info("replay mark %s was written under another autoscaler key or worker URL "
                     "(%s, %s): not applied", self.path, words[0], words[1][:100])
            return None
        return int(words[2])

    def bind(self, fingerprint: str) -> None:
        """Write the next marks under this key."""
        self.fingerprint = fingerprint

    def save(self, reqnum: int) -> None:
        """Write ``reqnum`` as the mark; never raises (the request goes on, protected in
        memory)."""
        line = f"{self.fingerprint} {self.url} {reqnum}\n".encode("ascii", "replace")
        try:
            if self.fd is None:
                os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
                self.size = os.fstat(self.fd).st_size
            data = line.ljust(WIDTH, b" ")
            os.pwrite(self.fd, data, 0)
            if len(data) < self.size:  # after a reqnum of 90 digits: nothing of it is left
                os.ftruncate(self.fd, len(data))
            self.size = len(data)
        except OSError as exc:
            self.close()
            self.failures += 1
            now = time.monotonic()
            if now - self.warned_at >= WARN_INTERVAL:
                self.warned_at = now
                log.warning("replay mark %s cannot be written (%s; %d time(s) since the last "
                            "such line): replays of requests served before a restart will not "
                            "be refused until it can", self.path, exc, self.failures)
                self.failures = 0

    def close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            finally:
                self.fd = None
