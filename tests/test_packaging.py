"""What ``pip install`` puts in site-packages (the ``vespa`` package only), and how a worker run
from the checkout still finds the checkout's ``benchmarks/`` and ``backends/``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vespa.config import REPO_ROOT
from vespa.main import checkout_on_path

from .conftest import REPO


def test_only_the_vespa_package_is_installed():
    """pyproject's package discovery, run the way setuptools runs it for the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    setuptools = pytest.importorskip("setuptools")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    find = pyproject["tool"]["setuptools"]["packages"]["find"]
    discover = setuptools.find_namespace_packages if find.get("namespaces", True) \
        else setuptools.find_packages
    packages = set()
    for where in find.get("where", ["."]):
        packages.update(discover(str(REPO / where), include=find.get("include", ["*"]),
                                 exclude=find.get("exclude", [])))
    assert {name.split(".")[0] for name in packages} == {"vespa"}
    subpackages = {".".join(path.parent.relative_to(REPO).parts)
                   for path in (REPO / "vespa").rglob("__init__.py")}
    assert subpackages <= packages  # and nothing of the worker is left out


def test_a_worker_run_from_the_checkout_finds_its_benchmarks_from_any_directory(monkeypatch):
    """Nothing on sys.path is the checkout (the worker started elsewhere): main puts it last."""
    assert (REPO_ROOT / "benchmarks" / "openai_chat.py").is_file()
    elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != REPO_ROOT]
    monkeypatch.setattr(sys, "path", list(elsewhere))
    checkout_on_path()
    checkout_on_path()
    assert sys.path == [*elsewhere, str(REPO_ROOT)]
