"""POST /swapserve/api/models/<name>/prefetch: an intent hint. The model is swapped in ahead of
need when that evicts nothing busy; the answer says what happens and never waits for the swap.
A model the user's quota excludes is refused as the completions route refuses it (403
``model_not_allowed``): a hint moves nothing for a model its sender may not call."""

from __future__ import annotations

from ..service import ModelNotFound
from ..service.accounting import QuotaExceeded
from .base import OpenAIError, SwapServeHandler


class PrefetchHandler(SwapServeHandler):
    async def post(self, name: str) -> None:
        self.require_user("execute")  # a hint, not a manual swap: any user who may call the model
        try:
            outcome = self.service.prefetch(name, self.identity().name)
        except ModelNotFound as exc:
            raise OpenAIError(404, str(exc), param="model", code="model_not_found") from None
        except QuotaExceeded as exc:
            r = exc.refusal
            raise OpenAIError(r.status, r.message, param=r.param, code=r.code, retry_after=r.retry_after) from None
        self.set_status(202 if outcome == "starting" else 200)
        self.finish({"model": name, "prefetch": outcome, "state": self.service.backends[name].state.value})
