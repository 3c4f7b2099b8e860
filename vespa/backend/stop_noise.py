"""A backend's known, harmless noise while it stops, folded into one line of the worker's log.

vLLM 0.32's own shutdown races itself (vllm-project/vllm#48745; the fix was not merged in 0.32):
``AsyncLLM.shutdown`` tears its engine client down before it cancels its output handler, and
when the handler sees the engine gone first it logs "AsyncLLM output_handler failed." and an
``EngineDeadError`` traceback, every line an ERROR of ``async_llm.py``, after a clean stop. How
the API server is signalled cannot avoid it. While Vespa stops the backend, that one block
becomes one line in the worker's log (the terminal); the backend's log file keeps every line.
Anything else, or a block that does not end as that one does, is shown as it came.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_HELD = 200  # lines of a block held back at most; past that it is not the known one


@dataclass(frozen=True)
class NoiseBlock:
    """Lines from one containing ``first`` through one containing ``last``, every line after
    the first matching ``line``; shown as ``note``."""

    first: str
    line: re.Pattern[str]
    last: str
    note: str


VLLM_SHUTDOWN_RACE = NoiseBlock(
    first="AsyncLLM output_handler failed.",
    line=re.compile(r"\bERROR\b.*\[async_llm\.py:\d+\]"),
    last="EngineDeadError",
    note="vLLM logged its known shutdown race after a clean stop: a traceback saying its engine "
         "is gone, which it was (vllm-project/vllm#48745; harmless); the full text is in its "
         "log file")


class Fold:
    """Feed a stopping backend's lines in order; ``feed`` and ``end`` return what to show."""

    def __init__(self, block: NoiseBlock):
        self.block = block
        self.held: list[str] = []

    def feed(self, line: str) -> list[str]:
        if not self.held:
            if self.block.first in line:
                self.held = [line]
                return []
            return [line]
        if not self.block.line.search(line) or len(self.held) >= MAX_HELD:
            shown, self.held = [*self.held, line], []
            return shown
        if self.block.last in line:
            self.held = []
            return [self.block.note]
        self.held.append(line)
        return []

    def end(self) -> list[str]:
        """The output ended: what is still held back, as it came."""
        shown, self.held = self.held, []
        return shown
