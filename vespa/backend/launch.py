"""Which process to launch for ``VESPA_BACKEND``: vLLM or the TTS server (each from its own
venv), or any command given in ``VESPA_BACKEND_COMMAND``."""

from __future__ import annotations

import asyncio
import os

from ..config import REPO_ROOT, Settings
from .stop_noise import VLLM_SHUTDOWN_RACE
from .supervisor import ProcessSpec


async def backend_process(settings: Settings) -> tuple[ProcessSpec, str | None]:
    """The process to run and what is missing on disk before it can (None when nothing is)."""
    env = settings.backend_env
    if settings.backend == "vllm":
        from backends import vllm

        gpu = await asyncio.to_thread(vllm.detect_gpu)
        spec = vllm.build_command(env, port=settings.backend_port,
                                  python=vllm.venv_python(env), gpu=gpu,
                                  api_key=settings.backend_api_key)
        # SIGTERM to vLLM's API server alone: it stops its engine processes itself, in order.
        # Signalled at the same moment, they can be gone before the API server begins its own
        # shutdown, and it then reports the engine dead.
        return (ProcessSpec("vllm", spec.argv, spec.env, cwd=str(REPO_ROOT), stop_group=False,
                            stop_grace=spec.stop_grace, stop_noise=VLLM_SHUTDOWN_RACE),
                vllm.setup_problem(spec))
    if settings.backend == "tts":
        venv = env.get("VESPA_TTS_VENV") or str(REPO_ROOT / ".venvs" / "tts")
        python = os.path.join(venv, "bin", "python")
        argv = [python, "-m", "backends.tts", "--host", "127.0.0.1",
                "--port", str(settings.backend_port)]
        problem = None if os.path.exists(python) else (
            f"TTS venv python not found at {python}: run backends/setup_tts.sh")
        return ProcessSpec("tts", argv, {}, cwd=str(REPO_ROOT)), problem
    argv = [word.replace("{port}", str(settings.backend_port))
            for word in settings.backend_command]
    return ProcessSpec(os.path.basename(argv[0]), argv, {}), None
