"""The replay window (pure core): verified (reqnum, signature) pairs a signed request may not
reuse, in bounded memory, with a floor that a restart can restore (``autoscaler/replay_mark``)."""

from __future__ import annotations

import heapq
from collections.abc import Callable

DEFAULT_REPLAY_WINDOW = 10_000


class ReplayWindow:
    """Refuses replays of verified (reqnum, signature bytes) pairs; bounded memory.

    The signature is its decoded bytes, never its base64 spelling: base64 ignores the unused low
    bits of the last character, so 16 spellings decode to the same 256 bytes, and keying on the
    text would let each of them through once. Every admitted pair with reqnum >= (highest reqnum
    seen - ``size``) is remembered, so a replay inside the window is always caught; a reqnum
    below that floor is refused as too old. At most
    ``size`` pairs are kept: when more arrive (many signatures for one reqnum), the oldest are
    forgotten and the floor rises past them, so nothing forgotten can be accepted again.
    The default 10,000 tolerates late arrivals when reqnums are shared by a busy endpoint, and
    costs at most ~4 MB (a 2048-bit signature is 256 bytes).

    Across restarts: ``on_new_max`` is told each new highest reqnum before its request is let
    through (the assembly writes it down), and ``restore`` makes every reqnum at or below the
    one written before a restart too old, since which of them were served is not known;
    ``on_refused_as_restored`` hears of each verified request refused for that reason (many
    would mean the autoscaler's reqnums started again under the same key). ``reset`` forgets
    everything: a new key, whose signatures share nothing with the old one's.
    """

    def __init__(self, size: int = DEFAULT_REPLAY_WINDOW):
        if size < 1:
            raise ValueError("replay window size must be at least 1")
        self.size = size
        self.max_reqnum: int | None = None
        self.floor: int | None = None
        # the signature admitted under each reqnum (a set of them when there are several), and
        # those reqnums as a min-heap: integers compare and hash far cheaper than (reqnum,
        # 256 bytes) pairs
        self.signatures: dict[int, bytes | set[bytes]] = {}
        self.reqnums: list[int] = []
        self.pairs = 0
        self.restored: int | None = None  # the highest reqnum admitted before a restart
        self.on_new_max: Callable[[int], None] | None = None
        self.on_refused_as_restored: Callable[[int], None] | None = None

    def restore(self, high_water: int) -> None:
        """Refuse every reqnum up to ``high_water``, the highest admitted before a restart."""
        self.raise_floor(high_water + 1)
        if self.max_reqnum is None or high_water > self.max_reqnum:
            self.max_reqnum = high_water
        if self.restored is None or high_water > self.restored:
            self.restored = high_water

    def reset(self) -> None:
        """Forget every pair, the floor and the highest reqnum (a new key)."""
        self.max_reqnum = self.floor = self.restored = None
        self.signatures.clear()
        self.reqnums.clear()
        self.pairs = 0

    def __len__(self) -> int:
        return self.pairs

    def check(self, reqnum: object, signature: bytes) -> str:
        """Why this pair must be refused, or "" when it is fresh (nothing is recorded)."""
        if not isinstance(reqnum, int) or isinstance(reqnum, bool):
            return "reqnum must be an integer"
        if self.floor is not None and reqnum < self.floor:
            if self.restored is not None and reqnum <= self.restored:
                return (f"request too old: reqnum {reqnum} was signed before this worker "
                        "restarted; route the request again")
            return (f"request too old: reqnum {reqnum} is below the replay window "
                    f"(oldest accepted {self.floor}); route the request again")
        if self.holds(reqnum, signature):
            return f"replayed request: reqnum {reqnum} was already served; route the request again"
        return ""

    def admit(self, reqnum: object, signature: bytes) -> str:
        """Check and, when fresh, record the pair; returns the refusal reason or ""."""
        reason = self.check(reqnum, signature)
        if reason or not isinstance(reqnum, int):  # check refuses any reqnum but an int
            if self.on_refused_as_restored is not None and isinstance(reqnum, int) \
                    and self.restored is not None and reqnum <= self.restored:
                self.on_refused_as_restored(reqnum)
            return reason
        self.record(reqnum, signature)
        return ""

    def holds(self, reqnum: int, signature: bytes) -> bool:
        """Whether the pair is remembered."""
        seen = self.signatures.get(reqnum)
        if seen is None:
            return False
        if isinstance(seen, bytes):
            return seen == signature
        return signature in seen

    def record(self, reqnum: int, signature: bytes) -> None:
        seen = self.signatures.get(reqnum)
        if seen is None:
            self.signatures[reqnum] = signature
            heapq.heappush(self.reqnums, reqnum)
        elif isinstance(seen, bytes):
            if seen == signature:
                return
            self.signatures[reqnum] = {seen, signature}
        elif signature in seen:
            return
        else:
            seen.add(signature)
        self.pairs += 1
        if self.max_reqnum is None or reqnum > self.max_reqnum:
            self.max_reqnum = reqnum
            if self.on_new_max is not None:
                self.on_new_max(reqnum)
        self.raise_floor(self.max_reqnum - self.size)
        while self.pairs > self.size:  # many signatures under few reqnums: forget the oldest
            self.raise_floor(self.reqnums[0] + 1)

    def raise_floor(self, floor: int) -> None:
        if self.floor is not None and floor <= self.floor:
            return
        self.floor = floor
        reqnums = self.reqnums
        while reqnums and reqnums[0] < floor:
            forgotten = self.signatures.pop(heapq.heappop(reqnums))
            self.pairs -= 1 if isinstance(forgotten, bytes) else len(forgotten)
