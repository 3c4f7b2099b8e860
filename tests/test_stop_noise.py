"""A stopping backend's known noise folded into one line of the worker's log (vLLM's shutdown
race, issue #19 item 7): the fold on vLLM 0.32's own lines, and a supervised backend that
prints the block when it is stopped."""

from __future__ import annotations

import asyncio
import logging
import sys

from vespa.backend.stop_noise import MAX_HELD, VLLM_SHUTDOWN_RACE, Fold
from vespa.backend.supervisor import ProcessSpec, Supervisor

from .conftest import REPO, wait_until
from .slow.vllm_stop import UNCLEAN
from .test_vllm_stop_output import CLEAN, RACE


def folded(text: str) -> list[str]:
    fold = Fold(VLLM_SHUTDOWN_RACE)
    shown = [line for raw in text.splitlines() for line in fold.feed(raw)]
    return shown + fold.end()


def test_vllms_shutdown_race_becomes_one_line_that_reads_clean():
    lines = CLEAN.splitlines()
    shown = folded("\n".join(lines[:3] + RACE.splitlines() + lines[3:]))
    assert shown == lines[:3] + [VLLM_SHUTDOWN_RACE.note] + lines[3:]
    assert not any(UNCLEAN.search(line) for line in shown)


def test_a_block_that_ends_otherwise_is_shown_as_it_came():
    other = RACE.replace("vllm.v1.engine.exceptions.EngineDeadError", "KeyError")
    assert folded(other) == other.splitlines()
    interrupted = RACE.splitlines()[:3] + ["INFO:     Application shutdown complete."]
    assert folded("\n".join(interrupted)) == interrupted
    cut_off = RACE.splitlines()[:3]  # the output ended inside the block
    assert folded("\n".join(cut_off)) == cut_off


def test_a_block_too_long_to_be_the_known_one_is_shown():
    first, body = RACE.splitlines()[0], RACE.splitlines()[1]
    lines = [first] + [body] * (MAX_HELD + 5) + [RACE.splitlines()[-1]]
    assert folded("\n".join(lines)) == lines


NOISY = f"""
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (print({RACE!r}, flush=True), sys.exit(0)))
print("ready", flush=True)
while True:
    time.sleep(1)
"""


async def supervised_stop(tmp_path, stop_noise, caplog) -> tuple[str, str]:
    """Run a backend that prints vLLM's race block on SIGTERM, stop it: (worker log, file)."""
    script = tmp_path / "noisy.py"  # a file: the start-up line shows the command
    script.write_text(NOISY)
    spec = ProcessSpec("noisy", [sys.executable, str(script)], cwd=str(REPO),
                       stop_noise=stop_noise)
    supervisor = Supervisor(spec, str(tmp_path / "noisy.log"))
    with caplog.at_level(logging.INFO, "vespa.backend"):
        task = asyncio.ensure_future(supervisor.run())
        await wait_until(lambda: "noisy: ready" in caplog.text, timeout=10)
        await supervisor.stop()
        await asyncio.wait_for(task, 10)
    return caplog.text, (tmp_path / "noisy.log").read_text()


async def test_the_worker_log_gets_one_line_and_the_file_every_line(tmp_path, caplog):
    worker_log, file = await supervised_stop(tmp_path, VLLM_SHUTDOWN_RACE, caplog)
    assert worker_log.count(VLLM_SHUTDOWN_RACE.note) == 1
    assert "Traceback" not in worker_log and "EngineDeadError" not in worker_log
    assert RACE in file


async def test_a_backend_without_known_noise_shows_every_line(tmp_path, caplog):
    worker_log, _ = await supervised_stop(tmp_path, None, caplog)
    assert "Traceback (most recent call last)" in worker_log
    assert VLLM_SHUTDOWN_RACE.note not in worker_log
