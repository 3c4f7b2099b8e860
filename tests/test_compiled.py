"""The compiled hot path (vespa/compiled.py, scripts/compile.py): the build is used only when it
was made from exactly this source by this interpreter, can be turned off, and the source keeps
what mypyc needs of it."""

from __future__ import annotations

import ast
import builtins
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import vespa
from vespa import compiled

from .conftest import PYTHON, REPO, worker_env

PACKAGE = REPO / "vespa"
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX")


def copy_package(root: Path) -> Path:
    """A copy of the package's source (its imports are what the stamp follows)."""
    return Path(shutil.copytree(PACKAGE, root / "vespa",
                                ignore=shutil.ignore_patterns("__pycache__")))


def fake_build(root: Path, package: Path, **changes) -> Path:
    """A whole build of ``package`` (its extension files are empty: only their presence counts
    until they are imported)."""
    build = root / "build"
    (build / "vespa").mkdir(parents=True)
    stamp = {**compiled.stamp_for(package), **changes}
    (build / compiled.STAMP).write_text(json.dumps(stamp))
    for path in compiled.built_files(build, stamp["ext_suffix"], stamp["compiled"]):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    return build


def edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# edited after the build\n")


def test_the_build_covers_the_request_paths_packages_and_metrics():
    expected = sorted([f"{package}.{path.stem}" for package in ("http", "corridor")
                       for path in (PACKAGE / package).glob("*.py")
                       if path.name != "__init__.py"] + ["observability.metrics"])
    assert compiled.hot_modules(PACKAGE) == expected
    assert {"http.server", "corridor.handler", "corridor.auth"} <= set(expected)


def test_a_build_of_exactly_this_source_is_used(tmp_path):
    package = copy_package(tmp_path)
    build = fake_build(tmp_path, package)
    use, why = compiled.check(package, build, environ={})
    assert use and why == f"compiled (mypyc, {len(compiled.hot_modules(PACKAGE))} modules)"


def test_the_stamp_covers_the_compiled_modules_and_what_they_import():
    sources = compiled.stamp_for(PACKAGE)["sources"]
    assert {"http/server.py", "corridor/handler.py", "observability/metrics.py",
            "state.py"} <= set(sources)  # state.py: imported by corridor/handler.py
    assert not {"observability/records.py", "backend/lifecycle.py", "worker.py",
                "config/settings.py", "compiled.py"} & set(sources)


def test_an_edited_module_of_the_request_path_turns_the_whole_build_off_and_is_named(tmp_path):
    package = copy_package(tmp_path)
    build = fake_build(tmp_path, package)
    for name in ("corridor/ledger.py", "state.py", "http/server.py"):
        original = (package / name).read_text()
        edit(package / name)
        assert compiled.check(package, build, environ={}) == (
            False, f"plain Python ({name} changed since the build: run scripts/compile.py again)")
        (package / name).write_text(original)
        assert compiled.check(package, build, environ={})[0]
    (package / "state.py").unlink()
    assert "state.py changed" in compiled.check(package, build, environ={})[1]


def test_edits_beyond_the_request_path_keep_the_build(tmp_path):
    package = copy_package(tmp_path)
    build = fake_build(tmp_path, package)
    for name in ("observability/records.py", "backend/lifecycle.py", "worker.py", "config/settings.py",
                 "http/__init__.py"):
        edit(package / name)
    (package / "new.py").write_text("# new\n")
    assert compiled.check(package, build, environ={})[0]


def test_a_module_added_to_a_compiled_package_is_compiled_too(tmp_path):
    package = copy_package(tmp_path)
    build = fake_build(tmp_path, package)
    (package / "corridor" / "new.py").write_text("# new\n")
    assert "corridor.new" in compiled.hot_modules(package)
    use, why = compiled.check(package, build, environ={})
    assert not use and "other modules" in why


def test_imports_are_followed_relative_absolute_in_functions_and_for_type_checking(tmp_path):
    package = tmp_path / "vespa"
    for name in ("__init__.py", "hot/__init__.py", "hot/sibling.py", "near.py", "deep.py",
                 "typed.py", "lazy.py", "pkg/__init__.py", "pkg/mod.py", "named/__init__.py",
                 "unused.py"):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(f"# {name}\n")
    (package / "near.py").write_text("from .deep import thing\n")
    (package / "hot" / "main.py").write_text(
        "import os\nfrom typing import TYPE_CHECKING\nfrom json import loads\n"
        "from . import sibling\nfrom ..near import thing\nfrom .. import pkg\n"
        "from ..named import value\nfrom vespa.pkg import mod\nfrom .... import beyond\n"
        "if TYPE_CHECKING:\n    from ..typed import Typed\n"
        "def later():\n    import vespa.lazy\n")
    main = package / "hot" / "main.py"
    assert compiled.imported_modules(package, main, main.read_text()) == {
        "hot.sibling", "near", "pkg", "named", "pkg.mod", "typed", "lazy"}
    assert set(compiled.source_digest(package, ["hot.main"])) == {
        "hot/main.py", "hot/sibling.py", "near.py", "deep.py", "pkg/__init__.py",
        "named/__init__.py", "pkg/mod.py", "typed.py", "lazy.py"}


