"""What devices there are and how full they are: NVML on a real GPU, else virtual devices whose
capacity comes from the models file. Without nvidia-ml-py or a driver, importing this is fine."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from ..config import DeviceConfig

log = logging.getLogger(__name__)
GIB = 1024**3


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    kind: str  # "nvidia" or "virtual"
    capacity_gib: float

    @property
    def virtual(self) -> bool:
        return self.kind == "virtual"


def _nvml():
    """The pynvml module, initialised, or None when there is no usable NVIDIA driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPU here
        return None
    return pynvml


class GpuMonitor:
    """Devices and their memory. ``devices`` from the models file override discovery. ``nvml``: the
    NVML module to ask (a seam for tests; default: pynvml, loaded only when a real GPU may be used)."""

    def __init__(self, configured: list[DeviceConfig] | None = None, default_virtual_gib: float = 16.0,
                 nvml: Any = None) -> None:
        self._nvml = None
        self.devices: list[DeviceInfo] = []
        wants_real = configured is None or any(not d.virtual for d in configured)
        if wants_real:
            self._nvml = nvml if nvml is not None else _nvml()
        if configured is None:
            if self._nvml is not None and self._nvml.nvmlDeviceGetCount() > 0:
                self.devices = [self._real(i, None) for i in range(self._nvml.nvmlDeviceGetCount())]
            else:
                self.devices = [DeviceInfo(0, "virtual 0", "virtual", default_virtual_gib)]
            return
        real_index = 0
        for i, dev in enumerate(configured):
            if dev.virtual:
                self.devices.append(DeviceInfo(i, dev.name or f"virtual {i}", "virtual", float(dev.memory_gib or 0)))
            elif self._nvml is not None and real_index < self._nvml.nvmlDeviceGetCount():
                self.devices.append(self._real(real_index, dev))
                real_index += 1
            else:
                raise ValueError(f"devices.{i}: no NVIDIA GPU #{real_index} here; declare it `virtual: true`")

    def _real(self, index: int, cfg: DeviceConfig | None) -> DeviceInfo:
        nv = self._nvml
        handle = nv.nvmlDeviceGetHandleByIndex(index)
        name = nv.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else name
        total = nv.nvmlDeviceGetMemoryInfo(handle).total / GIB
        capacity = min(total, cfg.memory_gib) if cfg and cfg.memory_gib else total
        return DeviceInfo(index, (cfg.name if cfg and cfg.name else name), "nvidia", round(capacity, 3))

    @property
    def has_gpu(self) -> bool:
        return any(not d.virtual for d in self.devices)

    def all_virtual(self, devices: list[int]) -> bool:
        """Whether every one of ``devices`` is virtual: memory is only counted there, never moved."""
        return all(self.devices[d].virtual for d in devices)

    def used_gib(self, index: int) -> float | None:
        """Memory in use on a real device (all processes), None on a virtual one."""
        dev = self.devices[index]
        if dev.virtual or self._nvml is None:
            return None
        handle = self._nvml.nvmlDeviceGetHandleByIndex(dev.index)
        return self._nvml.nvmlDeviceGetMemoryInfo(handle).used / GIB

    def _gpu_processes(self, pids: list[int]) -> list[tuple[int, int, float]]:
        """(device index, pid, GiB) for each of ``pids`` on each real GPU (NVML's per-process list)."""
        if self._nvml is None:
            return []
        wanted, found = set(pids), []
        for dev in self.devices:
            if dev.virtual:
                continue
            handle = self._nvml.nvmlDeviceGetHandleByIndex(dev.index)
            with contextlib.suppress(Exception):  # a device NVML cannot read counts as holding nothing
                for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if p.pid in wanted:
                        found.append((dev.index, p.pid, (p.usedGpuMemory or 0) / GIB))
        return found

    def process_memory_gib(self, pids: list[int]) -> dict[int, float]:
        """GPU memory held by the given processes, per device index."""
        result: dict[int, float] = {}
        for index, _pid, gib in self._gpu_processes(pids):
            result[index] = result.get(index, 0.0) + gib
        return result

    def gpu_pids(self, pids: list[int]) -> list[int]:
        """Those of ``pids`` that hold memory on any GPU: the ones to checkpoint."""
        return list(dict.fromkeys(pid for _index, pid, _gib in self._gpu_processes(pids)))
