"""The interface every runtime offers the scheduler (a process, a container)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..engines.base import LaunchSpec


@runtime_checkable
class EngineRuntime(Protocol):
    """One start of one engine. Steps raise ``RuntimeStepError`` with a message for the user."""

    kind: str  # "process" | "podman"
    freezer: str  # how freeze() works: "cgroup", "signal", "podman pause"
    frozen: bool

    async def start(self, spec: LaunchSpec) -> None: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def running(self) -> bool: ...

    async def wait(self) -> int:
        """Until the engine has exited; its exit code."""
        ...

    def pids(self) -> list[int]:
        """Every process of the engine by host PID (for the CUDA checkpoint and NVML matching)."""
        ...

    def log_tail(self, lines: int = 20) -> str: ...

    async def freeze(self) -> None: ...

    async def thaw(self) -> None: ...

    async def stop(self, timeout: float = 10.0) -> None: ...

    def kill(self) -> None:
        """Synchronous last resort at server exit."""
        ...
