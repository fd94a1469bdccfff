"""Client mode: a user's server forwards ``/swapserve/v1/*`` and ``/swapserve/api/*`` to the shared
swap service, with the user's hub token, relaying the answer as it comes (SSE chunk by chunk).

The user is authenticated by their own server first (token, cookie), exactly as in standalone
mode; the shared service then identifies them from the hub token, so quotas, usage and fair
queues apply to the hub user. The magic, the sidebar and the openai client see the same routes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from tornado.iostream import StreamClosedError

from .base import OpenAIError, SwapServeHandler

#: request headers that travel to the shared service (credentials are replaced by the hub token)
FORWARDED_REQUEST_HEADERS = ("Content-Type", "Accept", "Last-Event-ID")
#: response headers that travel back to the client
FORWARDED_RESPONSE_HEADERS = ("Content-Type", "Retry-After", "Cache-Control", "X-Accel-Buffering")
RESPONSE_HEADER_PREFIX = "x-swapserve-"


class UpstreamClient:
    """One aiohttp session to the shared service, made in the running loop on first use."""

    def __init__(self, base_url: str, token: str) -> None:
        self.base_url = base_url.rstrip("/") + "/"
        self.token = token
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class ProxyHandler(SwapServeHandler):
    """Every method of every route under /swapserve/(v1|api)/ in client mode."""

    def initialize(self) -> None:
        self._task: asyncio.Task[Any] | None = None

    @property
    def upstream(self) -> UpstreamClient:
        return self.settings["swapserve_upstream"]

    def on_connection_close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client went away: drop the upstream request (the service frees its slot)

    async def get(self, path: str) -> None:
        await self._forward(path)

    async def post(self, path: str) -> None:
        await self._forward(path)

    async def put(self, path: str) -> None:
        await self._forward(path)

    async def delete(self, path: str) -> None:
        await self._forward(path)

    async def _forward(self, path: str) -> None:
        self.require_user("execute" if self.request.method == "POST" and path.startswith("v1/") else
                          "read" if self.request.method == "GET" else "write")
        self._task = asyncio.current_task()
        url = self.upstream.base_url + "swapserve/" + path
        if self.request.query:
            url += "?" + self.request.query
        headers = {k: v for k in FORWARDED_REQUEST_HEADERS if (v := self.request.headers.get(k))}
        headers["Authorization"] = f"token {self.upstream.token}"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=15.0, sock_read=None)
        try:
            async with self.upstream.session().request(
                    self.request.method or "GET", url, data=self.request.body or None, headers=headers,
                    timeout=timeout, allow_redirects=False) as response:
                await self._relay(response)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if self._headers_written:
                return  # mid-stream: the connection to the client ends here too
            raise OpenAIError(503, f"The shared swap service at {self.upstream.base_url} did not answer "
                                   f"({exc.__class__.__name__}); try again shortly.", code="upstream_unreachable",
                              retry_after=5) from None
        except asyncio.CancelledError:
            if not self.request.connection.stream or not self.request.connection.stream.closed():
                raise
        except StreamClosedError:
            pass

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


def proxy_handlers() -> list[tuple]:
    return [(r"/swapserve/((?:v1|api)/.*)", ProxyHandler)]
