"""Swapping under contention through the real scheduler, with real engine processes (the reference
engine on the CPU: a real sleep/wake protocol) on a device the scheduler treats as a GPU.

What the device holds is played by :class:`FakeGpu`, the stand-in for NVML and libcuda (as
``tests/test_checkpoint.py``'s FakeDriver is for libcuda alone). It frees an engine's memory in
the stages the H100 showed while the engine's real sleep hook runs: the KV cache at once (it is
discarded), then the weights once their copy out is done (the real hook's return), leaving the
residual (CUDA context, allocator pools), and nothing once that is checkpointed; a sleep may also
take memory for a while (a transient buffer). It counts memory as held from the start of a step
that allocates it (restore, wake) to the end of a step that frees it, so it is strict about the
books. The checks run at every change of every reservation manager and in a sampler that polls
them all the time, with no exemption for any engine's state or lock:

- each manager's granted memory ≤ its capacity; the engines' reservations add up to no more than
  what was granted; a grant that no engine holds yet is taken (or given back) within a few steps
  of the event loop;
- what each engine holds on the device ≤ what it has reserved, and the sum ≤ capacity;
- the weights' digest and a fixed prompt's logits (the reference engine's ``GET /integrity``) after
  every wake are those of before the engine's first sleep.

Covered here: the handover during the victim's sleep (a waiting engine is granted, swapped in and
served while the victim's weights are still being copied out, its hook held by injection), the
overlapped eviction (issue 10: the requester serves while the victim's residual is still being
checkpointed and frozen), and ``residual: auto`` (kept residuals are checkpointed, least recently
used first, before anything is evicted, and an unmeasured model's start takes the room it needs
from them), with ``residual: keep`` as the contrast.

What this cannot prove (docs/testing.md): the sizes are the stand-in's numbers, not memory a
driver handed out, and the engines run on the CPU; tests/gpu/test_gpu_contention.py is the gate for
the same claims on a real GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")  # the reference engine

from jupyter_swapserve.config import parse_models
from jupyter_swapserve.gpu import checkpoint as ck
from jupyter_swapserve.service import ServiceConfig, SwapService, build_service
from jupyter_swapserve.service.backend import Backend, State, StepTiming
from jupyter_swapserve.service.handover import MARGIN_GIB
from jupyter_swapserve.service.reservations import Reservation, ReservationGroup, ReservationManager

from . import integrity
from .test_checkpoint import FakeDriver

ROOT = Path(__file__).resolve().parent.parent
EPS = 1e-6
#: a held checkpoint or sleep lets go after this long even if the test never releases it (no hang on a bug)
HOLD_GUARD_S = 20.0
#: steps of the event loop a granted reservation may wait to be taken by its engine: the grant wakes
#: the waiting swap-in, which returns it up its call chain (a handful of steps) to the backend
MAX_LOOP_STEPS_UNTAKEN = 50


def service(models: list[tuple[str, float | None, str]], capacity: float,
            idle_check_interval: float = 3600.0, checkpoints: dict[str, Path] | None = None) -> SwapService:
    """Reference engines (tiny random Llama on the CPU, one seed each: different answers) on one
    device of ``capacity`` GiB; ``models``: (name, memory_gib or None for unmeasured, residual);
    ``checkpoints``: models loaded from a checkpoint on disk instead of a seeded random init."""
    specs = []
    for seed, (name, memory, residual) in enumerate(models):
        model = str((checkpoints or {}).get(name, "shape:tiny"))
        spec: dict[str, Any] = {"name": name, "engine": "reference", "model": model, "api": "completion",
                                "residual": residual, "drain_timeout": 30,
                                "args": ["--device", "cpu", "--max-model-len", "64", "--seed", str(seed)],
                                "env": {"PYTHONPATH": str(ROOT)}}
        if memory is not None:
            spec["memory_gib"] = memory
        specs.append(spec)
    loaded = parse_models({"devices": [{"virtual": True, "memory_gib": capacity}], "models": specs})
    assert not loaded.errors, loaded.errors
    # the idle sweep (which also brings checkpointed residuals back) only where a test wants it
    return build_service(loaded, ServiceConfig(idle_check_interval=idle_check_interval))


def parts(r: Reservation | ReservationGroup | None) -> list[Reservation]:
    if r is None:
        return []
    return list(r.parts) if isinstance(r, ReservationGroup) else [r]


class FakeGpu:
    """NVML's per-process memory and libcuda's checkpoint calls for engines on a device the
    scheduler is told is a GPU, following what the real engine processes really did.

    ``sizes``: what each engine holds awake; ``residuals``: what it keeps once asleep; ``kv``: the
    part of it its sleep frees first (default: half of what the sleep frees); ``growth``: memory its
    sleep takes once the KV cache is gone and holds until its weights are gone (default none)."""

    def __init__(self, svc: SwapService, sizes: dict[str, float], residuals: dict[str, float],
                 kv: dict[str, float] | None = None, growth: dict[str, float] | None = None) -> None:
        self.svc = svc
        self.sizes = sizes
        self.residuals = residuals
        self.kv = {n: (kv or {}).get(n, (sizes[n] - residuals[n]) / 2) for n in sizes}
        self.growth = {n: (growth or {}).get(n, 0.0) for n in sizes}
        #: each engine's /integrity report before its first sleep, and how many wakes matched it
        self.baselines: dict[str, dict[str, Any]] = {}
        self.intact_wakes: dict[str, int] = dict.fromkeys(sizes, 0)
        self._lock = threading.Lock()
        self.held: dict[tuple[str, int], float] = {}  # (model, pid) → GiB on the device now
        self.saved: dict[tuple[str, int], float] = {}  # (model, pid) → GiB in its checkpoint image
        self.events: list[tuple[str, str]] = []  # (model, what happened on the device), in order
        self.records: list[tuple[str, str, list[str]]] = []  # the scheduler's swaps: (model, what, steps)
        self.failures: list[tuple[str, str]] = []
        self.violations: list[str] = []
        self.checks = 0
        self.seen: set[tuple[str, ...]] = set()  # the engines' states together, as the sampler saw them
        self._hold: str | None = None
        self._released = threading.Event()
        self.held_checkpoint = threading.Event()
        self._hold_sleep: str | None = None
        self._sleep_released = asyncio.Event()
        self.held_sleep = asyncio.Event()
        self._granted: dict[int, Reservation] = {}  # every grant seen (kept: no id is reused)
        self._untaken: dict[int, int] = {}  # id of a grant no engine holds yet → loop steps waited
        self.max_untaken_steps = 0

    # ---- what the device holds -------------------------------------------------------------
    def _key(self, b: Backend) -> tuple[str, int] | None:
        pid = getattr(b.runtime, "pid", None) if b.runtime is not None else None
        return (b.name, pid) if pid is not None else None

    def holds(self, b: Backend) -> float:
        """GiB the engine's process holds on the device now (a live process not yet seen: all of it)."""
        key = self._key(b)
        if key is None or not b.runtime.running:
            return 0.0
        return self.held.get(key, self.sizes[b.name])

    def _owner(self, pid: int) -> Backend:
        for b in self.svc.backends.values():
            if b.runtime is not None and b.runtime.pid == pid:
                return b
        raise LookupError(f"pid {pid} is no engine's")

    def _set(self, b: Backend, gib: float, what: str) -> None:
        key = self._key(b)
        assert key is not None
        with self._lock:
            if gib > self.holds(b) + EPS:  # memory is being taken: it must be reserved first
                reserved = self.reserved(b, b.device)
                if gib > reserved + EPS:
                    self.violations.append(f"{what}: {b.name} takes {gib:.3f} GiB with {reserved:.3f} reserved")
            self.held[key] = gib
            self.events.append((b.name, what))

    # NVML (GpuMonitor) ------------------------------------------------------------------------
    def process_memory_gib(self, pids: list[int]) -> dict[int, float]:
        result: dict[int, float] = {}
        for b in self.svc.backends.values():
            if b.runtime is not None and b.runtime.pid in pids:
                result[b.device] = result.get(b.device, 0.0) + self.holds(b)
        return result

    def gpu_pids(self, pids: list[int]) -> list[int]:
        return [b.runtime.pid for b in self.svc.backends.values()
                if b.runtime is not None and b.runtime.pid in pids and self.holds(b) > 0]

    # libcuda (the checkpoint driver) ----------------------------------------------------------
    def driver(self) -> FakeDriver:
        gpu = self

        class DeviceDriver(FakeDriver):
            def _fn(self, name: str) -> Callable[[ctypes.c_int, object], int]:
                call = super()._fn(name)

                def effect(pid: ctypes.c_int, args: object) -> int:
                    b = gpu._owner(pid.value)
                    key = gpu._key(b)
                    assert key is not None
                    if name == "cuCheckpointProcessRestore":
                        gpu._set(b, gpu.saved.pop(key, 0.0), "restore")
                    if name == "cuCheckpointProcessCheckpoint" and gpu._hold == b.name:
                        gpu.events.append((b.name, "checkpoint held"))
                        gpu.held_checkpoint.set()
                        if not gpu._released.wait(HOLD_GUARD_S):
                            gpu.violations.append(f"the held checkpoint of {b.name} was never released")
                    rc = call(pid, args)
                    if name == "cuCheckpointProcessCheckpoint" and rc == 0:
                        gpu.saved[key] = gpu.holds(b)
                        gpu._set(b, 0.0, "checkpoint")
                    return rc

                return effect

        return DeviceDriver()

    def hold_checkpoint(self, name: str) -> None:
        """Slow step by injection: the next checkpoint of ``name`` waits until released."""
        self._released.clear()
        self.held_checkpoint.clear()
        self._hold = name

    def release_checkpoint(self) -> None:
        self._hold = None
        self._released.set()

    def hold_sleep(self, name: str) -> None:
        """Slow step by injection: ``name``'s next sleep, its KV cache freed, keeps its weights on
        the device (their copy out still running) until released."""
        self._sleep_released.clear()
        self.held_sleep.clear()
        self._hold_sleep = name

    def release_sleep(self) -> None:
        self._hold_sleep = None
        self._sleep_released.set()

    # the engines' hooks: the real sleep/wake of the real process, and what it does to the device
    def _hooks(self, b: Backend) -> tuple[Callable[..., Awaitable[None]], Callable[..., Awaitable[None]]]:
        real_sleep, real_wake = b.adapter.sleep, b.adapter.wake

        async def sleep(client: Any, base_url: str) -> None:
            if b.name not in self.baselines:  # before the first sleep, nothing has touched the weights
                self.baselines[b.name] = (await integrity.report_async(client, base_url))["now"]
            # stages, as the H100 showed: the KV cache is discarded at once; then the engine may take
            # a transient buffer; the weights go when their copy out is done (the real hook returns)
            self._set(b, self.holds(b) - self.kv[b.name], "sleep: KV cache freed")
            if self._hold_sleep == b.name:
                self.events.append((b.name, "sleep held"))
                self.held_sleep.set()
                try:
                    await asyncio.wait_for(self._sleep_released.wait(), HOLD_GUARD_S)
                except TimeoutError:
                    self.violations.append(f"the held sleep of {b.name} was never released")
            if self.growth[b.name]:
                self._set(b, self.holds(b) + self.growth[b.name], "sleep: takes a transient buffer")
            await real_sleep(client, base_url)
            self._set(b, self.residuals[b.name], "sleep: weights freed")
            self.events.append((b.name, "sleep returned"))

        async def wake(client: Any, base_url: str) -> None:
            self._set(b, self.sizes[b.name], "wake")  # taken from the moment the wake begins
            await real_wake(client, base_url)
            now = (await integrity.report_async(client, base_url))["now"]
            changed = integrity.differences(now, self.baselines[b.name])
            if changed:
                self.violations.append(f"wake of {b.name}: " + "; ".join(changed))
            else:
                self.intact_wakes[b.name] += 1

        return sleep, wake

    # ---- the books -------------------------------------------------------------------------
    @staticmethod
    def reserved(b: Backend, device: int) -> float:
        return sum(p.gib for r in (b.reservation, b.residual_reservation) for p in parts(r)
                   if p.device == device and not p.released)

    def _taken(self, r: Reservation) -> bool:
        return any(p is r for b in self.svc.backends.values()
                   for held in (b.reservation, b.residual_reservation) for p in parts(held))

    def _watch_untaken(self, r: Reservation, where: str) -> None:
        """A grant that no engine holds yet must be taken (or given back) within
        MAX_LOOP_STEPS_UNTAKEN steps of the event loop, whatever its owner's state or locks."""
        if id(r) in self._untaken:
            return
        self._untaken[id(r)] = 0
        loop = asyncio.get_running_loop()

        def step() -> None:
            waited = self._untaken[id(r)]
            if r.released or self._taken(r):
                self.max_untaken_steps = max(self.max_untaken_steps, waited)
                del self._untaken[id(r)]
            elif waited >= MAX_LOOP_STEPS_UNTAKEN:
                self.violations.append(f"{where}: {r!r} was granted and no engine took it "
                                       f"in {waited} steps of the event loop")
                del self._untaken[id(r)]
            else:
                self._untaken[id(r)] = waited + 1
                loop.call_soon(step)

        loop.call_soon(step)

    def check(self, where: str) -> None:
        self.checks += 1
        backends = list(self.svc.backends.values())
        for device, manager in self.svc.reservations.items():
            granted, capacity = manager.granted_gib, manager.capacity_gib
            if granted > capacity + EPS:
                self.violations.append(f"{where}: {granted:.3f} GiB granted of {capacity:.3f} on device {device}")
            on_device = [b for b in backends if device in b.devices]
            holders = sum(self.reserved(b, device) for b in on_device)
            if holders > granted + EPS:
                self.violations.append(f"{where}: engines hold {holders:.3f} GiB, {granted:.3f} granted")
            for r in manager.granted():
                if id(r) not in self._granted:
                    self._granted[id(r)] = r
                    self.events.append((r.owner, "granted"))
                if not self._taken(r):
                    self._watch_untaken(r, where)
            used = 0.0
            for b in on_device:
                holds, reserved = self.holds(b), self.reserved(b, device)
                used += holds
                if holds > reserved + EPS:
                    self.violations.append(f"{where}: {b.name} holds {holds:.3f} GiB, reserved {reserved:.3f}")
            if used > capacity + EPS:
                self.violations.append(f"{where}: the engines hold {used:.3f} GiB of {capacity:.3f}")

    async def sample(self) -> None:
        """Poll every manager and engine, all the time, from the event loop."""
        while True:
            self.check("sample")
            self.seen.add(tuple(f"{b.name}:{b.state.value}" for b in self.svc.backends.values()))
            await asyncio.sleep(0.002)

    # the scheduler's observers ----------------------------------------------------------------
    def swap_recorded(self, model: str, what: str, timings: list[StepTiming]) -> None:
        self.records.append((model, what, [t.step for t in timings]))

    def engine_failed(self, model: str, reason: str) -> None:
        self.failures.append((model, reason))

    # ---- wiring ----------------------------------------------------------------------------
    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        svc = self.svc
        monkeypatch.setattr(svc.monitor, "all_virtual", lambda devices: False)
        monkeypatch.setattr(svc.monitor, "process_memory_gib", self.process_memory_gib)
        monkeypatch.setattr(svc.monitor, "gpu_pids", self.gpu_pids)
        svc.driver.checkpointer = ck.CudaCheckpointer(self.driver())
        svc.record.observers.append(self)
        for b in svc.backends.values():
            sleep, wake = self._hooks(b)
            monkeypatch.setattr(b.adapter, "sleep", sleep)
            monkeypatch.setattr(b.adapter, "wake", wake)

        def changed() -> None:
            self.check("change")
            svc.notifier.notify()

        # managers of the same devices and capacities, checked at every change (grant, resize,
        # transfer, release); replaced before anything is reserved
        for index, old in list(svc.reservations.items()):
            assert not old.granted()
            svc.reservations[index] = ReservationManager(index, old.capacity_gib, on_change=changed)

    def order(self, since: int, *events: tuple[str, str]) -> list[int]:
        """Where each event first happened on the device at or after position ``since``."""
        return [self.events.index(e, since) for e in events]


