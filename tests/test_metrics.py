"""Metrics: values after a known sequence of calls, parsed back from the exposition text;
route templates keep labels low-cardinality; histogram buckets and sums."""

from __future__ import annotations

import random
import string

import pytest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from vespa.corridor.refusal import Reason
from vespa.observability import metrics as metrics_module
from vespa.observability.metrics import DEFAULT_ROUTES, LATENCY_BUCKETS, Metrics, route_template


def scrape(metrics: Metrics) -> dict[tuple[str, tuple], float]:
    """The exposition as {(sample name, sorted labels): value}."""
    body, content_type = metrics.exposition()
    assert content_type == CONTENT_TYPE_PLAIN_0_0_4  # what Prometheus 2 and 3 both read
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def labels(**values: str) -> tuple:
    return tuple(sorted(values.items()))


def test_counters_after_a_known_sequence_of_calls():
    m = Metrics()
    m.request_done("POST", "/v1/chat/completions", 200, 0.2, 0.05, 100, 1000)
    m.request_done("POST", "/v1/chat/completions", 200, 0.3, 0.06, 50, 500)
    m.request_done("POST", "/v1/chat/completions", 429, None, None, 10, 0)
    m.request_done("GET", "/history/abc-123", 200, 0.01, 0.01, 0, 7)
    m.request_done("get", "/secret/user/42?token=x", 404, 0.01, 0.01, 0, 3)
    m.rejected(Reason.OVERLOAD)
    m.rejected(Reason.OVERLOAD)
    m.rejected(Reason.SIGNATURE)
    m.report("worker_status", True)
    m.report("worker_status", False)
    m.report("delete_requests", True)
    m.backend_restart()
    got = scrape(m)
    requests = {k[1]: v for k, v in got.items() if k[0] == "vespa_requests_total"}
    assert requests == {
        labels(method="POST", route="/v1/chat/completions", status="200"): 2,
        labels(method="POST", route="/v1/chat/completions", status="429"): 1,
        labels(method="GET", route="/history/*", status="200"): 1,
        labels(method="OTHER", route="other", status="404"): 1,
    }
    assert got[("vespa_rejected_total", labels(reason="overload"))] == 2
    assert got[("vespa_rejected_total", labels(reason="signature"))] == 1
    assert got[("vespa_rejected_total", labels(reason="draining"))] == 0  # present at zero
    rejected = {k[1] for k in got if k[0] == "vespa_rejected_total"}
    assert rejected == {labels(reason=reason.value) for reason in Reason}  # every one, no other
    assert got[("vespa_bytes_relayed_total", labels(direction="in"))] == 160
    assert got[("vespa_bytes_relayed_total", labels(direction="out"))] == 1510
    reports = ("vespa_autoscaler_reports_total")
    assert got[(reports, labels(kind="worker_status", result="ok"))] == 1
    assert got[(reports, labels(kind="worker_status", result="failed"))] == 1
    assert got[(reports, labels(kind="delete_requests", result="ok"))] == 1
    assert got[(reports, labels(kind="delete_requests", result="failed"))] == 0
    assert got[("vespa_backend_restarts_total", ())] == 1
    assert got[("vespa_upstream_latency_seconds_count", ())] == 4
    assert got[("vespa_upstream_latency_seconds_sum", ())] == pytest.approx(0.52)
    assert got[("vespa_upstream_ttfb_seconds_count", ())] == 4
    assert got[("vespa_upstream_ttfb_seconds_sum", ())] == pytest.approx(0.13)


def test_gauges_are_read_from_callables_at_scrape_time():
    state = {"in_flight": 3, "queued": 1, "wait": 2.5, "throughput": 0.0}
    m = Metrics(in_flight=lambda: state["in_flight"], queued=lambda: state["queued"],
                estimated_wait=lambda: state["wait"])
    m.throughput = lambda: state["throughput"]  # may be wired after construction
    got = scrape(m)
    assert got[("vespa_requests_in_flight", ())] == 3
    assert got[("vespa_requests_queued", ())] == 1
    assert got[("vespa_estimated_wait_seconds", ())] == 2.5
    assert got[("vespa_benchmark_throughput", ())] == 0
    state.update(in_flight=7, throughput=123.5)
    got = scrape(m)
    assert got[("vespa_requests_in_flight", ())] == 7
    assert got[("vespa_benchmark_throughput", ())] == 123.5


def test_a_failing_gauge_is_left_out_and_the_scrape_still_works():
    def broken():
        raise RuntimeError("no")

    m = Metrics(in_flight=broken, queued=lambda: 4)
    got = scrape(m)
    assert ("vespa_requests_in_flight", ()) not in got
    assert got[("vespa_requests_queued", ())] == 4


