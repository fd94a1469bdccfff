"""Client mode: a user's server forwards ``/swapserve/v1/*`` and ``/swapserve/api/*`` to the swap
services of the hub's GPU nodes, with the user's hub token, relaying the answer as it comes (SSE
chunk by chunk, status, ``Retry-After`` and the ``x-swapserve-*`` headers unchanged).

Several nodes look like one service: ``/v1/models`` and ``/api/status`` are their union, a request
goes to the node chosen for its model (``service/routing.py``, from the nodes' cached status, see
``service/nodes.py``), and the answer says which (``x-swapserve-node``). Routes that are not about
one model (quotas, usage: one database for all nodes) go to the first node that is up, or to the
node named by ``?node=``.

The user is authenticated by their own server first (token, cookie), exactly as in standalone
mode; the services then identify them from the hub token, so quotas, usage and fair queues apply
to the hub user. The magic, the sidebar and the openai client see the same routes.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import aiohttp
from tornado.iostream import StreamClosedError

from ..service.nodes import Node, NodeDirectory
from .base import OpenAIError, SwapServeHandler

#: request headers that travel to the service (credentials are replaced by the hub token)
FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept", "Last-Event-ID")
#: response headers that travel back to the client
FORWARDED_RESPONSE_HEADERS = ("Content-Type", "Retry-After", "Cache-Control", "X-Accel-Buffering")
RESPONSE_HEADER_PREFIX = "x-swapserve-"
NODE_HEADER = "x-swapserve-node"
#: the routes whose body names the model that picks the node
MODEL_ROUTES = ("v1/chat/completions", "v1/completions", "v1/embeddings")
MODEL_ACTION = re.compile(r"api/models/([^/]+)/(swap-in|swap-out|prefetch)")
#: a notebook kernel's routes (GET its state, POST its actions): to the node that books it
KERNEL_ROUTE = re.compile(r"api/kernels/([^/]+)(?:/[^/]+)?")
EVENTS_MIN_INTERVAL, EVENTS_KEEPALIVE = 0.1, 15.0
#: routes the service offers to users' servers themselves (their kernels' reports and commands)
OWNER_ROUTES = ("api/kernel-reports", "api/kernel-commands")


class Unreachable(Exception):
    """The node did not answer before any of its response was relayed: another may be tried."""


class ProxyHandler(SwapServeHandler):
    """Every method of every route under /swapserve/(v1|api)/ in client mode."""

    def initialize(self) -> None:
        self._task: asyncio.Task[Any] | None = None

    @property
    def directory(self) -> NodeDirectory:
        return self.settings["swapserve_nodes"]

    def on_connection_close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: drop the upstream request (the service frees its slot)

    async def get(self, path: str) -> None:
        await self._handle(path)

    async def post(self, path: str) -> None:
        await self._handle(path)

    async def put(self, path: str) -> None:
        await self._handle(path)

    async def delete(self, path: str) -> None:
        await self._handle(path)

    async def _handle(self, path: str) -> None:
        self.require_user("execute" if self.request.method == "POST" and path.startswith("v1/") else
                          "read" if self.request.method == "GET" else "write")
        if path.startswith(OWNER_ROUTES):
            # a server's own reports and command channel go to the service with the server's token
            # (kernel_reporter.py), never through this proxy on a browser's or a client's behalf
            raise OpenAIError(404, f"/swapserve/{path} is between this server and the swap service; it is not "
                                   "forwarded", code="not_forwarded")
        self._task = asyncio.current_task()
        try:
            await self.directory.first_status()
            if self.request.method == "GET" and path == "v1/models":
                self._no_node_up_is_503()
                self.finish(self.directory.models())
            elif self.request.method == "GET" and path == "api/status":
                await self.directory.refresh()
                self.finish(self.directory.status())
            elif self.request.method == "GET" and path == "api/events":
                await self._events()
            elif self.request.method == "POST" and path in MODEL_ROUTES:
                await self._to_model_node(path, self._model_of_body())
            elif self.request.method == "POST" and (action := MODEL_ACTION.fullmatch(path)):
                await self._model_action(path, action.group(1), action.group(2))
            elif self.request.method == "GET" and path == "api/kernels" and len(self.directory.nodes) > 1:
                await self.directory.refresh()
                self.finish({"kernels": self.directory.kernels()})
            elif kernel := KERNEL_ROUTE.fullmatch(path):
                await self._kernel_action(path, kernel.group(1))
            else:
                await self._to_any_node(path)
        except asyncio.CancelledError:
            if not self.request.connection.stream or not self.request.connection.stream.closed():
                raise
        except StreamClosedError:
            pass

    # ---- choosing the node -----------------------------------------------------------------------
    def _no_node_up_is_503(self) -> None:
        if not self.directory.up():
            nodes = self.directory.nodes.values()
            reasons = "; ".join(f"{n.name} at {n.url}: {n.error}" for n in nodes) or "none is configured"
            raise OpenAIError(503, f"No swap service answers ({reasons}); try again shortly.",
                              code="upstream_unreachable", retry_after=5)

    def _model_of_body(self) -> str | None:
        try:
            body = json.loads(self.request.body or b"null")
        except ValueError:
            return None  # the service answers the 400 about it
        model = body.get("model") if isinstance(body, dict) else None
        return model if isinstance(model, str) else None

    def _requested_node(self) -> Node | None:
        name = self.get_argument("node", None)
        if name is None:
            return None
        if name not in self.directory.nodes:
            raise OpenAIError(404, f"There is no node '{name}' (nodes: {', '.join(self.directory.nodes)}).",
                              param="node", code="node_not_found")
        return self.directory.nodes[name]

    def _not_served(self, model: str) -> OpenAIError:
        offered = self.directory.offered_by(model)
        if offered:
            down = "; ".join(f"{n}: {self.directory.nodes[n].error}" for n in offered)
            return OpenAIError(503, f"The model '{model}' is served only by nodes that are not answering "
                                    f"({down}); try again shortly.", param="model", code="node_unavailable",
                               retry_after=5)
        known = ", ".join(sorted(self.directory.model_names())) or "none"
        return OpenAIError(404, f"The model '{model}' does not exist on any node (models: {known}).", param="model",
                           code="model_not_found")

    async def _to_model_node(self, path: str, model: str | None) -> None:
        if model is None:
            await self._to_any_node(path)  # the service says what is wrong with the body
            return
        tried: list[str] = []
        while True:
            chosen = self.directory.choose(model, exclude=tried)
            if chosen is None:
                raise self._not_served(model) if not tried else self._unreachable(tried)
            node, _ = chosen
            try:
                await self._forward(node, path)
                return
            except Unreachable as exc:
                self.directory.mark_down(node, str(exc))
                tried.append(node.name)

    async def _model_action(self, path: str, model: str, action: str) -> None:
        node = self._requested_node()
        if node is None and action == "swap-out":
            running = self.directory.running_on(model)
            node = running[0] if running else None
        if node is None:
            chosen = self.directory.choose(model)
            if chosen is None:
                raise self._not_served(model)
            node = chosen[0]
        await self._forward_once(node, path)

    async def _kernel_action(self, path: str, kernel_id: str) -> None:
        """A notebook kernel's route goes to the node that books it (each user's server reports its
        kernels to every node; the node whose devices hold the kernel books it)."""
        node = self._requested_node() or self.directory.kernel_node(kernel_id)
        if node is None:
            await self.directory.refresh()  # booked a moment ago: the cached statuses may not say yet
            node = self.directory.kernel_node(kernel_id)
        if node is None:
            await self._to_any_node(path)  # which answers that no node books it
        else:
            await self._forward_once(node, path)

    async def _to_any_node(self, path: str) -> None:
        node = self._requested_node()
        if node is None:
            self._no_node_up_is_503()
            node = self.directory.up()[0]
        await self._forward_once(node, path)

    def _unreachable(self, tried: list[str]) -> OpenAIError:
        nodes = "; ".join(f"{n} at {self.directory.nodes[n].url}: {self.directory.nodes[n].error}" for n in tried)
        return OpenAIError(503, f"The swap service did not answer ({nodes}); try again shortly.",
                           code="upstream_unreachable", retry_after=5)

    async def _forward_once(self, node: Node, path: str) -> None:
        try:
            await self._forward(node, path)
        except Unreachable as exc:
            self.directory.mark_down(node, str(exc))
            raise self._unreachable([node.name]) from None

    # ---- relaying ----------------------------------------------------------------------------------
    async def _forward(self, node: Node, path: str) -> None:
        url = node.url + "swapserve/" + path
        query = "&".join(p for p in (self.request.query or "").split("&") if p and not p.startswith("node="))
        if query:
            url += "?" + query
        headers = {k: v for k in FORWARDED_REQUEST_HEADERS if (v := self.request.headers.get(k))}
        headers.update(self.directory.headers())
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=15.0, sock_read=None)
        try:
            async with self.directory.session().request(
                    self.request.method or "GET", url, data=self.request.body or None, headers=headers,
                    timeout=timeout, allow_redirects=False) as response:
                self.set_header(NODE_HEADER, node.name)
                await self._relay(response)
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(exc.__class__.__name__) from None  # nothing was sent: another node may take it
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if self._headers_written:
                return  # mid-stream: the connection to the client ends here too
            # sent, perhaps served: never sent again elsewhere (the user's tokens would count twice)
            raise OpenAIError(503, f"The swap service {node.name} at {node.url} stopped answering "
                                   f"({exc.__class__.__name__}); try again shortly.", code="upstream_unreachable",
                              retry_after=5) from None

    async def _relay(self, response: aiohttp.ClientResponse) -> None:
        self.set_status(response.status)
        for name, value in response.headers.items():
            if name in FORWARDED_RESPONSE_HEADERS or name.lower().startswith(RESPONSE_HEADER_PREFIX):
                self.set_header(name, value)
        if response.headers.get("Content-Type", "").startswith("text/event-stream"):
            async for chunk in response.content.iter_any():
                self.write(chunk)
                await self.flush()
            self.finish()
        else:
            self.finish(await response.read())

    async def _events(self) -> None:
        """The nodes' status as one, as server-sent events, on every change of any node."""
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        notifier = self.directory.notifier
        version = -1
        while True:
            if version != notifier.version:
                version = notifier.version
                self.write(f"event: status\ndata: {json.dumps(self.directory.status())}\n\n")
                await self.flush()
                await asyncio.sleep(EVENTS_MIN_INTERVAL)
                continue
            if await notifier.wait(EVENTS_KEEPALIVE, since=version) == version:
                self.write(": keepalive\n\n")
                await self.flush()


def proxy_handlers() -> list[tuple]:
    return [(r"/swapserve/((?:v1|api)/.*)", ProxyHandler)]
