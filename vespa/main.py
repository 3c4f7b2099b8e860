"""The worker process: settings, TLS, signals, and ``serve``: the worker's life in order."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
import socket
import ssl
import sys

from . import HOT_PATH
from .config import REPO_ROOT, ConfigError, Settings, load_settings
from .observability.logs import setup_logging
from .worker import Worker

log = logging.getLogger("vespa")


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if not settings.use_ssl:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(settings.ssl_cert, settings.ssl_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("VESPA_USE_SSL", "true",
                          f"a certificate at {settings.ssl_cert} and key at {settings.ssl_key} "
                          f"(VESPA_SSL_CERT, VESPA_SSL_KEY): {exc}") from None
    return context


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on now, or None. With SO_REUSEADDR, as the servers
    set it: a connection in TIME_WAIT does not count, a listener does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return "is taken (something already listens there)"
        return f"cannot be bound ({exc.strerror or exc})"
    return None


def check_ports(settings: Settings) -> None:
    """The worker's port and a launched backend's, free before anything starts: else one line
    naming the setting (exit 2), not a traceback once the backend is already up, nor a worker
    whose health checks reach whatever holds the backend's port."""
    wanted = [("VESPA_WORKER_PORT", settings.host, settings.worker_port)]
    if settings.backend is not None:
        wanted.append(("VESPA_BACKEND_PORT", "127.0.0.1", settings.backend_port))
    for name, host, port in wanted:
        problem = port_problem(host, port)
        if problem is not None:
            raise ConfigError(name, str(port), f"a port this worker can listen on: {port} "
                              f"{problem}; stop that, or set {name} to another port")


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """The worker's life, in order: build, start, listen, serve until ``stop``, drain, stop."""
    context = ssl_context(settings)
    worker = Worker(settings)
    try:
        await worker.start()
        await worker.listen(settings.host, settings.worker_port, context)
        # what start-up built lives as long as the process: keep it out of the GC's full
        # passes (each walked every module, class and setting: ~13 ms, several a second)
        gc.collect()  # start-up's own garbage goes first, not into the frozen generation
        gc.freeze()
        log.info("vespa listening on %s://%s:%d, backend %s%s; request path: %s",
                 "https" if context else "http", settings.host, settings.worker_port,
                 settings.backend_url, " (unsecured)" if settings.unsecured else "", HOT_PATH)
        await stop.wait()
        await worker.drain()
    finally:
        await worker.stop()


def run(settings: Settings) -> None:
    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(_main())
    else:
        uvloop.run(_main())


def checkout_on_path() -> None:
    """The checkout's ``benchmarks/`` (``VESPA_BENCHMARK``'s defaults) and ``backends/`` (the vLLM
    launcher) are not installed with the package: a worker run from a checkout imports them from
    the checkout's root whatever the working directory. Appended, so it shadows nothing."""
    if (REPO_ROOT / "benchmarks").is_dir() and str(REPO_ROOT) not in sys.path:
        sys.path.append(str(REPO_ROOT))


def main() -> None:
    checkout_on_path()
    try:
        settings = load_settings()
        ssl_context(settings)
        check_ports(settings)
    except ConfigError as exc:
        print(f"vespa: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings.log_level, settings.log_format,
                  secrets=settings.log_secrets)
    for warning in settings.unknown_settings:
        log.warning("%s", warning)
    run(settings)
