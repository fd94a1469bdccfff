"""The one door to an engine: engines listen on a Unix socket in an owner-only directory, and
the service reaches each through a gate on 127.0.0.1 that lets in only the service's own Unix
user.

Why a gate and not the socket alone: every caller in the service (the route's forwarding, the
scheduler's readiness probes, warm-up and sleep/wake hooks, token counting) speaks HTTP to an
engine's ``base_url``; the gate keeps that address (``http://127.0.0.1:<port>``) while the engine
itself listens on no TCP port at all. A local process of another user that connects to the gate
is answered 403 and cut off before anything reaches the engine (its user is read from the other
end of the loopback connection, in /proc/net/tcp); the socket's directory (mode 0700) keeps it
off the socket itself. Processes of the service's own user are trusted, as they could read the
service's memory anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import stat
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from ..engines.base import LaunchSpec, engine_socket_dir
from . import procfs

log = logging.getLogger(__name__)

_REFUSAL_BODY = (b'{"error": {"message": "Only the swap service may call its engines.", '
                 b'"type": "permission_error", "param": null, "code": "forbidden"}}')
REFUSAL = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nConnection: close\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY))
CHUNK = 1 << 16


class GateError(RuntimeError):
    """The gate or its private directory cannot be set up (the message names the path or port)."""


def ensure_private_dir(path: Path) -> Path:
    """``path`` as a directory only its owner (this user) may enter: created 0700, or checked to
    be a real directory of this user and tightened to 0700 (a directory of another user, or a
    link, in a shared /tmp would let that user in: refused)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise GateError(f"{path} is not a directory of this user (uid {os.geteuid()}); remove it and start again")
    if info.st_mode & 0o077:
        path.chmod(0o700)
    return path


