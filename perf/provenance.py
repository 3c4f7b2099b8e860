"""Where and when a measurement was made: what every results file under perf/results/ records
(the commit, whether the checkout had uncommitted changes, the machine, the time), so a figure the
README quotes can be traced to the run that measured it.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def git(tree: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=tree, capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip() if done.returncode == 0 else ""


def checkout(tree: Path = REPO_ROOT) -> dict:
    """The commit a checkout is at and whether its tracked files differ from it."""
    return {"commit": git(tree, "rev-parse", "HEAD") or None,
            "uncommitted_changes": bool(git(tree, "status", "--porcelain",
                                            "--untracked-files=no"))}


def request_path(python: str = sys.executable, tree: Path = REPO_ROOT,
                 env: dict[str, str] | None = None) -> str:
    """Compiled or plain Python (vespa/compiled.py), as a worker started from ``tree`` with
    ``python`` and ``env`` will run."""
    done = subprocess.run([python, "-c", "import vespa; print(vespa.HOT_PATH)"], cwd=tree,
                          env=env, capture_output=True, text=True, timeout=120)
    return done.stdout.strip() or "unknown"


def machine() -> dict:
    return {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
            "platform": platform.platform(), "python": platform.python_version()}


def timestamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def tool_version(argv: list[str]) -> str | None:
    """The first line a tool prints about its version (stdout or stderr), or None."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
