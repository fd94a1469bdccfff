"""Kernels as GPU tenants: the pure decisions (service/kernel_policy.py), and kernels ranked
against models by the same preemption policy."""

from __future__ import annotations

from jupyter_swapserve.service.kernel_policy import (
    KernelView,
    due_for_swap_out,
    kernel_snapshot,
    may_pin,
    over_user_limit,
)
from jupyter_swapserve.service.policy import BackendSnapshot, choose_victims
from jupyter_swapserve.service.states import State


def kernel(name: str, *, user: str = "ada", state: State = State.RUNNING, busy: bool = False, pinned: bool = False,
           gib: float = 2.0, last: float = 100.0, release: bool = False) -> KernelView:
    return KernelView(name, user, 0, state, busy, pinned, gib, last, release)


def model(name: str, last: float, gib: float = 4.0, queued: int = 0) -> BackendSnapshot:
    return BackendSnapshot(name=name, device=0, state="running", memory_gib=gib, queued=queued, in_flight=0,
                           last_used=last)


def test_an_idle_kernel_is_ranked_with_the_models_least_recently_used_first() -> None:
    snaps = [model("m-recent", last=300.0), kernel_snapshot(kernel("kernel a", last=200.0)), model("m-old", last=50.0)]
    plan = choose_victims(snaps, device=0, need_gib=5.0, free_gib=0.0, requester="m-new")
    assert plan.victims == ("m-old", "kernel a") and plan.sufficient


def test_a_busy_kernel_is_never_a_victim_even_when_nothing_else_frees_memory() -> None:
    snaps = [kernel_snapshot(kernel("kernel busy", busy=True, gib=10.0, last=0.0))]
    plan = choose_victims(snaps, device=0, need_gib=1.0, free_gib=0.0, requester="m")
    assert plan.victims == () and not plan.sufficient
    # nor a pinned one, nor one that is already swapped out
    snaps = [kernel_snapshot(kernel("kernel p", pinned=True)),
             kernel_snapshot(kernel("kernel s", state=State.SWAPPED_OUT))]
    assert choose_victims(snaps, device=0, need_gib=1.0, free_gib=0.0, requester="m").victims == ()


def test_idle_timeout_and_release_requests_pick_idle_kernels_only() -> None:
    kernels = [
        kernel("kernel old", last=10.0), kernel("kernel fresh", last=95.0),
        kernel("kernel busy", last=0.0, busy=True), kernel("kernel pinned", last=0.0, pinned=True),
        kernel("kernel asked", last=99.0, release=True), kernel("kernel out", last=0.0, state=State.SWAPPED_OUT),
        kernel("kernel empty", last=0.0, gib=0.0),
    ]
    assert due_for_swap_out(kernels, now=100.0, idle_timeout=60.0) == ["kernel old", "kernel asked"]
    assert due_for_swap_out(kernels, now=100.0, idle_timeout=None) == ["kernel asked"]


def test_a_users_limit_swaps_out_their_least_recently_used_idle_kernels() -> None:
    kernels = [kernel("kernel a", last=1.0, gib=3.0), kernel("kernel b", last=2.0, gib=3.0),
               kernel("kernel c", last=3.0, gib=3.0, busy=True), kernel("kernel z", user="bob", gib=30.0)]
    assert over_user_limit(kernels, "ada", None) == ([], True)
    assert over_user_limit(kernels, "ada", 6.0) == (["kernel a"], True)
    assert over_user_limit(kernels, "ada", 3.0) == (["kernel a", "kernel b"], True)
    # the busy one cannot go: not enough
    assert over_user_limit(kernels, "ada", 2.0) == (["kernel a", "kernel b"], False)
    # a kernel coming back counts and is never chosen
    back = [*kernels[:2], kernel("kernel d", last=0.0, gib=4.0, state=State.SWAPPED_OUT)]
    assert over_user_limit(back, "ada", 7.0, keep="kernel d") == (["kernel a"], True)


def test_pinning_is_allowed_within_the_users_pin_limit() -> None:
    kernels = [kernel("kernel a", gib=3.0, pinned=True), kernel("kernel b", gib=2.0), kernel("kernel z", user="bob")]
    assert may_pin(kernels, "ada", "kernel b", None)
    assert may_pin(kernels, "ada", "kernel b", 5.0)
    assert not may_pin(kernels, "ada", "kernel b", 4.0)
    assert not may_pin(kernels, "bob", "kernel z", 0.0)  # 0: the user may not pin


def test_a_kernel_whose_owner_does_not_answer_is_never_a_victim_nor_due() -> None:
    """A kernel of a user's server that is not connected, let a command time out, or stopped
    reporting: nobody can move it, so the policy passes it over for the next one."""
    silent = KernelView("kernel silent", "ada", 0, State.RUNNING, False, False, 2.0, 1.0, True, owner_answers=False)
    snaps = [kernel_snapshot(silent), kernel_snapshot(kernel("kernel next", last=50.0))]
    plan = choose_victims(snaps, device=0, need_gib=1.0, free_gib=0.0, requester="m")
    assert plan.victims == ("kernel next",) and plan.sufficient
    assert due_for_swap_out([silent], now=100.0, idle_timeout=1.0) == []
    assert over_user_limit([silent], "ada", 1.0) == ([], False)