def test_an_incomplete_build_or_one_of_other_modules_is_not_used(tmp_path):
    package = copy_package(tmp_path)
    build = fake_build(tmp_path, package)
    assert compiled.check(package, build, environ={})[0]
    (build / "vespa" / "http" / f"server{EXT_SUFFIX}").unlink()
    use, why = compiled.check(package, build, environ={})
    assert not use and "incomplete" in why and f"vespa/http/server{EXT_SUFFIX}" in why
    other = fake_build(tmp_path / "other", package, compiled=["http.server"])
    use, why = compiled.check(package, other, environ={})
    assert not use and "other modules" in why


def test_a_build_for_another_python_is_not_used(tmp_path):
    package = copy_package(tmp_path)
    build = fake_build(tmp_path, package, ext_suffix=".cpython-399-x86_64-linux-gnu.so")
    use, why = compiled.check(package, build, environ={})
    assert not use and "another Python" in why


def test_no_build_or_a_broken_stamp_means_plain_python(tmp_path):
    package = copy_package(tmp_path)
    use, why = compiled.check(package, tmp_path / "nowhere", environ={})
    assert not use and "not compiled" in why
    build = fake_build(tmp_path, package)
    (build / compiled.STAMP).write_text("{not json")
    use, why = compiled.check(package, build, environ={})
    assert not use and "unreadable" in why
    (build / compiled.STAMP).write_text("[]")  # JSON, but no stamp
    assert not compiled.check(package, build, environ={})[0]
    stamp = compiled.stamp_for(package)
    for sources in ({}, None, {"state.py": stamp["sources"]["state.py"]}):
        (build / compiled.STAMP).write_text(json.dumps({**stamp, "sources": sources}))
        use, why = compiled.check(package, build, environ={})
        assert not use and "misses its sources" in why


def test_vespa_pure_python_turns_a_good_build_off(tmp_path):
    package = copy_package(tmp_path)
    build = fake_build(tmp_path, package)
    use, why = compiled.check(package, build, environ={"VESPA_PURE_PYTHON": "1"})
    assert not use and "VESPA_PURE_PYTHON" in why
    assert compiled.check(package, build, environ={"VESPA_PURE_PYTHON": "0"})[0]


