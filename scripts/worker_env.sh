# Sourced by the project's scripts: create (once) and use the worker's virtual env.
# The worker is light (aiohttp, httptools, pycryptodome, psutil, python-dotenv, uvloop); its env
# never holds torch, vLLM or TTS engines (each backend gets its own env under .venvs/).
# VESPA_WORKER_EXTRAS=test also installs the test tools; VESPA_WORKER_PYTHON picks the interpreter
# (default python3) and VESPA_VENV the env's directory. Returns non-zero on failure (set -e or
# not), so callers can report it.
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
