"""Each stage's own metrics, through `ray.serve.metrics`: Ray tags every series with `application`, `deployment` and
`replica` and exports it on Ray's metrics port of the node (the PodMonitor in k8s/ scrapes every Ray pod), so
figures add up across replicas and no stage is missing. Nothing is served on the public HTTP port.

Names are `instantid_*` with their unit; Ray's exporter prefixes them `ray_` and counters get `_total`, so the
dashboard and the alerts query `ray_instantid_*` (EXPORTED lists every exported name; tests/test_operator.py
scrapes a live app and checks that each name the dashboard and the alerts use is there). Histograms reach the
request timeout (Serve's `request_timeout_s`, 330 s), so a slow request lands in a bucket, not only in `+Inf`.

A stage creates its metrics in its constructor (one StageMetrics per replica): Ray's metric objects belong to the
worker process that records them.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from ray.serve import metrics as serve_metrics

# Seconds: from a cached prompt (ms) to SDXL at 1024 px on a busy GPU (minutes), up to stage_timeout_s (300) and
# Serve's request_timeout_s (330).
LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 240, 300, 330]
STEP_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30]
BATCH_BUCKETS_IMAGES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32]
# Cosine similarity to the reference: ArcFace-style recognisers put the same person above ~0.3-0.4, others near 0.
# Ray takes positive boundaries only: a negative score lands in the first bucket (le 0.05), as it should.
IDENTITY_BUCKETS = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]

# Exported names (after Ray's `ray_` prefix and the `_total` of counters; histograms add _bucket/_sum/_count).
EXPORTED = {
    "ray_instantid_stage_requests_total": "calls each stage handled, by `code` (ok or the error code)",
    "ray_instantid_stage_latency_seconds": "time in each stage's own work (histogram)",
    "ray_instantid_http_requests_total": "HTTP requests at the Ingress by `route` and status `code`",
    "ray_instantid_request_latency_seconds": "end-to-end request time at the Ingress by `route` (histogram)",
    "ray_instantid_denoiser_queue_wait_seconds": "time a request waited for its GPU batch to start (histogram)",
    "ray_instantid_denoiser_batch_images": "images in each GPU batch (histogram)",
    "ray_instantid_denoiser_step_seconds": "seconds per denoising step of a batch (histogram)",
    "ray_instantid_images_generated_total": "images the Denoiser produced",
    "ray_instantid_cache_lookups_total": "face and prompt cache lookups by `result` (hit, miss)",
    "ray_instantid_gpu_memory_allocated_bytes": "GPU memory held by the replica's tensors (0 on CPU; `device`)",
    "ray_instantid_gpu_memory_reserved_bytes": "GPU memory reserved by the replica's allocator (0 on CPU)",
    "ray_instantid_rate_limit_fallbacks_total": "rate-limit checks an Ingress replica made on its own buckets "
                                                "because the shared ones (Redis) did not answer",
    "ray_instantid_jobs_queued": "async jobs waiting in the queue (every JobConsumer replica reports the same "
                                 "figure: aggregate with max)",
    "ray_instantid_jobs_running": "async jobs running (from the job records; aggregate with max)",
    "ray_instantid_jobs_oldest_queued_age_seconds": "how long the oldest queued job has waited (0: none queued)",
    "ray_instantid_safety_checked_images_total": "images the safety checker looked at, by `mode`",
    "ray_instantid_safety_flagged_images_total": "images the safety checker flagged, by `mode` (block: not "
                                                 "written, blur: written blurred, flag: written marked)",
    "ray_instantid_identity_score": "identity score (cosine to the reference) of every candidate image the "
                                    "scorer found a face in, by `same_model` (histogram)",
    "ray_instantid_identity_no_face_images_total": "candidate images in which the scorer found no face",
}


def _counter(name: str, *tag_keys: str) -> serve_metrics.Counter:
    """Counter `name`, described by its EXPORTED entry (Ray exports it as `ray_<name>_total`)."""
    return serve_metrics.Counter(name, description=EXPORTED[f"ray_{name}_total"], tag_keys=tag_keys)


def _histogram(name: str, boundaries: list[float], *tag_keys: str) -> serve_metrics.Histogram:
    return serve_metrics.Histogram(name, description=EXPORTED[f"ray_{name}"], boundaries=boundaries, tag_keys=tag_keys)


def _gauge(name: str, *tag_keys: str) -> serve_metrics.Gauge:
    return serve_metrics.Gauge(name, description=EXPORTED[f"ray_{name}"], tag_keys=tag_keys)


class StageMetrics:
    """Requests by outcome and latency of one stage, recorded by that stage's replica."""

    def __init__(self) -> None:
        self.requests = _counter("instantid_stage_requests", "code")
        self.latency = _histogram("instantid_stage_latency_seconds", LATENCY_BUCKETS_S)

    @contextmanager
    def track(self) -> Iterator[None]:
        """Time the block; count it as `ok`, or as the error code of what it raised (then re-raise)."""
        started = time.perf_counter()
        code = "ok"
        try:
            yield
        except BaseException as exc:  # CancelledError too: a caller that went away is not an `ok`
            code = getattr(exc, "code", None) or type(exc).__name__
            raise
        finally:
            self.requests.inc(tags={"code": code})
            self.latency.observe(time.perf_counter() - started)