@contextlib.contextmanager
def running_sampler(gpu: FakeGpu) -> Iterator[asyncio.Task[None]]:
    task = asyncio.get_running_loop().create_task(gpu.sample())
    try:
        yield task
    finally:
        task.cancel()


async def ask(svc: SwapService, model: str) -> str:
    """One greedy completion through the service (admission, swap-in, forwarding)."""
    async with svc.admit(model, "user") as ticket:
        body = {"model": model, "prompt": "swap me", "max_tokens": 6, "temperature": 0}
        async with svc.forward(ticket, "/v1/completions", body) as response:
            assert response.status_code == 200
            return str(json.loads(await response.read())["choices"][0]["text"])


async def until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


def no_leak(svc: SwapService) -> None:
    """Every grant is an engine's: its reservation while running, its kept residual while swapped out."""
    manager = svc.reservations[0]
    expected = sorted((p.owner, round(p.gib, 6)) for b in svc.backends.values()
                      for r in (b.reservation, b.residual_reservation) for p in parts(r))
    assert sorted((r.owner, round(r.gib, 6)) for r in manager.granted()) == expected
    for b in svc.backends.values():
        if b.state != State.RUNNING:
            assert b.reservation is None, b
    assert manager.waiting() == []


async def test_a_waiting_engine_is_granted_and_served_while_the_victims_sleep_hook_runs(
        monkeypatch: pytest.MonkeyPatch, tiny_checkpoint: Path) -> None:
    """The handover, integrated. Room for one of a (loaded from a checkpoint: weights that only its
    copy to host memory brings back) and b. b's request evicts a: a's sleep frees its KV cache at
    once, takes a transient buffer (less than the handover's margin) and keeps its weights on the
    device until released (their copy out, held by injection). b is granted, swapped in and served
    before a's sleep hook returns; the books stay exact at every instant, and after every wake each
    engine's weights and logits are those of before its first sleep."""
    svc = service([("a", 6.0, "checkpoint"), ("b", 6.0, "checkpoint")], capacity=10.0,
                  checkpoints={"a": tiny_checkpoint})
    growth = MARGIN_GIB * 0.8
    gpu = FakeGpu(svc, sizes={"a": 6.0, "b": 6.0}, residuals={"a": 0.5, "b": 0.5}, kv={"a": 2.5, "b": 2.5},
                  growth={"a": growth, "b": growth})
    gpu.install(monkeypatch)
    with running_sampler(gpu):
        svc.start()
        try:
            await svc.wait_started(90)
            a, b = svc.backends["a"], svc.backends["b"]
            first_a = await ask(svc, "a")
            gpu.hold_sleep("a")
            since = len(gpu.events)
            asking_b = asyncio.create_task(ask(svc, "b"))
            await asyncio.wait_for(gpu.held_sleep.wait(), 60)  # a's KV cache is gone, its weights are not
            # 10 - 6 free plus a's KV cache covers b: the handover grants b while a's hook runs
            await until(lambda: ("b", "granted") in gpu.events[since:], "b granted during a's sleep", timeout=15)
            first_b = await asyncio.wait_for(asking_b, 60)
            assert ("a", "sleep returned") not in gpu.events[since:], "b served while a's weights were on the device"
            assert a.state == State.SWAPPING_OUT and b.state == State.RUNNING
            assert a.reservation is not None and a.reservation.gib == pytest.approx(6.0 - 2.5 + MARGIN_GIB)
            gpu.release_sleep()
            await until(lambda: a.state == State.SWAPPED_OUT, "a's swap-out finished")
            freed_kv, granted_b, woke_b, returned = gpu.order(
                since, ("a", "sleep: KV cache freed"), ("b", "granted"), ("b", "wake"), ("a", "sleep returned"))
            assert freed_kv < granted_b < woke_b < returned
            assert ("a", "sleep: takes a transient buffer") in gpu.events[since:]
            no_leak(svc)

            # and back: every wake brings back the bits of before the first sleep
            assert await ask(svc, "a") == first_a
            assert await ask(svc, "b") == first_b
            assert gpu.intact_wakes == {"a": 2, "b": 2}
            no_leak(svc)
        finally:
            gpu.release_sleep()
            await svc.close()
    assert gpu.violations == []
    assert gpu.failures == []
    assert gpu.checks > 0 and svc.reservations[0].granted_gib == 0


