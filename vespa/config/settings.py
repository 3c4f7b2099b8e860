"""Every environment variable the worker reads, declared once: the ``Settings`` fields (with
their variable, Vast's name, kind, default and doc) and the variables that only feed them."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .kinds import (BEARER, COMMAND, DIRECTORY, FILE, FLAG, HTTP_URL, HTTP_URLS, LEVEL,
                    PATH_OR_URL, PATTERNS, PORT, NUMBER, REGEX, TARGET, TOKEN, Kind, choice,
                    number, text, whole)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BENCHMARKS = {"vllm": "benchmarks.openai_chat:benchmark", "tts": "benchmarks.tts:benchmark"}
MiB = 1024 * 1024


@dataclass(frozen=True)
class Setting:
    """One environment variable: how it is read, what it defaults to, and its line in the
    README's settings table."""

    variable: str
    kind: Kind
    default: Any
    doc: str
    vast: str | None = None  # the name Vast's platform gives the same value; ours wins
    shown: str | None = None  # the README's default, where the value alone would mislead
    secret: bool = False  # never reaches a log line (masked to a short prefix)
    backend: bool = False  # handed to a launched backend; a name ending in * is a prefix

    def matches(self, name: str) -> bool:
        if self.variable.endswith("*"):
            return name.startswith(self.variable[:-1])
        return name == self.variable


def setting(variable: str, kind: Kind, default: Any, doc: str, **more: Any) -> Any:
    """A ``Settings`` field read from ``variable`` (``more``: the rest of ``Setting``)."""
    return field(default=default,
                 metadata={"setting": Setting(variable, kind, default, doc, **more)})


