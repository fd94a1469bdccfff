"""The kernel websocket connection that swaps a kernel's GPU state back in before its next cell.

Jupyter's own connection class forwards each websocket message to the kernel's ZMQ channels.
This one looks at messages on the shell channel first: an ``execute_request`` or a comm message
to a kernel whose GPU memory is checkpointed is held (with everything after it, in order) while
the swap service restores the kernel, and delivered right after, preceded by one status line in
the cell's output ("GPU state restored in 0.9 s"). Everything else passes through unchanged.

Who restores depends on the mode, behind one small interface (:class:`KernelGate`): on a standalone
server its own kernel tenants (service/kernels.py); on a user's server under JupyterHub the kernel
reporter (kernel_reporter.py), which asks the shared service for the memory and restores when told.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol

from jupyter_client.jsonutil import json_default
from jupyter_server.services.kernels.connection.base import (
    deserialize_binary_message,
    deserialize_msg_from_ws_v1,
    serialize_msg_to_ws_v1,
)
from jupyter_server.services.kernels.connection.channels import ZMQChannelsWebsocketConnection

V1 = "v1.kernel.websocket.jupyter.org"
#: the messages that run code in the kernel, and so need its GPU state
NEEDS_GPU = frozenset({"execute_request", "comm_msg", "comm_open"})
#: where the server's settings hold the gate (set by app.py in standalone and client mode)
SETTING = "swapserve_kernel_gate"


class KernelGate(Protocol):
    """What the connection needs of kernel tenancy: standalone, service.kernels.KernelTenants; on a
    user's server under a hub, kernel_reporter.KernelReporter."""

    def tracks(self, kernel_id: str) -> bool: ...
    def begin_execution(self, kernel_id: str) -> bool: ...
    async def swap_in(self, kernel_id: str) -> float: ...


class SwapServeKernelConnection(ZMQChannelsWebsocketConnection):
    """ZMQ channels plus the transparent swap-in of a checkpointed kernel."""

    _held: list[Any] | None = None

    @property
    def _gate(self) -> KernelGate | None:
        return self.websocket_handler.settings.get(SETTING)

    def _peek(self, ws_msg: Any) -> tuple[str, dict[str, Any]]:
        """(channel, header) of a websocket message, in any of the protocols Jupyter accepts."""
        try:
            if self.subprotocol == V1:
                channel, parts = deserialize_msg_from_ws_v1(ws_msg)
                return channel, self.session.unpack(parts[0])
            msg = deserialize_binary_message(ws_msg) if isinstance(ws_msg, bytes) else json.loads(ws_msg)
            return msg.get("channel") or "shell", msg.get("header") or {}
        except Exception:  # a malformed message is Jupyter's to reject, not ours
            return "", {}

    def handle_incoming_message(self, incoming_msg: Any) -> None:
        if self._held is not None:  # a swap-in is under way: keep the order of everything sent
            self._held.append(incoming_msg)
            return
        gate = self._gate
        if gate is not None and gate.tracks(self.kernel_id):
            channel, header = self._peek(incoming_msg)
            if channel == "shell" and header.get("msg_type") in NEEDS_GPU and gate.begin_execution(self.kernel_id):
                self._held = [incoming_msg]
                task = asyncio.ensure_future(self._swap_in_then_deliver(gate, header))
                task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
                return
        super().handle_incoming_message(incoming_msg)

    async def _swap_in_then_deliver(self, gate: KernelGate, header: dict[str, Any]) -> None:
        try:
            seconds = await gate.swap_in(self.kernel_id)
            note, stream = f"GPU state restored in {seconds:.1f} s", "stdout"
        except Exception as exc:
            # deliver anyway: code that does not touch the GPU runs; a CUDA call waits for the
            # restore, which the service retries while the kernel is busy
            note, stream = f"GPU state could not be restored: {exc}", "stderr"
        finally:
            held, self._held = self._held or [], None
        self.log.info("kernel %s: %s", self.kernel_id, note)
        self._write_note(note, stream, header)
        for msg in held:
            super().handle_incoming_message(msg)

    def _write_note(self, text: str, stream: str, parent_header: dict[str, Any]) -> None:
        """One line in the output of the cell whose execution triggered the swap-in."""
        msg = self.session.msg("stream", content={"text": text + "\n", "name": stream}, parent=parent_header)
        try:
            if self.subprotocol == V1:
                self.write_message(serialize_msg_to_ws_v1(msg, "iopub", self.session.pack), binary=True)
            else:
                msg["channel"] = "iopub"
                self.write_message(json.dumps(msg, default=json_default))
        except Exception as exc:  # the browser went away meanwhile: the note is all that is lost
            self.log.debug("kernel %s: status line not sent: %s", self.kernel_id, exc)
