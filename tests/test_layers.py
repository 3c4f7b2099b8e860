"""The house's rules as the imports show them: each room imports only the rooms below it.

Read from the source with ``ast`` (TYPE_CHECKING imports count too), so a change that makes the
corridor reach up into the assembly, or http/ learn about Vast, fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vespa"

# room -> the rooms it may import (itself always); a room is a subpackage or a top-level module
ALLOWED = {
    "http": set(),
    "state": set(),
    "config": set(),
    "compiled": set(),
    "corridor": {"http", "state", "observability.metrics"},  # the counters it bumps
    "autoscaler": {"corridor", "state", "vespa"},
    "backend": {"config", "state"},
    "observability": {"corridor", "http", "state", "autoscaler", "backend", "vespa"},
    "client": set(),
    "devtools": {"corridor"},
    "worker": {"*"},
    "main": {"*"},
    "__main__": {"main"},
    "__init__": {"compiled"},
}


def room_of(module: str) -> str:
    """``vespa.http.server`` -> ``http``; ``vespa.worker`` -> ``worker``; ``vespa`` -> ``vespa``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "vespa"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The vespa modules ``path`` imports, as absolute names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("vespa")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("vespa"):
                found.add(target)
                found |= {f"{target}.{alias.name}" for alias in node.names
                          if (PACKAGE.parent / f"{target}.{alias.name}".replace(".", "/")
                              ).with_suffix(".py").exists()}
    return found


def test_no_room_imports_up_the_layers():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        room = "__init__" if name == "vespa" else room_of(name)
        allowed = ALLOWED[room]
        for imported in imports_of(path):
            target = room_of(imported)
            if imported == "vespa" and room in ("__main__", "__init__"):
                continue
            if imported == "vespa.compiled":  # the build loader: it imports nothing of Vespa
                continue
            if target == room or "*" in allowed or target in allowed \
                    or imported.partition(".")[2] in allowed:
                continue
            wrong.append(f"{name} imports {imported}")
    assert wrong == []


def test_only_the_entry_points_import_the_assembly():
    importers = {module_name(path) for path in PACKAGE.rglob("*.py")
                 if {"vespa.worker", "vespa.main"} & imports_of(path)}
    assert importers <= {"vespa.main", "vespa.__main__"}


def test_every_room_is_known():
    """A new subpackage or top-level module gets its line in ALLOWED (and in ARCHITECTURE.md)."""
    rooms = {room_of(module_name(path)) for path in PACKAGE.rglob("*.py")} - {"vespa"}
    assert rooms <= set(ALLOWED), rooms - set(ALLOWED)
