"""ipywidgets for front ends without the JupyterLab sidebar (classic Notebook, VS Code, Colab-likes).

    from jupyter_swapserve.kernel.widgets import ModelPanel, ChatBox
    ModelPanel()          # live: state, memory bars, swap buttons
    ChatBox("smollm2")    # a small chat, streamed

Both work in background threads, so they stay live while the kernel is busy or idle: the panel
follows the server's status event stream, the chat streams its answer into the widget.
"""

from __future__ import annotations

import contextvars
import html
import threading
import time
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from .client import LLMError, SwapServeClient, Waiter, build_body, seconds

STATE_COLOURS = {
    "running": "#2e7d32", "swapping_in": "#f9a825", "swapping_out": "#f9a825", "starting": "#f9a825",
    "swapped_out": "#757575", "stopped": "#757575", "failed": "#c62828",
}
RESIDENT = ("running", "swapping_in", "swapping_out", "starting")
RETRY_SECONDS = 2.0
POLL_SECONDS = 2.0  # when the server has no event stream
UPDATE_INTERVAL = 0.05


def _thread(target: Callable[[], None], name: str) -> threading.Thread:
    # the cell's context goes along, so anything the thread prints lands in that cell
    t = threading.Thread(target=contextvars.copy_context().run, args=(target,), name=name, daemon=True)
    t.start()
    return t


def _badge(state: str) -> str:
    colour = STATE_COLOURS.get(state, "#757575")
    return (f'<span style="background:{colour};color:white;border-radius:3px;padding:0 6px;'
            f'font-size:0.85em">{html.escape(state.replace("_", " "))}</span>')


class _ModelRow(w.HBox):
    """One model: name, state badge, memory bar, queue, last swap-in, swap buttons."""

    def __init__(self, name: str, on_swap: Callable[[str, str], None]) -> None:
        self.name = name
        self.state = ""
        self.name_label = w.HTML(f"<b>{html.escape(name)}</b>", layout=w.Layout(width="110px"))
        self.state_html = w.HTML(layout=w.Layout(width="100px"))
        self.memory_bar = w.FloatProgress(min=0.0, max=1.0, value=0.0, layout=w.Layout(width="120px"))
        self.memory_label = w.Label(layout=w.Layout(width="90px"))
        self.info = w.Label(layout=w.Layout(width="230px"))
        self.swap_in_button = w.Button(description="Swap in", icon="arrow-up", layout=w.Layout(width="95px"),
                                       tooltip=f"Move {name} into device memory")
        self.swap_out_button = w.Button(description="Swap out", icon="arrow-down", layout=w.Layout(width="95px"),
                                        tooltip=f"Move {name} out to host memory")
        self.swap_in_button.on_click(lambda _: on_swap(name, "swap-in"))
        self.swap_out_button.on_click(lambda _: on_swap(name, "swap-out"))
        super().__init__([self.name_label, self.state_html, self.memory_bar, self.memory_label, self.info,
                          self.swap_in_button, self.swap_out_button])

    def update(self, m: dict[str, Any], capacity_gib: float) -> None:
        # the row's state is set last: the row is updated from the panel's thread, and whoever sees the
        # new state (a cell waiting on it) must see the rest of the row updated for it too
        state = m.get("state", "?")
        self.state_html.value = _badge(state)
        size = m.get("memory_gib")
        held = m.get("reserved_gib") or (size if state in RESIDENT and size else 0.0)
        self.memory_bar.max = max(capacity_gib, 1e-6)
        self.memory_bar.value = min(float(held or 0.0), self.memory_bar.max)
        self.memory_bar.bar_style = "success" if state == "running" else (
            "danger" if state == "failed" else "warning" if state in RESIDENT else "info")
        self.memory_label.value = f"{size:.2f} GiB" if isinstance(size, (int, float)) else "? GiB"
        last = m.get("last_swap_in_seconds")
        parts = [f"queue {m.get('queue_depth', 0)}", f"in flight {m.get('in_flight', 0)}"]
        if isinstance(last, (int, float)):
            parts.append(f"swap-in {seconds(last)}")
        self.info.value = " · ".join(parts)
        if m.get("error"):
            self.state_html.value += f' <span title="{html.escape(m["error"])}">⚠</span>'
        self.swap_in_button.disabled = state in ("running", "swapping_in", "starting")
        self.swap_out_button.disabled = state != "running" or bool(m.get("pinned"))
        self.state = state


