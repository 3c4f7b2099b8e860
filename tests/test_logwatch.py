"""The backend log watch: ready and error lines, split writes, rotation, a file that comes late."""

from __future__ import annotations

import asyncio
import os

import pytest

from vespa.backend.logwatch import LogWatch

from .conftest import wait_until

READY = r"Application startup complete"
ERROR = r"(CUDA out of memory|Traceback)"


def append(path, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    with open(path, "ab") as file:
        file.write(data)


@pytest.fixture
def watch():
    """LogWatch factory; every watch is closed at the end (it keeps the file open)."""
    watches = []

    def factory(path, ready: str | None = READY, error: str | None = ERROR) -> LogWatch:
        watches.append(LogWatch(str(path), ready, error))
        return watches[-1]

    yield factory
    for w in watches:
        w.close()
        assert w.file is None


async def test_ready_and_error_lines_found(tmp_path, watch):
    log = tmp_path / "backend.log"
    append(log, "INFO loading model\nINFO Application startup complete.\n")
    w = watch(log)
    await w.poll()
    assert w.ready_line == "INFO Application startup complete."
    assert w.error_line is None
    append(log, "ERROR CUDA out of memory. Tried to allocate 2.00 GiB\nTraceback (most recent)\n")
    await w.poll()
    assert w.error_line == "ERROR CUDA out of memory. Tried to allocate 2.00 GiB"  # the first


async def test_nothing_found_without_a_match_or_patterns(tmp_path, watch):
    log = tmp_path / "backend.log"
    append(log, "INFO loading\nINFO still loading\n")
    w = watch(log)
    await w.poll()
    assert w.ready_line is None and w.error_line is None
    quiet = watch(log, None, None)
    append(log, "Application startup complete\nTraceback\n")
    await quiet.poll()
    assert quiet.ready_line is None and quiet.error_line is None


async def test_line_split_across_writes(tmp_path, watch):
    log = tmp_path / "backend.log"
    w = watch(log)
    append(log, "INFO Application start")
    await w.poll()
    assert w.ready_line is None
    append(log, "up compl")
    await w.poll()
    assert w.ready_line is None  # no newline yet: the line is not complete
    append(log, "ete\r\nINFO next\n")
    await w.poll()
    assert w.ready_line == "INFO Application startup complete"  # \r stripped


async def test_line_split_in_the_middle_of_a_utf8_character(tmp_path, watch):
    log = tmp_path / "backend.log"
    w = watch(log)
    text = "Modèle prêt: Application startup complete ✓\n".encode()
    cut = text.index("✓".encode()) + 1
    append(log, text[:cut])
    await w.poll()
    append(log, text[cut:])
    await w.poll()
    assert w.ready_line == "Modèle prêt: Application startup complete ✓"


async def test_invalid_utf8_does_not_stop_the_watch(tmp_path, watch):
    log = tmp_path / "backend.log"
    append(log, b"\xff\xfe garbage\nTraceback here\n")
    w = watch(log)
    await w.poll()
    assert w.error_line == "Traceback here"


async def test_file_missing_at_first_then_created(tmp_path, watch):
    log = tmp_path / "later" / "backend.log"
    w = watch(log)
    await w.poll()
    await w.poll()
    assert w.ready_line is None
    log.parent.mkdir()
    append(log, "Application startup complete\n")
    await w.poll()
    assert w.ready_line == "Application startup complete"


async def test_rotation_by_rename_and_new_file(tmp_path, watch):
    log = tmp_path / "backend.log"
    append(log, "INFO a long line of an old file that came before the rotation\n" * 50)
    w = watch(log)
    await w.poll()
    os.rename(log, tmp_path / "backend.log.1")
    append(log, "Application startup complete\n")  # shorter than what was read before
    await w.poll()
    assert w.ready_line == "Application startup complete"
    append(log, "Traceback (most recent call last):\n")
    await w.poll()
    assert w.error_line == "Traceback (most recent call last):"


async def test_rotation_to_a_longer_new_file(tmp_path, watch):
    log = tmp_path / "backend.log"
    append(log, "INFO old\n")
    w = watch(log)
    await w.poll()
    os.rename(log, tmp_path / "backend.log.1")
    append(log, "INFO " + "x" * 500 + "\nApplication startup complete\n")
    await w.poll()
    assert w.ready_line == "Application startup complete"


async def test_lines_written_just_before_a_rename_are_not_lost(tmp_path, watch):
    log = tmp_path / "backend.log"
    append(log, "INFO loading\n")
    w = watch(log)
    await w.poll()
    append(log, "CUDA out of memory\n")  # written, then the logger rotates before the next poll
    os.rename(log, tmp_path / "backend.log.1")
    append(log, "INFO new file\n")
    await w.poll()
    assert w.error_line == "CUDA out of memory"


async def test_partial_line_of_the_old_file_is_not_joined_to_the_new_one(tmp_path, watch):
    log = tmp_path / "backend.log"
    w = watch(log)
    append(log, "INFO Application startup")  # no newline: cut by the rotation
    await w.poll()
    os.rename(log, tmp_path / "backend.log.1")
    append(log, " complete\n")
    await w.poll()
    assert w.ready_line is None


async def test_file_removed_then_recreated(tmp_path, watch):
    log = tmp_path / "backend.log"
    append(log, "INFO first run\n")
    w = watch(log)
    await w.poll()
    append(log, "Traceback of the first run\n")
    os.remove(log)
    await w.poll()
    assert w.error_line == "Traceback of the first run"
    await w.poll()  # nothing there: nothing read
    append(log, "Application startup complete\n")
    await w.poll()
    assert w.ready_line == "Application startup complete"


async def test_rotation_by_truncation(tmp_path, watch):
    log = tmp_path / "backend.log"
    append(log, "INFO some old output that is long enough\n" * 20)
    w = watch(log)
    await w.poll()
    inode = os.stat(log).st_ino
    with open(log, "r+b") as file:  # copytruncate: same file, emptied
        file.truncate(0)
    append(log, "CUDA out of memory\n")
    assert os.stat(log).st_ino == inode
    await w.poll()
    assert w.error_line == "CUDA out of memory"


async def test_run_follows_a_growing_file(tmp_path, watch):
    log = tmp_path / "backend.log"
    w = watch(log)
    polls = []
    poll = w.poll

    async def counted_poll() -> None:
        await poll()
        polls.append(w.file)

    w.poll = counted_poll
    task = asyncio.create_task(w.run(interval=0.01))
    try:
        await wait_until(lambda: len(polls) >= 2)  # it looked for the file (none yet), again
        assert polls[:2] == [None, None]
        append(log, "x" * (3 << 20) + "\n")  # more than one read's worth
        append(log, "INFO Application startup complete\n")
        await wait_until(lambda: w.ready_line is not None, timeout=5.0)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert w.ready_line == "INFO Application startup complete"
    assert w.file is None  # a stopped watch holds no file open


async def test_a_very_long_line_is_bounded(tmp_path, watch):
    log = tmp_path / "backend.log"
    w = watch(log)
    for _ in range(4):
        append(log, "y" * (1 << 20))
        await w.poll()
    assert len(w.partial) <= 65536
    append(log, "\nTraceback\n")
    await w.poll()
    assert w.error_line == "Traceback"
