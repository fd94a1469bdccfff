"""Swapping under contention with real engine processes (http.server stands in for an engine) on a
virtual device with room for one model: a burst over three models is served with few swaps when
each swap-in keeps the device for its residency quantum, and with one swap per request or so
without it; every request is served and the books balance."""

from __future__ import annotations

import asyncio
from pathlib import Path

from jupyter_swapserve.config import parse_models
from jupyter_swapserve.service import SwapService, build_service

from .waiting import until


def service(tmp_path: Path, quantum: float, multiple: float) -> SwapService:
    models = [{"name": n, "engine": "command", "command": ["{python}", "-m", "http.server", "--bind", "{host}",
                                                           "{port}", "--directory", str(tmp_path)],
               "ready_path": "/", "warmup": False, "memory_gib": 0.6, "residency_quantum": quantum,
               "residency_multiple": multiple} for n in ("a", "b", "c")]
    return build_service(parse_models({"devices": [{"virtual": True, "memory_gib": 1.0}], "models": models}))


async def burst(svc: SwapService, per_model: int, hold: float) -> tuple[int, int, float]:
    """Requests for a, b, c interleaved, all at once; returns (served, swap-ins, max reserved/capacity)."""
    served = 0
    worst = 0.0
    manager = svc.reservations[0]

    async def one(model: str) -> None:
        nonlocal served, worst
        async with svc.admit(model, "user"):
            worst = max(worst, manager.granted_gib / manager.capacity_gib)
            await asyncio.sleep(hold)
            served += 1

    before = sum(b.swaps_in for b in svc.backends.values())
    await asyncio.gather(*(one(m) for _ in range(per_model) for m in ("a", "b", "c")))
    return served, sum(b.swaps_in for b in svc.backends.values()) - before, worst


async def run(tmp_path: Path, quantum: float, multiple: float) -> tuple[int, int, float]:
    svc = service(tmp_path, quantum, multiple)
    svc.start()
    await svc.wait_started(60)
    try:
        return await asyncio.wait_for(burst(svc, per_model=15, hold=0.02), 120)
    finally:
        await svc.close()
        assert svc.reservations[0].granted_gib == 0


async def test_a_burst_is_served_with_few_swaps_thanks_to_the_residency_quantum(tmp_path: Path) -> None:
    """With a quantum longer than the whole burst (300 s, the cap) each model, once swapped in, serves
    its whole queue: exactly one swap-in per model, however fast the machine. Without a quantum the
    models push each other out. How many swaps a quantum of a given length saves, with real swap
    costs, is a measurement: bench/contention.py (bench/results/)."""
    served, swaps, worst = await run(tmp_path, quantum=300.0, multiple=0.0)
    assert served == 45 and worst <= 1.0
    assert swaps == 3, swaps
    served_off, swaps_off, worst_off = await run(tmp_path, quantum=0.0, multiple=0.0)
    assert served_off == 45 and worst_off <= 1.0
    assert swaps_off > 3, swaps_off  # a model was pushed out while its requests still waited


async def test_prefetch_swaps_in_ahead_of_need_but_never_evicts_a_busy_model(tmp_path: Path) -> None:
    svc = service(tmp_path, quantum=2.0, multiple=4.0)
    svc.start()
    await svc.wait_started(60)
    try:
        assert svc.prefetch("a") == "starting"  # free memory: swapped in in the background
        await until(lambda: svc.backends["a"].state.value == "running", "a swapped in by the hint")
        assert svc.prefetch("a") == "running"
        # a is idle: a hint for b may push it out
        assert svc.prefetch("b") == "starting"
        await until(lambda: svc.backends["b"].state.value == "running", "b swapped in by the hint")
        assert svc.backends["a"].state.value == "swapped_out"
        # b is serving: a hint for c is declined and nothing moves
        async with svc.admit("b", "user"):
            outcome = svc.prefetch("c")
            assert outcome.startswith("declined") and "busy" in outcome
            assert svc.backends["c"].state.value == "swapped_out"
        assert svc.reservations[0].granted_gib <= 1.0
    finally:
        await svc.close()
