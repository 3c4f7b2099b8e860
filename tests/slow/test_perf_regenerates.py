"""Every results file the README quotes can be made again by its tool on a fresh machine (issue
#18: a fresh CI run regenerates them), and the README's figures render from the new files.

Short runs (one harness round of 2 s, 2 s under callgrind): what is checked is that each tool
still runs and writes what its README block needs, never how fast anything was. The files are
written to a temporary directory; the committed ones stay as they are."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "perf"))
import figures  # noqa: E402

pytestmark = pytest.mark.slow

SHORT = {  # the tools' own arguments for a short run, after those --measure passes
    "harness": ["--rounds", "1", "--duration", "2", "--warmup", "1"],
    "instructions_dev": ["--seconds", "2"],
    "instructions_url": ["--seconds", "2"],
    "instructions_full": ["--seconds", "2"],
    "instructions_plain": ["--seconds", "2"],
    "rsa_verify": ["--number", "20", "--repeat", "3"],
}


def test_every_quoted_results_file_is_regenerated_and_renders(tmp_path):
    missing = [tool for tool in ("wrk", "valgrind", "nginx")
               if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}")]
    assert not missing, f"scripts/test.sh installs these for the full run: {missing}"
    assert set(SHORT) == set(figures.MEASUREMENTS), "a new measurement needs its short run here"
    written = {}
    for name, (argv, env, suffix) in figures.MEASUREMENTS.items():
        output = tmp_path / f"{suffix}.json"
        done = subprocess.run([sys.executable, *argv, *SHORT[name], "--output", str(output)],
                              cwd=REPO, env={**os.environ, **env}, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0 and output.exists(), \
            f"{name}: exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        data = json.loads(output.read_text())
        assert data.get("commit") or data.get("machine", {}).get("commit"), name
        written[name] = output

    def read(path: str) -> str:
        if path == figures.QUOTED:
            return json.dumps({name: f"regenerated:{name}" for name in written})
        if path.startswith("regenerated:"):
            return written[path.removeprefix("regenerated:")].read_text()
        return (REPO / path).read_text()

    for document in figures.DOCUMENTS:
        rendered = figures.render(document, read)
        for block in figures.DOCUMENTS[document]:
            content = figures.block_in(rendered, block)
            assert content.strip(), f"{document}: block {block} rendered empty"
    table = figures.block_in(figures.render("README.md", read), "table")
    assert "SSE event latency is n/a" not in table  # the new harness measures it
    assert "Vast's worker" in table and "nginx" in table