@dataclass(frozen=True)
class Settings:
    """What the worker runs with. Each field read from a variable is declared by ``setting``;
    loading.py derives the defaults that depend on other settings (their README default says so)
    and the four fields at the end."""

    backend_url: str = setting(
        "VESPA_BACKEND_URL", HTTP_URL, "http://localhost:8000",
        "the backend to front (when Vespa does not launch it)")
    worker_port: int = setting("VESPA_WORKER_PORT", PORT, 3000, "port the worker listens on",
                               vast="WORKER_PORT")
    http_port: int | None = setting(
        "VESPA_WORKER_HTTP_PORT", whole(0, 65535), None,
        "plain-HTTP port that serves only `POST /session/end` (the platform's own calls); `0`: off",
        vast="WORKER_HTTP_PORT", shown="on a Vast instance the worker port + 1, else off")
    max_sessions: int = setting("VESPA_MAX_SESSIONS", whole(), 10,
                                "sessions held at once (Vast's default); one more gets 429")
    host: str = setting("VESPA_WORKER_HOST", text("a host address"), "0.0.0.0",
                        "address the worker listens on")
    unsecured: bool = setting("VESPA_UNSECURED", FLAG, False, "skip signature checks (dev only)",
                              vast="UNSECURED", shown="`true` without `REPORT_ADDR` off Vast, else `false`")
    allow_parallel: bool = setting("VESPA_ALLOW_PARALLEL", FLAG, True,
                                   "`false` runs one request at a time")
    max_concurrency: int | None = setting(
        "VESPA_MAX_CONCURRENCY", whole(), None,
        "at most this many requests run at once; the rest wait in line")
    max_wait_time: float = setting(
        "VESPA_MAX_WAIT_TIME", NUMBER, 10.0,
        "seconds a request may wait (estimated, and in line) before 429")
    max_throughput: float | None = setting(
        "VESPA_MAX_THROUGHPUT", NUMBER, None,
        "fixed throughput (workload units/s); skips the benchmark")
    default_cost: float = setting("VESPA_DEFAULT_COST", NUMBER, 1.0,
                                  "workload of a request without a cost (or cost ≤ 1)")
    blocked_paths: tuple[str, ...] = setting("VESPA_BLOCKED_PATHS", PATTERNS, (),
                                             "comma-separated fnmatch patterns answered 403")
    max_body_bytes: int = setting("VESPA_MAX_BODY_BYTES", whole(), 100 * MiB,
                                  "larger request bodies get 413", shown="100 MiB")
    request_timeout: float = setting(
        "VESPA_REQUEST_TIMEOUT", NUMBER, 600.0,
        "seconds the backend may stay silent (before and during a response) → 504; also how "
        "long a client may take nothing of an answer before it is cut")
    body_read_timeout: float = setting(
        "VESPA_BODY_READ_TIMEOUT", NUMBER, 30.0,
        "seconds a client may pause while sending a request body → 408")
    max_envelope_bytes: int = setting(
        "VESPA_MAX_ENVELOPE_BYTES", whole(), 4 * MiB,
        "a signed request's envelope is read whole and parsed before its signature is "
        "checked: larger ones get 413", shown="4 MiB")
    max_envelope_values: int = setting(
        "VESPA_MAX_ENVELOPE_VALUES", whole(), 100_000,
        "JSON values (objects, arrays, members) an envelope may hold before its signature is "
        "checked: more get 413 (parsing them would stall the worker)")
    envelope_read_timeout: float = setting(
        "VESPA_ENVELOPE_READ_TIMEOUT", NUMBER, 60.0,
        "seconds a signed request's envelope may take to arrive whole → 408")
    min_upload_rate: float = setting(
        "VESPA_MIN_UPLOAD_RATE", number(zero=True), 1024.0,
        "bytes/s a streamed request body must average once it has taken longer than "
        "`VESPA_BODY_READ_TIMEOUT` → 408 (`0`: no minimum)")
    max_client_connections: int = setting(
        "VESPA_MAX_CLIENT_CONNECTIONS", whole(), 256,
        "open connections one client address may hold; more are answered 429 and closed")
    connect_timeout: float = setting("VESPA_CONNECT_TIMEOUT", NUMBER, 5.0,
                                     "seconds to connect to the backend → 502")
    connection_limit: int = setting(
        "VESPA_CONNECTION_LIMIT", whole(), 256,
        "upstream connections (and requests in flight upstream)")
    drain_timeout: float = setting("VESPA_DRAIN_TIMEOUT", number(zero=True), 30.0,
                                   "seconds in-flight requests get to finish on SIGTERM")
    keepalive_timeout: float = setting(
        "VESPA_KEEPALIVE_TIMEOUT", NUMBER, 75.0,
        "seconds an idle client connection (or one that never sends a whole request) is kept")
    healthcheck_endpoint: str = setting(
        "VESPA_HEALTHCHECK_ENDPOINT", PATH_OR_URL, "/health",
        "backend path (or a whole URL) polled until 200, then periodically",
        vast="MODEL_HEALTH_ENDPOINT")
    healthcheck_interval: float = setting("VESPA_HEALTHCHECK_INTERVAL", NUMBER, 10.0,
                                          "seconds between health checks once ready")
    healthcheck_failures: int = setting(
        "VESPA_HEALTHCHECK_FAILURES", whole(), 3,
        "consecutive failures that set `error_msg` (a success clears it)")
    ready_timeout_initial: float = setting("VESPA_READY_TIMEOUT_INITIAL", NUMBER, 1200.0,
                                           "seconds to wait for the backend on a first start")
    ready_timeout_resume: float = setting(
        "VESPA_READY_TIMEOUT_RESUME", NUMBER, 300.0,
        "seconds to wait for the backend when a benchmark cache exists (model on disk)")
    benchmark: str | None = setting(
        "VESPA_BENCHMARK", TARGET, None, "`module:function` measuring throughput at start",
        shown="per backend")
    benchmark_timeout: float = setting("VESPA_BENCHMARK_TIMEOUT", NUMBER, 900.0,
                                       "seconds the benchmark may take")
    cache_dir: str = setting(
        "VESPA_CACHE_DIR", DIRECTORY, str(REPO_ROOT / ".cache"),
        "benchmark cache, converted models, backend logs (also handed to the backend)",
        shown="`<repo>/.cache`", backend=True)
    backend_log: str | None = setting("VESPA_BACKEND_LOG", FILE, None,
                                      "backend log file to watch",
                                      shown="`<cache>/logs/<backend>.log` when launched")
    backend_log_ready: str | None = setting(
        "VESPA_BACKEND_LOG_READY", REGEX, None,
        "regex on the backend log: start-up also waits for a line matching it")
    backend_log_error: str | None = setting(
        "VESPA_BACKEND_LOG_ERROR", REGEX, None,
        "regex on the backend log: a line matching it fails start-up at once")
    signature_scheme: str = setting("VESPA_SIGNATURE_SCHEME",
                                    choice("auto", "full", "url", "legacy"), "auto",
                                    "`auto`, `full`, `url` or `legacy`")
    replay_window: int = setting(
        "VESPA_REPLAY_WINDOW", whole(), 10_000,
        "how many recent signed requests are remembered against replays")
    delete_requests_format: str = setting(
        "VESPA_DELETE_REQUESTS_FORMAT", choice("2026", "legacy"), "2026",
        "`2026`: one POST of `requests` records, as Vast's current worker sends them; `legacy`: "
        "the older two POSTs of `request_idxs`, one for successes and one for failures")
    report_interval: float = setting(
        "VESPA_REPORT_INTERVAL", NUMBER, 1.0,
        "seconds between looks at the load; a report goes out when it changed")
    report_max_interval: float = setting("VESPA_REPORT_MAX_INTERVAL", NUMBER, 10.0,
                                         "seconds between reports at most, changed or not")
    public_url: str = setting("VESPA_PUBLIC_URL", HTTP_URL, "",
                              "the URL clients use for this worker",
                              shown="from Vast's variables")
    check_signed_url: bool = setting(
        "VESPA_CHECK_SIGNED_URL", FLAG, True,
        "refuse a request signed for another worker's URL; a signed worker must then know its "
        "public URL (`false`: accept any URL, for a worker whose public URL is unknown)")
    use_ssl: bool = setting("VESPA_USE_SSL", FLAG, False, "serve HTTPS", vast="USE_SSL",
                            shown="on a Vast instance `true` (as Vast's start-up), else `false`")
    ssl_cert: str = setting("VESPA_SSL_CERT", FILE, "/etc/instance.crt",
                            "certificate for HTTPS")
    ssl_key: str = setting("VESPA_SSL_KEY", FILE, "/etc/instance.key", "key for HTTPS")
    log_level: str = setting("VESPA_LOG_LEVEL", LEVEL, "INFO",
                             "`DEBUG` also turns on the access log")
    backend: str | None = setting(
        "VESPA_BACKEND", choice("vllm", "tts", "command", "none"), None,
        "`vllm`, `tts` or `command`: launch and supervise the backend on `VESPA_BACKEND_PORT` "
        "(then `VESPA_BACKEND_URL` must be unset or point there); `none`: front "
        "`VESPA_BACKEND_URL`. `start_server.sh` defaults to `vllm`, or to `none` when only "
        "`VESPA_BACKEND_URL` is set")
    backend_port: int = setting("VESPA_BACKEND_PORT", PORT, 8000, "port of the launched backend")
    backend_command: tuple[str, ...] = setting(
        "VESPA_BACKEND_COMMAND", COMMAND, (),
        "any backend command line (`{port}` is replaced); alone, it means "
        "`VESPA_BACKEND=command`")
    backend_restarts: int = setting("VESPA_BACKEND_RESTARTS", whole(0), 0,
                                    "times a backend that exits is started again")
    backend_api_key: str | None = setting(
        "VESPA_BACKEND_API_KEY", BEARER, None,
        "the backend's own key: sent as `Authorization: Bearer` with every request to the "
        "backend (instead of the client's) and with the benchmark's; a launched vLLM is given it",
        secret=True, shown="`VLLM_API_KEY` with `VESPA_BACKEND=vllm`, else none")
    log_format: str = setting("VESPA_LOG_FORMAT", choice("text", "json"), "text",
                              "`json`: one JSON object per line")
    metrics_routes: tuple[str, ...] = setting(
        "VESPA_METRICS_ROUTES", PATTERNS, (),
        "comma-separated fnmatch patterns used as the `route` label", shown="built-in list")
    request_log_dir: str | None = setting("VESPA_REQUEST_LOG_DIR", DIRECTORY, None,
                                          "write request records here")
    request_log_max_body_bytes: int = setting(
        "VESPA_REQUEST_LOG_MAX_BODY_BYTES", whole(0), 1 * MiB,
        "JSON bodies kept per record, each way", shown="1 MiB")
    request_log_retention_hours: float = setting("VESPA_REQUEST_LOG_RETENTION_HOURS", NUMBER,
                                                 24.0, "records older than this are removed")
    request_log_cleanup_interval: float = setting(
        "VESPA_REQUEST_LOG_CLEANUP_INTERVAL_SECONDS", NUMBER, 600.0,
        "how often old records are removed")
    request_log_max_bytes: int = setting(
        "VESPA_REQUEST_LOG_MAX_BYTES", whole(), 1 << 30,
        "disk the records may take; past it the oldest are removed", shown="1 GiB")
    request_log_max_per_second: float = setting(
        "VESPA_REQUEST_LOG_MAX_PER_SECOND", number(zero=True), 200.0,
        "records kept per second at most (`0`: no limit); the rest are skipped")
    logs_token: str | None = setting(
        "VESPA_LOGS_TOKEN", TOKEN, None,
        "token for `/_vespa/logs` (sent as `x-vespa-logs-token`)", secret=True)
    ops_token: str | None = setting(
        "VESPA_OPS_TOKEN", TOKEN, None,
        "token for `/_vespa/status` and `/_vespa/metrics` (sent as `x-vespa-ops-token` or "
        "`Authorization: Bearer`); without it they answer loopback clients only", secret=True)
    ops_open_on_loopback: bool = setting(
        "VESPA_OPS_OPEN_ON_LOOPBACK", FLAG, True,
        "loopback clients get `/_vespa/status` and `/_vespa/metrics` without the token")
    admit_on_backend_queue: bool = setting(
        "VESPA_ADMIT_ON_BACKEND_QUEUE", FLAG, False,
        "also refuse work while vLLM's own waiting queue is long")
    backend_queue_limit: int = setting(
        "VESPA_BACKEND_QUEUE_LIMIT", whole(0), 32,
        "how many requests waiting in vLLM count as long")
    insight_interval: float = setting("VESPA_INSIGHT_INTERVAL", NUMBER, 2.0,
                                      "seconds between scrapes of vLLM's `/metrics`")
    update_flag: str = setting(
        "VESPA_UPDATE_FLAG", FILE, "/.force_update",
        "file `POST /pyworker/update` writes (Vast's); on a Vast instance start_server.sh "
        "watches it, updates the checkout and restarts the worker")
    # Vast's own variables, as the platform sets them
    report_addrs: tuple[str, ...] = setting(
        "REPORT_ADDR", HTTP_URLS, (), "Vast: the autoscaler's addresses, comma-separated, tried "
        "in order; without it the worker reports nothing (dev mode)")
    container_id: int | None = setting("CONTAINER_ID", whole(0), None, "Vast: the worker id")
    master_token: str = setting(
        "MASTER_TOKEN", TOKEN, "",
        "Vast: the token every report carries, and `POST /pyworker/update`'s (as `Authorization: "
        "Bearer`; without one that route always answers 401)", secret=True)
    # Derived in loading.py from the variables above: no variable of their own.
    benchmark_identity: dict = field(default_factory=dict)  # what a cached benchmark measured
    backend_env: dict = field(default_factory=dict)  # the variables handed to the backend
    log_secrets: tuple[str, ...] = ()  # the values of the secret variables
    unknown_settings: tuple[str, ...] = ()  # one warning each, logged at start

    @property
    def benchmark_cache(self) -> str:
        return os.path.join(self.cache_dir, "benchmark.json")

    @property
    def concurrency_limit(self) -> int | None:
        """How many requests may run at once; None means no limit."""
        if not self.allow_parallel:
            return 1
        return self.max_concurrency


