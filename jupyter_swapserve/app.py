"""The Jupyter Server extension: configuration, start and stop of the swap service, routes."""

from __future__ import annotations

import os

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Float, Unicode

from .config import ConfigError, ModelsFile, load_models_file
from .handlers import handlers
from .service import SwapService


class SwapServe(ExtensionApp):
    name = "jupyter_swapserve"
    description = "Hot-swap LLM engines in and out of GPU memory behind an OpenAI-compatible route."

    models_file = Unicode(
        "", config=True,
        help="Path of the models file (YAML or JSON). Empty: no models are served.",
    )
    idle_check_interval = Float(1.0, config=True, help="Seconds between sweeps for idle models to swap out.")
    export_env = Bool(
        True, config=True,
        help="Export SWAPSERVE_URL and SWAPSERVE_TOKEN to the server's environment, which kernels inherit, "
             "so the %%llm magic and the openai client find the route without configuration.",
    )

    def initialize_settings(self) -> None:
        models = ModelsFile(devices=None, models=[], errors=[])
        if self.models_file:
            try:
                models = load_models_file(self.models_file)
            except ConfigError as exc:
                # one line naming the file and field; the server still starts, with no models
                self.log.error("jupyter-swapserve: %s", exc)
                models.errors.append(str(exc))
        for err in models.errors:
            self.log.error("jupyter-swapserve: %s", err)
        self.service = SwapService(models, idle_check_interval=self.idle_check_interval)
        self.settings["swapserve_service"] = self.service

    def initialize_handlers(self) -> None:
        self.handlers.extend(handlers())

    async def _start_jupyter_server_extension(self, serverapp) -> None:  # type: ignore[override]
        self.service.start()
        if self.export_env:
            os.environ["SWAPSERVE_URL"] = serverapp.connection_url.rstrip("/") + "/swapserve/v1"
            token = getattr(serverapp.identity_provider, "token", "") or ""
            if token:
                os.environ["SWAPSERVE_TOKEN"] = token
        self.log.info("jupyter-swapserve: %d model(s), devices: %s", len(self.service.backends),
                      ", ".join(f"{d.name} ({d.kind}, {d.capacity_gib:g} GiB)" for d in self.service.monitor.devices))

    async def stop_extension(self) -> None:
        await self.service.close()
