"""Reading the declared settings from the environment: the only module that reads ``os.environ``
(and an optional ``.env`` file), and the one that turns a bad value into ``ConfigError``."""

from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Any, Mapping

from dotenv import dotenv_values
from yarl import URL

from .kinds import BEARER
from .settings import (BENCHMARK_IDENTITY, CREDENTIALS, DECLARATIONS, DECLARED,
                       DEFAULT_BENCHMARKS, PUBLIC_IPADDR, SCRIPT_PREFIXES, SCRIPT_SETTINGS,
                       VAST_TCP_PORT, Setting, Settings)

_UNSET = object()
# vLLM's own key variable, read as the backend key the worker sends
VLLM_API_KEY = dataclasses.replace(next(s for s in CREDENTIALS if s.variable == "VLLM_API_KEY"),
                                   kind=BEARER)


class ConfigError(ValueError):
    """A setting has a value Vespa cannot use."""

    def __init__(self, name: str, value: str | None, accepts: str):
        # None: the value of a secret, not shown (the message goes to the terminal unmasked)
        shown = " (a secret: its value is not shown)" if value is None else f"={value!r}"
        super().__init__(f"invalid {name}{shown}: expected {accepts}")
        self.name = name


def environment(dotenv_path: str | None = ".env") -> dict[str, str]:
    """The process environment over the values of an optional ``.env`` file."""
    merged: dict[str, str] = {}
    if dotenv_path and os.path.isfile(dotenv_path):
        merged.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged.update(os.environ)
    return merged


class _Reader:
    """Reads declared settings from an environment mapping, converting and validating them."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env

    def given(self, setting: Setting) -> tuple[str, str] | None:
        """(variable, stripped text) of the first of our name and Vast's that is set."""
        for name in (setting.variable, *([setting.vast] if setting.vast else [])):
            value = self.env.get(name)
            if value is not None and value.strip() != "":
                return name, value.strip()
        return None

    def value(self, setting: Setting, default: Any = _UNSET) -> Any:
        """The setting's value; its declared default (or ``default``) when it is not set."""
        found = self.given(setting)
        if found is None:
            return setting.default if default is _UNSET else default
        name, text = found
        try:
            return setting.kind.parse(text)
        except (ValueError, TypeError):
            raise ConfigError(name, None if setting.secret else text,
                              setting.kind.accepts) from None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build ``Settings`` from ``env`` (default: the environment and ``.env``)."""
    read = _Reader(environment() if env is None else env)
    values = {name: read.value(setting) for name, setting in DECLARED.items()}
    backend = _backend(read, values["backend_command"])
    # TLS on a Vast instance unless told otherwise, as Vast's start-up has it
    use_ssl = read.value(DECLARED["use_ssl"], default=_on_vast(read))
    values.update(
        backend=backend,
        use_ssl=use_ssl,
        backend_url=_backend_url(read, backend, values["backend_url"], values["backend_port"]),
        # Without an autoscaler nobody signs requests: dev mode is unsecured unless told
        # otherwise; on a Vast instance only when told so
        unsecured=read.value(DECLARED["unsecured"],
                             default=not values["report_addrs"] and not _on_vast(read)),
        public_url=values["public_url"] or _vast_public_url(read, values["worker_port"],
                                                            use_ssl),
        # Vast's worker serves /session/end on the worker port + 1; off the platform, only when
        # asked (a port next to a test's or a laptop's worker may be anyone's)
        http_port=_http_port(read, values["http_port"], values["worker_port"]),
        benchmark=read.value(DECLARED["benchmark"], default=DEFAULT_BENCHMARKS.get(backend or "")),
        # a launched vLLM asks for VLLM_API_KEY when it is set: the worker then sends it
        backend_api_key=read.value(DECLARED["backend_api_key"], default=read.value(
            VLLM_API_KEY) if backend == "vllm" else None),
        backend_log=read.value(DECLARED["backend_log"], default=os.path.join(
            values["cache_dir"], "logs", f"{backend}.log") if backend else None),
        benchmark_identity={name: read.env[name] for name in BENCHMARK_IDENTITY
                            if read.env.get(name)},
        backend_env={name: value for name, value in read.env.items() if _handed_to_backend(name)},
        log_secrets=tuple(found[1] for setting in DECLARATIONS
                          if setting.secret and (found := read.given(setting))),
        unknown_settings=unknown_settings(read.env))
    _check_fail_open(read, values)
    return Settings(**values)


def _check_fail_open(read: _Reader, values: dict) -> None:
    """Refuse the configurations that would silently serve what they should refuse."""
    if values["unsecured"]:
        return
    if not values["report_addrs"]:  # on a Vast instance: nobody to sign or to report to
        raise ConfigError("REPORT_ADDR", "", "the autoscaler's address (Vast's platform sets "
                          "it), or VESPA_UNSECURED=true to serve unsigned requests on purpose")
    if not values["public_url"] and values["check_signed_url"]:
        raise ConfigError("VESPA_PUBLIC_URL", "", "this worker's public URL (or PUBLIC_IPADDR "
                          "and VAST_TCP_PORT_<port>), so that a request signed for another "
                          "worker is refused; or VESPA_CHECK_SIGNED_URL=false to accept any")


def _on_vast(read: _Reader) -> bool:
    """On a Vast instance: the platform set ``CONTAINER_ID``."""
    return bool(read.env.get("CONTAINER_ID", "").strip())


def _http_port(read: _Reader, port: int | None, worker_port: int) -> int | None:
    """The plain-HTTP session port: as set (0: off), else on a Vast instance the worker's + 1."""
    if port is not None:
        return port or None
    return worker_port + 1 if _on_vast(read) else None


