"""Where an engine runs: a plain process (``process``) or a podman container (``podman``).

Both runtimes offer one interface (:class:`EngineRuntime`), so the scheduler cannot tell them
apart; :func:`make_runtime` picks one from the model's ``runtime`` field."""

from __future__ import annotations

from typing import Any

from .base import EngineRuntime
from .process import ProcessRuntime, RuntimeStepError, cgroup2_mount


def make_runtime(backend: Any) -> EngineRuntime:
    """A fresh runtime for one start of ``backend``'s engine (a ``service.backend.Backend``)."""
    if backend.config.runtime == "podman":
        from .podman import PodmanRuntime  # podman-py is only needed by container models

        return PodmanRuntime(backend.name, backend.config)
    return ProcessRuntime(backend.name)


__all__ = ["EngineRuntime", "ProcessRuntime", "RuntimeStepError", "cgroup2_mount", "make_runtime"]