async def test_overlapped_eviction_hands_the_weights_over_while_the_victim_checkpoints(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Room for one: b's swap-in evicts a. a's sleep hook returns → its weights' memory goes to b at
    once; b is restored, woken and serves a request while a's residual checkpoint (held by
    injection) and freeze (slowed) are still running. The books stay exact at every instant."""
    svc = service([("a", 0.6, "checkpoint"), ("b", 0.6, "checkpoint")], capacity=1.0)
    gpu = FakeGpu(svc, sizes={"a": 0.6, "b": 0.6}, residuals={"a": 0.1, "b": 0.1})
    gpu.install(monkeypatch)
    with running_sampler(gpu):
        svc.start()
        try:
            await svc.wait_started(60)
            a, b = svc.backends["a"], svc.backends["b"]
            assert a.state == b.state == State.SWAPPED_OUT and svc.reservations[0].granted_gib == 0
            first_a = await ask(svc, "a")

            gpu.hold_checkpoint("a")
            since = len(gpu.events)
            real_freeze = a.runtime.freeze

            async def slow_freeze() -> None:
                await asyncio.sleep(0.2)
                await real_freeze()

            monkeypatch.setattr(a.runtime, "freeze", slow_freeze)
            first_b = await asyncio.wait_for(ask(svc, "b"), 60)
            # b came in and answered while a is still swapping out: its checkpoint has not returned
            assert gpu.held_checkpoint.is_set()
            assert b.state == State.RUNNING and a.state == State.SWAPPING_OUT
            assert a.reservation is not None and a.reservation.gib == pytest.approx(0.1)  # only its residual
            assert b.reservation is not None and b.reservation.gib == pytest.approx(0.6)
            await until(lambda: ("a:swapping_out", "b:running") in gpu.seen, "the sampler saw the overlap")
            gpu.release_checkpoint()
            await until(lambda: a.state == State.SWAPPED_OUT, "a's swap-out finished")

            assert [s.step for s in a.last_steps] == ["sleep", "release weights", "lock", "checkpoint", "freeze"]
            assert [s.step for s in b.last_steps] == ["thaw", "restore", "unlock", "wake"]
            # the order of what happened: a slept and handed over, b was restored and woken, and
            # only then did a's checkpoint return; b's swap-in was recorded before a's swap-out
            sleep_a, held_a, restore_b, wake_b, ckpt_a = gpu.order(
                since, ("a", "sleep: weights freed"), ("a", "checkpoint held"), ("b", "restore"), ("b", "wake"),
                ("a", "checkpoint"))
            assert sleep_a < restore_b < wake_b < ckpt_a and held_a < ckpt_a
            swaps = [(m, what) for m, what, _ in gpu.records]
            assert swaps.index(("b", "swap-in")) < swaps.index(("a", "swap-out (preempted for b)"))
            assert a.reservation is None and a.checkpointed_pids == [a.runtime.pid]
            no_leak(svc)

            # both answer as before (b evicted for a, then a for b, with no step held), each itself
            assert await ask(svc, "a") == first_a
            assert await ask(svc, "b") == first_b
            assert first_a != first_b
            assert b.state == State.RUNNING
            await until(lambda: a.state == State.SWAPPED_OUT, "a's second swap-out finished")
            assert a.swaps_out == 3 and b.swaps_out == 2 and gpu.failures == []
            no_leak(svc)
        finally:
            gpu.release_checkpoint()
            await svc.close()
    assert gpu.violations == []
    assert gpu.failures == []
    assert gpu.checks > 0 and svc.reservations[0].granted_gib == 0


async def test_auto_residuals_are_checkpointed_to_make_room_and_an_unmeasured_start_never_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """residual: auto. a and b keep their residuals after their startup snapshots (there is room);
    c, unmeasured, must hold the whole device to start: it checkpoints both residuals and starts.
    Later b's swap-in needs room: c's kept residual is checkpointed, a keeps running."""
    svc = service([("a", 0.5, "auto"), ("b", 0.5, "auto"), ("c", None, "auto")], capacity=1.0)
    gpu = FakeGpu(svc, sizes={"a": 0.5, "b": 0.5, "c": 0.5}, residuals={"a": 0.15, "b": 0.15, "c": 0.15})
    gpu.install(monkeypatch)
    manager = svc.reservations[0]
    with running_sampler(gpu):
        svc.start()
        try:
            await svc.wait_started(90)
            a, b, c = (svc.backends[n] for n in "abc")
            assert [x.state for x in (a, b, c)] == [State.SWAPPED_OUT] * 3
            # c started (nothing failed), was measured, and keeps its own residual
            assert gpu.failures == [] and c.error is None
            assert c.memory_measured and c.memory_gib == pytest.approx(0.5)
            assert c.residual_reservation is not None and c.residual_reservation.gib == pytest.approx(0.15)
            # to make room for it, a's and b's kept residuals went to host memory, least recently used first
            made_room = [(m, steps) for m, what, steps in gpu.records if what == "residual checkpointed to make room"]
            assert made_room == [("a", ["thaw", "lock", "checkpoint", "freeze"]),
                                 ("b", ["thaw", "lock", "checkpoint", "freeze"])]
            for x in (a, b):
                assert x.residual_reservation is None and x.checkpointed_pids == [x.runtime.pid]
                assert x.runtime.frozen
            assert [(m, what) for m, what, _ in gpu.records][-1] == ("c", "swap-out (startup snapshot)")
            assert [(r.owner, pytest.approx(r.gib)) for r in manager.granted()] == [("c", 0.15)]
            no_leak(svc)

            # a comes in: there is room; its checkpointed residual is restored, then it wakes
            answers = {"a": await ask(svc, "a")}
            assert [s.step for s in a.last_steps] == ["thaw", "restore", "unlock", "wake"]
            # b needs 0.5 with 0.35 free: c's kept residual moves out instead of evicting a
            answers["b"] = await ask(svc, "b")
            assert a.state == State.RUNNING and a.swaps_out == 1  # only its startup snapshot
            assert b.state == State.RUNNING
            assert gpu.records[-2][:2] == ("c", "residual checkpointed to make room")
            assert c.residual_reservation is None and c.checkpointed_pids == [c.runtime.pid]
            assert manager.granted_gib == pytest.approx(1.0)
            no_leak(svc)

            # c comes in by evicting the least recently used (a), and everyone answers as before
            answers["c"] = await ask(svc, "c")
            assert a.state == State.SWAPPED_OUT and [s.step for s in c.last_steps] == [
                "thaw", "restore", "unlock", "wake"]
            assert await ask(svc, "a") == answers["a"]
            assert len(set(answers.values())) == 3
            no_leak(svc)
        finally:
            await svc.close()
    assert gpu.violations == []
    assert gpu.failures == []
    assert manager.granted_gib == 0


async def test_a_residual_whose_engine_is_being_swapped_in_is_skipped_not_waited_for(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Making room holds the device lock. If the engine whose kept residual it would move has just
    been handed its transition lock by a request (which will next ask for the device lock), waiting
    for that engine would deadlock the two: the residual is skipped, and moved on a later round."""
    svc = service([("a", 0.5, "auto"), ("b", 0.5, "auto"), ("c", None, "auto")], capacity=1.0)
    gpu = FakeGpu(svc, sizes={"a": 0.5, "b": 0.5, "c": 0.5}, residuals={"a": 0.15, "b": 0.15, "c": 0.15})
    gpu.install(monkeypatch)
    placement, manager = svc.placement, svc.reservations[0]
    svc.start()
    try:
        await svc.wait_started(90)
        c = svc.backends["c"]
        assert c.residual_reservation is not None and manager.free_gib == pytest.approx(0.85)
        holder_has_lock, room_asked = asyncio.Event(), asyncio.Event()

        async def request_for_c() -> None:
            # what a request does: c's transition lock first, then (in its swap-in) the device lock
            async with c.transition:
                holder_has_lock.set()
                await room_asked.wait()
                small = await placement.reserve_on("c-request", 0, 0.01)
                small.release()

        holder = asyncio.create_task(request_for_c())
        await holder_has_lock.wait()
        needs_room = asyncio.create_task(placement.reserve_on("x", 0, 0.9))  # only c's residual can make room
        await asyncio.sleep(0.05)
        room_asked.set()
        granted = await asyncio.wait_for(needs_room, 20)  # before the fix: both waited forever
        await asyncio.wait_for(holder, 5)
        assert granted.gib == pytest.approx(0.9) and c.residual_reservation is None
        assert gpu.records[-1][:2] == ("c", "residual checkpointed to make room")
        granted.release()
        no_leak(svc)
    finally:
        await svc.close()
    # the books' checker knows engines only: the two test-made owners are the exception
    assert [v for v in gpu.violations if "c-request" not in v and "<Reservation x " not in v] == []


