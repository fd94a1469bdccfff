"""The status schema (jupyter_swapserve/schema/status.schema.json) against what the server says:
the live status of a real server and its events stream, a notebook kernel tenant's entry, and the
status document the sidebar's browser test serves (tests/browser/gpu_status.json), which must not
drift from the server's (it once said checkpointer "driver" where the server says "cuda-driver").
The sidebar's jest fixtures are checked against the same schema by
labextension/src/__tests__/status-schema.spec.ts."""

from __future__ import annotations

import copy
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from jupyter_swapserve.service.kernels import KernelTenant
from jupyter_swapserve.service.nodes import NodeDirectory
from jupyter_swapserve.service.reservations import ReservationManager

from .server import ServerHandle

SCHEMA: dict[str, Any] = json.loads(files("jupyter_swapserve").joinpath("schema/status.schema.json").read_text())
GPU_STATUS = Path(__file__).resolve().parent / "browser" / "gpu_status.json"


def status_errors(document: Any, definition: str | None = None) -> list[str]:
    """Where ``document`` breaks the status schema (or one of its definitions): [] when it conforms."""
    schema = SCHEMA if definition is None else {"$ref": f"#/$defs/{definition}", "$defs": SCHEMA["$defs"]}
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_the_schema_is_a_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_the_live_status_and_its_event_conform(demo_server: ServerHandle) -> None:
    status = demo_server.status()
    assert status["models"] and status_errors(status) == []
    with httpx.Client(timeout=30) as h, h.stream("GET", demo_server.url + "swapserve/api/events",
                                                 headers=demo_server.headers()) as r:
        lines = r.iter_lines()
        assert next(lines) == "event: status"
        event = json.loads(next(lines).removeprefix("data: "))
    assert status_errors(event) == []


def test_client_modes_union_of_the_nodes_statuses_conforms(demo_server: ServerHandle) -> None:
    """A user's server in client mode answers with every node's models and devices (each marked with
    its node), the nodes themselves, and a down node's models as unavailable."""
    nodes = NodeDirectory([("gpu1", "http://127.0.0.1:1/"), ("gpu2", "http://127.0.0.1:2/")], token="t")
    nodes.update(nodes.nodes["gpu1"], demo_server.status())
    nodes.update(nodes.nodes["gpu2"], json.loads(GPU_STATUS.read_text()))
    union = nodes.status()
    assert isinstance(union["checkpointer"], dict) and status_errors(union) == []  # the nodes' differ
    nodes.mark_down(nodes.nodes["gpu2"], "ConnectionRefusedError")
    union = nodes.status()
    assert {m["state"] for m in union["models"] if m["node"] == "gpu2"} == {"unavailable"}
    assert status_errors(union) == []


def test_a_kernel_tenants_entry_conforms() -> None:
    tenant = KernelTenant(kernel_id="0123abcd", user="alice", path="work/train.ipynb", device=0, pids=(4242,),
                          gib=1.5, busy=True, last_execution=1796170000.0)
    assert status_errors(tenant.status(), "kernel") == []
    tenant.reservation = ReservationManager(0, 8.0).try_acquire(tenant.name, 1.5)
    tenant.state, tenant.swaps_out, tenant.last_swap_out_reason = "swapped_out", 1, "idle for 600 s"
    assert status_errors(tenant.status(), "kernel") == []


def test_the_sidebars_gpu_status_conforms_and_drift_is_caught() -> None:
    served = json.loads(GPU_STATUS.read_text())
    assert status_errors(served) == []
    drifted = copy.deepcopy(served)
    drifted["checkpointer"] = "driver"
    assert [e for e in status_errors(drifted) if e.startswith("checkpointer: 'driver'")]
    del drifted["models"][0]["residual"]
    assert any("'residual' is a required property" in e for e in status_errors(drifted))
