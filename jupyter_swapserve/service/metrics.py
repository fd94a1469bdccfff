"""Prometheus metrics of the swap service, in a registry of its own (no Jupyter imports).

Fed by the scheduler's observer hook (swaps, evictions, failures) and by the handlers (requests,
queue wait, time to first token); the gauges (memory per device, queue depth per model) are read
from the service's status when scraped, so they are never stale."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: seconds: a freeze takes milliseconds, a checkpoint of a large engine tens of seconds
SWAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
WAIT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

#: label value for a model name that is not configured (keeps label cardinality bounded)
KERNEL_LABEL = "kernel"
UNKNOWN_MODEL = "_unknown"


def swap_path(step_names: Iterable[str]) -> str:
    """How a swap moved the engine's memory, from the steps it ran: ``residual`` (engine sleep,
    what it keeps stays on the GPU), ``engine_aware`` (sleep, then checkpoint), ``checkpoint``
    (CUDA checkpoint/restore) or ``freeze`` (cgroup freeze only: virtual devices)."""
    names = set(step_names)
    slept = bool(names & {"sleep", "wake"})
    checkpointed = bool(names & {"checkpoint", "restore"})
    if slept and checkpointed:
        return "engine_aware"
    if slept:
        return "residual"
    if checkpointed:
        return "checkpoint"
    return "freeze"


def swap_event(what: str) -> tuple[str, bool, str | None]:
    """The scheduler's record label → (direction, ok, reason). E.g. ``"swap-out (preempted for b)"``
    → ``("out", True, "preempted for b")``; ``"swap-in failed"`` → ``("in", False, None)``."""
    direction = "in" if what.startswith("swap-in") else "out"
    ok = not (what.endswith("failed") or what.endswith("cancelled"))
    reason = None
    if "(" in what and what.endswith(")"):
        reason = what[what.index("(") + 1:-1]
    return direction, ok, reason


class _StatusGauges(Collector):
    """Gauges read at scrape time from ``status()`` (SwapService.status's shape)."""

    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterable[Metric]:
        status = self._status()
        capacity = GaugeMetricFamily("swapserve_device_capacity_bytes", "Device memory the service manages.",
                                     labels=["device"])
        reserved = GaugeMetricFamily("swapserve_device_reserved_bytes", "Device memory reserved for engines.",
                                     labels=["device"])
        used = GaugeMetricFamily("swapserve_device_used_bytes", "Device memory in use (NVML; virtual: reserved).",
                                 labels=["device"])
        for d in status.get("devices", []):
            label = [str(d["index"])]
            capacity.add_metric(label, float(d["capacity_gib"]) * 2**30)
            reserved.add_metric(label, float(d["reserved_gib"]) * 2**30)
            used_gib = d.get("used_gib")
            used.add_metric(label, float(d["reserved_gib"] if used_gib is None else used_gib) * 2**30)
        depth = GaugeMetricFamily("swapserve_queue_depth", "Requests waiting for a model.", labels=["model"])
        in_flight = GaugeMetricFamily("swapserve_in_flight", "Requests a model is serving.", labels=["model"])
        running = GaugeMetricFamily("swapserve_model_state", "1 for the model's current state.",
                                    labels=["model", "state"])
        for m in status.get("models", []):
            depth.add_metric([m["name"]], float(m["queue_depth"]))
            in_flight.add_metric([m["name"]], float(m["in_flight"]))
            running.add_metric([m["name"], m["state"]], 1.0)
        yield from (capacity, reserved, used, depth, in_flight, running)


class SwapMetrics:
    """The service's metrics. One instance per service; ``exposition()`` is the scrape body."""

    def __init__(self, models: Sequence[str] = (), status: Callable[[], dict[str, Any]] | None = None) -> None:
        self.models = set(models)
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.swap_seconds = Histogram(
            "swapserve_swap_seconds",
            "Seconds of a completed swap's steps (freeze, checkpoint, sleep...; not the wait for memory), "
            "by model, direction (in/out) and path.",
            ["model", "direction", "path"], buckets=SWAP_BUCKETS, registry=r)
        self.swaps = Counter("swapserve_swaps", "Swaps by model, direction and outcome (ok/failed).",
                             ["model", "direction", "outcome"], registry=r)
        self.evictions = Counter("swapserve_evictions", "Models swapped out to make room for another.",
                                 ["model"], registry=r)
        self.failures = Counter("swapserve_failures", "Engines that failed (exited, or a swap could not be undone).",
                                ["model"], registry=r)
        self.requests = Counter("swapserve_requests", "Requests by route, model and HTTP status.",
                                ["route", "model", "status"], registry=r)
        self.queue_wait_seconds = Histogram(
            "swapserve_queue_wait_seconds", "Seconds a request waited for its turn (swap-in not included).",
            ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.swap_wait_seconds = Histogram(
            "swapserve_request_swap_wait_seconds", "Seconds a request waited for its model to be swapped in.",
            ["model"], buckets=WAIT_BUCKETS, registry=r)
        self.ttft_seconds = Histogram(
            "swapserve_time_to_first_token_seconds", "Seconds from a streaming request's arrival to its first chunk.",
            ["model"], buckets=WAIT_BUCKETS, registry=r)
        if status is not None:
            r.register(_StatusGauges(status))

    def model_label(self, model: Any) -> str:
        if model is None:
            return ""  # a route without a model (status, quotas...)
        return model if isinstance(model, str) and model in self.models else UNKNOWN_MODEL

    def tenant_label(self, name: str) -> str:
        """A model's name; every notebook kernel shares the label ``kernel`` (one series per kernel
        id would grow without bound as kernels come and go; the event log has the ids)."""
        return KERNEL_LABEL if name.startswith("kernel ") else self.model_label(name)

    # ---- the scheduler's observer interface ------------------------------------------------
    def swap_recorded(self, model: str, what: str, timings: Sequence[Any]) -> None:
        """``timings``: the swap's steps (``.step``, ``.seconds``, ``.ok``; SwapSteps.timings)."""
        direction, ok, reason = swap_event(what)
        model = self.tenant_label(model)
        self.swaps.labels(model, direction, "ok" if ok else "failed").inc()
        if ok:
            seconds = sum(t.seconds for t in timings)
            self.swap_seconds.labels(model, direction, swap_path(t.step for t in timings)).observe(seconds)
            if reason and reason.startswith("preempted"):
                self.evictions.labels(model).inc()

    def engine_failed(self, model: str, reason: str) -> None:
        self.failures.labels(model).inc()

    # ---- fed by the handlers ---------------------------------------------------------------
    def request(self, route: str, model: Any, status: int) -> None:
        self.requests.labels(route, self.model_label(model), str(status)).inc()

    def admitted(self, model: str, queue_seconds: float, swap_seconds: float) -> None:
        label = self.model_label(model)
        self.queue_wait_seconds.labels(label).observe(max(0.0, queue_seconds))
        self.swap_wait_seconds.labels(label).observe(max(0.0, swap_seconds))

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft_seconds.labels(self.model_label(model)).observe(max(0.0, seconds))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # ---- jupyter_server's own /metrics (the process-wide registry) --------------------------
    def register_globally(self) -> None:
        """Also expose these metrics at jupyter_server's /metrics (prometheus_client's default
        registry), beside the server's own. One service per process there: a second replaces the first."""
        _GLOBAL_BRIDGE.target = self
        if not _GLOBAL_BRIDGE.registered:
            REGISTRY.register(_GLOBAL_BRIDGE)
            _GLOBAL_BRIDGE.registered = True

    def unregister_globally(self) -> None:
        if _GLOBAL_BRIDGE.target is self:
            _GLOBAL_BRIDGE.target = None


class _GlobalBridge(Collector):
    """Registered once in the default registry; collects the current service's metrics."""

    def __init__(self) -> None:
        self.target: SwapMetrics | None = None
        self.registered = False

    def collect(self) -> Iterable[Metric]:
        target = self.target
        return target.registry.collect() if target is not None else iter(())

    def describe(self) -> Iterable[Metric]:
        return iter(())  # names vary with the service: no collision check against the default registry


_GLOBAL_BRIDGE = _GlobalBridge()
