"""The preemption policy is a pure function: snapshots in, ordered victims out."""

from __future__ import annotations

from jupyter_swapserve.service.policy import BackendSnapshot, choose_victims


def snap(name: str, queued: int = 0, in_flight: int = 0, last_used: float = 0, gib: float = 4, **kw) -> BackendSnapshot:
    return BackendSnapshot(name=name, device=kw.pop("device", 0), state=kw.pop("state", "running"), memory_gib=gib,
                           queued=queued, in_flight=in_flight, last_used=last_used, **kw)


def test_no_victims_when_enough_is_free() -> None:
    plan = choose_victims([snap("a")], device=0, need_gib=2, free_gib=3, requester="x")
    assert plan.victims == () and plan.sufficient


def test_fewest_queued_and_in_flight_first() -> None:
    backends = [snap("busy", queued=3), snap("idle"), snap("working", in_flight=1)]
    plan = choose_victims(backends, 0, need_gib=4, free_gib=0, requester="x")
    assert plan.victims == ("idle",) and plan.sufficient
    plan = choose_victims(backends, 0, need_gib=12, free_gib=0, requester="x")
    assert plan.victims == ("idle", "working", "busy")


def test_ties_go_to_least_recently_used() -> None:
    backends = [snap("recent", last_used=200), snap("old", last_used=100), snap("middle", last_used=150)]
    assert choose_victims(backends, 0, 8, 0, "x").victims == ("old", "middle")


def test_never_pinned_requester_other_device_or_not_running() -> None:
    backends = [snap("pinned", pinned=True), snap("x"), snap("elsewhere", device=1),
                snap("swapping", state="swapping_in"), snap("out", state="swapped_out"), snap("ok", gib=1)]
    plan = choose_victims(backends, 0, need_gib=4, free_gib=0, requester="x")
    assert plan.victims == ("ok",) and not plan.sufficient


def test_just_swapped_in_for_waiting_requests_is_protected() -> None:
    fresh = snap("fresh", queued=1, served_since_swap_in=False)
    other = snap("other", queued=5, last_used=999)
    plan = choose_victims([fresh, other], 0, 4, 0, "x")
    assert plan.victims == ("other",)
    # once it has served one of them it is an ordinary candidate again
    plan = choose_victims([snap("fresh", queued=1), other], 0, 4, 0, "x")
    assert plan.victims == ("fresh",)


def test_stops_at_the_shortest_sufficient_prefix() -> None:
    backends = [snap("a", gib=1, last_used=1), snap("b", gib=2, last_used=2), snap("c", gib=8, last_used=3)]
    plan = choose_victims(backends, 0, need_gib=3.5, free_gib=0.5, requester="x")
    assert plan.victims == ("a", "b") and plan.sufficient


def test_equal_load_goes_to_the_lower_priority_first() -> None:
    # both have one waiting request; the one waited on by a priority-3 user is evicted last
    backends = [snap("vip", queued=1, priority=3.0, last_used=0), snap("plain", queued=1, priority=1.0,
                                                                        last_used=100)]
    assert choose_victims(backends, 0, 4, 0, "x").victims == ("plain",)
    # priority only breaks ties: fewer requests still come first
    backends = [snap("vip", queued=0, priority=0.0), snap("plain", queued=2, priority=1.0)]
    assert choose_victims(backends, 0, 4, 0, "x").victims == ("vip",)


def test_residency_quantum_is_a_multiple_of_the_swap_cost_with_a_floor_and_a_cap() -> None:
    from jupyter_swapserve.service.policy import residency_quantum

    assert residency_quantum(None, None, multiple=4, floor_s=2) == 2  # never measured: the floor
    assert residency_quantum(0.002, 0.001, multiple=4, floor_s=2) == 2  # a CPU freeze/thaw: the floor
    assert residency_quantum(1.3, 1.7, multiple=4, floor_s=2) == 12  # a contended GPU swap: 4 x 3 s
    assert residency_quantum(100, 100, multiple=4, floor_s=2, cap_s=60) == 60
    assert residency_quantum(1, 1, multiple=0, floor_s=0) == 0  # off