async def test_residuals_moved_out_for_a_start_come_back_when_there_is_room(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The unmeasured start of c checkpointed a's and b's residuals; once c is measured and swapped
    out there is room again, and the idle sweep brings them back (thaw → restore → unlock → freeze),
    so a's next swap-in is thaw → wake, with no driver restore in the request's path."""
    svc = service([("a", 0.5, "auto"), ("b", 0.5, "auto"), ("c", None, "auto")], capacity=1.0,
                  idle_check_interval=0.2)
    gpu = FakeGpu(svc, sizes={"a": 0.5, "b": 0.5, "c": 0.5}, residuals={"a": 0.15, "b": 0.15, "c": 0.15})
    gpu.install(monkeypatch)
    manager = svc.reservations[0]
    with running_sampler(gpu):
        svc.start()
        try:
            await svc.wait_started(90)
            a, b = svc.backends["a"], svc.backends["b"]
            # booked first, then restored: done when booked, restored and out of its transition
            await until(lambda: all(x.residual_reservation is not None and not x.checkpointed_pids
                                    and not x.transition.locked() for x in (a, b)),
                        "a's and b's residuals back on the GPU")
            back = [(m, steps) for m, what, steps in gpu.records if what == "swap-in of the residual (room to keep it)"]
            assert sorted(back) == [("a", ["thaw", "restore", "unlock", "freeze"]),
                                    ("b", ["thaw", "restore", "unlock", "freeze"])]
            for x in (a, b):
                assert x.state == State.SWAPPED_OUT and x.checkpointed_pids == [] and x.runtime.frozen
                assert x.residual_reservation.gib == pytest.approx(0.15) and gpu.holds(x) == pytest.approx(0.15)
            assert manager.granted_gib == pytest.approx(0.45)
            answer = await ask(svc, "a")
            assert [s.step for s in a.last_steps] == ["thaw", "wake"]
            assert answer and gpu.violations == []
            no_leak(svc)
        finally:
            await svc.close()
    assert gpu.violations == [] and gpu.failures == []


async def test_keep_residuals_are_never_moved_so_an_unmeasured_start_fails_with_its_reason(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The contrast: residual: keep. a's kept residual stays on the device whatever waits; c,
    unmeasured, cannot get the whole device and fails with the reason, in the server log too."""
    caplog.set_level(logging.ERROR, logger="jupyter_swapserve")
    svc = service([("a", 0.5, "keep"), ("c", None, "keep")], capacity=1.0)
    gpu = FakeGpu(svc, sizes={"a": 0.5, "c": 0.5}, residuals={"a": 0.15, "c": 0.15})
    gpu.install(monkeypatch)
    manager = svc.reservations[0]
    with running_sampler(gpu):
        svc.start()
        try:
            await svc.wait_started(60)
            a, c = svc.backends["a"], svc.backends["c"]
            assert a.state == State.SWAPPED_OUT and a.residual_reservation is not None
            assert c.state == State.FAILED and "pinned models hold 0.15 of 1.00 GiB" in (c.error or "")
            assert [m for m, _ in gpu.failures] == ["c"]
            assert any("model c failed: start failed" in r.getMessage() for r in caplog.records)
            assert not any(what == "residual checkpointed to make room" for _, what, _ in gpu.records)
            assert [(r.owner, pytest.approx(r.gib)) for r in manager.granted()] == [("a", 0.15)]
            # a swaps in on top of its kept residual (no restore: nothing was checkpointed) and serves
            await ask(svc, "a")
            assert [s.step for s in a.last_steps] == ["thaw", "wake"]
            assert manager.granted_gib == pytest.approx(0.5)
            no_leak(svc)
        finally:
            await svc.close()
    assert gpu.violations == []
    assert manager.granted_gib == 0
