"""The choice of node for a model that several nodes offer (service/routing.py), on status
documents shaped like the service's own ``GET /swapserve/api/status``."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from jupyter_swapserve.service.routing import NodeState, assess, choose_node, offered_by, ranked


def model(name: str, state: str, memory: float = 0.5, reserved: float | None = None, queue: int = 0,
          in_flight: int = 0, swap_out: float | None = None, pinned: bool = False, last_used: float = 0.0,
          error: str | None = None) -> dict[str, Any]:
    if reserved is None:
        reserved = memory if state in ("running", "swapping_in", "swapping_out") else 0.0
    return {"name": name, "state": state, "device": 0, "memory_gib": memory, "reserved_gib": reserved,
            "queue_depth": queue, "in_flight": in_flight, "last_swap_out_seconds": swap_out, "pinned": pinned,
            "last_used": last_used, "error": error}


def node(name: str, capacity: float, *models: dict[str, Any], up: bool = True) -> NodeState:
    reserved = sum(m["reserved_gib"] for m in models)
    status = {"devices": [{"index": 0, "capacity_gib": capacity, "reserved_gib": reserved,
                           "free_gib": capacity - reserved}], "models": list(models)}
    return NodeState(name, up, status)


def test_running_first_whatever_the_queue() -> None:
    a = node("a", 1.0, model("m", "swapped_out"))  # fits: 1 GiB free
    b = node("b", 1.0, model("m", "running", queue=5))
    choice = choose_node("m", [a, b])
    assert choice is not None and (choice.node, choice.rank) == ("b", 1)


def test_among_running_the_shortest_queue_then_the_nodes_order() -> None:
    nodes = [node("a", 1.0, model("m", "running", queue=2)), node("b", 1.0, model("m", "running", in_flight=1)),
             node("c", 1.0, model("m", "swapping_in"))]
    assert [c.node for c in ranked("m", nodes)] == ["c", "b", "a"]
    tie = [nodes[0], node("d", 1.0, model("m", "running", queue=2))]
    assert choose_node("m", tie).node == "a"  # type: ignore[union-attr]


def test_swapped_out_and_fitting_before_one_that_evicts() -> None:
    a = node("a", 1.0, model("m", "swapped_out"), model("x", "running", memory=0.8))  # 0.2 free: evicts x
    b = node("b", 1.0, model("m", "swapped_out", queue=3), model("y", "running", memory=0.4))  # 0.6 free: fits
    assert [(c.node, c.rank) for c in ranked("m", [a, b])] == [("b", 2), ("a", 3)]


def test_the_cheapest_eviction_then_the_shortest_queue() -> None:
    slow = node("slow", 1.0, model("m", "swapped_out"), model("x", "running", memory=0.8, swap_out=3.0))
    fast = node("fast", 1.0, model("m", "swapped_out", queue=4), model("y", "running", memory=0.8, swap_out=0.4))
    unmeasured = node("new", 1.0, model("m", "swapped_out"), model("z", "running", memory=0.8))
    choices = ranked("m", [slow, fast, unmeasured])
    assert [c.node for c in choices] == ["fast", "new", "slow"]
    assert choices[0].eviction_seconds == 0.4 and choices[1].eviction_seconds == 1.0  # the default guess
    # the node's own policy picks the victims: two small ones cost both their swap-outs
    two = node("two", 1.0, model("m", "swapped_out", memory=0.9), model("p", "running", memory=0.45, swap_out=0.3),
               model("q", "running", memory=0.45, swap_out=0.3))
    assert assess(two, "m").eviction_seconds == 0.6  # type: ignore[union-attr]


def test_a_node_that_cannot_make_room_or_is_still_starting_comes_last() -> None:
    pinned = node("pinned", 1.0, model("m", "swapped_out"), model("x", "running", memory=0.8, pinned=True))
    starting = node("starting", 1.0, model("m", "starting"))
    evicts = node("evicts", 1.0, model("m", "swapped_out"), model("y", "running", memory=0.8, swap_out=5.0))
    assert [c.node for c in ranked("m", [pinned, starting, evicts])] == ["evicts", "pinned", "starting"]
    assert "waits for memory" in assess(pinned, "m").reason  # type: ignore[union-attr]


def test_a_node_that_is_down_is_never_chosen() -> None:
    down = node("down", 1.0, model("m", "running"), up=False)
    up = node("up", 1.0, model("m", "swapped_out"), model("x", "running", memory=0.9))
    assert choose_node("m", [down, up]).node == "up"  # type: ignore[union-attr]
    assert choose_node("m", [down]) is None
    assert offered_by("m", [down, up]) == ["down", "up"]  # but it still says who offers the model
    assert choose_node("other", [down, up]) is None and offered_by("other", [down, up]) == []
    assert choose_node("m", [NodeState("new", True, None)]) is None  # no status yet: nothing known


def test_a_failed_model_only_when_no_other_node_has_it() -> None:
    failed = node("failed", 1.0, model("m", "failed", error="the engine exited with 1"))
    starting = node("starting", 1.0, model("m", "starting"))
    assert choose_node("m", [failed, starting]).node == "starting"  # type: ignore[union-attr]
    only = choose_node("m", [failed, node("down", 1.0, model("m", "running"), up=False)])
    assert only is not None and only.rank == 4 and "exited with 1" in only.reason


STATES = st.sampled_from(["running", "swapping_in", "swapped_out", "swapping_out", "starting", "failed", "stopped"])


@given(st.lists(st.tuples(st.booleans(), st.booleans(), STATES, st.floats(0.1, 1.0), st.integers(0, 5),
                          st.floats(0.0, 1.0)), min_size=1, max_size=6))
def test_the_choice_serves_the_model_and_has_the_best_rank(specs: list[tuple]) -> None:
    nodes = []
    for i, (up, offers, state, memory, queue, other) in enumerate(specs):
        models = [model("x", "running", memory=other, swap_out=0.5)]
        if offers:
            models.append(model("m", state, memory=memory, queue=queue))
        nodes.append(node(f"n{i}", 1.5, *models, up=up))
    choice = choose_node("m", nodes)
    candidates = [n for n in nodes if n.up and any(e["name"] == "m" for e in n.status["models"])]  # type: ignore[index]
    if not candidates:
        assert choice is None
        return
    assert choice is not None and choice.node in {n.name for n in candidates}
    assert choice.rank == min(assess(n, "m").rank for n in candidates)  # type: ignore[union-attr]
