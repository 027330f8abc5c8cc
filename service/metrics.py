"""Prometheus metrics, in a registry owned by one app instance (no process-global state)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

from .heap import GcPauses

__all__ = ["Metrics"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """All series the service exports; `adapter` labels use the adapter name or the base name."""

    def __init__(self, engine: bool = True) -> None:
        """`engine` False (the Ray ingress, which forwards requests and runs no engine): only the request,
        process and GC series are exported; the engine's (batches, adapters, tiers) are made but not exported."""
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "lokr_requests", "HTTP requests by route, adapter and status", ["route", "adapter", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "lokr_request_latency_seconds", "End-to-end request latency", ["route"], buckets=_LATENCY,
            registry=self.registry,
        )  # fmt: skip
        r = self.registry if engine else CollectorRegistry()
        self.ttft = Histogram(
            "lokr_time_to_first_token_seconds",
            "Time to first generated token",
            ["adapter"],
            buckets=_LATENCY,
            registry=r,
        )
        self.tokens = Counter("lokr_tokens", "Tokens processed", ["kind", "adapter"], registry=r)
        self.images = Counter(
            "lokr_images", "Images denoised to their last step (image pipelines; the hires fix's two passes: two)",
            ["adapter"], registry=r,
        )  # fmt: skip
        self.denoiser_steps = Counter(
            "lokr_denoiser_steps", "Denoiser forwards run for images, finished or cancelled (image pipelines)",
            ["adapter"], registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "lokr_batch_size", "Rows per engine batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.queue_depth = Gauge("lokr_queue_depth", "Jobs waiting for the engine", registry=r)
        self.adapters_registered = Gauge("lokr_adapters_registered", "Adapters that requests may name", registry=r)
        self.adapters_resident = Gauge(
            "lokr_adapters_resident", "Adapters attached to the model (device tier)", registry=r
        )
        self.adapters_host = Gauge("lokr_adapters_host", "Adapters offloaded to host memory", registry=r)
        self.adapter_cache = Counter(
            "lokr_adapter_cache", "Adapter tier events: hit, miss_host, miss_disk, evict_device, evict_host",
            ["event"], registry=r,
        )  # fmt: skip
        self.adapter_bytes = Gauge(
            "lokr_adapter_bytes", "Bytes of adapter tensors attached to the model, stacked copies included", registry=r
        )
        self.adapter_loads = Counter("lokr_adapter_loads", "Adapter loads by result", ["result"], registry=r)
        self.adapter_unloads = Counter("lokr_adapter_unloads", "Adapter unloads", registry=r)
        self.engine_seconds = Counter(
            "lokr_engine_seconds", "Engine thread wall time by work: step (forwards) or command (attach, offload, ...)",
            ["work"], registry=r,
        )  # fmt: skip
        self.gc_pauses = GcPauses(self.registry)  # counted while the app runs (its lifespan installs the callback)
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
        PlatformCollector(registry=self.registry)  # python_info

    def forget_adapter(self, name: str) -> None:
        """Drop every series labelled with adapter `name` (it was unloaded): a fleet that churns thousands of
        adapters would otherwise export their series forever. A scrape sees the counts reset if it loads again."""
        for metric, labelnames in self._per_adapter():
            for values in _label_values(metric, labelnames, adapter=name):
                metric.remove(*values)

    def _per_adapter(self) -> tuple[tuple[MetricWrapperBase, tuple[str, ...]], ...]:
        return (
            (self.requests, ("route", "adapter", "status")),
            (self.ttft, ("adapter",)),
            (self.tokens, ("kind", "adapter")),
            (self.images, ("adapter",)),
            (self.denoiser_steps, ("adapter",)),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _label_values(metric: MetricWrapperBase, labelnames: tuple[str, ...], **match: str) -> set[tuple[str, ...]]:
    """The label values (in `labelnames` order) of `metric`'s series whose labels include `match`."""
    found = set()
    for family in metric.collect():
        for sample in family.samples:
            if all(sample.labels.get(k) == v for k, v in match.items()):
                found.add(tuple(sample.labels[n] for n in labelnames))
    return found
