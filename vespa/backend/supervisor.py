"""Launch and supervise the local backend process: its log, its death, its restarts, its end.

The backend runs in its own process group (so stopping it stops its children too) and is told
to die with the worker (Linux parent-death signal), so no orphans are left even when the worker
itself is killed. It is stopped the way it expects (``ProcessSpec.stop_group``): SIGTERM to the
whole group, or to the backend alone when it stops its own children (vLLM); SIGKILL to the group
if it is still there after the grace period, and to whatever of the group outlives it.

Its output goes to a log file and, line by line, to the worker's log, with the worker's secrets
masked in both (``MaskedOutput``); lines matching ``quiet`` (its access log of the worker's own
health checks and metrics scrapes, one every few seconds) go to the file only, and so does the
known noise it prints while it stops (``stop_noise.py``), which the worker's log gets as one line.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import re
import signal
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol

from .stop_noise import Fold, NoiseBlock

log = logging.getLogger("vespa.backend")
PR_SET_PDEATHSIG = 1
# After the backend itself has exited: how long the rest of its group (helpers winding down, such
# as multiprocessing's resource tracker cleaning up) has to end before it is killed.
LEFTOVER_GRACE = 5.0
PIECE = 1 << 16  # a line longer than the read buffer is taken in pieces of this size


@dataclass(frozen=True)
class ProcessSpec:
    """What to run for a backend, and how to stop it."""

    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    # SIGTERM to its whole process group (True), or to the process alone, which stops its own
    # children (False); SIGKILL to the group after `stop_grace` seconds.
    stop_group: bool = True
    stop_grace: float = 15.0
    # what it prints while it stops that is known and harmless: one line in the worker's log
    stop_noise: NoiseBlock | None = None


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def polls_pattern(paths: list[str]) -> re.Pattern[str]:
    """An access-log line of a GET or HEAD of one of ``paths`` (any query): the request line in
    quotes, as uvicorn (vLLM), aiohttp and most servers log it."""
    alternatives = "|".join(re.escape(path) for path in paths)
    return re.compile(rf'"(?:GET|HEAD) (?:{alternatives})(?:\?[^" ]*)? HTTP/')


class SecretMask(Protocol):
    """What masks the worker's secrets in bytes: ``observability.logs.Redactor``, which the
    worker passes in (this room does not import that one)."""

    @property
    def longest(self) -> int:
        """The longest secret's length in bytes; 0 when there is none."""

    def redact_bytes(self, data: bytes) -> bytes:
        """``data`` with each secret masked, every other byte as it was."""


class MaskedOutput:
    """The backend's output with each secret masked (``SecretMask``), piece by piece.

    A line longer than the read buffer comes in pieces, and a secret may straddle two of them:
    the last bytes of a piece that does not end its line (the longest secret's length less one)
    are held back and masked with the next piece. The bytes are otherwise kept as they came.
    """

    def __init__(self, secrets: SecretMask | None):
        # with no secret, each piece passes as it came: nothing to search for, nothing held
        self.redact = secrets.redact_bytes if secrets is not None and secrets.longest else None
        self.keep = secrets.longest - 1 if secrets is not None else 0
        self.held = b""

    def feed(self, piece: bytes, last: bool = False) -> bytes:
        """What can be written now of the output held back and this piece (``last``: the
        output ends with it), masked."""
        if self.redact is None:
            return piece
        data = self.redact(self.held + piece)
        if last or data.endswith(b"\n"):
            self.held = b""
            return data
        # a secret's beginning at the end of the piece is still as it came: masked whole later
        cut = max(len(data) - self.keep, 0)
        self.held = data[cut:]
        return data[:cut]

    def end(self) -> bytes:
        """What is still held back, when the output ends (masked already)."""
        held, self.held = self.held, b""
        return held


