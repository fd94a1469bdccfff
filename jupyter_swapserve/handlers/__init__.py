"""Tornado handlers of the swap service, all under ``<base_url>/swapserve/``."""

from __future__ import annotations

from .admin import SchemaHandler, StatusHandler, SwapHandler
from .embeddings import EmbeddingsHandler
from .events import EventsHandler
from .fallback import fallback_handlers
from .kernel_reports import KernelAnswerHandler, KernelCommandsHandler, KernelReportHandler
from .kernels import ACTIONS, KernelActionHandler, KernelHandler, KernelListHandler
from .metrics import MetricsHandler
from .openai import CompletionsHandler, ModelsHandler
from .openapi import OpenAPIHandler
from .prefetch import PrefetchHandler
from .quotas import QuotasHandler, UsageHandler, UserQuotaHandler, UsersHandler


def handlers() -> list[tuple]:
    return [
        (r"/swapserve/v1/models", ModelsHandler),
        (r"/swapserve/v1/chat/completions", CompletionsHandler, {"upstream_path": "/v1/chat/completions"}),
        (r"/swapserve/v1/completions", CompletionsHandler, {"upstream_path": "/v1/completions"}),
        (r"/swapserve/v1/embeddings", EmbeddingsHandler),
        (r"/swapserve/api/status", StatusHandler),
        (r"/swapserve/api/events", EventsHandler),
        (r"/swapserve/api/schema", SchemaHandler),
        (r"/swapserve/api/models/([^/]+)/(swap-in|swap-out)", SwapHandler),
        (r"/swapserve/api/models/([^/]+)/prefetch", PrefetchHandler),
        (r"/swapserve/api/kernels", KernelListHandler),
        (r"/swapserve/api/kernels/([^/]+)", KernelHandler),
        (rf"/swapserve/api/kernels/([^/]+)/({'|'.join(ACTIONS)})", KernelActionHandler),
        # between users' servers and the shared service (issue 21): reports, commands, answers
        (r"/swapserve/api/kernel-reports", KernelReportHandler),
        (r"/swapserve/api/kernel-commands", KernelCommandsHandler),
        (r"/swapserve/api/kernel-commands/([^/]+)", KernelAnswerHandler),
        (r"/swapserve/api/quotas", QuotasHandler),
        (r"/swapserve/api/quotas/([^/]+)", UserQuotaHandler),
        (r"/swapserve/api/usage", UsageHandler),
        (r"/swapserve/api/users", UsersHandler),
        (r"/swapserve/api/openapi.json", OpenAPIHandler),
        (r"/swapserve/metrics", MetricsHandler),
        *fallback_handlers(),  # last: unknown /swapserve/ paths get an OpenAI-shaped 404
    ]
