"""Every Vespa setting in one typed, validated object.

The only module that reads ``os.environ``. Settings come from the environment and an optional
``.env`` file (python-dotenv; real environment variables win). A bad value raises ``ConfigError``
naming the variable and what it accepts; ``vespa.app.main`` turns that into one line and exit 2.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

from dotenv import dotenv_values

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A setting has a value Vespa cannot use."""

    def __init__(self, name: str, value: str, accepts: str):
        super().__init__(f"invalid {name}={value!r}: expected {accepts}")
        self.name = name


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
    connect_timeout: float = 5.0
    drain_timeout: float = 30.0
    connection_limit: int = 256
    healthcheck_endpoint: str = "/health"
    healthcheck_interval: float = 10.0
    ready_timeout_initial: float = 1200.0
    ready_timeout_resume: float = 300.0
    log_level: str = "INFO"

    @property
    def concurrency_limit(self) -> int | None:
        """How many requests may run at once; None means no limit."""
        if not self.allow_parallel:
            return 1
        return self.max_concurrency


class _Reader:
    """Reads one variable at a time from a mapping, converting and validating it."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def raw(self, *names: str) -> tuple[str, str] | None:
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
    return Settings(
        backend_url=read.get("VESPA_BACKEND_URL", _parse_url, "an http:// or https:// URL",
                             d.backend_url),
        host=read.get("VESPA_WORKER_HOST", str, "a host address", d.host),
        worker_port=read.integer(("VESPA_WORKER_PORT", "WORKER_PORT"), d.worker_port,
                                 minimum=1, maximum=65535),
        unsecured=read.flag("VESPA_UNSECURED", d.unsecured),
        allow_parallel=read.flag("VESPA_ALLOW_PARALLEL", d.allow_parallel),
        max_concurrency=read.integer("VESPA_MAX_CONCURRENCY", d.max_concurrency),
        max_wait_time=read.number("VESPA_MAX_WAIT_TIME", d.max_wait_time),
        max_throughput=read.number("VESPA_MAX_THROUGHPUT", d.max_throughput),
        default_cost=read.number("VESPA_DEFAULT_COST", d.default_cost),
        blocked_paths=read.get("VESPA_BLOCKED_PATHS", _parse_patterns,
                               "comma-separated path patterns", d.blocked_paths),
        max_body_bytes=read.integer("VESPA_MAX_BODY_BYTES", d.max_body_bytes),
        request_timeout=read.number("VESPA_REQUEST_TIMEOUT", d.request_timeout),
        connect_timeout=read.number("VESPA_CONNECT_TIMEOUT", d.connect_timeout),
        drain_timeout=read.number("VESPA_DRAIN_TIMEOUT", d.drain_timeout, allow_zero=True),
        connection_limit=read.integer("VESPA_CONNECTION_LIMIT", d.connection_limit),
        healthcheck_endpoint=read.get("VESPA_HEALTHCHECK_ENDPOINT", _parse_path,
                                      "a path starting with /", d.healthcheck_endpoint),
        healthcheck_interval=read.number("VESPA_HEALTHCHECK_INTERVAL", d.healthcheck_interval),
        ready_timeout_initial=read.number("VESPA_READY_TIMEOUT_INITIAL",
                                          d.ready_timeout_initial),
        ready_timeout_resume=read.number("VESPA_READY_TIMEOUT_RESUME", d.ready_timeout_resume),
        log_level=read.get("VESPA_LOG_LEVEL", _parse_level, "one of " + ", ".join(_LOG_LEVELS),
                           d.log_level),
    )
