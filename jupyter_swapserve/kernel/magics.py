"""``%%llm`` and ``%llm``: prompts and swap control from a notebook, in jupyter-ai's ``%%ai`` conventions.

    %load_ext jupyter_swapserve
    %%llm smollm2 -f markdown --max-tokens 200
    Explain {topic} in two sentences.

The answer streams into the output as it arrives (IPython display handles, updated in place) and is
rendered in its format at the end. Expected failures (unknown model, no server, quota, engine
failure, interrupt) are one red line, never a traceback.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shlex
import string
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import DisplayHandle, display

from .client import (
    Connection,
    LLMError,
    SwapServeClient,
    Waiter,
    build_body,
    normalize_base_url,
    seconds,
)

FORMATS = ("markdown", "text", "code", "json")
UPDATE_INTERVAL = 0.05  # seconds between display updates: progressive, without a message per token
COMMANDS = ("list", "status", "swap-in", "swap-out", "config", "reset", "panel", "chat", "help")

USAGE = """\
%%llm MODEL [-f markdown|text|code|json] [--max-tokens N] [--temperature T] [--seed S]
            [--system TEXT] [-o VAR] [--chat]
    The cell is the prompt; {name} inserts a variable of the notebook, {{ and }} are braces.
    -o VAR stores the answer's text (the code, with -f code); --chat keeps a conversation per model.
%llm list                         models with state, memory, queue, last swap-in
%llm status                       devices and models in detail
%llm swap-in NAME | swap-out NAME
%llm config [--url URL] [--token TOKEN] [--reset]
%llm reset [MODEL]                forget the --chat conversation (of one model, or all)
%llm panel | chat [MODEL]         live model panel, chat box (ipywidgets)"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad options as IPython's one-line UsageError instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message}\n{USAGE}")


def _cell_parser() -> _Parser:
    p = _Parser(prog="%%llm", add_help=False)
    p.add_argument("model")
    p.add_argument("-f", "--format", choices=FORMATS, default="markdown")
    p.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--system")
    p.add_argument("-o", "--output", dest="output")
    p.add_argument("--chat", action="store_true")
    return p


# {name}, {name.attr}, {name[key]}, with optional !conversion and :spec; {{ and }} are escapes
_FIELD = re.compile(r"\{\{|\}\}|\{([A-Za-z_]\w*(?:\.[A-Za-z_]\w*|\[[^\[\]{}]*\])*)(![rsa])?(:[^{}]*)?\}")


def interpolate(text: str, namespace: dict[str, Any]) -> str:
    """Replace ``{name}`` fields with values from the namespace, as str.format would.

    Braces that are not a field of a defined name (code in the prompt, JSON) stay as written,
    so prompts about code need no escaping; ``{{``/``}}`` give literal braces as usual.
    """
    formatter = string.Formatter()

    def replace(m: re.Match[str]) -> str:
        whole = m.group(0)
        if whole in ("{{", "}}"):
            return whole[0]
        name, conversion, spec = m.group(1), m.group(2), m.group(3)
        root = re.match(r"\w+", name)
        if root is None or root.group(0) not in namespace:
            return whole
        try:
            value, _ = formatter.get_field(name, (), namespace)
            if conversion:
                value = formatter.convert_field(value, conversion[1])
            return formatter.format_field(value, spec[1:] if spec else "")
        except Exception:  # a field the value cannot satisfy stays as written, like unknown names
            return whole

    return _FIELD.sub(replace, text)


def strip_fences(text: str) -> tuple[str, str | None]:
    """The code inside the first ``` fence (and its language), or the text itself when unfenced."""
    m = re.search(r"```([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", text, re.S)
    if m is None:
        return text.strip("\n"), None
    return m.group(2).rstrip("\n"), (m.group(1) or None)


def _quiet(text: str) -> dict[str, str]:
    """A line that informs without competing with the answer."""
    if not text:
        return {"text/plain": ""}
    return {"text/plain": text,
            "text/html": f'<div style="opacity:0.6;font-size:0.85em">{html.escape(text)}</div>'}


