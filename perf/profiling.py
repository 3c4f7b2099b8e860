"""Summarise a py-spy speedscope profile as plain text: where the busy time goes.

Used by ``perf/run.py --profile``; also runs on its own:

    python perf/profiling.py perf/results/profile-vespa-....speedscope.json 5
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def top_functions(speedscope_path: Path, wall_seconds: float, limit: int = 30) -> str:
    """Self and inclusive time shares per function from a py-spy speedscope file.

    py-spy weights each sample in seconds and leaves out idle waits, so the sum of the weights
    is the time the process was busy; a leaf of ``Runner.run`` is time inside the event loop's
    own C code (uvloop callbacks, syscalls), which ``--profile-native`` breaks down further.
    """
    data = json.loads(speedscope_path.read_text())
    frames = [_frame_name(f) for f in data["shared"]["frames"]]
    own: dict[str, float] = {}
    total: dict[str, float] = {}
    busy = 0.0
    for prof in data["profiles"]:
        for stack, weight in zip(prof["samples"], prof["weights"]):
            busy += weight
            if stack:
                leaf = frames[stack[-1]]
                own[leaf] = own.get(leaf, 0) + weight
            for name in {frames[i] for i in stack}:
                total[name] = total.get(name, 0) + weight
    if not busy:
        return "no samples (was the process idle, or could py-spy not read it?)"
    lines = [f"busy {busy:.2f}s of {wall_seconds:g}s sampled ({100 * busy / wall_seconds:.0f}%; "
             "idle waits are not sampled). Shares below are of the busy time.",
             "", "self %   function (own time)"]
    lines += [f"{100 * v / busy:6.1f}  {k}" for k, v in _top(own, limit)]
    lines += ["", "total %  function (including callees; frames on every stack left out)"]
    below_root = {k: v for k, v in total.items() if v < 0.995 * busy}
    lines += [f"{100 * v / busy:6.1f}  {k}" for k, v in _top(below_root, limit)]
    return "\n".join(lines)


def _top(counts: dict[str, float], limit: int) -> list[tuple[str, float]]:
    return sorted(counts.items(), key=lambda kv: -kv[1])[:limit]


def _frame_name(frame: dict) -> str:
    """``func (file:line)`` for Python frames; native frames (--native) without the line."""
    path = frame.get("file") or "?"
    if path.endswith(".py"):
        return f"{frame['name']} ({_short(path)}:{frame.get('line')})"
    return f"{frame['name']} ({_short(path)})"


def _short(path: str) -> str:
    if "site-packages/" in path:
        return path.split("site-packages/", 1)[1]
    match = re.search(r"/lib/python3\.\d+/", path)
    if match:
        return path[match.end():]
    return path.replace(str(REPO_ROOT) + "/", "")


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python perf/profiling.py PROFILE.speedscope.json SECONDS_SAMPLED")
    print(top_functions(Path(sys.argv[1]), float(sys.argv[2])))


if __name__ == "__main__":
    main()