# Read only to build a value above (the public URL).
PUBLIC_IPADDR = Setting("PUBLIC_IPADDR", text("an address"), None,
                        "Vast: the instance's public address")
VAST_TCP_PORT = Setting("VAST_TCP_PORT_<port>", PORT, None,
                        "Vast: the public port mapped to `VESPA_WORKER_PORT`; with "
                        "`PUBLIC_IPADDR`, the public URL")
# Credentials a backend may be given: read only to keep them out of the worker's logs.
CREDENTIALS = tuple(Setting(name, TOKEN, None, doc + "; kept out of the worker's logs",
                            secret=True) for name, doc in (
    ("HF_TOKEN", "Hugging Face token a backend may use"),
    ("HUGGING_FACE_HUB_TOKEN", "the same, by its older name"),
    ("VLLM_API_KEY", "the API key a vLLM asks of its clients; for a launched vLLM, "
                     "`VESPA_BACKEND_API_KEY`'s default"),
    ("OPENAI_API_KEY", "an OpenAI key a backend may use")))
# The backend's own settings: the worker hands them to a launched backend's command builder.
HANDED_TO_BACKEND = tuple(Setting(name, text("any text"), None, doc, shown="—", backend=True)
                          for name, doc in (
    ("MODEL_NAME", "the model a launched backend serves (see below)"),
    ("VLLM_*", "vLLM's settings, for `VESPA_BACKEND=vllm` (see below)"),
    ("VESPA_VLLM_*", "where and how Vespa sets vLLM up (e.g. `VESPA_VLLM_VENV`)"),
    ("VESPA_TTS_*", "the TTS server's settings and set-up, for `VESPA_BACKEND=tts` (see below)"),
    ("HF_*", "Hugging Face's settings, for either backend")))