class EngineGate:
    """Accepts on ``127.0.0.1:port`` from ``allowed_uid`` alone and relays each connection, byte
    for byte, to the engine's Unix socket. Not reusable: one per engine start.

    The relay is as transparent as a wire, with one thing a wire does not need: an engine that ends
    a kept-alive connection (llama-server ends it after every streamed answer, whatever its
    Keep-Alive header said) has its end reach a direct client at once, but a client of the gate
    only once the gate has relayed it; a request that the client sent meanwhile, and that the
    engine never read, goes to the engine on a new connection instead of being lost with the old
    one (:class:`_Relay` says when that is certain)."""

    def __init__(self, port: int, socket_path: str, allowed_uid: int | None = None) -> None:
        self.port, self.socket_path = port, socket_path
        self.allowed_uid = os.geteuid() if allowed_uid is None else allowed_uid
        self.refused = 0  # connections turned away (another user's)
        self.engine_connections = 0  # connections opened to the engine (for the tests, and the curious)
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Future[None]] = set()
        self._tightened = False

    async def open(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(128)
        except OSError as exc:
            listener.close()
            raise GateError(f"cannot listen on 127.0.0.1:{self.port}: {exc.strerror or exc}") from None
        listener.setblocking(False)
        self._listener, self._loop = listener, asyncio.get_running_loop()
        self._spawn(self._accept_all(listener))

    def close(self) -> None:
        """Stop accepting and cut every relayed connection (synchronous: also the last resort)."""
        # also at interpreter exit (atexit), when the loop may be closed already: its sockets
        # close with the process then, and the socket file must still go
        with contextlib.suppress(RuntimeError):
            for task in list(self._tasks):
                task.cancel()
        if self._listener is not None:
            if self._loop is not None and not self._loop.is_closed():
                # off the selector before the descriptor is closed (and perhaps reused)
                with contextlib.suppress(RuntimeError, ValueError, OSError):
                    self._loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept_all(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, _ = await loop.sock_accept(listener)
            except OSError as exc:
                if listener.fileno() == -1:
                    return  # closed
                log.warning("engine gate %d: accept failed: %s", self.port, exc)
                await asyncio.sleep(0.1)  # out of descriptors, say: try again, without spinning
                continue
            client.setblocking(False)
            # answers are relayed as the engine writes them: a streamed token is not held back
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._serve(client))

    async def _serve(self, client: socket.socket) -> None:
        try:
            peer, own = client.getpeername(), client.getsockname()
            uid = procfs.tcp_socket_uid(tuple(peer[:2]), tuple(own[:2]))
            if uid != self.allowed_uid:
                self.refused += 1
                log.warning("engine gate %d: refused a connection of uid %s (only uid %d may call the engine)",
                            self.port, uid, self.allowed_uid)
                await _refuse(client)
                return
            await _Relay(self, client).run()
        except (asyncio.CancelledError, OSError):
            pass
        finally:
            client.close()

    async def connect(self) -> socket.socket | None:
        """A new connection to the engine, or None when it does not listen (starting, or gone)."""
        engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        engine.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(engine, self.socket_path)
        except OSError:
            engine.close()
            return None
        except BaseException:
            engine.close()
            raise
        self.engine_connections += 1
        self._tighten()
        return engine

    def _tighten(self) -> None:
        # engines create their socket with their own umask (uvicorn makes it 0666): owner-only,
        # beside the directory's 0700
        if not self._tightened:
            with contextlib.suppress(OSError):
                os.chmod(self.socket_path, 0o600)
            self._tightened = True


async def open_gate(spec: LaunchSpec) -> EngineGate | None:
    """For an engine on a Unix socket: its owner-only directory, no stale socket of an earlier
    start, and the gate on ``spec.port`` (runtime/gate.py). None for an engine on a TCP port."""
    if not spec.unix_socket:
        # no stale socket named by this port may stand for an engine on it (service/upstream.py
        # connects to a port's socket where there is one)
        with contextlib.suppress(OSError):
            os.unlink(engine_socket_dir() / f"{spec.port}.sock")
        return None
    ensure_private_dir(Path(spec.unix_socket).parent)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(spec.unix_socket)
    gate = EngineGate(spec.port, spec.unix_socket)
    await gate.open()
    return gate


#: how ``_Relay._copy`` ended: the engine ended its side, or reset the connection (it closed with
#: bytes of ours unread), or the client could not be written to
ENDED, RESET, CLIENT_GONE = "ended", "reset", "client gone"
#: the most a relay keeps of an unanswered request to send again (a larger one is not sent again)
REPLAY_LIMIT = 8 << 20


class _Relay:
    """One client connection to the gate, relayed both ways to the engine over one engine
    connection at a time, until the connection is over.

    Each side's end is passed on as a wire would: a client that hangs up (or half-closes after its
    request) has the engine's side shut down for writing, so the engine stops generating for a
    client that is gone and still answers one that only half-closed; the engine's end ends the
    client's connection (the end of an answer that runs to the close). Except where the engine
    ended a connection without reading what the client sent on it, which, on a Unix socket, the
    kernel says for certain: a write fails (EPIPE: the engine had closed), or the engine's side is
    reset (ECONNRESET: it closed with bytes unread). Those bytes (at most ``REPLAY_LIMIT``, sent
    since the engine's last byte to the client) go once more, on a new connection, so the
    client's request is answered; so do those the client sends after the engine ended its side."""

    def __init__(self, gate: EngineGate, client: socket.socket) -> None:
        self.gate, self.client = gate, client
        self.loop = asyncio.get_running_loop()
        self.engine: socket.socket | None = None
        self.to_client: asyncio.Future[str] | None = None
        #: bytes sent to the engine since its last byte to the client, and a copy of them to send
        #: again (None once over REPLAY_LIMIT, or once sent again: a second time is not tried)
        self.unanswered = 0
        self.replay: bytearray | None = bytearray()
        self.write_refused = False  # a write to this engine connection failed: it had closed

    async def run(self) -> None:
        if not await self._reconnect():
            return  # the engine does not listen (starting, or gone): the caller sees the connection close
        from_client: asyncio.Future[bytes] | None = asyncio.ensure_future(self.loop.sock_recv(self.client, CHUNK))
        try:
            while True:
                assert self.to_client is not None
                if not self.to_client.done():
                    await asyncio.wait({self.to_client} if from_client is None else {self.to_client, from_client},
                                       return_when=asyncio.FIRST_COMPLETED)
                    if from_client is None or not from_client.done():
                        continue
                else:
                    outcome = self.to_client.result()
                    if outcome == CLIENT_GONE:
                        return
                    if self.unanswered:
                        if not (self._unread(outcome) and await self._reconnect()):
                            return  # the engine read a request and ended without answering, or is gone
                        continue
                    if from_client is None or not (from_client.done() or _peek(self.client)):
                        return  # the engine ended its side, and nothing more of the client's is on its way
                    await from_client  # a request after the engine's end: on a new connection, below
                data = from_client.result()
                if not data:
                    from_client = None  # the client is done sending: so is the engine's peer
                    with contextlib.suppress(OSError):
                        self.engine.shutdown(socket.SHUT_WR)  # type: ignore[union-attr]
                    continue
                if self.to_client.done() or _peer_ended(self.engine):
                    # the engine ended this connection after its last answer: what is left of that
                    # answer reaches the client first, then the request goes on a new connection
                    outcome = await self.to_client
                    if outcome == CLIENT_GONE or (self.unanswered and not self._unread(outcome)):
                        return
                    if not await self._reconnect():
                        return
                await self._send(data)
                from_client = asyncio.ensure_future(self.loop.sock_recv(self.client, CHUNK))
        finally:
            # the client learns at once that the connection is over, before anything here awaits:
            # a request it sends later goes on a new connection of its own, instead of being lost
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_RDWR)
            tasks = [t for t in (self.to_client, from_client) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.engine is not None:
                self.engine.close()

    def _unread(self, outcome: str) -> bool:
        """Whether the engine connection that just ended left what was sent on it unread, for
        certain (and a copy is here to send again)."""
        return (outcome == RESET or self.write_refused) and self.replay is not None

    async def _reconnect(self) -> bool:
        """A new engine connection in place of the old one, with what the old one left unread
        sent on it; False when the engine does not listen."""
        if self.engine is not None:
            self.engine.close()
        self.engine, self.write_refused = await self.gate.connect(), False
        if self.engine is None:
            return False
        self.to_client = asyncio.ensure_future(self._copy(self.engine))
        if self.unanswered:
            assert self.replay is not None
            pending, self.unanswered, self.replay = bytes(self.replay), 0, None
            await self._send(pending)
        return True

    async def _send(self, data: bytes) -> None:
        """The client's bytes to the engine (a copy kept until the engine answers)."""
        self.unanswered += len(data)
        if self.replay is not None and len(self.replay) + len(data) <= REPLAY_LIMIT:
            self.replay += data
        else:
            self.replay = None
        try:
            await self.loop.sock_sendall(self.engine, data)  # type: ignore[arg-type]
        except (BrokenPipeError, ConnectionResetError):
            # the engine had closed: nothing of it was read, and _copy is about to see the end
            self.write_refused = True

    async def _copy(self, engine: socket.socket) -> str:
        """The engine's bytes to the client, until the engine ends its side or resets it, or the
        client cannot be written to."""
        while True:
            try:
                data = await self.loop.sock_recv(engine, CHUNK)
            except ConnectionResetError:
                return RESET
            except OSError:
                return ENDED
            if not data:
                return ENDED
            self.unanswered, self.replay = 0, bytearray()  # the engine answers: nothing to send again
            try:
                await self.loop.sock_sendall(self.client, data)
            except OSError:
                return CLIENT_GONE


def _peek(sock: socket.socket) -> bytes | None:
    """The next byte waiting on ``sock``, left there; ``b""`` at the end of the peer's side (or a
    connection reset); None while nothing is waiting."""
    try:
        return sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _peer_ended(sock: socket.socket | None) -> bool:
    """Whether the peer has ended its side of ``sock`` (closed, shut down or reset it), asked of the
    kernel without reading anything (a reset stays for the reader to see)."""
    if sock is None:
        return True
    poll = select.poll()
    poll.register(sock, select.POLLRDHUP | select.POLLHUP | select.POLLERR)
    return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, events in poll.poll(0))


async def _refuse(client: socket.socket) -> None:
    """Answer 403 and end the connection gently: the request head is read away first, since closing
    a socket with unread data resets the connection and the answer would be lost."""
    loop = asyncio.get_running_loop()

    async def read_head() -> None:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < CHUNK:
            data = await loop.sock_recv(client, CHUNK)
            if not data:
                return
            head += data

    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(read_head(), 5.0)
        await loop.sock_sendall(client, REFUSAL)
        client.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(loop.sock_recv(client, CHUNK), 5.0)  # until the client closes its end
