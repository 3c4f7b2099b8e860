# Sourced by the project's scripts: create (once) and use the worker's virtual env.
# The worker is light (aiohttp, pycryptodome, psutil, python-dotenv, uvloop); its env never holds
# torch, vLLM or TTS engines (each backend gets its own env under .venvs/).
VESPA_VENV="${VESPA_VENV:-$PWD/.venvs/worker}"
if [[ ! -x "$VESPA_VENV/bin/python" ]]; then
  echo "setting up the worker env in $VESPA_VENV" >&2
  python3 -m venv "$VESPA_VENV"
fi
stamp="$VESPA_VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  "$VESPA_VENV/bin/python" -m pip install --quiet --upgrade pip >&2
  "$VESPA_VENV/bin/python" -m pip install --quiet -e '.[test]' >&2
  rm -f "$VESPA_VENV"/.installed-*
  touch "$stamp"
fi
export VESPA_PYTHON="$VESPA_VENV/bin/python"
