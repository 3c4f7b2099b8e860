"""The slow tests' reading of vLLM's output at a stop (tests/slow/vllm_stop.py), on lines vLLM
0.32 printed here: a clean stop, its own shutdown race, and the stops of before issue #19."""

from tests.slow.vllm_stop import unclean_stop

CLEAN = """\
(APIServer pid=7) INFO 12-07 00:22:27 [launcher.py:254] [shutdown] API server: shutdown triggered
(EngineCore pid=8) INFO 12-07 00:22:31 [multiproc_executor.py:486] [shutdown] Executor: all workers exited gracefully
(APIServer pid=7) INFO 12-07 00:22:34 [core_client.py:777] [shutdown] MPClient: complete
(APIServer pid=7) INFO 12-07 00:22:34 [launcher.py:279] [shutdown] API server: engine client stopped
INFO:     Application shutdown complete."""

RACE = """\
(APIServer pid=7) ERROR 12-07 00:24:06 [async_llm.py:906] AsyncLLM output_handler failed.
(APIServer pid=7) ERROR 12-07 00:24:06 [async_llm.py:906] Traceback (most recent call last):
(APIServer pid=7) ERROR 12-07 00:24:06 [async_llm.py:906]   File "/v/vllm/v1/engine/async_llm.py", line 849, in output_handler
(APIServer pid=7) ERROR 12-07 00:24:06 [async_llm.py:906]     outputs = await engine_core.get_output_async()
(APIServer pid=7) ERROR 12-07 00:24:06 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause."""


def with_race(text: str) -> str:
    lines = text.splitlines()
    return "\n".join(lines[:3] + RACE.splitlines() + lines[3:])


def test_a_clean_stop_is_clean():
    assert unclean_stop(CLEAN) == ([], False)


def test_vllms_own_shutdown_race_is_told_apart():
    assert unclean_stop(with_race(CLEAN)) == ([], True)
    prefixed = "\n".join(f"2026-12-07 INFO vespa.backend: vllm: {line}"
                         for line in with_race(CLEAN).splitlines())
    assert unclean_stop(prefixed) == ([], True)


def test_the_same_block_elsewhere_is_unclean():
    before_the_client_is_down = RACE + "\n" + CLEAN  # a real engine death, not the shutdown race
    unclean, race = unclean_stop(before_the_client_is_down)
    assert not race and len(unclean) == 5
    cut_short = with_race(CLEAN).replace("vllm.v1.engine.exceptions.EngineDeadError", "KeyError")
    assert unclean_stop(cut_short)[1] is False


def test_the_stops_of_before_are_unclean():
    before = CLEAN + """
(APIServer pid=7) WARNING 12-07 00:13:41 [utils.py:648] [shutdown] Process manager: force killing remaining processes count=1
nanobind: leaked 4 instances!
/usr/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: There appear to be 1 leaked semaphore objects to clean up at shutdown"""
    unclean, race = unclean_stop(before)
    assert not race and [line[:30] for line in unclean] == [
        "(APIServer pid=7) WARNING 12-0", "nanobind: leaked 4 instances!", "/usr/lib/python3.11/multiproce"]
