"""The server's Prometheus metrics (GET /metrics): requests and errors by route and status, the queue of accepted
requests waiting for a model replica, the images per pipeline call (batch sizes), the time per pipeline stage and
per request. Kept by the ingress, which sees every request; with several ingress replicas, each reports its own
(scrape each, as Prometheus does for any replicated service)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# Stage buckets span a tiny model's milliseconds to a full-size CPU generation's minutes.
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
# The pipeline timings reported as stages (pipelines/timing.py's names; the per-step figures are not stages).
STAGES = ("text_encoder", "unet", "unet_shallow", "vae_encode", "vae_decode", "depth_estimator",
          "scheduler_and_glue", "total")
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """Counters, a gauge and histograms in their own registry (not the process-wide one, which Ray's own metrics
    use)."""

    def __init__(self):
        disable_created_metrics()  # the `_created` series (start times) only double the text
        self.registry = CollectorRegistry()
        self.requests = Counter("diffship_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=self.registry)
        self.errors = Counter("diffship_errors", "requests answered with an error, by route and kind",
                              ["route", "kind"], registry=self.registry)
        self.retries = Counter("diffship_retries", "model calls sent again because the replica running them died",
                               registry=self.registry)
        self.images = Counter("diffship_images", "images generated", registry=self.registry)
        self.queue_length = Gauge("diffship_queue_length",
                                  "accepted generation requests waiting for a model replica's answer (queued or "
                                  "running)", registry=self.registry)
        self.batch_size = Histogram("diffship_batch_size", "images in the pipeline call a request ran in",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.stage_seconds = Histogram("diffship_stage_seconds",
                                       "seconds per pipeline stage of the call a request ran in", ["stage"],
                                       buckets=SECONDS_BUCKETS, registry=self.registry)
        self.request_seconds = Histogram("diffship_request_seconds", "seconds from request to answer, by route",
                                         ["route"], buckets=SECONDS_BUCKETS, registry=self.registry)

    def answered(self, route: str, status: int, seconds: float, error_kind: str | None = None) -> None:
        self.requests.labels(route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)
        if error_kind is not None:
            self.errors.labels(route, error_kind).inc()

    def generated(self, images: int, batch_size: int, timings: dict) -> None:
        self.images.inc(images)
        self.batch_size.observe(batch_size)
        for stage in STAGES:
            if stage in timings:
                self.stage_seconds.labels(stage).observe(timings[stage])

    def text(self) -> bytes:
        return generate_latest(self.registry)
