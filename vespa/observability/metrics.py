"""Prometheus metrics: plain counters on the request path, turned into metric families at scrape time.

The hot path only bumps dict entries and fixed-bucket arrays (no locks, no label lookups); a custom
collector on a private ``CollectorRegistry`` exposes them as ``vespa_*`` families. Routes are
mapped to a fixed set of templates so labels stay low-cardinality.
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import math
import re
from bisect import bisect_left
from typing import Callable, Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from ..corridor.refusal import Reason
from ..corridor.sessions import Sessions

log = logging.getLogger("vespa.metrics")

DEFAULT_ROUTES: tuple[str, ...] = (
    # OpenAI-compatible servers (vLLM, TGI, llama.cpp, ...)
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/models/*",
    "/v1/audio/speech", "/v1/audio/transcriptions", "/v1/audio/translations",
    "/v1/images/generations", "/v1/responses", "/v1/rerank", "/rerank", "/v1/score", "/score",
    "/tokenize", "/detokenize", "/pooling", "/classify", "/invocations", "/version",
    # TTS servers
    "/synthesize", "/tts", "/voices", "/voices/*",
    # TGI and friends
    "/generate", "/generate_stream", "/info",
    # ComfyUI
    "/prompt", "/history", "/history/*", "/queue", "/view", "/upload/*", "/object_info",
    "/system_stats", "/ws",
    # health and metrics of the backend itself
    "/health", "/healthz", "/ping", "/metrics", "/",
)
OTHER_ROUTE = "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
OTHER_METHOD = "OTHER"
REPORT_KINDS = ("worker_status", "delete_requests")
# Upstream latency spans a 1 ms health check to a minutes-long generation.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0, 120.0, 300.0)
ROUTE_CACHE_LIMIT = 10_000

Gauge = Callable[[], float]


@functools.lru_cache(maxsize=32)
def compiled_routes(templates: tuple[str, ...]) -> re.Pattern:
    """One regex for all templates; the group named ``t{i}`` matches template ``i`` (named:
    fnmatch's own patterns hold numbered groups on Python 3.10)."""
    return re.compile("|".join(f"(?P<t{i}>{fnmatch.translate(t)})"
                               for i, t in enumerate(templates)))


def route_template(path: str, templates: Sequence[str] = DEFAULT_ROUTES) -> str:
    """The first fnmatch template that ``path`` (query and trailing slash ignored) matches,
    else ``"other"``."""
    path = path.partition("?")[0]
    if len(path) > 1:
        path = path.rstrip("/") or "/"
    templates = tuple(templates)
    if not templates:
        return OTHER_ROUTE
    match = compiled_routes(templates).match(path)
    if match is None or match.lastgroup is None:
        return OTHER_ROUTE
    return templates[int(match.lastgroup[1:])]


class Histogram:
    """Fixed buckets, non-cumulative counts (the last one is +Inf), and a sum; observed by
    ``counts[bisect_left(bounds, value)] += 1; total += value``."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS):
        self.bounds = list(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def cumulative(self) -> list[tuple[str, int]]:
        buckets, running = [], 0
        for bound, count in zip(self.bounds + [math.inf], self.counts):
            running += count
            buckets.append((floatToGoString(bound), running))
        return buckets


class Metrics:
    """The worker's counters. Hot-path methods cost well under a microsecond."""

    def __init__(self, routes: Iterable[str] = DEFAULT_ROUTES, *,
                 in_flight: Gauge | None = None, queued: Gauge | None = None,
                 estimated_wait: Gauge | None = None, throughput: Gauge | None = None,
                 buckets: Sequence[float] = LATENCY_BUCKETS):
        self.routes = tuple(routes)
        self.route_cache: dict[str, str] = {}
        self.requests: dict[tuple[str, str, int], int] = {}
        self.rejections = {reason: 0 for reason in Reason}
        self.reports = {(kind, ok): 0 for kind in REPORT_KINDS for ok in (True, False)}
        self.backend_restarts = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.upstream_latency = Histogram(buckets)
        self.upstream_ttfb = Histogram(buckets)
        # gauges read at scrape time; the owner may also assign these attributes later
        self.in_flight = in_flight
        self.queued = queued
        self.estimated_wait = estimated_wait
        self.throughput = throughput
        self.sessions: Sessions | None = None  # read at scrape time, when sessions are served
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MetricsCollector(self))

    # -- the hot path --------------------------------------------------------------------------
    def request_done(self, method: str, path: str, status: int,
                     upstream_seconds: float | None, ttfb_seconds: float | None,
                     bytes_in: int, bytes_out: int) -> None:
        """One request answered (relayed or refused). ``path`` is the raw request path; it is
        mapped to a route template here (cached)."""
        route = self.route_cache.get(path)
        if route is None:
            route = self.learn_route(path)
        if method not in METHODS:
            method = OTHER_METHOD
        key = (method, route, status)
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        # histogram observations inlined: a method call each would cost more than the update
        if upstream_seconds is not None:
            histogram = self.upstream_latency
            histogram.counts[bisect_left(histogram.bounds, upstream_seconds)] += 1
            histogram.total += upstream_seconds
        if ttfb_seconds is not None:
            histogram = self.upstream_ttfb
            histogram.counts[bisect_left(histogram.bounds, ttfb_seconds)] += 1
            histogram.total += ttfb_seconds
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def rejected(self, reason: Reason) -> None:
        """A request the worker answered itself (``corridor.refusal``), by its reason."""
        self.rejections[reason] += 1

    def report(self, kind: str, ok: bool) -> None:
        """One report to the autoscaler sent (ok) or given up on (failed)."""
        key = (kind if kind in REPORT_KINDS else "other", bool(ok))
        self.reports[key] = self.reports.get(key, 0) + 1

    def backend_restart(self) -> None:
        self.backend_restarts += 1

    def learn_route(self, path: str) -> str:
        cache = self.route_cache
        if len(cache) >= ROUTE_CACHE_LIMIT:
            cache.clear()
        route = cache[path] = route_template(path, self.routes)
        return route

    # -- scraping ------------------------------------------------------------------------------
    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The body and its content type in the format the scraper's Accept header asks for
        (Prometheus text 0.0.4 when it names none, OpenMetrics when it asks)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def read_gauge(name: str, source: Gauge | None) -> float | None:
    if source is None:
        return 0.0
    try:
        value = source()
    except Exception:  # a broken gauge must not break the scrape
        log.exception("metrics: gauge %s failed", name)
        return None
    return 0.0 if value is None else float(value)


