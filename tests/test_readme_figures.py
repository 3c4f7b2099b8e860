"""Every figure in the README comes from a results file a measuring tool wrote (issue #18 item
4): the README's copies are compared with their sources here, so a hand-edited or stale number
fails the fast suite."""

from __future__ import annotations

from .reliability.results import README, RESULTS_PATH, readme_block, readme_section


def test_the_readmes_reliability_table_is_results_md():
    assert readme_section(README.read_text()) == readme_block(RESULTS_PATH.read_text()), (
        "README's reliability table differs from tests/reliability/RESULTS.md: run "
        "python tests/reliability/results.py")


def test_results_md_says_when_where_and_from_which_commit():
    written = next(line for line in RESULTS_PATH.read_text().splitlines()
                   if line.startswith("Written by"))
    assert "commit " in written and "cores" in written, written
