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
import stat
from pathlib import Path

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
    for byte, to the engine's Unix socket. Not reusable: one per engine start."""

    def __init__(self, port: int, socket_path: str, allowed_uid: int | None = None) -> None:
        self.port, self.socket_path = port, socket_path
        self.allowed_uid = os.geteuid() if allowed_uid is None else allowed_uid
        self.refused = 0  # connections turned away (another user's)
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self._tightened = False

    async def open(self) -> None:
        try:
            self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        except OSError as exc:
            raise GateError(f"cannot listen on 127.0.0.1:{self.port}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Stop accepting and cut every relayed connection (synchronous: also the last resort)."""
        # also at interpreter exit (atexit), when the loop may be closed already: its sockets
        # close with the process then, and the socket file must still go
        with contextlib.suppress(RuntimeError):
            if self._server is not None:
                self._server.close()
            for task in list(self._relays):
                task.cancel()
        self._server = None
        with contextlib.suppress(OSError):
            os.unlink(self.socket_path)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        try:
            peer, own = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
            uid = procfs.tcp_socket_uid(tuple(peer[:2]), tuple(own[:2]))
            if uid != self.allowed_uid:
                self.refused += 1
                log.warning("engine gate %d: refused a connection of uid %s (only uid %d may call the engine)",
                            self.port, uid, self.allowed_uid)
                await _refuse(reader, writer)
                return
            try:
                up_reader, up_writer = await asyncio.open_unix_connection(self.socket_path)
            except OSError:
                return  # not listening yet (starting) or gone: the caller sees the connection close
            self._tighten()
            try:
                await _relay(reader, writer, up_reader, up_writer)
            finally:
                up_writer.close()
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            self._relays.discard(task)

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


async def _refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer 403 and end the connection gently: the request is read away first, since closing a
    socket with unread data resets the connection and the answer would be lost."""
    with contextlib.suppress(ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError,
                             asyncio.LimitOverrunError):
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        writer.write(REFUSAL)
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(reader.read(CHUNK), 5.0)  # until the client closes its end


async def _relay(a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter,
                 b_reader: asyncio.StreamReader, b_writer: asyncio.StreamWriter) -> None:
    """Both directions until either side ends; then both end (a client that hangs up must stop
    the engine's generation, as a direct connection would)."""

    async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(CHUNK):
                dst.write(data)
                await dst.drain()

    pumps = [asyncio.ensure_future(pump(a_reader, b_writer)), asyncio.ensure_future(pump(b_reader, a_writer))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
