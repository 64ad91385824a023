"""Prometheus metrics of the ingress replica (served at GET /metrics).

Per-stage figures travel back with each response (timings, queue wait, batch size, cache hits), so the ingress
records them for every stage without the stages exporting metrics of their own. Each ingress replica counts its
own requests: with several, scrape each (or sum them); Ray's metrics port on every node (the PodMonitor in k8s/)
carries Serve's own per-deployment request, error, latency and queue metrics for every stage.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from .schemas import GenerateResponse

REGISTRY = CollectorRegistry()
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

HTTP_REQUESTS = Counter("instantid_http_requests", "HTTP requests by route and status code",
                        ["route", "code"], registry=REGISTRY)
HTTP_LATENCY = Histogram("instantid_http_latency_seconds", "HTTP request latency", ["route"],
                         buckets=LATENCY_BUCKETS, registry=REGISTRY)
STAGE_LATENCY = Histogram("instantid_stage_latency_seconds", "Time spent in each stage", ["stage"],
                          buckets=LATENCY_BUCKETS, registry=REGISTRY)
BATCH_SIZE = Histogram("instantid_denoiser_batch_images", "Images in the denoiser batch a request ran in",
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16), registry=REGISTRY)
IMAGES = Counter("instantid_images_generated", "Images generated", registry=REGISTRY)
CACHE_LOOKUPS = Counter("instantid_cache_lookups", "Face and prompt cache lookups", ["stage", "result"],
                        registry=REGISTRY)
REQUEST_ERRORS = Counter("instantid_request_errors", "Failed generate requests (HTTP and handle) by error code",
                         ["code"], registry=REGISTRY)


def observe_http(route: str, code: int, seconds: float) -> None:
    HTTP_REQUESTS.labels(route=route, code=str(code)).inc()
    HTTP_LATENCY.labels(route=route).observe(seconds)


def observe_response(response: GenerateResponse) -> None:
    for stage, ms in response.timings_ms.items():
        STAGE_LATENCY.labels(stage=stage).observe(ms / 1000)
    BATCH_SIZE.observe(response.batch_size)
    IMAGES.inc(len(response.images))
    for stage, hit in response.cache_hits.items():
        CACHE_LOOKUPS.labels(stage=stage, result="hit" if hit else "miss").inc()


def observe_error(code: str) -> None:
    REQUEST_ERRORS.labels(code=code).inc()
