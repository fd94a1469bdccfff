"""Device memory of the reference engine: releasing and re-mapping it (torch-memory-saver or
plain torch), the pinned host staging of the weights, and vLLM's sleep protocol built on them.

``SleepWake`` is the sleep/wake half of :class:`.engine.Engine` (a mixin: both halves work on the
same tensors, and the engine's lock orders a sleep against a forward pass)."""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import threading
import time
from typing import Any

import torch

from .model import GIB

log = logging.getLogger("swapserve.reference")


class MemorySaver:
    """Releases and re-maps the device memory of the weights and the KV pool.

    ``tms``: torch-memory-saver keeps the virtual addresses (graphs stay valid) and releases the
    physical pages. ``torch``: the storages are resized to zero and the allocator's cache emptied;
    the addresses may change on wake.
    """

    def __init__(self, kind: str, device: torch.device) -> None:
        self.kind = kind
        self.device = device
        self._tms: Any = None
        if kind == "tms":
            from torch_memory_saver import torch_memory_saver

            # in-process pluggable allocator: no LD_PRELOAD needed when the service launches us
            torch_memory_saver.hook_mode = "torch"
            self._tms = torch_memory_saver

    def region(self, tag: str) -> contextlib.AbstractContextManager[Any]:
        if self._tms is not None:
            return self._tms.region(tag=tag)
        return contextlib.nullcontext()

    def release(self, tag: str, tensor: torch.Tensor) -> None:
        if self._tms is not None:
            self._tms.pause(tag)
        else:
            tensor.untyped_storage().resize_(0)

    def remap(self, tag: str, tensor: torch.Tensor, nbytes: int) -> None:
        if self._tms is not None:
            self._tms.resume(tag)
        else:
            tensor.untyped_storage().resize_(nbytes)


