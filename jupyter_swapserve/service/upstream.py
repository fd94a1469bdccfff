"""Forwarding to an engine: the hot path of every request.

aiohttp rather than httpx here: on this path it costs about 1 ms less per request (measured
against the same llama.cpp engine, 300 requests each), which is most of what the route adds.
The rest of the service (readiness probes, warm-up, sleep/wake hooks) keeps httpx.

An engine on a Unix socket (runtime/gate.py) is reached at ``http://127.0.0.1:<port>``, its gate;
this hot path skips the gate's relay and connects to the socket itself (the same door: only the
service's user may open it), found by the port's name in the engine socket directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp

from ..engines.base import engine_socket_dir
from .scheduler import EngineUnavailable


def _ended_before_the_request(exc: aiohttp.ClientConnectionError) -> bool:
    """Whether a request failed because the engine had ended the pooled connection it was sent on,
    before the pool saw the end: its keep-alive ran out (e.g. while it was frozen: nothing is
    answered, ServerDisconnected), or it ended the connection right after its last answer although
    that answer offered keep-alive (llama-server does after every stream), and writing the request
    to the closed socket failed (a broken pipe or reset: aiohttp's ClientOSError, or the transport
    it closed on that error as its cause). The engine answered nothing and did not read the whole
    request: it may be sent again."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return True
    return any(isinstance(e, (BrokenPipeError, ConnectionResetError))
               or getattr(e, "errno", None) in (errno.EPIPE, errno.ECONNRESET)
               for e in (exc, exc.__cause__))


class UpstreamResponse:
    """An engine's response, read once: whole (``read``) or chunk by chunk (``iter_chunks``).
    Transport errors become :class:`EngineUnavailable`."""

    def __init__(self, response: aiohttp.ClientResponse, model: str) -> None:
        self._response = response
        self._model = model
        self.status_code = response.status
        self.headers = response.headers

    def _unavailable(self, exc: BaseException) -> EngineUnavailable:
        return EngineUnavailable(f"model '{self._model}' stopped answering mid-response: {exc.__class__.__name__}")

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._unavailable(exc) from None

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise self._unavailable(exc) from None


class Upstream:
    """One connection pool to the engines on TCP ports and one per engine socket, made in the
    running loop on first use."""

    def __init__(self, socket_dir: Path | None = None) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._socket_sessions: dict[str, aiohttp.ClientSession] = {}
        self._retired: list[aiohttp.ClientSession] = []
        self._socket_dir = socket_dir or engine_socket_dir()

    def _get_session(self, url: str) -> aiohttp.ClientSession:
        # no limit on connections: each model already bounds its own concurrency
        # idle connections are dropped before the engines' own keep-alive (uvicorn: 5 s) ends them
        socket_path = self._engine_socket(url)
        if socket_path is not None:
            session = self._socket_sessions.get(socket_path)
            if session is None or session.closed:
                self._forget_gone_sockets()
                session = aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(socket_path, limit=0, keepalive_timeout=4.0),
                    auto_decompress=False)
                self._socket_sessions[socket_path] = session
            return session
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4.0),
                                                  auto_decompress=False)
        return self._session

    def _engine_socket(self, url: str) -> str | None:
        """The socket behind a gate at ``url``'s port, or None for an engine on a TCP port (whose
        runtime removed any socket of that name: runtime/gate.py, open_gate)."""
        parts = urlsplit(url)
        if parts.hostname != "127.0.0.1" or parts.port is None:
            return None
        path = self._socket_dir / f"{parts.port}.sock"
        try:
            return str(path) if stat.S_ISSOCK(path.stat().st_mode) else None
        except OSError:
            return None

    def _forget_gone_sockets(self) -> None:
        # an engine that restarted listens on a new socket: the old one's pool is retired (its
        # connections ended with the engine), and closed with the rest
        for path in [p for p in self._socket_sessions if not os.path.exists(p)]:
            self._retired.append(self._socket_sessions.pop(path))

    @contextlib.asynccontextmanager
    async def post(self, url: str, body: bytes, model: str, read_timeout: float) -> AsyncIterator[UpstreamResponse]:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0, sock_read=read_timeout)
        session = self._get_session(url)
        try:
            try:
                response = await session.post(url, data=body, headers={"Content-Type": "application/json"},
                                              timeout=timeout)
            except aiohttp.ClientConnectionError as exc:
                if not _ended_before_the_request(exc):
                    raise
                # a pooled connection the engine had ended as it was reused: nothing was answered,
                # so the request is sent once more, on a new connection
                response = await session.post(url, data=body, headers={"Content-Type": "application/json"},
                                              timeout=timeout)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise EngineUnavailable(f"model '{model}' did not answer: {exc.__class__.__name__}") from None
        try:
            yield UpstreamResponse(response, model)
        except BaseException:
            # cancelled (the client hung up) or failed mid-body: drop the connection, which tells the
            # engine to stop generating, instead of returning a half-read one to the pool
            response.close()
            raise
        finally:
            response.release()

    async def close(self) -> None:
        for session in [self._session, *self._socket_sessions.values(), *self._retired]:
            if session is not None:
                await session.close()