class ModelPanel(w.VBox):
    """The models of the swap service, live: state, memory on the device, queue, swap buttons."""

    def __init__(self, client: SwapServeClient | None = None, live: bool = True) -> None:
        self.client = client or SwapServeClient()
        self.rows: dict[str, _ModelRow] = {}
        self.devices = w.VBox()
        self.models = w.VBox()
        self.message = w.HTML()
        self.status: dict[str, Any] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()  # updates come from the event thread and from swap threads
        self._thread: threading.Thread | None = None
        super().__init__([w.HTML("<b>jupyter-swapserve</b>"), self.devices, self.models, self.message])
        self.refresh()
        if live:
            self._thread = _thread(self._follow, "swapserve-panel")

    def refresh(self) -> None:
        """Read the status once (the live panel does this on every change by itself)."""
        try:
            self.update(self.client.status())
        except LLMError as exc:
            self.say(str(exc), error=True)

    def say(self, text: str, error: bool = False) -> None:
        colour = "#c62828" if error else "inherit"
        self.message.value = f'<span style="color:{colour};opacity:0.8">{html.escape(text)}</span>' if text else ""

    def update(self, status: dict[str, Any]) -> None:
        with self._lock:
            self.status = status
            capacity = {d["index"]: float(d.get("capacity_gib") or 0) for d in status.get("devices", [])}
            self._update_devices(status.get("devices", []))
            names = [m["name"] for m in status.get("models", [])]
            for m in status.get("models", []):
                row = self.rows.get(m["name"])
                if row is None:
                    row = self.rows[m["name"]] = _ModelRow(m["name"], self._swap)
                row.update(m, capacity.get(m.get("device", 0), 1.0))
            if [r.name for r in self.models.children] != names:  # type: ignore[attr-defined]
                self.models.children = [self.rows[n] for n in names]

    def _update_devices(self, devices: list[dict[str, Any]]) -> None:
        while len(self.devices.children) < len(devices):
            bar = w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="240px"))
            self.devices.children = [*self.devices.children, w.HBox([w.Label(layout=w.Layout(width="210px")),
                                                                     bar, w.Label()])]
        for box, d in zip(self.devices.children, devices, strict=False):
            label, bar, text = box.children  # type: ignore[attr-defined]
            label.value = f"{d['name']} ({d['kind']})"
            bar.max = max(float(d.get("capacity_gib") or 0), 1e-6)
            bar.value = min(float(d.get("reserved_gib") or 0), bar.max)
            text.value = f"{d.get('reserved_gib', 0):.2f} / {d.get('capacity_gib', 0):.2f} GiB reserved"

    def _follow(self) -> None:
        """Keep the panel current: the server's event stream, or polling where there is none."""
        polling = False
        while not self._stop.is_set():
            try:
                if polling:
                    self.update(self.client.status())
                    self._stop.wait(POLL_SECONDS)
                    continue
                for status in self.client.events():
                    if self._stop.is_set():
                        return
                    self.update(status)
                    if self.message.value.startswith('<span style="color:#c62828'):
                        self.say("")  # connected again
            except LLMError as exc:
                if getattr(exc, "status", None) == 404:
                    polling = True
                    continue
                self.say(f"{exc} (retrying)", error=True)
            except Exception as exc:  # keep the panel alive whatever the stream does
                self.say(f"status stream: {exc.__class__.__name__}: {exc} (retrying)", error=True)
            self._stop.wait(RETRY_SECONDS)

    def _swap(self, name: str, direction: str) -> None:
        """A button's action, off the kernel's main thread: a swap-in may take seconds."""
        row = self.rows[name]
        row.swap_in_button.disabled = row.swap_out_button.disabled = True
        self.say(f"{name}: {direction.replace('-', ' ')}…")

        def work() -> None:
            try:
                result = self.client.swap(name, direction)
            except LLMError as exc:
                self.say(str(exc), error=True)
            else:
                if direction == "swap-in":
                    done = (f"{name} swapped in, {seconds(float(result.get('seconds') or 0))}"
                            if result.get("swapped") else f"{name} was already in memory")
                else:
                    done = f"{name} swapped out" if result.get("swapped") else (
                        f"{name} was not swapped out" + (f": {result['reason']}" if result.get("reason") else ""))
                self.say(done)
            if not self._thread:  # not live: show the result of the swap anyway
                self.refresh()

        _thread(work, f"swapserve-{direction}")

    def stop(self) -> None:
        """Stop following the server (the stream ends at its next event or keepalive)."""
        self._stop.set()

    def close(self) -> None:
        self.stop()
        super().close()