def _backend(read: _Reader, command: tuple[str, ...]) -> str | None:
    """The backend Vespa launches: ``VESPA_BACKEND``, or ``command`` when only a command is
    given; None (``none``) fronts ``VESPA_BACKEND_URL``."""
    backend = read.value(DECLARED["backend"], default="command" if command else None)
    if backend == "command" and not command:
        raise ConfigError("VESPA_BACKEND_COMMAND", "", "a command line when VESPA_BACKEND=command")
    return None if backend == "none" else backend


def _backend_url(read: _Reader, backend: str | None, url: str, port: int) -> str:
    """A launched backend is on ``port`` here: a URL elsewhere would be silently ignored."""
    if backend is None:
        return url
    launched = f"http://127.0.0.1:{port}"
    given = read.given(DECLARED["backend_url"])
    if given is not None and not _is_local_port(url, port):
        raise ConfigError("VESPA_BACKEND_URL", given[1],
                          f"unset or {launched}, where VESPA_BACKEND={backend} launches the "
                          "backend (VESPA_BACKEND=none fronts a backend you run)")
    return launched


def _is_local_port(url: str, port: int) -> bool:
    """``url`` is plain http on this machine's loopback at ``port``."""
    parsed = URL(url)
    return parsed.scheme == "http" and parsed.port == port \
        and parsed.host in ("127.0.0.1", "localhost", "::1") and parsed.path in ("", "/")


def _vast_public_url(read: _Reader, port: int, use_ssl: bool) -> str:
    """The public URL from Vast's ``PUBLIC_IPADDR`` and ``VAST_TCP_PORT_<port>``, when both
    are set."""
    ip = read.value(PUBLIC_IPADDR)
    public_port = read.value(dataclasses.replace(VAST_TCP_PORT, variable=f"VAST_TCP_PORT_{port}"))
    if ip is None or public_port is None:
        return ""
    return f"{'https' if use_ssl else 'http'}://{ip}:{public_port}"


def _handed_to_backend(name: str) -> bool:
    return any(s.backend and s.matches(name) for s in DECLARATIONS)


def unknown_settings(env: Mapping[str, str]) -> tuple[str, ...]:
    """A warning for each VESPA_* variable set that nothing reads (a typo, or a setting Vespa
    does not have), with the closest declared name when there is one."""
    known = {s.variable for s in DECLARATIONS if not s.variable.endswith("*")} | SCRIPT_SETTINGS
    # compared without the common VESPA_ prefix, which makes every name look alike
    candidates = sorted(name[6:] for name in known if name.startswith("VESPA_"))
    warnings = []
    for name in sorted(env):
        if not name.startswith("VESPA_") or name in known or name.startswith(SCRIPT_PREFIXES) \
                or _handed_to_backend(name):
            continue
        close = difflib.get_close_matches(name[6:], candidates, n=1)
        warnings.append(f"{name} is not a Vespa setting and is ignored"
                        + (f" (did you mean VESPA_{close[0]}?)" if close else ""))
    return tuple(warnings)
