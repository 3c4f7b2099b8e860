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


def test_a_mark_for_another_worker_url_is_not_applied(tmp_path):
    """A request signed for another URL is refused anyway; a cache dir shared by two workers
    must not make one refuse the other's reqnums."""
    path = str(tmp_path / "replay-mark")
    mark = ReplayMark(path, "http://10.0.0.1:40000")
    mark.bind(KEY)
    mark.save(900)
    assert ReplayMark(path, "http://10.0.0.1:40000").load(KEY) == 900
    assert ReplayMark(path, "http://10.0.0.2:40000").load(KEY) is None
    assert ReplayMark(path).load(KEY) is None


def test_a_damaged_mark_is_not_applied_and_says_so(tmp_path, caplog):
    path = tmp_path / "replay-mark"
    path.write_text(f"{KEY} - twelve\n")
    with caplog.at_level(logging.WARNING, "vespa.replay"):
        assert ReplayMark(str(path)).load(KEY) is None
    assert "not '<key fingerprint> <url> <reqnum>'" in caplog.text


def test_an_unwritable_mark_warns_once_a_minute_and_tries_again(tmp_path, caplog):
    blocker = tmp_path / "replay-mark"
    blocker.mkdir()  # a directory where the file should be
    mark = ReplayMark(str(blocker))
    mark.bind(KEY)
    with caplog.at_level(logging.WARNING, "vespa.replay"):
        mark.save(1)  # never raises: the request goes on
        mark.save(2)
    assert caplog.text.count("cannot be written") == 1
    blocker.rmdir()  # the disk has room again
    mark.save(3)
    assert ReplayMark(str(blocker)).load(KEY) == 3


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


def test_the_window_forgets_everything_for_a_new_key():
    window = ReplayWindow(size=100)
    window.restore(5000)
    window.admit(6000, b"a")
    window.reset()
    assert window.admit(7, b"b") == ""  # the new key's reqnums start wherever they start
    assert window.restored is None and window.max_reqnum == 7


def test_refusals_of_reqnums_from_before_the_restart_are_told(caplog):
    window = ReplayWindow(size=100)
    heard: list[int] = []
    window.on_refused_as_restored = heard.append
    window.restore(500)
    assert "before this worker restarted" in window.admit(499, b"a")
    assert "before this worker restarted" in window.admit(500, b"b")
    assert window.admit(501, b"c") == ""
    window.admit(550, b"d")
    assert "replayed" in window.admit(501, b"c")  # refused, but not for the restart
    assert heard == [499, 500]


async def test_a_rotated_key_gets_a_fresh_window_and_its_own_mark(tmp_path):
    """Key A admitted up to reqnum 1,000; then the autoscaler rotated to key B, whose reqnums
    start low: B's requests are served, marked under B, and refused again after a restart."""
    from vespa.config import load_settings
    from vespa.devtools.signing import Signer
    from vespa.worker import Worker

    settings = load_settings({
        "REPORT_ADDR": "http://127.0.0.1:9", "CONTAINER_ID": "7", "VESPA_USE_SSL": "false",
        "VESPA_PUBLIC_URL": "http://127.0.0.1:3999", "VESPA_WORKER_HTTP_PORT": "0",
        "VESPA_BACKEND_URL": "http://127.0.0.1:8000", "VESPA_CACHE_DIR": str(tmp_path)})
    key_a, key_b = Signer().public_key, Signer().public_key
    worker = Worker(settings)
    worker.on_key(key_a)
    assert worker.doorway.replay.admit(1000, b"a") == ""
    worker.on_key(key_b)
    assert worker.doorway.replay.admit(7, b"b") == ""
    worker.replay_mark.close()

    restarted = Worker(settings)
    restarted.on_key(key_b)
    assert "before this worker restarted" in restarted.doorway.replay.admit(7, b"b")
    assert restarted.doorway.replay.admit(8, b"c") == ""
    restarted.replay_mark.close()
