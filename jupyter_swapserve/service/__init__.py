"""The core of jupyter-swapserve: no Jupyter imports, pure asyncio, usable alone. Built by
:func:`build_service`; the rooms and what each may import: DESIGN.md beside this file."""

from .core import ModelNotFound, QueueFull, SwapService, Ticket
from .factory import KernelOptions, Seams, ServiceConfig, build_service
from .placement import EngineUnavailable

__all__ = ["EngineUnavailable", "KernelOptions", "ModelNotFound", "QueueFull", "Seams", "ServiceConfig", "SwapService",
           "Ticket", "build_service"]
