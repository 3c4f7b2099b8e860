"""The startup benchmark: load ``module:function``, run it against the backend, cache the result.

The cache is a JSON file keyed by what was measured (benchmark, backend model and arguments, GPU
name), so a changed model measures again. A failed benchmark is an error, never a cached or
default number. Writing the cache may fail (disk full): the worker goes on with a warning.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import pkgutil
import shutil
import sys
from typing import Awaitable, Callable

import aiohttp

log = logging.getLogger("vespa.benchmark")
Benchmark = Callable[[str, aiohttp.ClientSession], Awaitable[float]]


class BenchmarkError(RuntimeError):
    """The benchmark could not run or gave no usable throughput."""


def load_benchmark(target: str) -> Benchmark:
    module_name, _, function_name = target.partition(":")
    try:
        function = pkgutil.resolve_name(f"{module_name}:{function_name}")
    except Exception as exc:
        # an AttributeError once the module is imported means the name is not in it; before
        # (the module is not in sys.modules), the module's own code failed
        if not (isinstance(exc, AttributeError) and module_name in sys.modules):
            raise BenchmarkError(f"cannot import benchmark module {module_name!r}: {exc}") \
                from None
        function = None
    if not callable(function):
        raise BenchmarkError(f"{module_name} has no function {function_name!r}")
    return function


async def gpu_name() -> str:
    """The first GPU's name from nvidia-smi, or "cpu" when there is none."""
    if shutil.which("nvidia-smi") is None:
        return "cpu"
    try:
        proc = await asyncio.create_subprocess_exec(
            "nvidia-smi", "--query-gpu=name", "--format=csv,noheader",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
    except (OSError, asyncio.TimeoutError):
        return "cpu"
    names = out.decode(errors="replace").strip().splitlines()
    return names[0].strip() if names else "cpu"


def cache_key(target: str, identity: dict, gpu: str) -> str:
    material = json.dumps({"benchmark": target, "backend": identity, "gpu": gpu},
                          sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:32]


def _read(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2, sort_keys=True)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


class BenchmarkCache:
    def __init__(self, path: str):
        self.path = path

    def exists(self) -> bool:
        return os.path.isfile(self.path)

    async def get(self, key: str) -> float | None:
        entry = (await asyncio.to_thread(_read, self.path)).get(key)
        if isinstance(entry, dict) and isinstance(entry.get("throughput"), (int, float)) \
                and entry["throughput"] > 0:
            return float(entry["throughput"])
        return None

    async def put(self, key: str, throughput: float, description: dict) -> None:
        def update() -> None:
            data = _read(self.path)
            data[key] = {"throughput": throughput, **description}
            _write(self.path, data)
        try:
            await asyncio.to_thread(update)
        except OSError as exc:
            log.warning("could not write the benchmark cache %s (%s): it will measure again "
                        "on the next start", self.path, exc)


async def run_benchmark(target: str, backend_url: str, timeout: float,
                        api_key: str | None = None) -> float:
    """Run the benchmark once; its throughput in workload units per second. With ``api_key``
    (the backend's own, VESPA_BACKEND_API_KEY) every request of the session carries it."""
    function = load_benchmark(target)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        async with aiohttp.ClientSession(base_url=backend_url.rstrip("/") + "/",
                                         headers=headers) as session:
            throughput = await asyncio.wait_for(function(backend_url, session), timeout)
    except asyncio.TimeoutError:
        raise BenchmarkError(f"benchmark {target} took longer than {timeout:g}s "
                             "(VESPA_BENCHMARK_TIMEOUT)") from None
    except BenchmarkError:
        raise
    except Exception as exc:
        raise BenchmarkError(f"benchmark {target} failed: {exc!r}") from None
    if not isinstance(throughput, (int, float)) or isinstance(throughput, bool) \
            or not math.isfinite(throughput) or throughput <= 0:
        raise BenchmarkError(f"benchmark {target} returned {throughput!r}, "
                             "not a positive throughput")
    return float(throughput)
