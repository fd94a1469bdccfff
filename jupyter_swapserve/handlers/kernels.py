"""Kernels as GPU tenants: GET /swapserve/api/kernels[/<id>], POST /swapserve/api/kernels/<id>/<action>.

Actions: ``release`` (swap out as soon as the kernel is idle: what ``%gpu release`` asks from inside
the busy kernel), ``swap-out`` (now, if idle), ``swap-in``, ``pin`` and ``unpin``. A user acts on
their own kernels; admins on everyone's.
"""

from __future__ import annotations

from typing import Any

from ..service.identity import Identity
from ..service.kernels import KernelSwapError, KernelTenant, KernelTenants
from ..service.remote_kernels import RemoteKernels
from .base import OpenAIError, SwapServeHandler

ACTIONS = ("release", "swap-out", "swap-in", "pin", "unpin")


def visible_status(status: dict[str, Any], identity: Identity) -> dict[str, Any]:
    """The status as ``identity`` may see it: on the shared service a user sees their own kernels
    only (admins all); ``user`` says who looks."""
    if not identity.admin:
        status["kernels"] = [k for k in status.get("kernels", []) if k.get("user") == identity.name]
    status["user"] = {"name": identity.name, "admin": identity.admin}
    return status


class KernelsBase(SwapServeHandler):
    @property
    def tenants(self) -> KernelTenants:
        tenants = self.settings.get("swapserve_kernels")
        if tenants is None:
            raise OpenAIError(404, "kernels are not GPU tenants on this server (SwapServe.kernel_tenants is off)",
                              code="kernels_not_tracked")
        return tenants

    def visible(self, tenant: KernelTenant) -> bool:
        identity = self.identity()
        return identity.admin or tenant.user == identity.name

    def tenant(self, kernel_id: str) -> KernelTenant | None:
        """The kernel's tenant entry; None for a kernel of this server that holds no GPU memory."""
        tenant = self.tenants.tenants.get(kernel_id)
        if tenant is not None and not self.visible(tenant):
            raise OpenAIError(403, f"kernel '{kernel_id}' belongs to another user", param="kernel_id",
                              code="forbidden")
        if tenant is None and (isinstance(self.tenants, RemoteKernels) or kernel_id not in self.kernel_manager):
            where = "booked on this swap service" if isinstance(self.tenants, RemoteKernels) else "on this server"
            raise OpenAIError(404, f"no kernel '{kernel_id}' {where}", param="kernel_id", code="kernel_not_found")
        return tenant


class KernelListHandler(KernelsBase):
    async def get(self) -> None:
        self.require_user("read")
        self.finish({"kernels": [t.status() for t in self.tenants.tenants.values() if self.visible(t)],
                     "idle_timeout": self.tenants.idle_timeout})


class KernelHandler(KernelsBase):
    async def get(self, kernel_id: str) -> None:
        self.require_user("read")
        tenant = self.tenant(kernel_id)
        self.finish(tenant.status() if tenant is not None else
                    {"kernel_id": kernel_id, "state": "not_a_tenant", "memory_gib": 0.0,
                     "note": "the kernel holds no GPU memory"})


class KernelActionHandler(KernelsBase):
    async def post(self, kernel_id: str, action: str) -> None:
        self.require_user("write")
        await self.tenants.refresh()  # busy or idle as of now, not as of the last sweep
        tenant = self.tenant(kernel_id)
        result: dict[str, Any] = {"kernel_id": kernel_id, "action": action}
        try:
            if tenant is None:
                if action in ("pin", "swap-in", "swap-out"):
                    raise KernelSwapError("the kernel holds no GPU memory")
                result["result"] = "not a GPU tenant: the kernel holds no GPU memory"
            elif action == "release":
                result["result"] = self.tenants.release(kernel_id)
            elif action in ("pin", "unpin"):
                result["result"] = self.tenants.pin(kernel_id, action == "pin")
            elif action == "swap-out":
                swapped = await self.tenants.swap_out(kernel_id, "swapped out by hand")
                why = "busy" if tenant.busy else "pinned" if tenant.pinned else tenant.state_label
                result["result"] = "swapped out" if swapped else f"not swapped out: the kernel is {why}"
            else:
                seconds = await self.tenants.swap_in(kernel_id)
                result["result"], result["seconds"] = "resident", seconds
        except KernelSwapError as exc:
            raise OpenAIError(409, str(exc), param="kernel_id", code="kernel_swap_refused") from None
        if tenant is not None:
            result["state"] = tenant.state_label
        self.finish(result)
