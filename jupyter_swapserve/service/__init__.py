"""The core of jupyter-swapserve: no Jupyter imports, pure asyncio, usable alone."""

from .core import ModelNotFound, QueueFull, SwapService, Ticket
from .scheduler import EngineUnavailable

__all__ = ["EngineUnavailable", "ModelNotFound", "QueueFull", "SwapService", "Ticket"]