class MetricsCollector:
    """Turns a ``Metrics`` into metric families at scrape time."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        m = self.metrics
        requests = CounterMetricFamily("vespa_requests", "Requests answered by the worker, by "
                                       "method, route template and status.",
                                       labels=["method", "route", "status"])
        for (method, route, status), count in list(m.requests.items()):
            requests.add_metric([method, route, str(status)], count)
        yield requests
        for name, source, text in (
                ("vespa_requests_in_flight", m.in_flight, "Requests admitted and not finished "
                 "(running or queued)."),
                ("vespa_requests_queued", m.queued, "Requests waiting for a concurrency slot."),
                ("vespa_estimated_wait_seconds", m.estimated_wait, "Estimated wait of a new "
                 "request before it starts."),
                ("vespa_benchmark_throughput", m.throughput, "Measured backend throughput "
                 "(max_perf, workload per second).")):
            value = read_gauge(name, source)
            if value is not None:
                yield GaugeMetricFamily(name, text, value=value)
        rejected = CounterMetricFamily("vespa_rejected", "Requests the worker answered itself "
                                       "instead of the backend, by reason.", labels=["reason"])
        for reason, count in list(m.rejections.items()):
            rejected.add_metric([reason.value], count)
        yield rejected
        for name, histogram, text in (
                ("vespa_upstream_latency_seconds", m.upstream_latency,
                 "Time from sending a request upstream to the end of its response."),
                ("vespa_upstream_ttfb_seconds", m.upstream_ttfb,
                 "Time from sending a request upstream to the first byte of its response.")):
            family = HistogramMetricFamily(name, text)
            family.add_metric([], histogram.cumulative(), sum_value=histogram.total)
            yield family
        relayed = CounterMetricFamily("vespa_bytes_relayed", "Body bytes relayed: in = client "
                                      "to backend, out = backend to client.",
                                      labels=["direction"])
        relayed.add_metric(["in"], m.bytes_in)
        relayed.add_metric(["out"], m.bytes_out)
        yield relayed
        reports = CounterMetricFamily("vespa_autoscaler_reports", "Reports to the autoscaler, "
                                      "by kind and result.", labels=["kind", "result"])
        for (kind, ok), count in list(m.reports.items()):
            reports.add_metric([kind, "ok" if ok else "failed"], count)
        yield reports
        yield CounterMetricFamily("vespa_backend_restarts", "Times the supervised backend "
                                  "process was restarted.", value=m.backend_restarts)
        if m.sessions is not None:
            yield GaugeMetricFamily("vespa_sessions_open", "Sessions open now.",
                                    value=len(m.sessions.open))
            yield CounterMetricFamily("vespa_sessions_created", "Sessions created.",
                                      value=m.sessions.created)
            ended = CounterMetricFamily("vespa_sessions_ended", "Sessions ended, by how: by "
                                        "the client (ended), by expiry, by the drain.",
                                        labels=["how"])
            for how, count in list(m.sessions.ends.items()):
                ended.add_metric([how], count)
            yield ended
