"""GET /swapserve/metrics: the service's Prometheus metrics (authenticated, like every route)."""

from __future__ import annotations

from tornado import web

from ..service.metrics import CONTENT_TYPE, SwapMetrics
from .base import OpenAIError, SwapServeHandler


class MetricsHandler(SwapServeHandler):
    async def get(self) -> None:
        self.require_user("read")
        metrics: SwapMetrics | None = self.settings.get("swapserve_metrics")
        if metrics is None:
            raise OpenAIError(404, "Metrics are off on this server.", code="metrics_disabled")
        self.set_header("Content-Type", CONTENT_TYPE)
        self.write(metrics.exposition())
        # APIHandler.finish would label the body application/json; Prometheus wants its text format
        web.RequestHandler.finish(self)
