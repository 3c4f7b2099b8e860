"""The perf/ scripts as modules, for tests of their pure parts and of the README's figures.

perf/ is a directory of scripts that import each other by name (``import sse_latency``), not a
package, so it goes on ``sys.path`` (last: none of its names hides another module).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

PERF = Path(__file__).resolve().parent.parent / "perf"


def perf_module(name: str) -> ModuleType:
    if str(PERF) not in sys.path:
        sys.path.append(str(PERF))
    return importlib.import_module(name)
