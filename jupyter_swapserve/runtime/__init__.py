"""Where an engine runs: a plain process (``process``) or a podman container (``podman``).

Both runtimes offer one interface (:class:`EngineRuntime`), so the scheduler cannot tell them
apart; :class:`Runtimes` makes one for each start of an engine from the model's ``runtime`` field.
It is the core's runtime seam (service/factory.py): it owns the server's podman connection."""

from __future__ import annotations

from typing import Any

from .base import EngineRuntime
from .process import ProcessRuntime, RuntimeStepError, cgroup2_mount


class Runtimes:
    """A fresh runtime for each start of an engine. ``podman_url``: the podman service for
    container models (empty: ``$SWAPSERVE_PODMAN_URL``, else one started for this server on first
    use)."""

    def __init__(self, podman_url: str | None = None) -> None:
        self.podman_url = podman_url or None
        self._podman: Any = None

    def podman(self) -> Any:
        """This server's podman connection (a ``runtime.podman.PodmanService``), made on first use."""
        if self._podman is None:
            from .podman import PodmanService  # podman-py is only needed by container models

            self._podman = PodmanService(self.podman_url)
        return self._podman

    def __call__(self, backend: Any) -> EngineRuntime:
        """A runtime for one start of ``backend``'s engine (a ``service.backend.Backend``)."""
        if backend.config.runtime == "podman":
            from .podman import PodmanRuntime

            return PodmanRuntime(backend.name, backend.config, self.podman())
        return ProcessRuntime(backend.name)

    def close(self) -> None:
        if self._podman is not None:
            self._podman.close()
            self._podman = None


def make_runtime(backend: Any) -> EngineRuntime:
    """A runtime for ``backend`` with a podman connection of its own (tests, one-off tools)."""
    return Runtimes()(backend)


__all__ = ["EngineRuntime", "ProcessRuntime", "RuntimeStepError", "Runtimes", "cgroup2_mount", "make_runtime"]
