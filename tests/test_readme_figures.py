"""Every figure in the README comes from a results file a measuring tool wrote (issue #18 item
4): the README's copies are compared with their sources here, so a hand-edited or stale number
fails the fast suite."""

from __future__ import annotations

import subprocess

from .reliability.results import README, RESULTS_PATH, readme_block, readme_section


def committed(path) -> str:
    """``path`` as the checkout's commit has it: a run of the reliability suite (the full run's
    first pass, say) rewrites RESULTS.md, and the README quotes the committed one."""
    root = README.parent
    shown = subprocess.run(["git", "show", f"HEAD:{path.relative_to(root).as_posix()}"],
                           cwd=root, capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else path.read_text()


def test_the_readmes_reliability_table_is_results_md():
    assert readme_section(committed(README)) == readme_block(committed(RESULTS_PATH)), (
        "README's reliability table differs from tests/reliability/RESULTS.md: run "
        "python tests/reliability/results.py")


def test_results_md_says_when_where_and_from_which_commit():
    written = next(line for line in committed(RESULTS_PATH).splitlines()
                   if line.startswith("Written by"))
    assert "commit " in written and "cores" in written, written
