"""Prometheus metrics for the HTTP server, in a registry of their own (never the global one).

=====================================================  ===========================================
``imagerouter_http_requests_total``                    requests by ``endpoint``, ``method``, ``status``
``imagerouter_http_request_duration_seconds``          latency histogram by ``endpoint``
``imagerouter_errors_total``                           error answers by ``error`` (the error class)
``imagerouter_cost_usd_total``                         actual USD billed, by ``provider``
``imagerouter_images_total``                           images served, by ``provider``
``imagerouter_generations_total``                      successful generations by ``provider``, ``model``
=====================================================  ===========================================

Labels never carry prompts, keys or key names.
"""

from __future__ import annotations

from decimal import Decimal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class ServerMetrics:
    """The server's counters and histograms; :meth:`render` gives the text exposition format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter("imagerouter_http_requests", "HTTP requests answered.",
                                ("endpoint", "method", "status"), registry=self.registry)
        self.latency = Histogram("imagerouter_http_request_duration_seconds", "Time to answer a request.",
                                 ("endpoint",), buckets=_BUCKETS, registry=self.registry)
        self.errors = Counter("imagerouter_errors", "Error answers by error class.", ("error",),
                              registry=self.registry)
        self.cost = Counter("imagerouter_cost_usd", "Actual cost billed by providers, in USD.", ("provider",),
                            registry=self.registry)
        self.images = Counter("imagerouter_images", "Images served.", ("provider",), registry=self.registry)
        self.generations = Counter("imagerouter_generations", "Successful generations.", ("provider", "model"),
                                   registry=self.registry)

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def observe_error(self, error: str) -> None:
        self.errors.labels(error).inc()

    def observe_generation(self, provider: str, model: str, images: int, cost_usd: Decimal) -> None:
        self.generations.labels(provider, model).inc()
        self.images.labels(provider).inc(images)
        self.cost.labels(provider).inc(float(cost_usd))

    def render(self) -> bytes:
        """Every metric in Prometheus' text format."""
        return generate_latest(self.registry)


__all__ = ["ServerMetrics"]