class ChatBox(w.VBox):
    """A small chat with one model at a time; the conversation is kept per model, in this widget."""

    def __init__(self, model: str | None = None, client: SwapServeClient | None = None,
                 max_tokens: int = 256, system: str | None = None, temperature: float | None = None,
                 seed: int | None = None) -> None:
        self.client = client or SwapServeClient()
        self.system, self.temperature, self.seed = system, temperature, seed
        self.conversations: dict[str, list[dict[str, str]]] = {}
        names: list[str] = []
        error = ""
        try:
            names = sorted(self.client.models())
        except LLMError as exc:
            error = str(exc)
        self.model = w.Dropdown(options=names, value=model if model in names else (names[0] if names else None),
                                description="Model", layout=w.Layout(width="260px"))
        self.max_tokens = w.BoundedIntText(value=max_tokens, min=1, max=32768, description="Max tokens",
                                           layout=w.Layout(width="200px"))
        self.transcript = w.HTML(layout=w.Layout(max_height="400px", overflow="auto", border="1px solid #ddd",
                                                 padding="4px"))
        self.prompt = w.Textarea(placeholder="Ask something (Shift+Enter is a new line; press Send)",
                                 layout=w.Layout(width="100%", height="70px"))
        self.send_button = w.Button(description="Send", button_style="primary", icon="paper-plane")
        self.stop_button = w.Button(description="Stop", icon="stop", disabled=True)
        self.clear_button = w.Button(description="Clear", icon="eraser")
        self.status = w.HTML()
        self.send_button.on_click(lambda _: self.send())
        self.stop_button.on_click(lambda _: self._cancel.set())
        self.clear_button.on_click(lambda _: self.clear())
        self.model.observe(lambda _: self._render(), names="value")
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self._partial = ""
        super().__init__([w.HBox([self.model, self.max_tokens]), self.transcript, self.prompt,
                          w.HBox([self.send_button, self.stop_button, self.clear_button]), self.status])
        if error:
            self._say(error, error=True)
        if model is not None and model not in names and names:
            self._say(f"Unknown model '{model}'. Available models: {', '.join(names)}.", error=True)
        self._render()

    @property
    def conversation(self) -> list[dict[str, str]]:
        return self.conversations.get(self.model.value or "", [])

    def send(self, text: str | None = None) -> None:
        """Send the prompt box (or text); the answer streams into the transcript."""
        prompt = (text if text is not None else self.prompt.value).strip()
        if not prompt or self.busy or not self.model.value:
            return
        self.prompt.value = ""
        self._cancel.clear()
        self.send_button.disabled, self.stop_button.disabled = True, False
        self._thread = _thread(lambda: self._answer(self.model.value, prompt), "swapserve-chat")

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        """Until the answer being streamed is complete (scripts and tests)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def clear(self) -> None:
        self.conversations.pop(self.model.value or "", None)
        self._partial = ""
        self._say("")
        self._render()

    def _answer(self, model: str, prompt: str) -> None:
        history = self.conversations.setdefault(model, [])
        self._partial = ""
        turn = {"role": "user", "content": prompt}
        self._render(pending=turn)
        waiter = Waiter(self.client, model, self._say)
        try:
            api = self.client.model(model).get("api", "chat")
            body = build_body(api, prompt, system=self.system, history=history, max_tokens=self.max_tokens.value,
                              temperature=self.temperature, seed=self.seed)
            waiter.start()
            with self.client.stream(model, api, body) as stream:
                waiter.stop()
                notes = []
                if stream.swap_in_seconds > 0:
                    notes.append(f"{model} swapped in, {seconds(stream.swap_in_seconds)}")
                if stream.queue_seconds >= 0.1:
                    notes.append(f"queued {seconds(stream.queue_seconds)}")
                self._say(" · ".join(notes))
                last = 0.0
                for piece in stream:
                    if self._cancel.is_set():
                        break  # leaving the block closes the stream: the server cancels
                    self._partial += piece
                    if time.monotonic() - last >= UPDATE_INTERVAL:
                        self._render(pending=turn)
                        last = time.monotonic()
            if self._cancel.is_set():
                notes.append("stopped")
            history.extend([turn, {"role": "assistant", "content": self._partial}])
            self._partial = ""
            self._say(" · ".join(notes))
        except LLMError as exc:
            self._partial = ""
            self._say(str(exc), error=True)
        except Exception as exc:  # a widget thread has nowhere to raise to
            self._partial = ""
            self._say(f"{exc.__class__.__name__}: {exc}", error=True)
        finally:
            waiter.stop()
            self._render()
            self.send_button.disabled, self.stop_button.disabled = False, True

    def _say(self, text: str, error: bool = False) -> None:
        colour = "#c62828" if error else "inherit"
        self.status.value = (f'<span style="color:{colour};opacity:0.7;font-size:0.85em">{html.escape(text)}'
                             "</span>") if text else ""

    def _render(self, pending: dict[str, str] | None = None) -> None:
        turns = list(self.conversation)
        if pending is not None:
            turns += [pending, {"role": "assistant", "content": self._partial or "…"}]
        parts = []
        for t in turns:
            who = "You" if t["role"] == "user" else (self.model.value or "model")
            parts.append(f'<div style="margin:4px 0"><b>{html.escape(who)}</b>{_markdown(t["content"])}</div>')
        self.transcript.value = "".join(parts)


def _markdown(text: str) -> str:
    """HTML of a message: Markdown where mistune is installed (it comes with nbconvert), with any HTML
    in the text escaped, since widget HTML is not sanitised."""
    try:
        import mistune
    except ImportError:
        return f'<div style="white-space:pre-wrap">{html.escape(text)}</div>'
    return str(mistune.create_markdown(escape=True)(text))


__all__ = ["ChatBox", "ModelPanel"]