def test_every_family_has_help_text():
    body, _ = Metrics().exposition()
    families = list(text_string_to_metric_families(body.decode()))
    names = {f.name for f in families}
    assert names == {"vespa_requests", "vespa_requests_in_flight", "vespa_requests_queued",
                     "vespa_estimated_wait_seconds", "vespa_benchmark_throughput",
                     "vespa_rejected", "vespa_upstream_latency_seconds",
                     "vespa_upstream_ttfb_seconds", "vespa_bytes_relayed",
                     "vespa_autoscaler_reports", "vespa_backend_restarts"}
    assert all(f.documentation for f in families)


def test_histogram_bucket_counts_and_sum():
    m = Metrics(buckets=(0.1, 1.0, 10.0))
    for seconds in (0.05, 0.1, 0.5, 1.0, 2.0, 20.0, 30.0):
        m.request_done("POST", "/generate", 200, seconds, seconds / 10, 0, 0)
    got = scrape(m)
    bucket = "vespa_upstream_latency_seconds_bucket"
    # le is inclusive: 0.1 counts in the 0.1 bucket, 1.0 in the 1.0 bucket; counts cumulative
    assert got[(bucket, labels(le="0.1"))] == 2
    assert got[(bucket, labels(le="1.0"))] == 4
    assert got[(bucket, labels(le="10.0"))] == 5
    assert got[(bucket, labels(le="+Inf"))] == 7
    assert got[("vespa_upstream_latency_seconds_sum", ())] == pytest.approx(53.65)
    ttfb = "vespa_upstream_ttfb_seconds_bucket"
    assert got[(ttfb, labels(le="0.1"))] == 4  # 0.005, 0.01, 0.05, 0.1
    assert got[(ttfb, labels(le="+Inf"))] == 7


def test_default_buckets_are_sorted_and_span_milliseconds_to_minutes():
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)
    assert LATENCY_BUCKETS[0] <= 0.001 and LATENCY_BUCKETS[-1] >= 300


@pytest.mark.parametrize("path, expected", [
    ("/v1/chat/completions", "/v1/chat/completions"),
    ("/v1/chat/completions/", "/v1/chat/completions"),
    ("/v1/chat/completions?stream=true", "/v1/chat/completions"),
    ("/v1/models/SmolLM2", "/v1/models/*"),
    ("/history/8d0c", "/history/*"),
    ("/generate_stream", "/generate_stream"),
    ("/synthesize", "/synthesize"),
    ("/", "/"),
    ("/v1/chat/completionsX", "other"),
    ("/admin/users/42", "other"),
    ("", "other"),
])
def test_route_template(path, expected):
    assert route_template(path, DEFAULT_ROUTES) == expected


def test_route_template_uses_the_first_matching_configured_template():
    assert route_template("/api/v2/run/7", ["/api/*/run/*", "/api/*"]) == "/api/*/run/*"
    assert route_template("/api/x", ["/api/*/run/*", "/api/*"]) == "/api/*"
    assert route_template("/api/x", []) == "other"


def test_random_paths_give_only_templates_or_other():
    rng = random.Random(6)
    alphabet = string.ascii_letters + string.digits + "/-_.%"
    m = Metrics()
    for i in range(10_000):
        path = "/" + "".join(rng.choices(alphabet, k=rng.randint(1, 40)))
        if i % 3 == 0:
            path = "/history/" + path
        m.request_done(rng.choice(["GET", "POST", "BREW", "propfind"]), path, 200, None, None,
                       0, 0)
    routes = {route for (_, route, _) in m.requests}
    methods = {method for (method, _, _) in m.requests}
    assert routes <= set(DEFAULT_ROUTES) | {"other"}
    assert "/history/*" in routes and "other" in routes
    assert methods == {"GET", "POST", "OTHER"}
    assert sum(m.requests.values()) == 10_000
    assert len(m.route_cache) <= metrics_module.ROUTE_CACHE_LIMIT


def test_route_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(metrics_module, "ROUTE_CACHE_LIMIT", 100)
    m = Metrics()
    for i in range(1000):
        m.request_done("GET", f"/x/{i}", 200, None, None, 0, 0)
        assert len(m.route_cache) <= 100
    assert m.requests == {("GET", "other", 200): 1000}


def test_each_metrics_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.backend_restart()
    assert scrape(a)[("vespa_backend_restarts_total", ())] == 1
    assert scrape(b)[("vespa_backend_restarts_total", ())] == 0


def test_openmetrics_when_the_scraper_asks_for_it():
    metrics = Metrics()
    metrics.backend_restart()
    body, content_type = metrics.exposition(
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5")
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert b"vespa_backend_restarts_total 1.0" in body


def test_an_unknown_reason_cannot_be_written():
    """A refusal's reason is a ``Reason``: a typo is an error, never a silent "other"."""
    with pytest.raises(ValueError):
        Reason("made-up reason")
    # KeyError as plain Python; TypeError compiled (mypyc checks the argument's type)
    with pytest.raises((KeyError, TypeError)):
        Metrics().rejected("made-up reason")  # type: ignore[arg-type]
