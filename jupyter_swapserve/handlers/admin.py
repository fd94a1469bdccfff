"""Status and manual swaps: GET /swapserve/api/status, POST /swapserve/api/models/<name>/swap-in|swap-out."""

from __future__ import annotations

from typing import Any

from ..config import schema
from ..service import EngineUnavailable, ModelNotFound
from .base import OpenAIError, SwapServeHandler
from .kernels import visible_status


def viewer_status(handler: SwapServeHandler) -> dict[str, Any]:
    """The status as the caller sees it: who they are and whether they administer the service (the
    sidebar offers manual swaps and the quota form to admins only), and whether this is a node's
    shared service (``mode``: service) or a server's own engines (standalone)."""
    status = visible_status(handler.service.status(), handler.identity())  # a user's own kernels only
    status["mode"] = handler.settings.get("swapserve_mode") or "standalone"
    return status


class StatusHandler(SwapServeHandler):
    async def get(self) -> None:
        self.require_user("read")
        self.finish(viewer_status(self))


class SchemaHandler(SwapServeHandler):
    async def get(self) -> None:
        self.require_user("read")
        self.finish(schema())


class SwapHandler(SwapServeHandler):
    async def post(self, name: str, direction: str) -> None:
        self.require_user("write")
        # on a shared node, moving engines by hand is for admins: a user could otherwise push out the
        # model another user is waiting for (a standalone server's one user is its admin)
        self.require_admin()
        try:
            if direction == "swap-in":
                waited = await self.service.swap_in(name)
                result = {"model": name, "swapped": waited > 0, "seconds": waited}
            else:
                swapped = await self.service.swap_out(name)
                result = {"model": name, "swapped": swapped}
        except ModelNotFound as exc:
            raise OpenAIError(404, str(exc), param="model", code="model_not_found") from None
        except EngineUnavailable as exc:
            raise OpenAIError(503 if exc.retry_after else 409, str(exc), code="engine_unavailable") from None
        backend = self.service.backends[name]
        result["state"] = backend.state.value
        if direction == "swap-out" and not result["swapped"] and backend.error:
            result["reason"] = backend.error
        self.finish(result)
