"""``%gpu``: this notebook kernel as a GPU tenant of the swap service.

    %gpu            show the kernel's GPU state (memory, resident or swapped out, last swap-in)
    %gpu release    swap the kernel's GPU memory out as soon as this cell finishes
    %gpu pin        keep it on the GPU (within the GPU memory your admin lets you pin)
    %gpu unpin      let the service swap it out again when idle or when the memory is needed
"""

from __future__ import annotations

import os
import re
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_magic, magics_class

from .client import LLMError, SwapServeClient

ACTIONS = ("release", "pin", "unpin")


def this_kernel_id() -> str:
    """The id of the kernel this code runs in, from its connection file (kernel-<id>.json)."""
    try:
        from ipykernel.connect import get_connection_file

        name = os.path.basename(get_connection_file())
    except Exception:
        name = ""
    match = re.fullmatch(r"kernel-(.+)\.json", name)
    if not match:
        raise UsageError("%gpu works in a notebook kernel started by a Jupyter server (no connection file here)")
    return match.group(1)


def describe(state: dict[str, Any]) -> str:
    if state.get("state") == "not_a_tenant":
        return "This kernel holds no GPU memory: nothing to swap."
    parts = [f"{state.get('memory_gib', 0):.2f} GiB on device {state.get('device')}",
             str(state.get("state", "?")).replace("_", " ")]
    if state.get("pinned"):
        parts.append("pinned")
    if state.get("last_swap_in_seconds") is not None:
        parts.append(f"last restored in {state['last_swap_in_seconds']:.1f} s")
    if state.get("swaps_out"):
        why = f", last {state['last_swap_out_reason']}" if state.get("last_swap_out_reason") else ""
        parts.append(f"swapped out {state['swaps_out']} time(s){why}")
    if state.get("error"):
        parts.append(f"last error: {state['error']}")
    return "GPU: " + ", ".join(parts)


@magics_class
class GpuMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.client = SwapServeClient()

    @line_magic
    def gpu(self, line: str) -> None:
        action = line.strip()
        if action not in ("", *ACTIONS):
            raise UsageError(f"%gpu: unknown action '{action}' (use: %gpu, %gpu {' | %gpu '.join(ACTIONS)})")
        kernel_id = this_kernel_id()
        try:
            if action:
                result = self.client.request("POST", f"swapserve/api/kernels/{kernel_id}/{action}", content=b"{}")
                print(f"GPU: {result.get('result')}")
            else:
                print(describe(self.client.request("GET", f"swapserve/api/kernels/{kernel_id}")))
        except LLMError as exc:
            raise UsageError(f"%gpu: {exc}") from None


GpuMagics.gpu.__doc__ = __doc__