# attribute of Settings -> its declaration
DECLARED: dict[str, Setting] = {f.name: f.metadata["setting"]
                                for f in dataclasses.fields(Settings) if "setting" in f.metadata}
DECLARATIONS = (*DECLARED.values(), PUBLIC_IPADDR, VAST_TCP_PORT, *CREDENTIALS,
                *HANDED_TO_BACKEND)
SECRET_VARIABLES = tuple(s.variable for s in DECLARATIONS if s.secret)
# Settings that identify what a benchmark measured: a change in any of them measures again.
BENCHMARK_IDENTITY = ("VESPA_BACKEND", "VESPA_BACKEND_URL", "MODEL_NAME", "VLLM_MODEL",
                      "VLLM_ARGS", "VLLM_MAX_MODEL_LEN", "VLLM_QUANTIZATION",
                      "VLLM_TENSOR_PARALLEL_SIZE", "VESPA_TTS_ENGINE", "VESPA_TTS_VOICE",
                      "VESPA_TTS_MODEL_DIR")
# VESPA_* names read by the project's scripts and tests, not by the worker (never "unknown").
SCRIPT_SETTINGS = frozenset({
    "VESPA_AUTOSCALER_PORT", "VESPA_CERT_SIGN_URL", "VESPA_DEV_API_KEY", "VESPA_LOCAL",
    "VESPA_PYTHON", "VESPA_VENV", "VESPA_WORKER_EXTRAS", "VESPA_WORKER_PYTHON",
    "VESPA_SOAK_SECONDS", "VESPA_COMPILE", "VESPA_UPDATE_REF", "VESPA_UPDATE_REMOTE",
    # read when the package is imported (vespa/compiled.py), before any setting
    "VESPA_PURE_PYTHON"})
SCRIPT_PREFIXES = ("VESPA_RELIABILITY_",)
