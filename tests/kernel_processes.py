"""Stand-ins for a notebook kernel's process, for the kernel-tenancy tests that run without Jupyter
(tests/test_kernel_tenants.py, tests/test_remote_kernels.py): a Python process holding 50 MiB, on
the virtual device measured by its resident memory."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from jupyter_swapserve.runtime.procfs import rss_bytes

BALLAST = 50 << 20


def kernel_process(processes: list[subprocess.Popen[bytes]], user: str = "ada") -> int:
    """A process of ``user``'s server, as JupyterHub starts them (JUPYTERHUB_USER in its environment),
    returned once its ballast is held: its measured size no longer grows (a process measured while
    its interpreter was still starting weighed a few MiB, and two such kernels compared at random)."""
    proc = subprocess.Popen([sys.executable, "-c", f"import time; b = b'x' * {BALLAST}; time.sleep(120)"],
                            env={**os.environ, "JUPYTERHUB_USER": user})
    processes.append(proc)
    deadline = time.monotonic() + 20
    while rss_bytes([proc.pid]) < BALLAST and time.monotonic() < deadline:
        time.sleep(0.02)
    return proc.pid
