"""GPU tests run only where an NVIDIA GPU answers through NVML; elsewhere they are skipped."""

from __future__ import annotations

import functools

import pytest


@functools.cache
def nvidia_gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # no nvidia-ml-py, no driver, no device: all mean "no GPU here"
        return 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if nvidia_gpu_count() > 0:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (NVML found none)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