class CacheMetrics:
    def __init__(self) -> None:
        self.lookups = _counter("instantid_cache_lookups", "result")

    def lookup(self, hit: bool) -> None:
        self.lookups.inc(tags={"result": "hit" if hit else "miss"})


class DenoiserMetrics:
    def __init__(self, device: str) -> None:
        self.device = device
        self.queue_wait = _histogram("instantid_denoiser_queue_wait_seconds", LATENCY_BUCKETS_S)
        self.batch_images = _histogram("instantid_denoiser_batch_images", BATCH_BUCKETS_IMAGES)
        self.step_seconds = _histogram("instantid_denoiser_step_seconds", STEP_BUCKETS_S)
        self.images = _counter("instantid_images_generated")
        self.gpu_allocated = _gauge("instantid_gpu_memory_allocated_bytes", "device")
        self.gpu_reserved = _gauge("instantid_gpu_memory_reserved_bytes", "device")
        self.record_gpu_memory()

    def batch(self, images: int, queue_waits_s: list[float], seconds: float, steps: int | None) -> None:
        self.batch_images.observe(images)
        for wait in queue_waits_s:
            self.queue_wait.observe(max(wait, 0.0))
        if steps:
            self.step_seconds.observe(seconds / steps)
        self.images.inc(images)
        self.record_gpu_memory()

    def record_gpu_memory(self) -> None:
        allocated = reserved = 0
        if self.device.startswith("cuda"):
            import torch

            allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        self.gpu_allocated.set(allocated, tags={"device": self.device})
        self.gpu_reserved.set(reserved, tags={"device": self.device})


class IngressMetrics:
    def __init__(self) -> None:
        self.http_requests = _counter("instantid_http_requests", "route", "code")
        self.request_latency = _histogram("instantid_request_latency_seconds", LATENCY_BUCKETS_S, "route")

    def http(self, route: str, code: int, seconds: float) -> None:
        self.http_requests.inc(tags={"route": route, "code": str(code)})
        self.request_latency.observe(seconds, tags={"route": route})


class JobsMetrics:
    """The job backlog as gauges, set by each JobConsumer replica from the job records (the same figure from every
    replica, so dashboards and alerts take the max; an Ingress-side count would vanish with scale-to-zero)."""

    def __init__(self) -> None:
        self.queued = _gauge("instantid_jobs_queued")
        self.running = _gauge("instantid_jobs_running")
        self.oldest_age = _gauge("instantid_jobs_oldest_queued_age_seconds")

    def backlog(self, queued: int, running: int, oldest_queued_age_s: float) -> None:
        self.queued.set(queued)
        self.running.set(running)
        self.oldest_age.set(oldest_queued_age_s)


class SafetyMetrics:
    """Images checked and flagged by the SafetyChecker replica (a flag rate is flagged / checked)."""

    def __init__(self) -> None:
        self.checked_images = _counter("instantid_safety_checked_images", "mode")
        self.flagged_images = _counter("instantid_safety_flagged_images", "mode")

    def checked(self, flagged: list[bool], mode: str) -> None:
        if flagged:
            self.checked_images.inc(len(flagged), tags={"mode": mode})
        if any(flagged):
            self.flagged_images.inc(sum(flagged), tags={"mode": mode})


class IdentityMetrics:
    """Identity scores of the images a FaceAnalysis replica scored (Ray tags them with the deployment)."""

    def __init__(self) -> None:
        self.scores = _histogram("instantid_identity_score", IDENTITY_BUCKETS, "same_model")
        self.no_face = _counter("instantid_identity_no_face_images")

    def scored(self, scores: list[float | None], same_model: bool) -> None:
        for score in scores:
            if score is None:
                self.no_face.inc()
            else:
                self.scores.observe(score, tags={"same_model": str(same_model).lower()})


class AccessMetrics:
    def __init__(self) -> None:
        self.fallbacks = _counter("instantid_rate_limit_fallbacks")

    def fallback(self) -> None:
        self.fallbacks.inc()
