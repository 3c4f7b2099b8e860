"""Every Vespa setting in one typed, validated object.

The only module that reads ``os.environ``. Settings come from the environment and an optional
``.env`` file (python-dotenv; real environment variables win). A bad value raises ``ConfigError``
naming the variable and what it accepts; ``vespa.app.main`` turns that into one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, TypeVar

from dotenv import dotenv_values
from yarl import URL

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_SCHEMES = ("auto", "full", "url", "legacy")
_DELETE_FORMATS = ("2026", "legacy")
_BACKENDS = ("vllm", "tts", "command", "none")  # none: front the backend at VESPA_BACKEND_URL
DEFAULT_BENCHMARKS = {"vllm": "benchmarks.openai_chat:benchmark", "tts": "benchmarks.tts:benchmark"}
# Settings handed to a launched backend's command builder.
_BACKEND_ENV_PREFIXES = ("VLLM_", "VESPA_TTS_", "VESPA_VLLM_", "HF_")
_BACKEND_ENV_NAMES = ("MODEL_NAME", "VESPA_CACHE_DIR")
REPO_ROOT = Path(__file__).resolve().parent.parent
# Settings that identify what a benchmark measured: a change in any of them measures again.
BENCHMARK_IDENTITY = ("VESPA_BACKEND", "VESPA_BACKEND_URL", "MODEL_NAME", "VLLM_MODEL",
                      "VLLM_ARGS", "VLLM_MAX_MODEL_LEN", "VLLM_QUANTIZATION",
                      "VLLM_TENSOR_PARALLEL_SIZE", "VESPA_TTS_ENGINE", "VESPA_TTS_VOICE",
                      "VESPA_TTS_MODEL_DIR")


class ConfigError(ValueError):
    """A setting has a value Vespa cannot use."""

    def __init__(self, name: str, value: str, accepts: str):
        super().__init__(f"invalid {name}={value!r}: expected {accepts}")
        self.name = name


SECRET_VARIABLES = ("MASTER_TOKEN", "VESPA_LOGS_TOKEN", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                    "VLLM_API_KEY", "OPENAI_API_KEY")


@dataclass(frozen=True)
class Settings:
    backend_url: str = "http://localhost:8000"
    host: str = "0.0.0.0"
    worker_port: int = 3000
    unsecured: bool = False
    allow_parallel: bool = True
    max_concurrency: int | None = None
    max_wait_time: float = 10.0
    max_throughput: float | None = None
    default_cost: float = 1.0
    blocked_paths: tuple[str, ...] = ()
    max_body_bytes: int = 100 * 1024 * 1024
    request_timeout: float = 600.0
    body_read_timeout: float = 30.0  # a client pausing longer mid-body gets a 408
    connect_timeout: float = 5.0
    drain_timeout: float = 30.0
    keepalive_timeout: float = 75.0
    connection_limit: int = 256
    healthcheck_endpoint: str = "/health"
    healthcheck_interval: float = 10.0
    ready_timeout_initial: float = 1200.0
    ready_timeout_resume: float = 300.0
    healthcheck_failures: int = 3
    log_level: str = "INFO"
    # Vast platform
    report_addrs: tuple[str, ...] = ()
    container_id: int | None = None
    master_token: str = ""
    public_url: str = ""
    use_ssl: bool = False
    ssl_cert: str = "/etc/instance.crt"
    ssl_key: str = "/etc/instance.key"
    # protocol
    signature_scheme: str = "auto"
    delete_requests_format: str = "2026"
    replay_window: int = 10_000
    report_interval: float = 1.0
    report_max_interval: float = 10.0
    # backend start-up
    benchmark: str | None = None
    benchmark_timeout: float = 900.0
    cache_dir: str = str(REPO_ROOT / ".cache")
    backend_log: str | None = None
    backend_log_ready: str | None = None
    backend_log_error: str | None = None
    benchmark_identity: dict = field(default_factory=dict)
    # launched backend (VESPA_BACKEND)
    backend: str | None = None
    backend_port: int = 8000
    backend_restarts: int = 0
    backend_env: dict = field(default_factory=dict)
    backend_command: tuple[str, ...] = ()
    # operations
    log_format: str = "text"
    metrics_routes: tuple[str, ...] = ()
    request_log_dir: str | None = None
    request_log_max_body_bytes: int = 1 << 20
    request_log_retention_hours: float = 24.0
    request_log_cleanup_interval: float = 600.0
    request_log_max_per_second: float = 200.0  # records past this rate are skipped; 0: no limit
    # Values that must never reach a log line (masked to a short prefix): Vast's token, ours,
    # and the usual credentials a backend is given in its environment.
    log_secrets: tuple[str, ...] = ()
    unknown_settings: tuple[str, ...] = ()  # one warning each, logged at start
    logs_token: str | None = None
    admit_on_backend_queue: bool = False
    backend_queue_limit: int = 32
    insight_interval: float = 2.0

    @property
    def benchmark_cache(self) -> str:
        return os.path.join(self.cache_dir, "benchmark.json")

    @property
    def concurrency_limit(self) -> int | None:
        """How many requests may run at once; None means no limit."""
        if not self.allow_parallel:
            return 1
        return self.max_concurrency


# VESPA_* names read by the project's scripts and tests, not by the worker (never "unknown").
SCRIPT_SETTINGS = frozenset({
    "VESPA_AUTOSCALER_PORT", "VESPA_CERT_SIGN_URL", "VESPA_DEV_API_KEY", "VESPA_LOCAL",
    "VESPA_PYTHON", "VESPA_VENV", "VESPA_WORKER_EXTRAS", "VESPA_WORKER_PYTHON",
    "VESPA_SOAK_SECONDS", "VESPA_COMPILE",
    # read when the package is imported (vespa/compiled.py), before any setting
    "VESPA_PURE_PYTHON"})
_SCRIPT_PREFIXES = ("VESPA_RELIABILITY_",)


class _Reader:
    """Reads one variable at a time from a mapping, converting and validating it."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.asked: set[str] = set()

    def unknown(self) -> tuple[str, ...]:
        """A warning for each VESPA_* variable set that nothing reads (a typo, or a setting
        Vespa does not have), with the closest real name when there is one."""
        known = self.asked | SCRIPT_SETTINGS
        warnings = []
        for name in sorted(self.env):
            if not name.startswith("VESPA_") or name in known or name in _BACKEND_ENV_NAMES \
                    or name.startswith(_BACKEND_ENV_PREFIXES + _SCRIPT_PREFIXES):
                continue
            # compared without the common VESPA_ prefix, which makes every name look alike
            close = difflib.get_close_matches(name[6:], [k[6:] for k in known
                                                         if k.startswith("VESPA_")], n=1)
            warnings.append(f"{name} is not a Vespa setting and is ignored"
                            + (f" (did you mean VESPA_{close[0]}?)" if close else ""))
        return tuple(warnings)

    def raw(self, *names: str) -> tuple[str, str] | None:
        self.asked.update(names)
        for name in names:
            value = self.env.get(name)
            if value is not None and value.strip() != "":
                return name, value.strip()
        return None

    def get(self, names: str | tuple[str, ...], parse: Callable[[str], T], accepts: str,
            default: T) -> T:
        found = self.raw(*((names,) if isinstance(names, str) else names))
        if found is None:
            return default
        name, value = found
        try:
            return parse(value)
        except (ValueError, TypeError):
            raise ConfigError(name, value, accepts) from None

    def flag(self, names: str | tuple[str, ...], default: bool) -> bool:
        return self.get(names, _parse_bool, "true or false", default)

    def number(self, name: str, default: float | None, *, minimum: float = 0.0,
               allow_zero: bool = False) -> float | None:
        accepts = f"a number {'>=' if allow_zero else '>'} {minimum:g}"
        return self.get(name, lambda v: _parse_float(v, minimum, allow_zero), accepts, default)

    def integer(self, names: str | tuple[str, ...], default: int | None, *, minimum: int = 1,
                maximum: int | None = None) -> int | None:
        accepts = f"a whole number from {minimum}" + (f" to {maximum}" if maximum else " up")
        return self.get(names, lambda v: _parse_int(v, minimum, maximum), accepts, default)


