"""Unit tests of the vLLM launch command (backends/vllm.py) for CPU and CUDA machines."""

from __future__ import annotations

import pytest

from backends import vllm
from backends.vllm import build_command

PY = "/venv/bin/python"


def cmd(gpu: bool = False, port: int = 8001, **env: str) -> vllm.LaunchSpec:
    return build_command(env, port=port, python=PY, gpu=gpu)


def flag(argv: list[str], name: str) -> str | None:
    """Value after `name` in argv, asserting the flag appears exactly once."""
    assert argv.count(name) == 1, f"{name} appears {argv.count(name)} times in {argv}"
    return argv[argv.index(name) + 1]


def test_cpu_defaults_serve_the_converted_smollm2():
    spec = cmd(VESPA_CACHE_DIR="/data/cache")
    assert spec.argv[:3] == [PY, "-m", "vllm.entrypoints.openai.api_server"]
    assert flag(spec.argv, "--model") == "/data/cache/models/SmolLM2-135M-Instruct"
    assert flag(spec.argv, "--served-model-name") == "SmolLM2-135M-Instruct"
    assert flag(spec.argv, "--host") == "127.0.0.1"
    assert flag(spec.argv, "--port") == "8001"
    assert flag(spec.argv, "--dtype") == "float32"
    assert flag(spec.argv, "--max-model-len") == "2048"
    assert spec.argv.count("--enforce-eager") == 1
    assert spec.env == {"VLLM_NO_USAGE_STATS": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
                        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    assert spec.model == "/data/cache/models/SmolLM2-135M-Instruct"
    assert spec.served_model_name == "SmolLM2-135M-Instruct"
    assert spec.port == 8001
    assert spec.health_path == "/health"


@pytest.mark.parametrize("gpu", [False, True])
def test_vllm_gets_time_to_stop_its_engine_and_the_supervisor_waits_for_it(gpu):
    spec = cmd(gpu=gpu)
    assert flag(spec.argv, "--shutdown-timeout") == str(vllm.SHUTDOWN_TIMEOUT) == "15"
    assert spec.stop_grace == vllm.SHUTDOWN_TIMEOUT + vllm.STOP_MARGIN
    longer = cmd(gpu=gpu, VLLM_ARGS="--shutdown-timeout=120")
    assert "--shutdown-timeout" not in longer.argv and "--shutdown-timeout=120" in longer.argv
    assert longer.stop_grace == 120 + vllm.STOP_MARGIN
    assert cmd(gpu=gpu, VLLM_ARGS="--shutdown_timeout 0").stop_grace == vllm.STOP_MARGIN
    # vLLM's argparse keeps the last of a repeated flag: so does the grace
    twice = cmd(gpu=gpu, VLLM_ARGS="--shutdown-timeout 10 --enforce-eager --shutdown-timeout 120")
    assert twice.stop_grace == 120 + vllm.STOP_MARGIN


def test_default_cache_dir_is_repo_dot_cache():
    assert cmd().model == str(vllm.REPO_ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct")
    assert cmd(VESPA_CACHE_DIR="rel").model == str(vllm.REPO_ROOT / "rel" / "models" / "SmolLM2-135M-Instruct")


def test_cuda_defaults_add_no_cpu_flags():
    spec = cmd(gpu=True, MODEL_NAME="Qwen/Qwen2.5-7B-Instruct")
    assert spec.argv == [PY, "-m", "vllm.entrypoints.openai.api_server",
                         "--model", "Qwen/Qwen2.5-7B-Instruct",
                         "--served-model-name", "Qwen/Qwen2.5-7B-Instruct",
                         "--host", "127.0.0.1", "--port", "8001", "--shutdown-timeout", "15"]
    assert spec.env == {"VLLM_NO_USAGE_STATS": "1"}  # hub model: no offline flags, no CPU KV cache


def test_cuda_without_a_model_also_serves_smollm2_offline():
    spec = cmd(gpu=True)
    assert spec.served_model_name == "SmolLM2-135M-Instruct"
    assert "--dtype" not in spec.argv and "--enforce-eager" not in spec.argv
    assert spec.env["HF_HUB_OFFLINE"] == "1" and "VLLM_CPU_KVCACHE_SPACE" not in spec.env


@pytest.mark.parametrize("gpu", [False, True])
def test_every_env_knob_becomes_its_flag(gpu):
    spec = cmd(gpu=gpu, VLLM_MODEL="org/model", VLLM_MAX_MODEL_LEN="4096",
               VLLM_GPU_MEMORY_UTILIZATION="0.85", VLLM_TENSOR_PARALLEL_SIZE="2",
               VLLM_QUANTIZATION="awq", VLLM_SERVED_MODEL_NAME="my-llm")
    assert flag(spec.argv, "--model") == "org/model"
    assert flag(spec.argv, "--max-model-len") == "4096"
    assert flag(spec.argv, "--gpu-memory-utilization") == "0.85"
    assert flag(spec.argv, "--tensor-parallel-size") == "2"
    assert flag(spec.argv, "--quantization") == "awq"
    assert flag(spec.argv, "--served-model-name") == "my-llm"
    assert spec.served_model_name == "my-llm"


def test_local_model_path_is_served_under_its_folder_name_offline():
    spec = cmd(gpu=True, MODEL_NAME="/models/llama-3-8b/")
    assert spec.served_model_name == "llama-3-8b"
    assert spec.env["HF_HUB_OFFLINE"] == "1"


def test_blank_settings_count_as_unset():
    assert cmd(MODEL_NAME=" ", VLLM_MAX_MODEL_LEN="", VLLM_ARGS="").argv == cmd().argv


def test_user_settings_of_the_environment_win():
    spec = cmd(VLLM_CPU_KVCACHE_SPACE="4", HF_HUB_OFFLINE="0", VLLM_NO_USAGE_STATS="0")
    assert spec.env == {"TRANSFORMERS_OFFLINE": "1"}


def test_vllm_args_are_appended_and_override_defaults_without_duplicates():
    spec = cmd(VLLM_ARGS="--dtype bfloat16 --max_model_len=512 --no-enforce-eager --host 0.0.0.0 "
                         "--chat-template '/x y/t.jinja' --seed -1")
    argv = spec.argv
    assert argv.count("--dtype") == 1 and flag(argv, "--dtype") == "bfloat16"
    assert "--max-model-len" not in argv and "--max_model_len=512" in argv
    assert "--enforce-eager" not in argv and "--no-enforce-eager" in argv
    assert flag(argv, "--host") == "0.0.0.0"
    assert flag(argv, "--chat-template") == "/x y/t.jinja"
    assert argv[-2:] == ["--seed", "-1"]


def test_short_aliases_in_vllm_args_count_as_the_flag():
    argv = cmd(gpu=True, VLLM_ARGS="-tp 4 -q fp8").argv
    assert "--tensor-parallel-size" not in argv and "--quantization" not in argv
    assert argv[-4:] == ["-tp", "4", "-q", "fp8"]


def test_model_and_served_name_from_vllm_args():
    spec = cmd(gpu=True, VLLM_ARGS="--model=org/m --served-model-name alias other")
    assert spec.model == "org/m" and spec.served_model_name == "alias"
    assert spec.argv.count("--model=org/m") == 1 and "--model" not in spec.argv
    assert spec.argv.count("--served-model-name") == 1


@pytest.mark.parametrize("env, message", [
    ({"VLLM_MAX_MODEL_LEN": "abc"}, "VLLM_MAX_MODEL_LEN must be a positive integer"),
    ({"VLLM_MAX_MODEL_LEN": "0"}, "VLLM_MAX_MODEL_LEN must be a positive integer"),
    ({"VLLM_MAX_MODEL_LEN": "-5"}, "VLLM_MAX_MODEL_LEN must be a positive integer"),
    ({"VLLM_TENSOR_PARALLEL_SIZE": "1.5"}, "VLLM_TENSOR_PARALLEL_SIZE must be a positive integer"),
    ({"VLLM_GPU_MEMORY_UTILIZATION": "90%"}, r"VLLM_GPU_MEMORY_UTILIZATION must be a number in \(0, 1\]"),
    ({"VLLM_GPU_MEMORY_UTILIZATION": "1.2"}, "VLLM_GPU_MEMORY_UTILIZATION must be a number"),
    ({"VLLM_GPU_MEMORY_UTILIZATION": "0"}, "VLLM_GPU_MEMORY_UTILIZATION must be a number"),
    ({"VLLM_GPU_MEMORY_UTILIZATION": "nan"}, "VLLM_GPU_MEMORY_UTILIZATION must be a number"),
    ({"VLLM_QUANTIZATION": "awq --evil"}, "VLLM_QUANTIZATION must be one word"),
    ({"VLLM_SERVED_MODEL_NAME": "two words"}, "VLLM_SERVED_MODEL_NAME must not contain spaces"),
    ({"VLLM_ARGS": "--chat-template 'unclosed"}, "VLLM_ARGS is not valid shell words"),
    ({"VLLM_ARGS": "--port 9000"}, "VLLM_ARGS must not set --port"),
    ({"VLLM_ARGS": "--port=9000"}, "VLLM_ARGS must not set --port"),
    ({"VLLM_ARGS": "--api-key k"}, "VLLM_ARGS must not set --api-key: set VESPA_BACKEND_API_KEY"),
    ({"VLLM_ARGS": "--api_key=k"}, "VLLM_ARGS must not set --api-key"),
    ({"VLLM_ARGS": "--hf-token hf_secret"}, "VLLM_ARGS must not give --hf-token a value: set HF_TOKEN"),
    ({"VLLM_ARGS": "--hf_token=hf_secret"}, "VLLM_ARGS must not give --hf-token a value"),
    ({"VLLM_ARGS": "--model"}, "--model in VLLM_ARGS has no value"),
    ({"VLLM_ARGS": "--model --dtype half"}, "--model in VLLM_ARGS has no value"),
    ({"MODEL_NAME": "a/b", "VLLM_MODEL": "c/d"}, "MODEL_NAME and VLLM_MODEL are both set and differ"),
    ({"MODEL_NAME": "a/b", "VLLM_ARGS": "--model c/d"}, "model is set twice: in MODEL_NAME"),
    ({"VLLM_MAX_MODEL_LEN": "4096", "VLLM_ARGS": "--max-model-len 1024"},
     "VLLM_MAX_MODEL_LEN and --max-model-len in VLLM_ARGS are both set"),
    ({"VLLM_TENSOR_PARALLEL_SIZE": "2", "VLLM_ARGS": "-tp 4"}, "VLLM_TENSOR_PARALLEL_SIZE and --tensor-parallel-size"),
    ({"VLLM_SERVED_MODEL_NAME": "x", "VLLM_ARGS": "--served-model-name y"}, "VLLM_SERVED_MODEL_NAME and --served-model-name"),
    ({"VLLM_ARGS": "--shutdown-timeout soon"}, "--shutdown-timeout in VLLM_ARGS must be whole seconds"),
    ({"VLLM_ARGS": "--shutdown-timeout -1"}, "--shutdown-timeout in VLLM_ARGS must be whole seconds"),
])
def test_bad_settings_raise_a_value_error_naming_the_setting(env, message):
    with pytest.raises(ValueError, match=message):
        cmd(**env)


def test_a_bare_hf_token_flag_is_kept():
    """``--hf-token`` without a value makes vLLM use the token stored on disk: no secret on the
    command line, so it is passed on."""
    spec = cmd(VLLM_ARGS="--hf-token --max-num-seqs 4")
    assert spec.argv[-3:] == ["--hf-token", "--max-num-seqs", "4"]


def test_the_backend_key_reaches_vllm_in_its_environment_not_its_command_line():
    """vLLM reads VLLM_API_KEY as it reads --api-key; a command line is readable by every
    process on the machine and vLLM logs its non-default arguments."""
    spec = build_command({"VLLM_API_KEY": "old"}, port=8001, python=PY, gpu=False,
                         api_key="bk-secret")
    assert spec.env["VLLM_API_KEY"] == "bk-secret"  # over one the worker's env would pass on
    assert not any("bk-secret" in arg or arg == "--api-key" for arg in spec.argv)
    assert "VLLM_API_KEY" not in cmd().env


def test_same_model_in_both_variables_is_fine():
    assert cmd(MODEL_NAME="a/b", VLLM_MODEL="a/b").model == "a/b"


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_bad_port_is_rejected(port):
    with pytest.raises(ValueError, match="port"):
        cmd(port=port)


def test_venv_python_path():
    assert vllm.venv_python({}) == str(vllm.REPO_ROOT / ".venvs" / "vllm" / "bin" / "python")
    assert vllm.venv_python({"VESPA_VLLM_VENV": "/opt/v"}) == "/opt/v/bin/python"


def test_setup_problem_names_what_is_missing(tmp_path):
    spec = build_command({"VESPA_CACHE_DIR": str(tmp_path)}, port=8001, python=str(tmp_path / "nope"), gpu=False)
    assert "run backends/setup_vllm.sh" in vllm.setup_problem(spec)
    python = tmp_path / "python"
    python.touch()
    spec = build_command({"VESPA_CACHE_DIR": str(tmp_path)}, port=8001, python=str(python), gpu=False)
    assert "has no config.json" in vllm.setup_problem(spec)
    model = tmp_path / "models" / "SmolLM2-135M-Instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    assert vllm.setup_problem(spec) is None
    hub = build_command({"MODEL_NAME": "org/m"}, port=8001, python=str(python), gpu=True)
    assert vllm.setup_problem(hub) is None


def test_detect_gpu_reads_nvidia_smi(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    monkeypatch.setenv("PATH", str(tmp_path))
    assert vllm.detect_gpu() is False  # not installed
    fake.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A100 (UUID: GPU-x)'\n")
    fake.chmod(0o755)
    assert vllm.detect_gpu() is True
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert vllm.detect_gpu() is False
