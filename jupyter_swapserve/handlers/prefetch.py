"""POST /swapserve/api/models/<name>/prefetch: an intent hint. The model is swapped in ahead of
need when that evicts nothing busy; the answer says what happens and never waits for the swap."""

from __future__ import annotations

from ..service import ModelNotFound
from .base import OpenAIError, SwapServeHandler


class PrefetchHandler(SwapServeHandler):
    async def post(self, name: str) -> None:
        self.require_user("execute")  # a hint, not a manual swap: any user who may call the model
        try:
            outcome = self.service.prefetch(name)
        except ModelNotFound as exc:
            raise OpenAIError(404, str(exc), param="model", code="model_not_found") from None
        self.set_status(202 if outcome == "starting" else 200)
        self.finish({"model": name, "prefetch": outcome, "state": self.service.backends[name].state.value})
