"""The compiled hot path: use the mypyc build of the request path when it matches the source.

``scripts/compile.py`` compiles ``HOT_MODULES`` with mypyc into ``<env>/vespa-compiled``, next to
the interpreter that will load them, with a stamp of the source it compiled. When this package is
imported, ``activate`` puts that build ahead of the source on the package's path, but only when
the build is whole and every module of the package's top level is byte for byte what it was
compiled against: an edited file makes the whole worker run as plain Python (the compiled
modules call each other directly, so they go together) until it is compiled again.
``VESPA_PURE_PYTHON=1`` turns the build off. The source stays plain, typed Python; the build is
an optimisation, never a requirement.

What compiled code asks of the source: types mypy accepts with strict optional checking; no
async generators; no ``vars()`` of its objects; exception classes derived from a built-in
exception kept as Python classes (``@mypyc_attr(native_class=False)``); and a name of its own
for each kind of exception caught in one function: mypyc gives a variable one type per
function, so ``except A as exc`` followed by ``except B as exc`` would refuse a B at run time.

This module is never compiled itself and imports nothing of the package.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

# The request's corridor, front door to backend and back; compiled together as one group.
HOT_MODULES = ("corridor.admission", "corridor.answer", "corridor.handler", "corridor.doorway",
               "corridor.refusal", "http.pool", "corridor.envelope", "http.server",
               "http.messages", "http.flow", "http.body", "http.upstream", "corridor.gate",
               "corridor.ledger", "observability.metrics", "corridor.request_ids",
               "corridor.visit")
GROUP = "vespa_hot"  # the shared library holding the compiled code: vespa_hot__mypyc
STAMP = "stamp.json"
OFF_SWITCH = "VESPA_PURE_PYTHON"


def build_dir() -> Path:
    """Where the build for this interpreter lives (one per virtual env)."""
    return Path(sys.prefix) / "vespa-compiled"


def source_digest(package_dir: Path) -> dict[str, str]:
    """sha256 of every module at the package's top level: the hot modules, and those whose
    types they were compiled against (a compiled module checks the types it was built with)."""
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(package_dir.glob("*.py"))}


def stamp_for(package_dir: Path) -> dict:
    """What a build of ``package_dir`` for this interpreter records, and what a load checks."""
    return {"ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"), "group": GROUP,
            "compiled": list(HOT_MODULES), "sources": source_digest(package_dir)}


def built_files(build: Path, ext_suffix: str) -> list[Path]:
    """The files a whole build holds: one per hot module, and the shared library."""
    return [build / "vespa" / f"{name}{ext_suffix}" for name in HOT_MODULES] + [
        build / f"{GROUP}__mypyc{ext_suffix}"]


def check(package_dir: Path, build: Path, environ=os.environ) -> tuple[bool, str]:
    """(use the build, why): the build is used only when it is whole and was made by this
    interpreter from exactly this source."""
    if environ.get(OFF_SWITCH, "").strip().lower() in ("1", "true", "yes", "on"):
        return False, f"plain Python ({OFF_SWITCH} is set)"
    try:
        built = json.loads((build / STAMP).read_text())
    except FileNotFoundError:
        return False, "plain Python (not compiled: run scripts/compile.py for a faster worker)"
    except (OSError, ValueError) as exc:
        return False, f"plain Python (the compiled build's stamp is unreadable: {exc})"
    try:
        current = stamp_for(package_dir)
    except OSError as exc:
        return False, f"plain Python (cannot read the source to compare with the build: {exc})"
    if not isinstance(built, dict) or built.get("ext_suffix") != current["ext_suffix"]:
        return False, "plain Python (the build is for another Python: run scripts/compile.py)"
    if built.get("group") != GROUP or built.get("compiled") != current["compiled"]:
        return False, "plain Python (the build compiled other modules: run scripts/compile.py)"
    sources = built.get("sources")
    if sources != current["sources"]:
        sources = sources if isinstance(sources, dict) else {}
        changed = sorted(name for name in set(sources) | set(current["sources"])
                         if sources.get(name) != current["sources"].get(name))
        return False, (f"plain Python ({', '.join(changed)} changed since the build: run "
                       "scripts/compile.py again)")
    missing = [path.name for path in built_files(build, current["ext_suffix"])
               if not path.exists()]
    if missing:
        return False, (f"plain Python (the build is incomplete, {', '.join(missing)} missing: "
                       "run scripts/compile.py again)")
    return True, f"compiled (mypyc, {len(HOT_MODULES)} modules)"


def activate(package_path: list[str], build: Path | None = None) -> tuple[bool, str]:
    """Put the build ahead of the source on ``package_path`` (the package's ``__path__``) when
    ``check`` allows it; returns its verdict. Called once, before any hot module is imported."""
    package_dir = Path(package_path[0])
    build = build_dir() if build is None else build
    use, why = check(package_dir, build)
    if use:
        package_path.insert(0, str(build / "vespa"))
        if str(build) not in sys.path:
            sys.path.append(str(build))  # the shared library the compiled modules import
    return use, why