def _is_local_port(url: str, port: int) -> bool:
    """``url`` is plain http on this machine's loopback at ``port``."""
    parsed = URL(url)
    return parsed.scheme == "http" and parsed.port == port \
        and parsed.host in ("127.0.0.1", "localhost", "::1") and parsed.path in ("", "/")


def _parse_bool(value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(value)


def _parse_float(value: str, minimum: float, allow_zero: bool) -> float:
    number = float(value)
    if not math.isfinite(number) or number < minimum or (number == minimum and not allow_zero):
        raise ValueError(value)
    return number


def _parse_int(value: str, minimum: int, maximum: int | None) -> int:
    number = int(value)
    if number < minimum or (maximum is not None and number > maximum):
        raise ValueError(value)
    return number


def _parse_url(value: str) -> str:
    if not value.startswith(("http://", "https://")) or len(value) <= len("https://"):
        raise ValueError(value)
    return value.rstrip("/")


def _parse_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(value)
    return value


def _parse_level(value: str) -> str:
    if value.upper() not in _LOG_LEVELS:
        raise ValueError(value)
    return value.upper()


def _parse_patterns(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _parse_urls(value: str) -> tuple[str, ...]:
    return tuple(_parse_url(u.strip()) for u in value.split(",") if u.strip())


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value.lower() not in choices:
            raise ValueError(value)
        return value.lower()
    return parse


def _parse_target(value: str) -> str:
    module, sep, function = value.partition(":")
    if not sep or not module.strip() or not function.strip().isidentifier():
        raise ValueError(value)
    return value.strip()


def _parse_command(value: str) -> tuple[str, ...]:
    import shlex
    words = tuple(shlex.split(value))
    if not words:
        raise ValueError(value)
    return words


def _parse_regex(value: str) -> str:
    import re
    re.compile(value)
    return value


def _public_url(read: "_Reader", port: int, use_ssl: bool) -> str:
    """``VESPA_PUBLIC_URL``, else Vast's ``PUBLIC_IPADDR`` and ``VAST_TCP_PORT_<port>``."""
    explicit = read.get("VESPA_PUBLIC_URL", _parse_url, "an http:// or https:// URL", "")
    if explicit:
        return explicit
    ip = read.raw("PUBLIC_IPADDR")
    public_port = read.integer(f"VAST_TCP_PORT_{port}", None, minimum=1, maximum=65535)
    if ip is None or public_port is None:
        return ""
    return f"{'https' if use_ssl else 'http'}://{ip[1]}:{public_port}"


def environment(dotenv_path: str | None = ".env") -> dict[str, str]:
    """The process environment over the values of an optional ``.env`` file."""
    merged: dict[str, str] = {}
    if dotenv_path and os.path.isfile(dotenv_path):
        merged.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged.update(os.environ)
    return merged


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build ``Settings`` from ``env`` (default: the environment and ``.env``)."""
    read = _Reader(environment() if env is None else env)
    d = Settings()
    port = read.integer(("VESPA_WORKER_PORT", "WORKER_PORT"), d.worker_port, minimum=1,
                        maximum=65535)
    use_ssl = read.flag(("VESPA_USE_SSL", "USE_SSL"), d.use_ssl)
    report_addrs = read.get("REPORT_ADDR", _parse_urls, "comma-separated http(s) URLs",
                            d.report_addrs)
    backend_command = read.get("VESPA_BACKEND_COMMAND", _parse_command,
                               "a command line (use {port} for the backend port)", ())
    backend = read.get("VESPA_BACKEND", _parse_choice(_BACKENDS), "one of vllm|tts|command|none",
                       "command" if backend_command else None)
    if backend == "none":
        backend = None
    if backend == "command" and not backend_command:
        raise ConfigError("VESPA_BACKEND_COMMAND", "", "a command line when VESPA_BACKEND=command")
    backend_port = read.integer("VESPA_BACKEND_PORT", d.backend_port, minimum=1, maximum=65535)
    backend_url = read.get("VESPA_BACKEND_URL", _parse_url, "an http:// or https:// URL",
                           d.backend_url)
    if backend is not None:
        launched = f"http://127.0.0.1:{backend_port}"
        given = read.raw("VESPA_BACKEND_URL")
        if given is not None and not _is_local_port(backend_url, backend_port):
            raise ConfigError("VESPA_BACKEND_URL", given[1],
                              f"unset or {launched}, where VESPA_BACKEND={backend} launches the "
                              "backend (VESPA_BACKEND=none fronts a backend you run)")
        backend_url = launched
    settings = Settings(
        backend_url=backend_url,
        backend=backend,
        log_secrets=tuple(value for name in SECRET_VARIABLES
                          if (value := (read.raw(name) or (None, None))[1])),
        backend_port=backend_port,
        backend_command=backend_command,
        backend_restarts=read.integer("VESPA_BACKEND_RESTARTS", d.backend_restarts, minimum=0),
        backend_env={k: v for k, v in read.env.items()
                     if k.startswith(_BACKEND_ENV_PREFIXES) or k in _BACKEND_ENV_NAMES},
        host=read.get("VESPA_WORKER_HOST", str, "a host address", d.host),
        worker_port=port,
        # Without an autoscaler nobody signs requests: dev mode is unsecured unless told otherwise.
        unsecured=read.flag("VESPA_UNSECURED", not report_addrs),
        allow_parallel=read.flag("VESPA_ALLOW_PARALLEL", d.allow_parallel),
        max_concurrency=read.integer("VESPA_MAX_CONCURRENCY", d.max_concurrency),
        max_wait_time=read.number("VESPA_MAX_WAIT_TIME", d.max_wait_time),
        max_throughput=read.number("VESPA_MAX_THROUGHPUT", d.max_throughput),
        default_cost=read.number("VESPA_DEFAULT_COST", d.default_cost),
        blocked_paths=read.get("VESPA_BLOCKED_PATHS", _parse_patterns,
                               "comma-separated path patterns", d.blocked_paths),
        max_body_bytes=read.integer("VESPA_MAX_BODY_BYTES", d.max_body_bytes),
        request_timeout=read.number("VESPA_REQUEST_TIMEOUT", d.request_timeout),
        body_read_timeout=read.number("VESPA_BODY_READ_TIMEOUT", d.body_read_timeout),
        connect_timeout=read.number("VESPA_CONNECT_TIMEOUT", d.connect_timeout),
        drain_timeout=read.number("VESPA_DRAIN_TIMEOUT", d.drain_timeout, allow_zero=True),
        keepalive_timeout=read.number("VESPA_KEEPALIVE_TIMEOUT", d.keepalive_timeout),
        connection_limit=read.integer("VESPA_CONNECTION_LIMIT", d.connection_limit),
        healthcheck_endpoint=read.get("VESPA_HEALTHCHECK_ENDPOINT", _parse_path,
                                      "a path starting with /", d.healthcheck_endpoint),
        healthcheck_interval=read.number("VESPA_HEALTHCHECK_INTERVAL", d.healthcheck_interval),
        ready_timeout_initial=read.number("VESPA_READY_TIMEOUT_INITIAL",
                                          d.ready_timeout_initial),
        ready_timeout_resume=read.number("VESPA_READY_TIMEOUT_RESUME", d.ready_timeout_resume),
        healthcheck_failures=read.integer("VESPA_HEALTHCHECK_FAILURES", d.healthcheck_failures),
        log_level=read.get("VESPA_LOG_LEVEL", _parse_level, "one of " + ", ".join(_LOG_LEVELS),
                           d.log_level),
        report_addrs=report_addrs,
        container_id=read.integer("CONTAINER_ID", d.container_id, minimum=0),
        master_token=read.get("MASTER_TOKEN", str, "a token", d.master_token),
        public_url=_public_url(read, port, use_ssl),
        use_ssl=use_ssl,
        ssl_cert=read.get("VESPA_SSL_CERT", str, "a file path", d.ssl_cert),
        ssl_key=read.get("VESPA_SSL_KEY", str, "a file path", d.ssl_key),
        signature_scheme=read.get("VESPA_SIGNATURE_SCHEME", _parse_choice(_SCHEMES),
                                  "one of " + "|".join(_SCHEMES), d.signature_scheme),
        delete_requests_format=read.get("VESPA_DELETE_REQUESTS_FORMAT",
                                        _parse_choice(_DELETE_FORMATS),
                                        "one of " + "|".join(_DELETE_FORMATS),
                                        d.delete_requests_format),
        replay_window=read.integer("VESPA_REPLAY_WINDOW", d.replay_window),
        report_interval=read.number("VESPA_REPORT_INTERVAL", d.report_interval),
        report_max_interval=read.number("VESPA_REPORT_MAX_INTERVAL", d.report_max_interval),
        benchmark=read.get("VESPA_BENCHMARK", _parse_target, "module:function",
                           DEFAULT_BENCHMARKS.get(backend or "")),
        benchmark_timeout=read.number("VESPA_BENCHMARK_TIMEOUT", d.benchmark_timeout),
        cache_dir=read.get("VESPA_CACHE_DIR", str, "a directory", d.cache_dir),
        backend_log=read.get("VESPA_BACKEND_LOG", str, "a file path",
                             os.path.join(read.get("VESPA_CACHE_DIR", str, "", d.cache_dir),
                                          "logs", f"{backend}.log") if backend else None),
        backend_log_ready=read.get("VESPA_BACKEND_LOG_READY", _parse_regex,
                                   "a regular expression", d.backend_log_ready),
        backend_log_error=read.get("VESPA_BACKEND_LOG_ERROR", _parse_regex,
                                   "a regular expression", d.backend_log_error),
        benchmark_identity={name: read.env[name] for name in BENCHMARK_IDENTITY
                            if read.env.get(name)},
        log_format=read.get("VESPA_LOG_FORMAT", _parse_choice(("text", "json")), "text or json",
                            d.log_format),
        metrics_routes=read.get("VESPA_METRICS_ROUTES", _parse_patterns,
                                "comma-separated path patterns", d.metrics_routes),
        request_log_dir=read.get("VESPA_REQUEST_LOG_DIR", str, "a directory",
                                 d.request_log_dir),
        request_log_max_body_bytes=read.integer("VESPA_REQUEST_LOG_MAX_BODY_BYTES",
                                                d.request_log_max_body_bytes, minimum=0),
        request_log_retention_hours=read.number("VESPA_REQUEST_LOG_RETENTION_HOURS",
                                                d.request_log_retention_hours),
        request_log_cleanup_interval=read.number("VESPA_REQUEST_LOG_CLEANUP_INTERVAL_SECONDS",
                                                 d.request_log_cleanup_interval),
        request_log_max_per_second=read.number("VESPA_REQUEST_LOG_MAX_PER_SECOND",
                                               d.request_log_max_per_second, allow_zero=True),
        logs_token=read.get("VESPA_LOGS_TOKEN", str, "a token", d.logs_token),
        admit_on_backend_queue=read.flag("VESPA_ADMIT_ON_BACKEND_QUEUE",
                                         d.admit_on_backend_queue),
        backend_queue_limit=read.integer("VESPA_BACKEND_QUEUE_LIMIT", d.backend_queue_limit,
                                         minimum=0),
        insight_interval=read.number("VESPA_INSIGHT_INTERVAL", d.insight_interval),
    )
    return dataclasses.replace(settings, unknown_settings=read.unknown())
