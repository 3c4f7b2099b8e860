"""The compiled hot path: use the mypyc build of the request path when it matches the source.

What is compiled (``hot_modules``) is derived from the files: every module of the request
path's subpackages (``HOT_PACKAGES``: vespa/http/, vespa/corridor/) and the modules named in
``HOT_EXTRA`` (vespa/observability/metrics.py, whose counters every request bumps); a module
added to those subpackages is compiled too; no ``__init__.py`` is. ``scripts/compile.py``
compiles them with mypyc into ``<env>/vespa-compiled``, next to the interpreter that will load
them, as extension modules laid out like the package (``vespa/http/server.<EXT_SUFFIX>``) and
one shared library, with a stamp of what it compiled.

The stamp (``stamp_for``) names the compiled modules and holds the sha256 of each source the
build depends on: the compiled modules and, transitively, every module of the package they
import (``source_digest``, parsing imports with ``ast``: relative and absolute, inside functions
and under ``TYPE_CHECKING`` too), because compiled code checks the types it was built against.
So editing vespa/state.py or vespa/corridor/ledger.py makes the build stale; editing a module
the request path never imports (vespa/observability/records.py, vespa/backend/) does not.

When the package is imported, ``activate`` runs ``check``: the build is used only when it is
whole and was made by this interpreter from these compiled modules, with every source its stamp
records byte for byte the same (hashed, not parsed: this runs at every start; while they are
unchanged, so are their imports). Any difference makes the whole worker run as plain Python (the
compiled modules call each other directly, so they go together) until it is compiled again.
When it is used, ``activate`` puts the build ahead of the source on the package's ``__path__``,
and each subpackage holding compiled modules does the same for its own ``__path__`` by calling
``build_first(__name__, __path__)`` from its ``__init__.py`` (vespa/http/, vespa/corridor/,
vespa/observability/), so ``import vespa.http.server`` loads the extension module.
``VESPA_PURE_PYTHON=1`` turns the build off. The source stays plain, typed Python; the build is
an optimisation, never a requirement.

What compiled code asks of the source: types mypy accepts with strict optional checking; no
async generators; no ``vars()`` of its objects; exception classes derived from a built-in
exception other than ``Exception`` kept as Python classes (``@mypyc_attr(native_class=False)``);
and a name of its own for each kind of exception caught in one function: mypyc gives a variable
one type per function, so ``except A as exc`` followed by ``except B as exc`` would refuse a B
at run time.

This module is never compiled itself and imports nothing of the package.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

# The request's corridor, front door to backend and back; compiled together as one group.
HOT_PACKAGES = ("http", "corridor")  # every module of these subpackages
HOT_EXTRA = ("observability.metrics",)  # and these modules (its counters: on every request)
GROUP = "vespa_hot"  # the shared library holding the compiled code: vespa_hot__mypyc
STAMP = "stamp.json"
OFF_SWITCH = "VESPA_PURE_PYTHON"

_active_build: Path | None = None  # the build ``activate`` put in use, if any


def build_dir() -> Path:
    """Where the build for this interpreter lives (one per virtual env)."""
    return Path(sys.prefix) / "vespa-compiled"


def hot_modules(package_dir: Path) -> list[str]:
    """The modules compiled, named within the package (``"http.server"``), sorted."""
    found = {f"{package}.{path.stem}" for package in HOT_PACKAGES
             for path in (package_dir / package).glob("*.py") if path.name != "__init__.py"}
    return sorted(found | set(HOT_EXTRA))


def module_file(package_dir: Path, name: str) -> Path | None:
    """The source of module ``name`` of the package (``""`` is the package itself), if any."""
    parts = name.split(".") if name else []
    candidates = [package_dir.joinpath(*parts, "__init__.py")]  # a package first, as Python
    if parts:
        candidates.append(package_dir.joinpath(*parts[:-1], parts[-1] + ".py"))
    return next((path for path in candidates if path.is_file()), None)


def imported_modules(package_dir: Path, path: Path, source: str | bytes) -> set[str]:
    """The modules of the package that its module at ``path`` imports anywhere in ``source``
    (in functions and under ``TYPE_CHECKING`` too), named as ``hot_modules`` names them.
    ``from P import n`` counts P.n when that is a module, else P (whose names are used)."""
    top = package_dir.name
    here = list(path.relative_to(package_dir).with_suffix("").parts)[:-1]  # its package
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name[len(top) + 1:] for alias in node.names
                         if alias.name == top or alias.name.startswith(top + "."))
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if node.level:
            if node.level - 1 > len(here):
                continue  # beyond the package
            parts = here[:len(here) - node.level + 1] + module.split(".")
            base = ".".join(part for part in parts if part)
        elif module == top or module.startswith(top + "."):
            base = module[len(top) + 1:]
        else:
            continue  # another package
        for alias in node.names:
            submodule = f"{base}.{alias.name}" if base else alias.name
            found.add(submodule if module_file(package_dir, submodule) else base)
    return found


def source_digest(package_dir: Path, modules: list[str]) -> dict[str, str]:
    """sha256 of each of ``modules`` and, transitively, of every module of the package they
    import, by path within the package (``"corridor/ledger.py"``)."""
    digests: dict[str, str] = {}
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(package_dir, name)
        if path is None:
            continue  # not in the package: an import that fails as plain Python too
        source = path.read_bytes()
        digests[path.relative_to(package_dir).as_posix()] = hashlib.sha256(source).hexdigest()
        todo.extend(imported_modules(package_dir, path, source))
    return dict(sorted(digests.items()))


def stamp_for(package_dir: Path) -> dict:
    """What a build of ``package_dir`` for this interpreter records, and what a load checks."""
    modules = hot_modules(package_dir)
    return {"ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"), "group": GROUP,
            "compiled": modules, "sources": source_digest(package_dir, modules)}


def built_files(build: Path, ext_suffix: str, modules: list[str]) -> list[Path]:
    """The files a whole build of ``modules`` holds: one per module, laid out like the package
    (``vespa/http/server.<ext_suffix>``), and the shared library."""
    return [build.joinpath("vespa", *parts[:-1], parts[-1] + ext_suffix)
            for parts in (name.split(".") for name in modules)] + [
        build / f"{GROUP}__mypyc{ext_suffix}"]


def switched_off(environ=os.environ) -> bool:
    """``VESPA_PURE_PYTHON`` asks for plain Python, whatever the build."""
    return environ.get(OFF_SWITCH, "").strip().lower() in ("1", "true", "yes", "on")


def changed_sources(package_dir: Path, sources: dict[str, str]) -> list[str]:
    """Which of the recorded ``sources`` (path within the package -> sha256) differ now or are
    gone. Their imports were followed when they were recorded, so while none differs, neither
    does what they import."""
    changed = []
    for name, digest in sources.items():
        try:
            now = hashlib.sha256((package_dir / name).read_bytes()).hexdigest()
        except FileNotFoundError:
            now = ""
        if now != digest:
            changed.append(name)
    return sorted(changed)


def check(package_dir: Path, build: Path, environ=os.environ) -> tuple[bool, str]:
    """(use the build, why): the build is used only when it is whole and was made by this
    interpreter from exactly this source: the same compiled modules, and every source its stamp
    records byte for byte the same (no parsing here: this runs on every start)."""
    if switched_off(environ):
        return False, f"plain Python ({OFF_SWITCH} is set)"
    try:
        built = json.loads((build / STAMP).read_text())
    except FileNotFoundError:
        return False, "plain Python (not compiled: run scripts/compile.py for a faster worker)"
    except (OSError, ValueError) as exc:
        return False, f"plain Python (the compiled build's stamp is unreadable: {exc})"
    ext_suffix = sysconfig.get_config_var("EXT_SUFFIX")
    if not isinstance(built, dict) or built.get("ext_suffix") != ext_suffix:
        return False, "plain Python (the build is for another Python: run scripts/compile.py)"
    modules = hot_modules(package_dir)
    if built.get("group") != GROUP or built.get("compiled") != modules:
        return False, "plain Python (the build compiled other modules: run scripts/compile.py)"
    sources = built.get("sources")
    if not isinstance(sources, dict) or not {
            "/".join(name.split(".")) + ".py" for name in modules} <= set(sources):
        return False, "plain Python (the build's stamp misses its sources: run scripts/compile.py)"
    try:
        changed = changed_sources(package_dir, sources)
    except (OSError, TypeError) as problem:
        return False, f"plain Python (cannot compare the source with the build: {problem})"
    if changed:
        return False, (f"plain Python ({', '.join(changed)} changed since the build: run "
                       "scripts/compile.py again)")
    missing = [path.relative_to(build).as_posix()
               for path in built_files(build, ext_suffix, modules) if not path.exists()]
    if missing:
        return False, (f"plain Python (the build is incomplete, {', '.join(missing)} missing: "
                       "run scripts/compile.py again)")
    return True, f"compiled (mypyc, {len(modules)} modules)"


def activate(package_path: list[str], build: Path | None = None) -> tuple[bool, str]:
    """Put the build ahead of the source on ``package_path`` (the package's ``__path__``) when
    ``check`` allows it, and remember it for ``build_first``; returns the verdict. Called once,
    before any compiled module is imported."""
    global _active_build
    package_dir = Path(package_path[0])
    build = build_dir() if build is None else build
    use, why = check(package_dir, build)
    _active_build = build if use else None
    if use:
        build_first(package_dir.name, package_path)
        if str(build) not in sys.path:
            sys.path.append(str(build))  # the shared library the compiled modules import
    return use, why


def build_first(package: str, package_path: list[str]) -> None:
    """Put the build's directory for ``package`` (``"vespa.http"``) ahead of its source on
    ``package_path`` when a build is in use: each subpackage holding compiled modules calls it
    from its ``__init__.py`` with its ``__name__`` and ``__path__``."""
    if _active_build is not None:
        package_path.insert(0, str(_active_build.joinpath(*package.split("."))))