def test_a_model_with_waiting_requests_keeps_the_device_for_its_quantum() -> None:
    fresh = snap("fresh", queued=5, served_since_swap_in=True, resident_for=1.0, quantum=8.0)
    assert choose_victims([fresh], 0, 4, 0, "x").victims == ()  # protected: swapped in 1 s ago for 5 requests
    due = snap("due", queued=5, served_since_swap_in=True, resident_for=9.0, quantum=8.0)
    assert choose_victims([due], 0, 4, 0, "x").victims == ("due",)
    idle = snap("idle", queued=0, served_since_swap_in=True, resident_for=0.5, quantum=8.0)
    assert choose_victims([idle], 0, 4, 0, "x").victims == ("idle",)  # nothing waits for it: no protection
    unserved = snap("unserved", queued=1, served_since_swap_in=False, resident_for=60.0, quantum=8.0)
    assert choose_victims([unserved], 0, 4, 0, "x").victims == ()  # never pushed out before serving one


def test_a_batch_in_flight_is_work_too() -> None:
    # concurrency 8: the whole batch is forwarded, nothing is queued, and it is still being served
    batch = snap("batch", queued=0, in_flight=8, served_since_swap_in=True, resident_for=1.0, quantum=8.0)
    assert choose_victims([batch], 0, 4, 0, "x").victims == ()
    long = snap("long", queued=0, in_flight=8, served_since_swap_in=True, resident_for=9.0, quantum=8.0)
    assert choose_victims([long], 0, 4, 0, "x").victims == ("long",)  # its quantum is over: drained, then out
    first = snap("first", queued=0, in_flight=1, served_since_swap_in=False, resident_for=60.0, quantum=8.0)
    assert choose_victims([first], 0, 4, 0, "x").victims == ()


def test_residual_auto_keeps_while_there_is_room_and_lru_residuals_make_room_first() -> None:
    from jupyter_swapserve.service.policy import ResidualSnapshot, keeps_residual, movable_residuals

    assert keeps_residual("keep", room=False) and keeps_residual("auto", room=True)
    assert not keeps_residual("auto", room=False) and not keeps_residual("checkpoint", room=True)
    kept = [ResidualSnapshot("new", 0.9, 300, "auto"), ResidualSnapshot("old", 0.9, 100, "auto"),
            ResidualSnapshot("fixed", 0.9, 50, "keep"), ResidualSnapshot("mid", 0.9, 200, "auto")]
    assert movable_residuals(kept, 0.5) == ("old",)  # least recently used first, only as many as needed
    assert movable_residuals(kept, 1.5) == ("old", "mid")
    assert movable_residuals(kept, 80) == ("old", "mid", "new")  # never a residual: keep one
    assert movable_residuals(kept, 0) == ()


def test_residuals_come_back_most_recently_used_first_while_they_fit_and_nobody_waits() -> None:
    from jupyter_swapserve.service.policy import ResidualSnapshot, residuals_to_restore

    snaps = [ResidualSnapshot("old", 1.0, 10.0, "auto"), ResidualSnapshot("new", 1.0, 30.0, "auto"),
             ResidualSnapshot("mid", 2.0, 20.0, "auto"), ResidualSnapshot("never", 0.5, 40.0, "checkpoint")]
    assert residuals_to_restore(snaps, free_gib=10.0, anyone_waiting=False) == ("new", "mid", "old")
    assert residuals_to_restore(snaps, free_gib=2.5, anyone_waiting=False) == ("new", "old")  # mid does not fit
    assert residuals_to_restore(snaps, free_gib=10.0, anyone_waiting=True) == ()
    assert residuals_to_restore(snaps, free_gib=0.5, anyone_waiting=False) == ()
