# Sourced by the project's scripts: create (once) and use the worker's virtual env.
# The worker is light (aiohttp, httptools, pycryptodome, python-dotenv, uvloop); its env
# never holds torch, vLLM or TTS engines (each backend gets its own env under .venvs/).
# VESPA_WORKER_EXTRAS=test also installs the test tools; VESPA_WORKER_PYTHON picks the interpreter
# (default python3) and VESPA_VENV the env's directory. Returns non-zero on failure (set -e or
# not), so callers can report it. Then it compiles the request path with mypyc (once, and again
# after those modules change; VESPA_COMPILE=0 skips it): see scripts/compile.py.
VESPA_VENV="${VESPA_VENV:-$PWD/.venvs/worker}"
_extras="${VESPA_WORKER_EXTRAS:-}"
_spec="."
[[ -n "$_extras" ]] && _spec=".[$_extras]"
if [[ ! -x "$VESPA_VENV/bin/python" ]]; then
  echo "setting up the worker env in $VESPA_VENV" >&2
  "${VESPA_WORKER_PYTHON:-python3}" -m venv "$VESPA_VENV" || return 1
fi
_stamp="$VESPA_VENV/.installed-$( (cat pyproject.toml; echo "$_extras") | sha256sum | cut -c1-16)"
if [[ ! -f "$_stamp" ]]; then
  "$VESPA_VENV/bin/python" -m pip install --quiet --upgrade pip >&2 \
    && "$VESPA_VENV/bin/python" -m pip install --quiet -e "$_spec" >&2 \
    && rm -f "$VESPA_VENV"/.installed-* && touch "$_stamp" || return 1
fi
export VESPA_PYTHON="$VESPA_VENV/bin/python"
# The compiled request path: without a C compiler (installed here as root on Debian/Ubuntu) the
# worker runs as plain Python, same behaviour, slower. start_server.sh runs it alongside the
# backend's set-up (VESPA_COMPILE=0 here, then compile_request_path in the background).
compile_request_path() {
  "$VESPA_PYTHON" scripts/compile.py --check 2>/dev/null && return 0
  local packages
  read -r -a packages <<< "$("$VESPA_PYTHON" scripts/compile.py --apt-packages)"  # gcc, headers
  if (( ${#packages[@]} )) && [[ $EUID == 0 ]] && command -v apt-get >/dev/null; then
    { timeout 300 apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq "${packages[@]}"
    } >&2 || true
  fi
  # bounded: a stuck mirror or compiler never holds the worker's start for long
  timeout 900 "$VESPA_PYTHON" scripts/compile.py \
    || echo "worker env: the worker runs as plain Python" >&2
}
if [[ "${VESPA_COMPILE:-1}" != 0 ]]; then
  compile_request_path
fi
