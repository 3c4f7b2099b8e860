"""The compiled hot path (vespa/compiled.py, scripts/compile.py): the build is used only when it
was made from exactly this source by this interpreter, can be turned off, and the source keeps
what mypyc needs of it."""

from __future__ import annotations

import ast
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


def fake_package(root: Path) -> Path:
    """A package directory holding the hot modules' sources and one more module (contents are
    what counts)."""
    package = root / "vespa"
    package.mkdir()
    for name in (*compiled.HOT_MODULES, "config"):
        (package / f"{name}.py").write_text(f"# {name}\n")
    return package


def fake_build(root: Path, package: Path, **changes) -> Path:
    """A whole build of ``package`` (its extension files are empty: only their presence counts
    until they are imported)."""
    build = root / "build"
    (build / "vespa").mkdir(parents=True)
    stamp = {**compiled.stamp_for(package), **changes}
    (build / compiled.STAMP).write_text(json.dumps(stamp))
    for path in compiled.built_files(build, stamp["ext_suffix"]):
        path.touch()
    return build


def test_a_build_of_exactly_this_source_is_used(tmp_path):
    package = fake_package(tmp_path)
    build = fake_build(tmp_path, package)
    use, why = compiled.check(package, build, environ={})
    assert use and why == f"compiled (mypyc, {len(compiled.HOT_MODULES)} modules)"


def test_an_edited_module_turns_the_whole_build_off_and_is_named(tmp_path):
    package = fake_package(tmp_path)
    build = fake_build(tmp_path, package)
    (package / "proxy.py").write_text("# proxy, edited\n")
    use, why = compiled.check(package, build, environ={})
    assert not use
    assert "proxy.py changed since the build" in why and "scripts/compile.py" in why


def test_an_edited_added_or_removed_module_beyond_the_hot_ones_also_counts(tmp_path):
    """The compiled modules were built against the types of the rest of the package."""
    package = fake_package(tmp_path)
    build = fake_build(tmp_path, package)
    (package / "config.py").write_text("# config, edited\n")
    assert compiled.check(package, build, environ={}) == (False, "plain Python (config.py "
                                                          "changed since the build: run "
                                                          "scripts/compile.py again)")
    (package / "config.py").write_text("# config\n")
    (package / "new.py").write_text("# new\n")
    assert "new.py changed" in compiled.check(package, build, environ={})[1]
    (package / "new.py").unlink()
    (package / "config.py").unlink()
    assert "config.py changed" in compiled.check(package, build, environ={})[1]


def test_an_incomplete_build_or_one_of_other_modules_is_not_used(tmp_path):
    package = fake_package(tmp_path)
    build = fake_build(tmp_path, package)
    assert compiled.check(package, build, environ={})[0]
    ext_suffix = compiled.stamp_for(package)["ext_suffix"]
    (build / "vespa" / f"proxy{ext_suffix}").unlink()
    use, why = compiled.check(package, build, environ={})
    assert not use and "incomplete" in why and f"proxy{ext_suffix}" in why
    other = fake_build(tmp_path / "other", package, compiled=["front"])
    use, why = compiled.check(package, other, environ={})
    assert not use and "other modules" in why


def test_a_build_for_another_python_is_not_used(tmp_path):
    package = fake_package(tmp_path)
    build = fake_build(tmp_path, package, ext_suffix=".cpython-399-x86_64-linux-gnu.so")
    use, why = compiled.check(package, build, environ={})
    assert not use and "another Python" in why


def test_no_build_or_a_broken_stamp_means_plain_python(tmp_path):
    package = fake_package(tmp_path)
    use, why = compiled.check(package, tmp_path / "nowhere", environ={})
    assert not use and "not compiled" in why
    build = fake_build(tmp_path, package)
    (build / compiled.STAMP).write_text("{not json")
    use, why = compiled.check(package, build, environ={})
    assert not use and "unreadable" in why
    (build / compiled.STAMP).write_text("[]")  # JSON, but no stamp
    assert not compiled.check(package, build, environ={})[0]


def test_vespa_pure_python_turns_a_good_build_off(tmp_path):
    package = fake_package(tmp_path)
    build = fake_build(tmp_path, package)
    use, why = compiled.check(package, build, environ={"VESPA_PURE_PYTHON": "1"})
    assert not use and "VESPA_PURE_PYTHON" in why
    assert compiled.check(package, build, environ={"VESPA_PURE_PYTHON": "0"})[0]


def test_activate_puts_the_build_ahead_of_the_source(tmp_path, monkeypatch):
    package = fake_package(tmp_path)
    build = fake_build(tmp_path, package)
    monkeypatch.delenv("VESPA_PURE_PYTHON", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))  # restored after the test
    package_path = [str(package)]
    assert compiled.activate(package_path, build)[0]
    assert package_path == [str(build / "vespa"), str(package)]
    assert str(build) in sys.path  # where the shared library of the compiled code lives
    (package / "gate.py").write_text("# gate, edited\n")
    stale_path = [str(package)]
    assert not compiled.activate(stale_path, build)[0]
    assert stale_path == [str(package)]


def imported(env: dict[str, str], cwd: Path = REPO) -> tuple[bool, str, str]:
    """(COMPILED, HOT_PATH, vespa.http.server's file) in a fresh interpreter."""
    out = subprocess.run(
        [PYTHON, "-c", "import vespa, vespa.http.server; "
                       "print(vespa.COMPILED); print(vespa.HOT_PATH); print(vespa.http.server.__file__)"],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=60, check=True).stdout
    flag, why, front = out.strip().split("\n")
    return flag == "True", why, front


def test_the_worker_runs_what_its_verdict_says():
    use, why, front = imported(worker_env())
    assert use == front.endswith(sysconfig.get_config_var("EXT_SUFFIX")), (why, front)
    if os.environ.get("CI") == "true" and os.environ.get("VESPA_COMPILE", "1") != "0":
        assert use, why  # the project's set-up compiles (unless told not to): CI checks it did
    use, why, front = imported(worker_env(VESPA_PURE_PYTHON="1"))
    assert not use and front == str(PACKAGE / "front.py") and "VESPA_PURE_PYTHON" in why


def test_an_edited_checkout_never_runs_the_stale_build(tmp_path):
    """A copy of the package with one hot module edited, against this interpreter's build."""
    shutil.copytree(PACKAGE, tmp_path / "vespa", ignore=shutil.ignore_patterns("__pycache__"))
    front = tmp_path / "vespa" / "front.py"
    front.write_text(front.read_text() + "\n# edited after the build\n")
    env = worker_env()
    env["PYTHONPATH"] = str(tmp_path)
    use, why, loaded = imported(env, cwd=tmp_path)
    assert not use and loaded == str(front)
    built = compiled.build_dir().joinpath(compiled.STAMP).exists()
    assert ("front.py changed since the build" in why) if built else ("not compiled" in why)


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


def test_the_hot_modules_name_each_caught_exception_for_its_kind():
    problems = {name: except_names_of_two_types((PACKAGE / f"{name}.py").read_text())
                for name in compiled.HOT_MODULES}
    assert {name: found for name, found in problems.items() if found} == {}


def test_the_hot_modules_have_no_async_generators():
    """mypyc compiles none (``async def`` with ``yield``)."""
    found = []
    for name in compiled.HOT_MODULES:
        for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
            if isinstance(node, ast.AsyncFunctionDef) and any(
                    isinstance(inner, (ast.Yield, ast.YieldFrom)) for inner in ast.walk(node)):
                found.append(f"{name}.{node.name}")
    assert found == []
