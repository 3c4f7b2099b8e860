"""The replay mark (issue #17 item 3): the highest reqnum a key signed, in a file, and what the
replay window does with it after a restart. The worker-process tests are in
tests/reliability/test_replay_restart.py."""

from __future__ import annotations

import logging

from vespa.autoscaler.replay_mark import WIDTH, ReplayMark
from vespa.corridor.replay import ReplayWindow

KEY = "sha256:00112233aabbccdd"


def test_a_mark_is_read_back_under_its_key_only(tmp_path):
    path = str(tmp_path / "cache" / "replay-mark")  # the directory is made on first write
    mark = ReplayMark(path)
    assert mark.load(KEY) is None
    mark.bind(KEY)
    mark.save(1_000_000)
    mark.save(7)  # shorter: nothing of the longer line is left
    mark.close()
    assert ReplayMark(path).load(KEY) == 7
    assert ReplayMark(path).load("sha256:ffffffffffffffff") is None
    assert len((tmp_path / "cache" / "replay-mark").read_bytes()) == WIDTH


def test_a_reqnum_longer_than_the_line_is_kept_whole(tmp_path):
    path = str(tmp_path / "replay-mark")
    mark = ReplayMark(path)
    mark.bind(KEY)
    huge = 10 ** 120
    mark.save(huge)
    assert ReplayMark(path).load(KEY) == huge
    mark.save(5)
    assert ReplayMark(path).load(KEY) == 5


def test_a_damaged_mark_is_not_applied_and_says_so(tmp_path, caplog):
    path = tmp_path / "replay-mark"
    path.write_text(f"{KEY} twelve\n")
    with caplog.at_level(logging.WARNING, "vespa.replay"):
        assert ReplayMark(str(path)).load(KEY) is None
    assert "not '<key fingerprint> <reqnum>'" in caplog.text


def test_an_unwritable_mark_warns_once_and_never_raises(tmp_path, caplog):
    blocker = tmp_path / "replay-mark"
    blocker.mkdir()  # a directory where the file should be
    mark = ReplayMark(str(blocker))
    mark.bind(KEY)
    with caplog.at_level(logging.WARNING, "vespa.replay"):
        mark.save(1)
        mark.save(2)
    assert mark.failed
    assert caplog.text.count("cannot be written") == 1


def test_the_window_tells_each_new_highest_reqnum_before_admitting():
    window = ReplayWindow(size=100)
    told: list[int] = []
    window.on_new_max = told.append
    for reqnum in (5, 3, 9, 9, 7, 12):
        window.admit(reqnum, bytes([reqnum, len(told)]))
    assert told == [5, 9, 12]
    assert window.admit(12, b"other") == ""  # a second signature of a seen reqnum: not new
    assert told == [5, 9, 12]


def test_a_restored_window_refuses_everything_up_to_the_mark():
    window = ReplayWindow(size=100)
    told: list[int] = []
    window.on_new_max = told.append
    window.restore(500)
    assert "too old" in window.admit(500, b"a")
    assert "too old" in window.admit(1, b"b")
    assert window.admit(501, b"c") == ""
    assert "replayed" in window.admit(501, b"c")
    assert told == [501]
    window.restore(10)  # an older mark never lowers the floor
    assert "too old" in window.admit(400, b"d")
