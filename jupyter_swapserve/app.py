"""The Jupyter Server extension: configuration, start and stop of the swap service, routes."""

from __future__ import annotations

import getpass
import logging
import os
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir
from jupyter_server.extension.application import ExtensionApp
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection
from traitlets import Bool, Enum, Float, List, Unicode

from .config import ConfigError, ModelsFile, load_models_file
from .gpu.checkpoint import make_checkpointer
from .gpu.monitor import GpuMonitor
from .handlers import handlers
from .handlers.fallback import fallback_handlers
from .handlers.proxy import proxy_handlers
from .kernel_connection import SETTING as KERNEL_GATE
from .kernel_connection import SwapServeKernelConnection
from .kernel_reporter import KernelReporter
from .kernel_watch import KernelWatcher
from .runtime import Runtimes
from .service import KernelOptions, Seams, ServiceConfig, SwapService, build_service
from .service.accounting import QuotaAccounting
from .service.identity import AdminRule
from .service.nodes import NodeDirectory, node_name_of
from .service.steps import DriverSteps
from .service.storage import QuotaStore, StorageError


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

    admin_users = List(
        Unicode(), config=True,
        help="Users who may read and change everyone's quotas and usage. Standalone servers (no hub): "
             "the server's one user is an admin unless this or admin_groups is set.",
    )
    admin_groups = List(Unicode(), config=True, help="JupyterHub groups whose members are admins.")
    hub_admins_are_admins = Bool(True, config=True, help="JupyterHub admins are admins of the swap service.")
    local_user = Unicode(
        "", config=True,
        help="The user name of a server without JupyterHub (token or password login), under which its "
             "quota and usage are kept. Empty: the operating-system user running the server.",
    )
    quota_db_url = Unicode(
        "", config=True,
        help="SQLAlchemy URL of the quota and usage database. Empty: SQLite (WAL) at "
             "<Jupyter data dir>/swapserve/quotas.sqlite. 'none': quotas off, nothing counted.",
    )
    podman_url = Unicode(
        "", config=True,
        help="The podman service for container models (runtime: podman), e.g. unix:///run/podman/podman.sock. "
             "Empty: $SWAPSERVE_PODMAN_URL, else a 'podman system service' started for this server.",
    )

    mode = Enum(
        ["auto", "standalone", "service", "client"], "auto", config=True,
        help="standalone: this server runs the engines for its one user. service: the shared service of a "
             "JupyterHub (set by `jupyter swapserve`). client: a user's server under a hub whose /swapserve/ "
             "routes forward to the shared services of the hub's nodes. auto: client when an upstream is "
             "configured or the hub has a service named by hub_service_prefix, else standalone.",
    )
    upstream_url = Unicode(
        "", config=True,
        help="Client mode: the shared swap service's URL, e.g. http://127.0.0.1:10101/services/swapserve/. "
             "Empty: $SWAPSERVE_UPSTREAM_URL, else the services found at the hub (hub_service_prefix).",
    )
    upstream_urls = List(
        Unicode(), config=True,
        help="Client mode: the swap services of several nodes, one URL each (as upstream_url); requests go "
             "to the node that serves their model. Empty: upstream_url, else the hub's services.",
    )
    hub_service_prefix = Unicode(
        "swapserve", config=True,
        help="Client mode: every hub service named so, or so followed by '-' (swapserve, swapserve-gpu1, ...), "
             "is a node's swap service (GET /hub/api/services with the server's token).",
    )
    hub_service_name = Unicode(
        "swapserve", config=True,
        help="The hub service asked for when the server's token may not list the hub's services "
             "(GET /hub/api/services/<name>).",
    )
    kernel_tenants = Bool(
        True, config=True,
        help="Notebook kernels that hold GPU memory are tenants of the GPUs like the models: listed in the "
             "status, evicted by the same policy when idle, checkpointed (never frozen) and restored before "
             "their next cell runs. Standalone: this server's kernels. Under JupyterHub, a user's server "
             "(client mode) reports its kernels to the shared service and swaps them when it says so; the "
             "service (service mode) books and ranks the kernels its users' servers report.",
    )
    kernel_lease = Float(
        15.0, config=True,
        help="Service mode: a user's server's kernel report holds this many seconds. A server that stops "
             "reporting loses its kernels' bookings: they are then counted by what their processes hold "
             "(NVML) until those end, and are never victims.",
    )
    kernel_command_timeout = Float(
        10.0, config=True,
        help="Service mode: seconds a user's server has to take a command (swap a kernel out or in) before "
             "the service gives up on it (and picks another victim); the work itself may then take longer, "
             "by the GiB to move.",
    )
    kernel_idle_timeout = Float(
        None, allow_none=True, config=True,
        help="Swap out a kernel's GPU memory after this many seconds without execution. None (the "
             "default): only when a swap-in needs the memory, or its user asks (%%gpu release).",
    )
    kernel_check_interval = Float(2.0, config=True, help="Seconds between sweeps of the kernels' GPU memory.")
    kernel_tenants_on_virtual_device = Bool(
        False, config=True,
        help="On a server without a GPU (virtual device 0), count kernels as tenants by their host "
             "memory: demos and tests of kernel swapping (bookkeeping only, nothing is checkpointed). Under "
             "JupyterHub, set it on the users' servers and on the shared service alike.",
    )
    event_log = Unicode(
        "", config=True,
        help="JSON-lines log of every swap, eviction and engine failure. Empty: "
             "<Jupyter data dir>/swapserve/events.jsonl. 'none': no event log.",
    )

    def _resolve_mode(self) -> tuple[str, list[tuple[str, str]]]:
        """The mode, and in client mode the nodes' services as (name, URL)."""
        if self.mode in ("standalone", "service"):
            return self.mode, []
        urls = list(self.upstream_urls) or [u for u in (self.upstream_url, os.environ.get("SWAPSERVE_UPSTREAM_URL"))
                                            if u][:1]
        nodes = [(node_name_of(u), u) for u in urls]
        if not nodes and os.environ.get("JUPYTERHUB_API_URL"):
            nodes = self._discover_nodes()
        if nodes:
            return "client", nodes
        if self.mode == "client":
            raise SystemExit("jupyter-swapserve: SwapServe.mode is 'client' but no swap service was found: set "
                             "SwapServe.upstream_urls or $SWAPSERVE_UPSTREAM_URL, or register one with the hub")
        return "standalone", []

    def _discover_nodes(self) -> list[tuple[str, str]]:
        from .hub import discover_upstreams  # only under a hub: it imports JupyterHub's auth

        return discover_upstreams(self.hub_service_prefix, self.hub_service_name)

    def _make_accounting(self) -> QuotaAccounting | None:
        url = self.quota_db_url
        if url.lower() == "none":
            return None
        if not url:
            path = Path(jupyter_data_dir()) / "swapserve" / "quotas.sqlite"
            path.parent.mkdir(parents=True, exist_ok=True)
            url = f"sqlite:///{path}"
        try:
            accounting = QuotaAccounting(QuotaStore(url))
        except StorageError as exc:
            # quotas cannot be enforced: refuse to serve rather than serve everyone without limits
            raise SystemExit(f"jupyter-swapserve: SwapServe.quota_db_url: {exc}") from None
        self.log.info("jupyter-swapserve: quotas and usage in %s", accounting.store.engine.url.render_as_string())
        return accounting

    def _route_core_logs(self) -> None:
        """The core logs under 'jupyter_swapserve.*' with the standard library: show its lines (swap
        steps, evictions, model failures with their reasons) in the server's log, formatted alike."""
        core = logging.getLogger("jupyter_swapserve")
        handlers = getattr(getattr(self, "serverapp", None), "log", self.log).handlers or self.log.handlers
        if handlers and not core.handlers:
            for handler in handlers:
                core.addHandler(handler)
            core.setLevel(logging.INFO)
            core.propagate = False

    def initialize_settings(self) -> None:
        self._route_core_logs()
        self.resolved_mode, nodes = self._resolve_mode()
        self.settings["swapserve_mode"] = self.resolved_mode
        self.settings["swapserve_local_user"] = self.local_user or getpass.getuser()
        self.settings["swapserve_admin_rule"] = AdminRule.of(self.admin_users, self.admin_groups,
                                                             self.hub_admins_are_admins)
        self.service: SwapService | None = None
        self.nodes: NodeDirectory | None = None
        self.kernel_reporter: KernelReporter | None = None
        if nodes:
            # the hub's token for this server, owned by its user: the services see that user
            token = os.environ.get("JUPYTERHUB_API_TOKEN", "")
            discovered = not (self.upstream_urls or self.upstream_url or os.environ.get("SWAPSERVE_UPSTREAM_URL"))
            self.nodes = NodeDirectory(nodes, token, discover=self._discover_nodes if discovered else None)
            self.settings["swapserve_nodes"] = self.nodes
            self.log.info("jupyter-swapserve: client mode, /swapserve/ forwarded to %s",
                          ", ".join(f"{name} ({url})" for name, url in nodes))
            if self._kernels_are_tenants():
                self._report_kernels(token)
            return
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
        config, seams = self._service_config()
        try:
            self.service = build_service(models, config, seams)
        except OSError as exc:
            raise SystemExit(f"jupyter-swapserve: SwapServe.event_log: cannot open {config.event_log}: {exc}") from None
        if config.event_log is not None:
            self.log.info("jupyter-swapserve: event log %s", config.event_log)
        self.settings["swapserve_service"] = self.service
        self.settings["swapserve_metrics"] = self.service.metrics
        self.service.metrics.register_globally()  # also at jupyter_server's /metrics
        if self.service.kernels is not None:
            self.settings["swapserve_kernels"] = self.service.kernels
        if self.service.kernels is not None and self.resolved_mode == "standalone":
            self.settings[KERNEL_GATE] = self.service.kernels
            self.settings["kernel_websocket_connection_class"] = SwapServeKernelConnection

    def _report_kernels(self, token: str) -> None:
        """Client mode: this server's kernels reported to the shared service, swapped on its commands."""
        assert self.nodes is not None
        directory = self.nodes
        monitor = GpuMonitor(None)
        if not monitor.has_gpu and not self.kernel_tenants_on_virtual_device:
            return  # no GPU here: no kernel of this server can hold GPU memory
        self.kernel_reporter = KernelReporter(
            KernelWatcher(self.serverapp, os.environ.get("JUPYTERHUB_USER") or self.settings["swapserve_local_user"]),
            monitor, DriverSteps(make_checkpointer(monitor.has_gpu)),
            lambda: [node.url for node in directory.nodes.values()], token,
            os.environ.get("JUPYTERHUB_SERVER_NAME", ""), virtual=self.kernel_tenants_on_virtual_device,
            interval=self.kernel_check_interval)
        self.settings[KERNEL_GATE] = self.kernel_reporter
        self.settings["kernel_websocket_connection_class"] = SwapServeKernelConnection

    def _service_config(self) -> tuple[ServiceConfig, Seams]:
        """The core's configuration and seams, from this extension's traits."""
        data = Path(jupyter_data_dir()) / "swapserve"
        event_log = None if self.event_log.lower() == "none" else Path(self.event_log or data / "events.jsonl")
        config = ServiceConfig(idle_check_interval=self.idle_check_interval, accounting=self._make_accounting(),
                               kernels=None, metrics=True, event_log=event_log)
        seams = Seams(runtimes=Runtimes(self.podman_url))
        if self.kernel_tenants and self.resolved_mode == "service":
            # the kernels of users' servers, which report them and act on the service's commands
            config.kernels = KernelOptions(idle_timeout=self.kernel_idle_timeout,
                                           on_virtual_device=self.kernel_tenants_on_virtual_device,
                                           interval=min(self.kernel_check_interval, 1.0), remote=True,
                                           lease_s=self.kernel_lease, answer_timeout_s=self.kernel_command_timeout)
        elif self._kernels_are_tenants():
            config.kernels = KernelOptions(idle_timeout=self.kernel_idle_timeout,
                                           on_virtual_device=self.kernel_tenants_on_virtual_device,
                                           interval=self.kernel_check_interval)
            seams.kernel_facts = KernelWatcher(self.serverapp, self.settings["swapserve_local_user"])
        return config, seams

    def _kernels_are_tenants(self) -> bool:
        """This server's kernels as GPU tenants (standalone, or reported by a user's server in client
        mode): their websocket connection swaps a checkpointed kernel back in before its next cell, so
        it must be ours (or Jupyter's own, which it wraps)."""
        if not self.kernel_tenants or self.resolved_mode not in ("standalone", "client"):
            return False
        configured = self.settings.get("kernel_websocket_connection_class")
        if configured not in (None, ZMQChannelsWebsocketConnection, SwapServeKernelConnection):
            self.log.warning("jupyter-swapserve: kernels are not GPU tenants: ServerApp.kernel_websocket_"
                             "connection_class is %s, which cannot be wrapped", configured)
            return False
        return True

    def initialize_handlers(self) -> None:
        # client mode: everything under /swapserve/ goes to the shared service; the rest is a JSON 404
        self.handlers.extend([*proxy_handlers(), *fallback_handlers()] if self.nodes is not None else handlers())

    async def _start_jupyter_server_extension(self, serverapp) -> None:  # type: ignore[override]
        if self.service is not None:
            self.service.start()
        if self.nodes is not None:
            self.nodes.start()
        if self.kernel_reporter is not None:
            self.kernel_reporter.start()
        if self.export_env and self.resolved_mode != "service":
            os.environ["SWAPSERVE_URL"] = serverapp.connection_url.rstrip("/") + "/swapserve/v1"
            token = getattr(serverapp.identity_provider, "token", "") or ""
            if token:
                os.environ["SWAPSERVE_TOKEN"] = token
        if self.service is not None:
            self.log.info("jupyter-swapserve: %s mode, %d model(s), devices: %s", self.resolved_mode,
                          len(self.service.backends), ", ".join(f"{d.name} ({d.kind}, {d.capacity_gib:g} GiB)"
                                                              for d in self.service.monitor.devices))

    async def stop_extension(self) -> None:
        if self.settings.get("swapserve_metrics") is not None:
            self.settings["swapserve_metrics"].unregister_globally()
        if self.service is not None:
            await self.service.close()
        if self.kernel_reporter is not None:
            await self.kernel_reporter.close()
        if self.nodes is not None:
            await self.nodes.close()
