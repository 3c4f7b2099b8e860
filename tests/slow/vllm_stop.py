"""What a clean stop of vLLM looks like in its output (issue #19 item 7), for the slow tests.

Unclean: an error traceback, EngineDeadError, vLLM's process manager force-killing its engine,
multiprocessing's resource tracker reporting "leaked semaphore/shared_memory objects", triton's
"nanobind: leaked ..." lists, any ERROR line.

One thing is not in Vespa's hands: vLLM 0.32's own shutdown races itself. ``AsyncLLM.shutdown``
tears the engine client down (its output task, cancelled, hands an EngineDeadError to whoever
waits for output) before it cancels its output handler, and when the handler sees that error
first it logs "AsyncLLM output_handler failed." with the EngineDeadError traceback
(vllm-project/vllm#48745; the fix, #49000, was not merged in vLLM 0.32). It comes after
"[shutdown] MPClient: complete", in one block; it is told apart here and reported, not failed.
"""

from __future__ import annotations

import re

UNCLEAN = re.compile(r"Traceback|EngineDeadError|leaked|force killing|\bERROR\b")
RACE_START = "AsyncLLM output_handler failed."
RACE_LINE = re.compile(r"\bERROR\b.*\[async_llm\.py:\d+\]")
ENGINE_CLIENT_DOWN = "[shutdown] MPClient: complete"


def unclean_stop(output: str) -> tuple[list[str], bool]:
    """(the lines of ``output`` that show an unclean stop, whether vLLM's own shutdown race
    logged its EngineDeadError block, which is left out of those lines)."""
    lines = output.splitlines()
    race: set[int] = set()
    client_down = next((i for i, line in enumerate(lines) if ENGINE_CLIENT_DOWN in line), None)
    if client_down is not None:
        start = next((i for i in range(client_down, len(lines)) if RACE_START in lines[i]), None)
        if start is not None:
            end = start
            while end + 1 < len(lines) and RACE_LINE.search(lines[end + 1]):
                end += 1
            if "EngineDeadError" in lines[end]:
                race = set(range(start, end + 1))
    unclean = [line for i, line in enumerate(lines) if i not in race and UNCLEAN.search(line)]
    return unclean, bool(race)