class SleepWake:
    """``POST /sleep`` and ``POST /wake_up``: what the engine frees and maps back, and how."""

    # set by the engine's cold start (engine.py)
    args: Any
    cuda: bool
    device: torch.device
    dtype: torch.dtype
    lock: threading.Lock
    saver: MemorySaver
    flat: torch.Tensor
    kv: torch.Tensor
    weights_bytes: int
    kv_bytes: int
    graph: Any
    graph_pool: Any
    graph_ptrs: tuple[int, int]
    sleeping: int
    staging: torch.Tensor | None
    staging_current: bool
    staging_kind: str
    last_sleep: dict[str, Any]
    last_wake: dict[str, Any]
    first_after_wake: bool
    cycles: int

    def _sync(self) -> None: ...
    def _ptrs(self) -> tuple[int, int]: ...
    def _capture_graph(self) -> None: ...
    def _reload_weights(self) -> None: ...

    def sleep(self, level: int) -> dict[str, Any]:
        with self.lock:
            if self.sleeping:
                return {"already": True, **self.last_sleep}
            t0 = time.perf_counter()
            info: dict[str, Any] = {"level": level, "weights_gib": round(self.weights_bytes / GIB, 3),
                                    "kv_gib": round(self.kv_bytes / GIB, 3), "memory_saver": self.saver.kind}
            self._sync()
            # the KV cache first: it is discarded, not copied, so its memory can go back to the
            # driver at once, before the weights' copy; the service hands what NVML shows freed to
            # a waiting engine while this hook still runs, and that engine's H2D copy then overlaps
            # this one's D2H (PCIe is full duplex)
            t = time.perf_counter()
            self.saver.release("kv", self.kv)
            if self.cuda:
                torch.cuda.empty_cache()  # plain torch: the freed pool must leave the allocator's cache
                self._sync()
            info["kv_release_s"] = round(time.perf_counter() - t, 4)
            if level == 1:
                t = time.perf_counter()
                if self.staging is None:
                    # pinned once, reused on every cycle: pinning 16 GB takes seconds, copying it 0.3 s
                    self.staging = self._alloc_staging(self.flat.numel())
                    info["pin_s"] = round(time.perf_counter() - t, 4)
                    info["staging"] = self.staging_kind
                t = time.perf_counter()
                if self.staging_current and self.args.copy_out == "changed":
                    # inference never writes the weights: the host copy of the last cycle is still
                    # exact, so this sleep frees at once and puts nothing on PCIe (a waiting engine's
                    # wake then copies in at full speed instead of sharing the link with this copy)
                    info["d2h_skipped"] = True
                else:
                    self.staging.copy_(self.flat, non_blocking=True)
                    self._sync()
                    self.staging_current = True
                info["d2h_s"] = round(time.perf_counter() - t, 4)
            else:
                self.staging_current = False  # level 2 discards the weights; a reload replaces them
            t = time.perf_counter()
            self.saver.release("weights", self.flat)
            info["release_s"] = round(time.perf_counter() - t, 4)
            if self.cuda:
                # what the allocator still caches (prefill activations) would be checkpointed for nothing
                t = time.perf_counter()
                torch.cuda.empty_cache()
                self._sync()
                info["empty_cache_s"] = round(time.perf_counter() - t, 4)
            info["staging_gib"] = round(self.staging.numel() * self.staging.element_size() / GIB, 3) \
                if self.staging is not None else 0.0
            info["total_s"] = round(time.perf_counter() - t0, 4)
            info["resident_gib"] = self._resident_gib()
            self.sleeping = level
            self.last_sleep = info
            log.info("SLEEP %s", json.dumps(info))
            return info

    def _alloc_staging(self, numel: int) -> torch.Tensor:
        """Host memory the weights sleep in, registered with the driver for DMA-speed copies.

        ``pinned``: cudaHostAlloc through torch. ``hugepages``: an anonymous mapping advised to
        use transparent huge pages, then cudaHostRegister'ed: 512x fewer pages for the driver to
        pin now and to re-map when the process is restored from a checkpoint.
        """
        self.staging_kind = "pageable"
        if not self.cuda:
            return torch.empty(numel, dtype=self.dtype)
        if self.args.staging == "hugepages":
            nbytes = numel * torch.finfo(self.dtype).bits // 8
            buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            with contextlib.suppress(AttributeError, OSError):
                buf.madvise(mmap.MADV_HUGEPAGE)
            host = torch.frombuffer(buf, dtype=torch.uint8)
            cudart = torch.cuda.cudart()
            rc = cudart.cudaHostRegister(host.data_ptr(), nbytes, 0)
            if int(rc) == 0:
                self._staging_mapping = buf  # keeps the mapping alive as long as the tensor
                self.staging_kind = "hugepages"
                return host.view(self.dtype)
            log.warning("cudaHostRegister of the huge-page staging buffer failed (%s): using pinned memory", rc)
            del host
            buf.close()
        self.staging_kind = "pinned"
        return torch.empty(numel, dtype=self.dtype, pin_memory=True)

    def wake(self) -> dict[str, Any]:
        with self.lock:
            if not self.sleeping:
                return {"already": True}
            t0 = time.perf_counter()
            info: dict[str, Any] = {"memory_saver": self.saver.kind}
            # both mapped before the copy: pages another process has just freed (a victim's, in an
            # overlapped eviction) take the driver ~70 ms to hand out, and doing that while the
            # copy runs slowed the copy by more (measured on an H100)
            self.saver.remap("weights", self.flat, self.weights_bytes)
            self.saver.remap("kv", self.kv, self.kv_bytes)
            with torch.inference_mode():  # the pool is an inference tensor
                self.kv.zero_()  # remapped pages hold garbage: see the KV pool allocation
            self._sync()
            info["remap_s"] = round(time.perf_counter() - t0, 4)
            t = time.perf_counter()
            if self.sleeping == 1 and self.staging is not None:
                self.flat.copy_(self.staging, non_blocking=True)
            else:  # level 2: the weights were discarded; load them again
                self._reload_weights()
            self._sync()
            info["h2d_s"] = round(time.perf_counter() - t, 4)
            if self.graph is not None and self._ptrs() != self.graph_ptrs:
                # plain torch gave the memory back at other addresses: the graph points at the old ones
                t = time.perf_counter()
                self.graph = None
                self.graph_pool = None  # the old graph's pool went with it; capturing into it asserts
                self._capture_graph()
                info["recapture_s"] = round(time.perf_counter() - t, 4)
            info["total_s"] = round(time.perf_counter() - t0, 4)
            self.sleeping = 0
            self.first_after_wake = True
            self.cycles += 1
            self.last_wake = info
            log.info("WAKE %s", json.dumps(info))
            return info

    def _resident_gib(self) -> float | None:
        """Device memory this process still holds (what a checkpoint will copy), from NVML."""
        if not self.cuda:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == os.getpid() and p.usedGpuMemory:
                    return round(p.usedGpuMemory / GIB, 3)
        except Exception:  # NVML missing or not allowed: report torch's view only
            pass
        return round(torch.cuda.memory_reserved(self.device) / GIB, 3)