class Supervisor:
    def __init__(self, spec: ProcessSpec, log_path: str, *, restarts: int = 0,
                 grace: float | None = None, on_exit: Callable[[str], None] = lambda _: None,
                 on_restart: Callable[[], None] = lambda: None,
                 quiet: re.Pattern[str] | None = None, secrets: SecretMask | None = None):
        self.spec = spec
        self.log_path = log_path
        self.secrets = secrets  # masked in the backend's output before it reaches any log
        self.restarts_left = restarts
        self.grace = spec.stop_grace if grace is None else grace
        self.leftover_grace = LEFTOVER_GRACE
        self.on_exit = on_exit
        self.on_restart = on_restart
        self.quiet = quiet
        self.process: asyncio.subprocess.Process | None = None
        self.stopping = False
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self.restarts = 0

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.log_path) or ".", exist_ok=True)
        log.info("starting %s: %s (log: %s)", self.spec.name, " ".join(self.spec.argv),
                 self.log_path)
        self.process = await asyncio.create_subprocess_exec(
            *self.spec.argv, cwd=self.spec.cwd, env={**os.environ, **self.spec.env},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            preexec_fn=_die_with_parent, limit=1 << 20)

    async def run(self) -> None:
        """Start the backend and watch it until it is stopped or out of restarts."""
        delay = 1.0
        await self.start()
        while True:
            await self.pump_output()
            code = await self.process.wait()
            if self.stopping:
                return
            # what it left of its group goes with it now, while its pid is still its group's
            # (later, the pid may be another process's)
            await self._end_leftovers()
            message = f"backend {self.spec.name} exited with code {code}"
            if self.tail:
                message += ": " + " | ".join(list(self.tail)[-5:])
            log.error(message)
            if self.restarts_left <= 0:
                self.on_exit(message[:2000])
                return
            self.restarts_left -= 1
            self.restarts += 1
            log.warning("restarting %s in %.0fs (%d restart(s) left)", self.spec.name, delay,
                        self.restarts_left)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)
            self.on_restart()
            await self.start()

    async def pump_output(self) -> None:
        """Copy the backend's output to its log file and the worker's log, line by line, its
        secrets masked."""
        loop = asyncio.get_running_loop()
        fold: Fold | None = None
        with open(self.log_path, "ab", buffering=0) as sink:
            async for line in self._masked_lines():
                await loop.run_in_executor(None, sink.write, line)
                text = line.decode("utf-8", "replace").rstrip()
                if not text or (self.quiet is not None and self.quiet.search(text)):
                    continue
                if self.stopping and self.spec.stop_noise is not None:
                    fold = fold or Fold(self.spec.stop_noise)
                    self.show(fold.feed(text))
                else:
                    self.show([text])
        if fold is not None:
            self.show(fold.end())

    def show(self, lines: list[str]) -> None:
        for text in lines:
            self.tail.append(text[:300])
            log.info("%s: %s", self.spec.name, text)

    async def _masked_lines(self) -> AsyncIterator[bytes]:
        """The backend's output to its end, line by line (a long line in pieces), masked."""
        output = MaskedOutput(self.secrets)
        while piece := await self._next_line():
            # its last line, even without a newline, is shown as one line: nothing held back
            if masked := output.feed(piece, last=self.process.stdout.at_eof()):
                yield masked
        if held := output.end():
            yield held

    async def _next_line(self) -> bytes:
        """The next line of the backend's output (b"" at its end); a line longer than the
        buffer comes in pieces."""
        stdout = self.process.stdout
        try:
            return await stdout.readuntil(b"\n")
        except asyncio.IncompleteReadError as end:  # its last line, without a newline
            return end.partial
        except asyncio.LimitOverrunError:  # left in the buffer (readline would drop it all)
            return await stdout.read(PIECE)

    async def stop(self) -> None:
        """SIGTERM the backend (or its whole group), SIGKILL the group after the grace period;
        then give what is left of the group a moment to end, and kill what does not."""
        self.stopping = True
        process = self.process
        if process is None or process.returncode is not None:
            return  # it ended by itself: what it left of its group went then (``run``)
        if self.spec.stop_group:
            self._signal_group(signal.SIGTERM)
        else:
            try:
                process.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        if not await self._exited(self.grace):
            log.warning("%s did not stop in %.0fs: killing it", self.spec.name, self.grace)
            self._signal_group(signal.SIGKILL)
        await self._end_leftovers()
        try:  # its output to the end (a process outside its group may still hold the pipe)
            await asyncio.wait_for(process.wait(), self.leftover_grace)
        except asyncio.TimeoutError:
            log.warning("%s stopped, but its output is still open: not reading it any more",
                        self.spec.name)

    async def _exited(self, timeout: float) -> bool:
        """Whether the backend process has exited within ``timeout`` seconds. Not
        ``process.wait()``: on Python 3.11 that also waits for every process holding its output
        pipe, such as children it leaves behind."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.process.returncode is None:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def _end_leftovers(self) -> None:
        """Processes of the group that outlive the backend: a bounded wait, then SIGKILL."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.leftover_grace
        while (left := group_members(self.process.pid)) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if left:
            log.warning("%d process(es) of %s still running %.0fs after it stopped: killing them "
                        "(%s)", len(left), self.spec.name, self.leftover_grace,
                        ", ".join(f"{pid} {name}" for pid, name in left))
            self._signal_group(signal.SIGKILL)

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, name) of the live (not zombie) processes of process group ``pgid``, from /proc; where
    there is no /proc, whether the group exists at all."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [(pgid, "?")]
    members = []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as file:
                stat = file.read().decode("utf-8", "replace")
        except OSError:
            continue
        name = stat[stat.find("(") + 1:stat.rfind(")")]
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            members.append((int(entry), name))
    return members
