"""The swap services of several GPU nodes, as one for a user's server in client mode.

Each node's status is kept current from its own event stream (``GET /swapserve/api/events``,
server-sent events on every change), so that choosing the node for a request
(:func:`.routing.choose_node`) reads a cache and never waits for a node. A stream that breaks marks
its node down until it connects again (retried with a growing pause); a node answers nothing while
it is down, and its models are reported unavailable. The list of nodes is the hub's: it is asked
again now and then (``discover``, injected), so a node added later appears.

No Jupyter here: the handlers (``handlers/proxy.py``) relay requests to the node chosen.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import aiohttp

from .routing import Choice, NodeState, choose_node, model_entry, offered_by, ranked

log = logging.getLogger(__name__)

#: a stream sends a keep-alive every 15 s: this long without a byte and the node counts as down
STREAM_READ_TIMEOUT = 40.0
RECONNECT_FIRST, RECONNECT_MAX = 0.5, 10.0
#: how long a first request waits for the nodes' first status (only right after the server starts)
FIRST_STATUS_TIMEOUT = 10.0
STATUS_TIMEOUT = 10.0
MODEL_FIELDS = ("engine", "api", "state")


def node_name_of(url: str) -> str:
    """A name for a node given by URL: the last path segment (…/services/swapserve-gpu1/), else host:port."""
    parsed = urlparse(url)
    segments = [s for s in parsed.path.split("/") if s]
    return segments[-1] if segments else parsed.netloc


@dataclass
class Node:
    name: str
    url: str  # the service's base URL, ending in "/" (…/services/swapserve-gpu1/)
    status: dict[str, Any] | None = None
    up: bool = False
    error: str | None = "not contacted yet"
    changed_at: float = field(default_factory=time.time)
    heard: asyncio.Event = field(default_factory=asyncio.Event)  # a first status, or a first failure

    def state(self) -> NodeState:
        return NodeState(self.name, self.up, self.status)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "up": self.up, "error": None if self.up else self.error,
                "since": self.changed_at,
                "models": [m["name"] for m in (self.status or {}).get("models", [])],
                "devices": len((self.status or {}).get("devices", []))}


class Notifier:
    """A version that grows on every change, and a wait for the next one."""

    def __init__(self) -> None:
        self.version = 0
        self._changed = asyncio.Event()

    def notify(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, timeout: float, since: int) -> int:
        if self.version == since:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)
        return self.version


class NodeDirectory:
    def __init__(self, nodes: Iterable[tuple[str, str]], token: str,
                 discover: Callable[[], list[tuple[str, str]]] | None = None, rediscover_seconds: float = 60.0,
                 ) -> None:
        self.token = token
        self.nodes: dict[str, Node] = {}
        self.notifier = Notifier()
        self._discover = discover
        self._rediscover_seconds = rediscover_seconds
        self._session: aiohttp.ClientSession | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._others: list[asyncio.Task[None]] = []
        self._started = False
        for name, url in nodes:
            self.nodes[name] = Node(name, url.rstrip("/") + "/")

    # ---- connections -------------------------------------------------------------------------
    def session(self) -> aiohttp.ClientSession:
        """One pool for the event streams and the forwarded requests, made in the running loop."""
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        return self._session

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        for node in self.nodes.values():
            self._follow(node)
        if self._discover is not None:
            self._others.append(asyncio.create_task(self._rediscover()))

    def _follow(self, node: Node) -> None:
        self._tasks[node.name] = asyncio.create_task(self._stream(node), name=f"swapserve-node-{node.name}")

    async def close(self) -> None:
        for task in [*self._tasks.values(), *self._others]:
            task.cancel()
        for task in [*self._tasks.values(), *self._others]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()

    async def _stream(self, node: Node) -> None:
        pause = RECONNECT_FIRST
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=STREAM_READ_TIMEOUT)
        while True:
            try:
                async with self.session().get(node.url + "swapserve/api/events", headers=self.headers(),
                                              timeout=timeout) as response:
                    if response.status != 200:
                        body = (await response.text())[:300]
                        raise ConnectionError(f"its event stream answered {response.status}: {body}")
                    pause = RECONNECT_FIRST
                    buffer = b""
                    async for chunk in response.content.iter_any():
                        buffer += chunk
                        while b"\n\n" in buffer:
                            event, buffer = buffer.split(b"\n\n", 1)
                            self._event(node, event)
                raise ConnectionError("its event stream ended")
            except asyncio.CancelledError:
                raise
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError, ValueError) as exc:
                self.mark_down(node, f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__)
            await asyncio.sleep(pause)
            pause = min(RECONNECT_MAX, pause * 2)

    def _event(self, node: Node, event: bytes) -> None:
        lines = event.decode("utf-8", "replace").splitlines()
        if "event: status" not in lines:
            return  # a keep-alive comment
        data = "\n".join(line[len("data:"):].lstrip() for line in lines if line.startswith("data:"))
        self.update(node, json.loads(data))

    def update(self, node: Node, status: dict[str, Any]) -> None:
        """A node's status as it reported it (its stream, or a status fetched meanwhile)."""
        if node.up and node.status is not None and status.get("version", 0) < node.status.get("version", 0):
            return  # an older document than the one kept (a fetch answered after a newer event)
        if not node.up:
            node.changed_at = time.time()
            log.info("swap service node %s is up (%s)", node.name, node.url)
        node.status, node.up, node.error = status, True, None
        node.heard.set()
        self.notifier.notify()

    def mark_down(self, node: Node, error: str) -> None:
        if node.up or node.error != error:
            log.warning("swap service node %s (%s) is not answering: %s", node.name, node.url, error)
            node.changed_at = time.time()
        node.up, node.error = False, error
        node.heard.set()
        self.notifier.notify()

    async def _rediscover(self) -> None:
        """Add the nodes the hub lists now (a node is never dropped here: a down one says so)."""
        assert self._discover is not None
        while True:
            await asyncio.sleep(self._rediscover_seconds)
            try:
                found = await asyncio.to_thread(self._discover)
            except Exception:  # the hub is busy or restarting: ask again next time
                log.exception("swap service discovery failed")
                continue
            for name, url in found:
                if name not in self.nodes:
                    log.info("swap service node %s appeared (%s)", name, url)
                    self.nodes[name] = Node(name, url.rstrip("/") + "/")
                    self._follow(self.nodes[name])
                    self.notifier.notify()

    async def first_status(self, timeout: float = FIRST_STATUS_TIMEOUT) -> None:
        """Wait until every node has said something (a status or a failure); right after the
        server starts only, later this returns at once."""
        pending = [n.heard.wait() for n in self.nodes.values() if not n.heard.is_set()]
        if pending:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*pending), timeout)

    # ---- decisions from the cache ---------------------------------------------------------------
    def states(self) -> list[NodeState]:
        return [n.state() for n in self.nodes.values()]

    def up(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.up]

    def choose(self, model: str, exclude: Sequence[str] = ()) -> tuple[Node, Choice] | None:
        choice = choose_node(model, [s for s in self.states() if s.name not in exclude])
        return (self.nodes[choice.node], choice) if choice is not None else None

    def offered_by(self, model: str) -> list[str]:
        return offered_by(model, self.states())

    def running_on(self, model: str) -> list[Node]:
        return [self.nodes[c.node] for c in ranked(model, self.states()) if c.rank == 1]

    def model_names(self) -> list[str]:
        names: dict[str, None] = {}
        for node in self.nodes.values():
            for entry in (node.status or {}).get("models", []):
                names.setdefault(entry["name"], None)
        return list(names)

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the union of the nodes' models, each saying which node a request
        would go to now and every node that offers it (a down node's models: unavailable)."""
        data = []
        for name in self.model_names():
            chosen = self.choose(name)
            nodes = [{"node": n.name, "up": n.up,
                      "state": (model_entry(n.status, name) or {}).get("state") if n.up else "unavailable"}
                     for n in self.nodes.values() if model_entry(n.status, name) is not None]
            source = model_entry(chosen[0].status if chosen else self.nodes[nodes[0]["node"]].status, name) or {}
            data.append({
                "id": name, "object": "model", "created": int(source.get("created") or 0), "owned_by": "swapserve",
                "swapserve": {**{f: source.get(f) for f in MODEL_FIELDS},
                              **({} if chosen else {"state": "unavailable"}),
                              "node": chosen[0].name if chosen else None, "nodes": nodes},
            })
        return {"object": "list", "data": data}

    def kernel_node(self, kernel_id: str) -> Node | None:
        """The node that books the notebook kernel (its status lists it), if any does."""
        return next((n for n in self.nodes.values()
                     if any(k.get("kernel_id") == kernel_id for k in (n.status or {}).get("kernels", []))), None)

    def kernels(self) -> list[dict[str, Any]]:
        """The notebook kernels the nodes book (each node lists its own), each with its node."""
        return [{**k, "node": n.name} for n in self.nodes.values() for k in (n.status or {}).get("kernels", [])]

    def status(self) -> dict[str, Any]:
        """The nodes' statuses as one: devices, models and kernels each with their node, and a
        ``nodes`` section (up or down, since when, why not, which models)."""
        devices, models, errors, checkpointers = [], [], [], {}
        user, quotas, mode = None, False, None
        for node in self.nodes.values():
            status = node.status or {}
            checkpointers[node.name] = status.get("checkpointer")
            devices += [{**d, "node": node.name} for d in status.get("devices", [])]
            for entry in status.get("models", []):
                models.append({**entry, "node": node.name} if node.up else
                              {**entry, "node": node.name, "state": "unavailable",
                               "error": f"node {node.name} is not answering: {node.error}"})
            errors += [f"{node.name}: {e}" for e in status.get("config_errors", [])]
            if node.up:
                user = user or status.get("user")
                quotas = quotas or bool(status.get("quotas"))
                mode = mode or status.get("mode")  # the nodes' shared services say "service"
        return {
            "version": self.notifier.version,
            "checkpointer": next(iter(set(checkpointers.values()))) if len(set(checkpointers.values())) == 1
            else checkpointers,
            "devices": devices,
            "models": models,
            "kernels": self.kernels(),
            "config_errors": errors,
            "quotas": quotas,
            **({"user": user} if user is not None else {}),
            **({"mode": mode} if mode is not None else {}),
            "nodes": [n.as_dict() for n in self.nodes.values()],
        }

    async def refresh(self) -> None:
        """Ask every node for its status now (``GET /swapserve/api/status``), all at once: what
        ``/api/status`` answers is as fresh as the nodes, and the cache with it."""
        timeout = aiohttp.ClientTimeout(total=STATUS_TIMEOUT)

        async def one(node: Node) -> None:
            try:
                async with self.session().get(node.url + "swapserve/api/status", headers=self.headers(),
                                              timeout=timeout) as response:
                    if response.status == 200:
                        self.update(node, await response.json())
                    elif not node.up:
                        node.error = f"its status answered {response.status}"
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                self.mark_down(node, exc.__class__.__name__)

        await asyncio.gather(*(one(n) for n in self.nodes.values()))