def _table(headers: list[str], rows: list[list[str]]) -> dict[str, str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    plain = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    plain += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    md = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return {"text/plain": "\n".join(plain), "text/markdown": "\n".join(md)}


def _gib(value: Any) -> str:
    return f"{value:.2f} GiB" if isinstance(value, (int, float)) else "?"


def _ago(timestamp: Any) -> str:
    if not isinstance(timestamp, (int, float)) or not timestamp:
        return "never"
    s = max(0.0, time.time() - timestamp)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.0f} h ago"


class _Output:
    """The cell's two outputs: a quiet status line (waiting, swapped in) above the streamed answer."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.status: DisplayHandle | None = None
        self.answer: DisplayHandle | None = None

    def set_status(self, text: str) -> None:
        if self.status is None:
            if not text:
                return
            self.status = display(_quiet(text), raw=True, display_id=True)
        else:
            self.status.update(_quiet(text), raw=True)

    def stream(self, text: str) -> None:
        bundle = self._streaming_bundle(text)
        if self.answer is None:
            self.answer = display(bundle, raw=True, display_id=True)
        else:
            self.answer.update(bundle, raw=True)

    def _streaming_bundle(self, text: str) -> dict[str, Any]:
        if self.fmt == "markdown":
            return {"text/markdown": text, "text/plain": text}
        if self.fmt == "code":
            code, lang = strip_fences(text)
            return {"text/markdown": f"```{lang or 'python'}\n{code}\n```", "text/plain": code}
        return {"text/plain": text}

    def final(self, bundle: dict[str, Any]) -> None:
        if self.answer is None:
            self.answer = display(bundle, raw=True, display_id=True)
        else:
            self.answer.update(bundle, raw=True)


@magics_class
class LLMMagics(Magics):
    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.client = SwapServeClient()
        # per-model --chat conversations of this kernel: OpenAI messages, user and assistant turns
        self.conversations: dict[str, list[dict[str, str]]] = {}

    @line_cell_magic
    def llm(self, line: str, cell: str | None = None) -> None:
        """Prompt a model (``%%llm MODEL``) or manage the swap service (``%llm list|status|...``)."""
        if cell is None:
            self._line(line)
        else:
            self._cell(line, cell)

    # ---- %%llm ------------------------------------------------------------------------------
    def _cell(self, line: str, cell: str) -> None:
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%%llm: {exc}") from None
        if not argv:
            raise UsageError(f"%%llm needs a model name.\n{USAGE}")
        args = _cell_parser().parse_args(argv)
        # the intent hint first: the model's swap-in overlaps with rendering the prompt and the request
        hinted = self.client.prefetch(args.model)
        ns = self.shell.user_ns
        prompt = interpolate(cell, ns).strip()
        if not prompt:
            raise UsageError(f"The cell is empty: write the prompt below %%llm {args.model}.")
        system = interpolate(args.system, ns) if args.system else None
        api = self.client.model(args.model).get("api", "chat")
        history = self.conversations.get(args.model, []) if args.chat else []
        body = build_body(api, prompt, system=system, history=history, max_tokens=args.max_tokens,
                          temperature=args.temperature, seed=args.seed)
        out = _Output(args.format)
        try:
            text, stream_note = self._stream(args.model, api, body, out, prefetched=hinted == "starting")
        except KeyboardInterrupt:
            # leaving the stream's `with` block closed the connection: the server cancels the request
            out.set_status("")
            raise LLMError(f"Interrupted: the request to {args.model} was cancelled.") from None
        except LLMError:
            out.set_status("")  # a waiting line must not outlive the request
            raise
        value, render_note = self._render(text, args.format, out)
        out.set_status(" · ".join(n for n in (stream_note, render_note) if n))
        if args.output:
            ns[args.output] = value
        if args.chat:
            self.conversations.setdefault(args.model, []).extend(
                [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}])

    def _stream(self, model: str, api: str, body: dict[str, Any], out: _Output,
                prefetched: bool = False) -> tuple[str, str]:
        """Stream the answer into out; the answer's text and the line about swap and queue."""
        waiter = Waiter(self.client, model, out.set_status)
        waiter.start()
        text, note = "", ""
        try:
            with self.client.stream(model, api, body) as stream:
                waiter.stop()  # from here only this thread touches the outputs
                notes = []
                if stream.swap_in_seconds > 0:
                    notes.append(f"{model} swapped in, {seconds(stream.swap_in_seconds)}")
                elif prefetched:
                    notes.append(f"{model} swapped in, ahead of the request (prefetch)")
                if stream.queue_seconds >= 0.1:
                    notes.append(f"queued {seconds(stream.queue_seconds)}")
                note = " · ".join(notes)
                out.set_status(note)
                last = 0.0
                for piece in stream:
                    text += piece
                    if time.monotonic() - last >= UPDATE_INTERVAL:
                        out.stream(text)
                        last = time.monotonic()
                if stream.finish_reason == "length":
                    note = " · ".join([*notes, "stopped at --max-tokens"])
        finally:
            waiter.stop()
        return text, note

    def _render(self, text: str, fmt: str, out: _Output) -> tuple[Any, str]:
        """Show the final answer in its format; the value -o stores, and a note about it."""
        if fmt == "markdown":
            out.final({"text/markdown": text, "text/plain": text})
            return text, ""
        if fmt == "text":
            out.final({"text/plain": text})
            return text, ""
        if fmt == "code":
            code, lang = strip_fences(text)
            out.final({"text/markdown": f"```{lang or 'python'}\n{code}\n```", "text/plain": code})
            # the front end inserts a new cell below with the code (jupyter-ai's -f code)
            self.shell.set_next_input(code, replace=False)
            return code, "code inserted in a new cell below"
        body, _ = strip_fences(text)
        try:
            value = json.loads(body)
        except ValueError:
            out.final({"text/plain": text})
            return text, "the answer is not valid JSON; shown as text"
        out.final({"application/json": value if isinstance(value, (dict, list)) else {"value": value},
                   "text/plain": json.dumps(value, indent=2)})
        return text, ""

    # ---- %llm -------------------------------------------------------------------------------
    def _line(self, line: str) -> None:
        try:
            argv = shlex.split(line)
        except ValueError as exc:
            raise UsageError(f"%llm: {exc}") from None
        if not argv or argv[0] in ("help", "-h", "--help"):
            print(USAGE)
            return
        command, rest = argv[0], argv[1:]
        if command == "list":
            self._list()
        elif command == "status":
            self._status()
        elif command in ("swap-in", "swap-out"):
            if len(rest) != 1:
                raise UsageError(f"%llm {command} NAME")
            self._swap(rest[0], command)
        elif command == "config":
            self._config(rest)
        elif command == "reset":
            self._reset(rest)
        elif command in ("panel", "chat"):
            self._widget(command, rest)
        else:
            raise UsageError(f"Unknown command '{command}' (commands: {', '.join(COMMANDS)}); "
                             f"to prompt a model use the cell magic: %%llm {command}")

    def _list(self) -> None:
        status = self.client.status()
        rows = []
        for m in status.get("models", []):
            last = m.get("last_swap_in_seconds")
            rows.append([m["name"], m.get("api", "?"), m.get("state", "?"), _gib(m.get("memory_gib")),
                         str(m.get("queue_depth", 0)), str(m.get("in_flight", 0)),
                         seconds(last) if isinstance(last, (int, float)) else "—"])
        if not rows:
            print("No models are served; check the models file (--SwapServe.models_file).")
            return
        head = ["model", "api", "state", "memory", "queue", "in flight", "last swap-in"]
        if status.get("nodes"):  # client mode: a model of several nodes has a row per node
            head, rows = ["node", *head], [[m.get("node", "?"), *row] for m, row in
                                           zip(status.get("models", []), rows, strict=True)]
        display(_table(head, rows), raw=True)

    def _status(self) -> None:
        status = self.client.status()
        devices = [[str(d["index"]), d["name"], d["kind"], _gib(d["capacity_gib"]), _gib(d["reserved_gib"]),
                    _gib(d["free_gib"]), _gib(d.get("used_gib"))] for d in status.get("devices", [])]
        models = []
        for m in status.get("models", []):
            swap_in, swap_out = m.get("last_swap_in_seconds"), m.get("last_swap_out_seconds")
            models.append([
                m["name"], f"{m.get('engine', '?')}/{m.get('api', '?')}", m.get("state", "?"),
                str(m.get("device", "?")), _gib(m.get("memory_gib")), str(m.get("queue_depth", 0)),
                str(m.get("in_flight", 0)), f"{m.get('swaps_in', 0)}/{m.get('swaps_out', 0)}",
                seconds(swap_in) if isinstance(swap_in, (int, float)) else "—",
                seconds(swap_out) if isinstance(swap_out, (int, float)) else "—",
                _ago(m.get("last_used")), (m.get("error") or "")[:80],
            ])
        print(f"server: {self.client.connection.describe()}")
        device_head = ["device", "name", "kind", "capacity", "reserved", "free", "used"]
        model_head = ["model", "engine/api", "state", "device", "memory", "queue", "in flight", "swaps in/out",
                      "last swap-in", "last swap-out", "last used", "error"]
        nodes = status.get("nodes")
        if nodes:  # client mode: the services of the hub's nodes, as one
            display(_table(["node", "up", "models", "since", "error"],
                           [[n["name"], "yes" if n["up"] else "no", ", ".join(n.get("models") or []) or "—",
                             _ago(n.get("since")), (n.get("error") or "")[:80]] for n in nodes]), raw=True)
            device_head, model_head = ["node", *device_head], ["node", *model_head]
            devices = [[d.get("node", "?"), *row] for d, row in zip(status.get("devices", []), devices, strict=True)]
            models = [[m.get("node", "?"), *row] for m, row in zip(status.get("models", []), models, strict=True)]
        display(_table(device_head, devices), raw=True)
        display(_table(model_head, models), raw=True)
        for err in status.get("config_errors") or []:
            print(f"models file: {err}")

    def _swap(self, name: str, direction: str) -> None:
        self.client.model(name)  # one line listing the models when the name is unknown
        result = self.client.swap(name, direction)
        state = result.get("state", "?")
        if direction == "swap-in":
            if result.get("swapped"):
                print(f"{name} swapped in, {seconds(float(result.get('seconds') or 0))} (now {state})")
            else:
                print(f"{name} was already in memory (now {state})")
        elif result.get("swapped"):
            print(f"{name} swapped out (now {state})")
        else:
            reason = f": {result['reason']}" if result.get("reason") else ""
            print(f"{name} was not swapped out (now {state}){reason}")

    def _config(self, argv: list[str]) -> None:
        p = _Parser(prog="%llm config", add_help=False)
        p.add_argument("--url")
        p.add_argument("--token")
        p.add_argument("--reset", action="store_true")
        args = p.parse_args(argv)
        if args.reset:
            self.client.configure(None)
        elif args.url is not None or args.token is not None:
            current = self.client.configured
            if args.url is None and current is None:
                raise UsageError("%llm config --token needs --url the first time.")
            url = normalize_base_url(args.url) if args.url is not None else current.base_url  # type: ignore[union-attr]
            token = args.token if args.token is not None else (current.token if current else "")
            self.client.configure(Connection(url, token, "%llm config"))
        print(f"swapserve: {self.client.connection.describe()}")

    def _widget(self, command: str, argv: list[str]) -> None:
        try:
            from .widgets import ChatBox, ModelPanel
        except ImportError:
            raise LLMError(f"%llm {command} needs ipywidgets: pip install ipywidgets") from None
        if command == "panel":
            display(ModelPanel(client=self.client))
        else:
            model = argv[0] if argv else None
            if model is not None:
                self.client.model(model)  # one line listing the models when the name is unknown
            display(ChatBox(model, client=self.client))

    def _reset(self, argv: list[str]) -> None:
        if argv:
            for name in argv:
                self.conversations.pop(name, None)
            print(f"Forgot the conversation with {', '.join(argv)}.")
        else:
            self.conversations.clear()
            print("Forgot all conversations.")


# `%llm?` shows the whole usage
LLMMagics.llm.__doc__ = f"Prompt a model or manage the swap service.\n\n{USAGE}"


def load_ipython_extension(ipython: Any) -> None:
    from .gpu_magic import GpuMagics  # %gpu: this kernel as a GPU tenant

    ipython.register_magics(LLMMagics)
    ipython.register_magics(GpuMagics)
