"""The sidebar's jest fixtures are documents a server could send: the two-node status
(labextension/src/__tests__/two-nodes.status.json) is the union a user's server in client mode
makes of two node statuses (service/nodes.py NodeDirectory.status(), run here on the fixture's own
node statuses), with and without a node that stopped answering. No browser, no engines."""

from __future__ import annotations

import json

from jupyter_swapserve.service.nodes import NodeDirectory

from ..server import ROOT

FIXTURE = ROOT / "labextension" / "src" / "__tests__" / "two-nodes.status.json"
DOWN = "ClientConnectorError: Cannot connect to host 127.0.0.1:1"


def union_of(node_statuses: dict[str, dict], down: str | None) -> dict:
    directory = NodeDirectory([(name, f"http://127.0.0.1:1/services/{name}/") for name in node_statuses], token="t")
    for name, status in node_statuses.items():
        directory.update(directory.nodes[name], status)
    if down:
        directory.mark_down(directory.nodes[down], DOWN)
    return directory.status()


def test_the_two_node_fixture_is_what_client_mode_makes_of_two_nodes() -> None:
    doc = json.loads(FIXTURE.read_text())
    assert set(doc["node_statuses"]) == {"swapserve-gpu1", "swapserve-gpu2"}
    for which, down in (("union", None), ("union_gpu2_down", "swapserve-gpu2")):
        union = union_of(doc["node_statuses"], down)
        assert [n["since"] for n in doc[which]["nodes"]] == [1796170100.0] * 2
        for node in union["nodes"]:
            node["since"] = 1796170100.0  # a clock reading: the one thing that differs from run to run
        assert union == doc[which], which
    # the collision the sidebar's keying is for: the same model and device 0 once per node
    union = doc["union"]
    assert [m["node"] for m in union["models"] if m["name"] == "smollm2"] == ["swapserve-gpu1", "swapserve-gpu2"]
    assert [(d["node"], d["index"]) for d in union["devices"]] == [("swapserve-gpu1", 0), ("swapserve-gpu2", 0)]
