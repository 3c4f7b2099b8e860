"""The highest reqnum the autoscaler's key signed for this worker, kept across restarts.

Under the schemes that sign reqnum (full, legacy) a replayed request is refused, but the replay
window lives in memory: after a restart, every signature it had seen would work once more. So
each new highest reqnum is written to a small file in the cache dir *before* its request is let
through, and at start the reqnums at or below the one written under the same key are refused as
too old (which of them were served is not known; the client routes such a request again).

One ``pwrite`` of a fixed-width line per new highest reqnum, no fsync: the mark survives the
process, a crash or a kill included, not a crash of the machine. A mark written under another
key is not applied: that key's signatures no longer verify anyway. When the file cannot be
read or written the worker says so once and keeps its protection in memory only.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("vespa.replay")

WIDTH = 96  # every line is padded to this, so a shorter one overwrites a longer one whole


class ReplayMark:
    def __init__(self, path: str):
        self.path = path
        self.fingerprint = ""  # the key the next marks are written under
        self.fd: int | None = None
        self.size = 0  # the file's length
        self.failed = False  # said once; from then on the mark is kept in memory only

    def load(self, fingerprint: str) -> int | None:
        """The mark written under the key ``fingerprint``, or None (no mark, another key's,
        or an unreadable file: then it says why)."""
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
        if len(words) != 2 or not words[1].isdigit():
            log.warning("replay mark %s holds %r, not '<key fingerprint> <reqnum>': earlier "
                        "reqnums are not refused", self.path, text.strip()[:100])
            return None
        if words[0] != fingerprint:
            log.info("replay mark %s was written under another autoscaler key (%s): not applied",
                     self.path, words[0])
            return None
        return int(words[1])

    def bind(self, fingerprint: str) -> None:
        """Write the next marks under this key."""
        self.fingerprint = fingerprint

    def save(self, reqnum: int) -> None:
        """Write ``reqnum`` as the mark; never raises (the request goes on, protected in
        memory)."""
        if self.failed:
            return
        line = f"{self.fingerprint} {reqnum}\n".encode("ascii")
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
            self.failed = True
            log.warning("replay mark %s cannot be written (%s): replays of requests served "
                        "before a restart will not be refused", self.path, exc)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
