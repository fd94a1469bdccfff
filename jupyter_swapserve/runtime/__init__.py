"""Where an engine runs: a plain process (``process``) or a podman container (``podman``)."""

from .process import ProcessRuntime, RuntimeStepError, cgroup2_mount

__all__ = ["ProcessRuntime", "RuntimeStepError", "cgroup2_mount"]
