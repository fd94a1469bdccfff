"""The one place the core is composed: :func:`build_service` builds the swap service from its
configuration, with what it touches outside itself injected (:class:`Seams`) rather than read from
module globals. The Jupyter extension (app.py) is one caller, tests and benchmarks are others.

    models file → backends (adapter each; a bad entry is a config error, never a crash)
    seams       → GPU monitor (NVML), checkpoint driver, runtimes (processes, podman), clock
    the rooms   → placement ← tenant sources (models, kernels) · residuals · launcher · scheduler
    observers   → metrics and the event log, told of every swap by the one swap record
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..config import ModelsFile
from ..engines import EngineError, adapter_for
from ..gpu.checkpoint import make_checkpointer
from ..gpu.monitor import GpuMonitor
from ..runtime import Runtimes
from .accounting import QuotaAccounting
from .backend import Backend
from .background import Background
from .clock import Clock
from .core import SwapService
from .events import Notifier
from .kernel_owners import OwnerChannels
from .kernels import KernelFactsSource, KernelTenants
from .launcher import EngineLauncher
from .placement import Placement
from .remote_kernels import RemoteKernels
from .reservations import ReservationManager
from .residuals import Residuals
from .scheduler import ModelTenants, Scheduler
from .steps import Checkpointer, DriverSteps, SwapObserver, SwapRecord
from .upstream import Upstream

log = logging.getLogger(__name__)


@dataclass
class Seams:
    """What the core uses outside itself. Each left None gets the real thing."""

    #: devices and their memory (NVML); default: discovered, or the models file's devices
    monitor: GpuMonitor | None = None
    #: the CUDA checkpoint driver; default: the driver API where there is a GPU, else a no-op
    checkpointer: Checkpointer | None = None
    #: makes the runtime of each engine start (processes, podman containers)
    runtimes: Runtimes | None = None
    clock: Clock | None = None
    #: where the facts of notebook kernels come from (the Jupyter server's kernels)
    kernel_facts: KernelFactsSource | None = None


@dataclass
class KernelOptions:
    """Notebook kernels as GPU tenants: of this server (standalone), or of users' servers that
    report them to this shared service (``remote``, service/remote_kernels.py)."""

    idle_timeout: float | None = None
    #: count kernels on a virtual device by their host memory (demos and tests)
    on_virtual_device: bool = False
    interval: float = 2.0
    #: the kernels are users' servers' (the shared service): they report them and act on commands
    remote: bool = False
    #: remote: a server's report holds this long; a command's first answer is awaited this long
    lease_s: float = 15.0
    answer_timeout_s: float = 10.0


@dataclass
class ServiceConfig:
    idle_check_interval: float = 1.0
    accounting: QuotaAccounting | None = None
    #: None: kernels are not tenants
    kernels: KernelOptions | None = None
    #: Prometheus metrics of the service (service/metrics.py); the event log's path (None: none)
    metrics: bool = False
    event_log: Path | None = None
    observers: list[SwapObserver] = field(default_factory=list)
    lock_timeout_ms: int = 10_000
    driver_timeout_s: float = 300.0


def build_backends(models: ModelsFile, monitor: GpuMonitor, clock: Clock) -> tuple[dict[str, Backend], list[str]]:
    """One backend per valid model of the models file, and the errors of the others (one line each,
    naming the model and the field)."""
    errors = list(models.errors)
    backends: dict[str, Backend] = {}
    for m in models.models:
        missing = [d for d in m.devices if d >= len(monitor.devices)]
        if missing:
            errors.append(f"model '{m.name}': field 'device': {missing[0]} does not exist here")
            continue
        try:
            adapter = adapter_for(m)
        except EngineError as exc:
            errors.append(f"model '{m.name}': field 'engine': {exc}")
            continue
        too_small = [d for d in m.devices
                     if m.memory_gib is not None and m.memory_gib > monitor.devices[d].capacity_gib]
        if too_small:
            errors.append(f"model '{m.name}': field 'memory_gib': {m.memory_gib} GiB exceeds device {too_small[0]} "
                          f"({monitor.devices[too_small[0]].capacity_gib:g} GiB)")
            continue
        backends[m.name] = Backend(config=m, adapter=adapter, clock=clock)
    for err in errors:
        log.error("models file: %s", err)
    return backends, errors


def build_service(models: ModelsFile, config: ServiceConfig | None = None, seams: Seams | None = None) -> SwapService:
    config = config or ServiceConfig()
    seams = seams or Seams()
    clock = seams.clock or Clock()
    monitor = seams.monitor or GpuMonitor(models.devices)
    notifier = Notifier()
    backends, errors = build_backends(models, monitor, clock)
    for b in backends.values():
        b.on_change = notifier.notify
    driver = DriverSteps(seams.checkpointer or make_checkpointer(monitor.has_gpu), config.lock_timeout_ms,
                         config.driver_timeout_s)
    record = SwapRecord(list(config.observers))
    background = Background()
    runtimes = seams.runtimes or Runtimes()
    client = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None))
    placement = Placement({d.index: ReservationManager(d.index, d.capacity_gib, on_change=notifier.notify)
                           for d in monitor.devices}, notifier, background)
    launcher = EngineLauncher(monitor, runtimes, record, client)
    residuals = Residuals(backends, placement, monitor, driver, record, client, launcher.fail,
                          lambda b: monitor.all_virtual(b.devices))
    scheduler = Scheduler(backends, placement, residuals, launcher, driver, record, background, monitor, clock)
    placement.register(ModelTenants(backends, scheduler, residuals))
    kernels = _kernel_tenants(config, seams, placement, driver, record, monitor, notifier, background, clock)
    service = SwapService(models_file=models, config_errors=errors, backends=backends, notifier=notifier,
                          monitor=monitor, driver=driver, record=record, placement=placement, scheduler=scheduler,
                          kernels=kernels, accounting=config.accounting, upstream=Upstream(), client=client,
                          runtimes=runtimes, idle_check_interval=config.idle_check_interval)
    _observe(service, config)
    return service


def _kernel_tenants(config: ServiceConfig, seams: Seams, placement: Placement, driver: DriverSteps,
                    record: SwapRecord, monitor: GpuMonitor, notifier: Notifier, background: Background,
                    clock: Clock) -> KernelTenants | None:
    options = config.kernels
    if options is None:
        return None
    accounting = config.accounting

    def limits(user: str) -> tuple[float | None, float | None]:
        if accounting is None:
            return None, None
        quota = accounting.limits(user)
        return quota.kernel_gpu_gib, quota.kernel_pin_gib

    shared = dict(idle_timeout=options.idle_timeout, virtual=options.on_virtual_device, limits=limits,
                  interval=options.interval, clock=clock)
    kernels: KernelTenants
    if options.remote:
        kernels = RemoteKernels(placement, driver, record, monitor, notifier, background, **shared,
                                owners=OwnerChannels(), lease_s=options.lease_s,
                                answer_timeout_s=options.answer_timeout_s)
    else:
        kernels = KernelTenants(placement, driver, record, monitor, notifier, background, **shared,
                                facts=seams.kernel_facts)
    placement.register(kernels)
    return kernels


def _observe(service: SwapService, config: ServiceConfig) -> None:
    """Prometheus metrics and the event log, fed by the swap record."""
    if config.metrics:
        from .metrics import SwapMetrics

        service.metrics = SwapMetrics(list(service.backends), status=service.status)
        service.record.observers.append(service.metrics)
    if config.event_log is not None:
        from .eventlog import EventLog

        service.record.observers.append(EventLog(config.event_log))  # OSError: the caller says which setting


__all__ = ["KernelOptions", "Seams", "ServiceConfig", "build_backends", "build_service"]