def test_activate_puts_the_build_ahead_of_the_source_for_the_package_and_its_subpackages(
        tmp_path, monkeypatch):
    package = copy_package(tmp_path)
    build = fake_build(tmp_path, package)
    monkeypatch.delenv("VESPA_PURE_PYTHON", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored after the test
    monkeypatch.setattr(compiled, "_active_build", compiled._active_build)  # and this
    package_path = [str(package)]
    assert compiled.activate(package_path, build)[0]
    assert package_path == [str(build / "vespa"), str(package)]
    assert str(build) in sys.path  # where the shared library of the compiled code lives
    http_path = [str(package / "http")]
    compiled.build_first("vespa.http", http_path)  # what vespa/http/__init__.py does
    assert http_path == [str(build / "vespa" / "http"), str(package / "http")]
    edit(package / "corridor" / "gate.py")
    stale_path, stale_http_path = [str(package)], [str(package / "http")]
    assert not compiled.activate(stale_path, build)[0]
    compiled.build_first("vespa.http", stale_http_path)
    assert stale_path == [str(package)] and stale_http_path == [str(package / "http")]


def test_every_package_holding_compiled_modules_puts_the_build_first():
    """Without the call in its __init__.py, a subpackage's modules would load as plain Python
    beside the compiled others."""
    packages = {name.rpartition(".")[0] for name in compiled.hot_modules(PACKAGE)}
    assert packages == {"http", "corridor", "observability"}
    for package in packages:
        calls = [ast.unparse(node) for node in ast.walk(ast.parse(
                 (PACKAGE / package / "__init__.py").read_text())) if isinstance(node, ast.Call)]
        assert "_build_first(__name__, __path__)" in calls, package


def imported(env: dict[str, str], cwd: Path = REPO) -> tuple[bool, str, dict[str, str]]:
    """(COMPILED, HOT_PATH, each compiled module's file) in a fresh interpreter."""
    script = ("import importlib, json, pathlib, vespa\n"
              "from vespa import compiled\n"
              "source = pathlib.Path(vespa.__path__[-1])  # after the build's, when in use\n"
              "files = {name: importlib.import_module('vespa.' + name).__file__\n"
              "         for name in compiled.hot_modules(source)}\n"
              "print(json.dumps([vespa.COMPILED, vespa.HOT_PATH, files]))")
    out = subprocess.run([PYTHON, "-c", script], env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    use, why, files = json.loads(out)
    return use, why, files


def test_the_worker_runs_what_its_verdict_says():
    use, why, files = imported(worker_env())
    assert {name: file.endswith(EXT_SUFFIX) for name, file in files.items()} == {
        name: use for name in compiled.hot_modules(PACKAGE)}, why
    if (os.environ.get("CI") == "true" and os.environ.get("VESPA_COMPILE", "1") != "0"
            and not compiled.switched_off()):
        assert use, why  # the project's set-up compiles (unless told not to): CI checks it did
    use, why, files = imported(worker_env(VESPA_PURE_PYTHON="1"))
    assert not use and "VESPA_PURE_PYTHON" in why
    assert files == {name: str(PACKAGE.joinpath(*name.split("."))) + ".py"
                     for name in compiled.hot_modules(PACKAGE)}


def test_an_edited_checkout_never_runs_the_stale_build(tmp_path):
    """A copy of the package with a module the corridor imports edited, against this
    interpreter's build."""
    package = copy_package(tmp_path)
    edit(package / "state.py")
    env = worker_env()
    env.pop("VESPA_PURE_PYTHON", None)
    env["PYTHONPATH"] = str(tmp_path)
    use, why, files = imported(env, cwd=tmp_path)
    assert not use and files["http.server"] == str(package / "http" / "server.py")
    if compiled.check(PACKAGE, compiled.build_dir(), environ={})[0]:
        assert "state.py changed since the build" in why  # the build of the checkout


def test_status_and_the_package_name_the_request_path_that_runs():
    assert vespa.HOT_PATH.startswith("compiled" if vespa.COMPILED else "plain Python")
    from vespa.observability import status
    assert status.HOT_PATH == vespa.HOT_PATH


def except_names_of_two_types(source: str) -> list[str]:
    """``except A as e`` and ``except B as e`` in one function: mypyc types ``e`` once and then
    refuses the second kind at run time (a TypeError in an error path), which mypy accepts."""
    found = []
    for function in ast.walk(ast.parse(source)):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        kinds: dict[str, set[str]] = {}
        todo = list(ast.iter_child_nodes(function))
        while todo:
            node = todo.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda,
                                 ast.ClassDef)):
                continue  # its own scope
            if isinstance(node, ast.ExceptHandler) and node.name:
                kinds.setdefault(node.name, set()).add(ast.unparse(node.type)
                                                       if node.type else "BaseException")
            todo.extend(ast.iter_child_nodes(node))
        found += [f"{function.name}(): {name} is {sorted(types)}"
                  for name, types in kinds.items() if len(types) > 1]
    return found


def test_the_checker_finds_an_except_name_of_two_types():
    source = ("async def f():\n    try:\n        pass\n    except KeyError as exc:\n"
              "        pass\n    except OSError as exc:\n        pass\n")
    assert except_names_of_two_types(source) == ["f(): exc is ['KeyError', 'OSError']"]


def hot_sources() -> dict[str, str]:
    """Each compiled module's source, by name."""
    return {name: compiled.module_file(PACKAGE, name).read_text()
            for name in compiled.hot_modules(PACKAGE)}


def test_the_hot_modules_name_each_caught_exception_for_its_kind():
    problems = {name: except_names_of_two_types(source) for name, source in hot_sources().items()}
    assert {name: found for name, found in problems.items() if found} == {}


def test_the_hot_modules_have_no_async_generators():
    """mypyc compiles none (``async def`` with ``yield``)."""
    found = []
    for name, source in hot_sources().items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.AsyncFunctionDef) and any(
                    isinstance(inner, (ast.Yield, ast.YieldFrom)) for inner in ast.walk(node)):
                found.append(f"{name}.{node.name}")
    assert found == []


def test_the_hot_modules_keep_builtin_exception_subclasses_python_classes():
    """mypyc makes a native class of Exception's subclasses only; one of another built-in
    exception (ValueError, ConnectionError, ...) stays a Python class, said so."""
    keep = "mypyc_attr(native_class=False)"
    found = []
    for name, source in hot_sources().items():
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.ClassDef):
                continue
            bases = [getattr(builtins, base.id, None) for base in node.bases
                     if isinstance(base, ast.Name)]
            if any(isinstance(base, type) and issubclass(base, BaseException)
                   and base not in (BaseException, Exception) for base in bases) and (
                    keep not in [ast.unparse(decorator) for decorator in node.decorator_list]):
                found.append(f"{name}.{node.name}")
    assert found == []
