"""Compile the worker's request path with mypyc, for the interpreter that runs this script.

    .venvs/worker/bin/python scripts/compile.py            # build (about a minute), if needed
    .venvs/worker/bin/python scripts/compile.py --check    # exit 0 when the build is current
    .venvs/worker/bin/python scripts/compile.py --remove   # back to plain Python
    .venvs/worker/bin/python scripts/compile.py --apt-packages  # what apt must add first

The request path (``vespa.compiled.hot_modules``: every module of vespa/http/ and
vespa/corridor/, and vespa/observability/metrics.py) is compiled into ``<env>/vespa-compiled``,
one extension module per module laid out like the package (``vespa/http/server.<EXT_SUFFIX>``)
and a shared library, with a stamp of the sources the build depends on (those modules and what
they import within the package); the package loads the build only while those sources match the
stamp (see vespa/compiled.py), so an edit never runs stale code. One build runs at a time in an
env, and an env holds one checkout's build: give each checkout its own env.
It needs mypy (``pip install -e .[compile]``, installed here when missing) and a C compiler with
the Python headers; without them it says what is missing, and the worker runs as plain Python.
``scripts/worker_env.sh`` runs it (and installs those first, as root with apt).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vespa import compiled  # noqa: E402  (vespa/compiled.py imports nothing of the package)

PACKAGE = ROOT / "vespa"


def missing_tools() -> dict[str, str]:
    """What the build lacks that this script cannot install: the Debian/Ubuntu package that
    brings it -> what is missing."""
    missing = {}
    compiler = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        missing["gcc"] = f"no C compiler ({compiler})"
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.exists():  # a Debian/Ubuntu system Python keeps them in python3.X-dev
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        missing[f"python{version}-dev"] = f"no Python headers ({header})"
    return missing


MYPY_SERIES = "2.4."  # as pinned by the compile extra in pyproject.toml


def ensure_mypy() -> None:
    try:
        installed = metadata.version("mypy")
    except metadata.PackageNotFoundError:
        installed = ""
    if not installed.startswith(MYPY_SERIES):
        print("compile: installing mypy (the compile extra)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e",
                        f"{ROOT}[compile]"], check=True)


SETUP = """
import sys
from setuptools import setup
from mypyc.build import mypycify
paths, group, out, tmp = sys.argv[1].split(","), sys.argv[2], sys.argv[3], sys.argv[4]
setup(name=group, ext_modules=mypycify(
          ["--ignore-missing-imports", "--follow-imports=silent", *paths],
          opt_level="3", group_name=group, target_dir=tmp + "/c"),
      script_args=["build_ext", "--build-lib", out, "--build-temp", tmp])
"""


class BuildFailed(Exception):
    """mypyc or the C compiler failed; the message is the end of their output."""


def build(target: Path) -> None:
    """Compile into a fresh directory, then swap it in whole."""
    stamp = compiled.stamp_for(PACKAGE)  # what is compiled is what was read here
    paths = [f"vespa/{'/'.join(name.split('.'))}.py" for name in stamp["compiled"]]
    with tempfile.TemporaryDirectory(prefix="vespa-compile-", dir=target.parent) as tmp:
        out = Path(tmp) / "out"
        done = subprocess.run([sys.executable, "-c", SETUP, ",".join(paths), compiled.GROUP,
                               str(out), str(Path(tmp) / "build")], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            raise BuildFailed("\n".join(done.stdout.splitlines()[-30:]))
        if compiled.stamp_for(PACKAGE) != stamp:
            raise SystemExit("compile: the source changed during the build; run it again")
        (out / compiled.STAMP).write_text(json.dumps(stamp, indent=1))
        if target.exists():
            target.rename(Path(tmp) / "old")  # deleted with the temporary directory
        out.rename(target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 0 when the build is current")
    parser.add_argument("--remove", action="store_true", help="delete the build")
    parser.add_argument("--apt-packages", action="store_true",
                        help="print the Debian/Ubuntu packages the build lacks")
    args = parser.parse_args()
    target = compiled.build_dir()
    if args.apt_packages:
        print(" ".join(missing_tools()))
        return 0
    if args.check:
        current, why = compiled.check(PACKAGE, target, environ={})
        print(f"compile: {why}", file=sys.stderr)
        return 0 if current else 1
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "vespa-compiled.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build (or removal) at a time in this env
        if args.remove:
            remove(target)
            print(f"compile: removed {target}", file=sys.stderr)
            return 0
        return compile_once(target)


def remove(target: Path) -> None:
    """Out of the way in one step, then deleted: never a half-deleted build in place."""
    if target.exists():
        doomed = target.with_name(f"{target.name}.removed-{os.getpid()}")
        target.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def compile_once(target: Path) -> int:
    current, why = compiled.check(PACKAGE, target, environ={})
    if current:  # perhaps built while this one waited for the lock
        print(f"compile: {why}", file=sys.stderr)
        return 0
    missing = missing_tools()
    if missing:
        print(f"compile: cannot compile the request path: {'; '.join(missing.values())} (on "
              f"Debian/Ubuntu: apt-get install -y {' '.join(missing)}). The worker runs as "
              "plain Python (slower, same behaviour).", file=sys.stderr)
        return 1
    ensure_mypy()
    print(f"compile: compiling {len(compiled.hot_modules(PACKAGE))} modules with mypyc into "
          f"{target} (about a minute)", file=sys.stderr)
    try:
        build(target)
    except BuildFailed as exc:
        print(f"{exc}\ncompile: the build failed (above); the worker runs as plain Python",
              file=sys.stderr)
        return 1
    print(f"compile: {compiled.check(PACKAGE, target, environ={})[1]}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
