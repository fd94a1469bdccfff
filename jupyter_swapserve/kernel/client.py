"""A small synchronous client of the swap service for code running in a kernel (the ``%%llm`` magic,
the widgets): finds the server, reads status, swaps, and streams completions.

Synchronous on purpose: a cell runs on the kernel's main thread, where an event loop is already
running (so ``asyncio.run`` is refused), and a kernel interrupt arrives there as KeyboardInterrupt
inside the blocking socket read, which closes the stream on the way out — the server then cancels
the request.
"""

from __future__ import annotations

import contextvars
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

API_SUFFIX = "swapserve/v1"
CONFIGURE_HINT = "Configure with: %llm config --url URL --token TOKEN"
# streamed answers may wait long in a queue or behind a swap-in; an interrupt ends them sooner
READ_TIMEOUT = 600.0
PROBE_TIMEOUT = 3.0
WAIT_DELAY = 0.5  # no waiting line for answers that start at once
WAIT_POLL = 0.5
# base models behind the completions route stop after 16 tokens by default (llama.cpp, OpenAI)
COMPLETION_DEFAULT_MAX_TOKENS = 256


class LLMError(Exception):
    """An expected failure, shown as one line in the notebook, without a traceback."""

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of formatting a traceback (InteractiveShell.showtraceback)
        return [f"\x1b[31m{self}\x1b[0m"]


class ServerError(LLMError):
    """The server answered with an OpenAI-shaped error."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}
        super().__init__(self._describe())

    def _describe(self) -> str:
        text = self.message.rstrip()
        if self.status == 429:
            resets = _reset_hints(self.headers)
            if resets and not any(r in text for r in resets):
                text += f" (resets: {', '.join(resets)})"
        elif self.status == 401:
            text += f" {CONFIGURE_HINT}"
        return text


def _reset_hints(headers: dict[str, str]) -> list[str]:
    """When a quota or rate limit resets, from the usual headers (Retry-After, x-ratelimit-reset-*)."""
    hints = []
    for key, value in headers.items():
        k = key.lower()
        if k == "retry-after":
            hints.append(f"retry after {value} s" if value.isdigit() else f"retry after {value}")
        elif "reset" in k:
            hints.append(f"{k}: {value}")
    return hints


def normalize_base_url(url: str) -> str:
    """The Jupyter server's base URL ending in "/", from it or from its ``.../swapserve/v1`` route."""
    url = url.strip().rstrip("/")
    for suffix in ("/" + API_SUFFIX, "/swapserve"):
        if url.endswith(suffix):
            url = url[: -len(suffix)]
            break
    if "://" not in url:
        url = "http://" + url
    return url + "/"


@dataclass
class Connection:
    base_url: str  # the Jupyter server's base URL, ending in "/"
    token: str
    source: str  # how it was found, for messages

    @property
    def api_url(self) -> str:
        return self.base_url + API_SUFFIX

    def describe(self) -> str:
        shown = (self.token[:4] + "…") if self.token else "no token"
        return f"{self.api_url} ({shown}; from {self.source})"


@dataclass
class Discovery:
    """The places a kernel looks for the server, in order; the first that answers wins."""

    configured: Connection | None = None  # from %llm config: when set, it is the only candidate
    tried: list[str] = field(default_factory=list)

    def candidates(self) -> Iterator[Connection]:
        if self.configured is not None:
            yield self.configured
            return
        env_url = os.environ.get("SWAPSERVE_URL")
        if env_url:
            yield Connection(normalize_base_url(env_url), os.environ.get("SWAPSERVE_TOKEN", ""), "SWAPSERVE_URL")
        else:
            self.tried.append("SWAPSERVE_URL: not set")
        yield from self._runtime_servers()
        yield from self._hub()

    def _runtime_servers(self) -> Iterator[Connection]:
        try:
            from jupyter_core.paths import jupyter_runtime_dir
            from jupyter_server.serverapp import list_running_servers
        except ImportError:
            self.tried.append("Jupyter runtime dir: jupyter_server is not installed in the kernel")
            return
        runtime_dir = jupyter_runtime_dir()
        servers = list(list_running_servers(runtime_dir))
        if not servers:
            self.tried.append(f"Jupyter runtime dir ({runtime_dir}): no running servers")
            return
        # a kernel's parent process is the server that started it: try that one first
        parent = os.getppid()
        servers.sort(key=lambda s: s.get("pid") != parent)
        for info in servers:
            url = info.get("url") or ""
            if url:
                yield Connection(normalize_base_url(url), info.get("token", ""),
                                 f"Jupyter runtime dir, server pid {info.get('pid')}")

    def _hub(self) -> Iterator[Connection]:
        token = os.environ.get("JUPYTERHUB_API_TOKEN")
        if not token:
            self.tried.append("JupyterHub: JUPYTERHUB_API_TOKEN not set")
            return
        url = os.environ.get("JUPYTERHUB_SERVICE_URL")
        if url:
            parts = urlsplit(url)
            # the single-user server may listen on all interfaces; reach it over loopback
            if parts.hostname in ("0.0.0.0", "", "::"):
                netloc = "127.0.0.1" + (f":{parts.port}" if parts.port else "")
                url = urlunsplit((parts.scheme or "http", netloc, parts.path, "", ""))
        else:
            prefix = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")
            url = "http://127.0.0.1:8888" + prefix  # the single-user server's default port
        yield Connection(normalize_base_url(url), token, "JupyterHub environment")


def probe(conn: Connection) -> str | None:
    """None when the swap service answers at conn, else why not (one phrase)."""
    try:
        r = httpx.get(conn.base_url + "swapserve/api/status", headers=_auth(conn), timeout=PROBE_TIMEOUT)
    except httpx.HTTPError as exc:
        return f"{conn.base_url}: {_describe_http_error(exc)}"
    if r.status_code == 200:
        return None
    if r.status_code in (401, 403):
        return f"{conn.base_url}: the token was refused ({r.status_code})"
    if r.status_code == 404:
        return f"{conn.base_url}: no jupyter-swapserve extension there (404)"
    return f"{conn.base_url}: HTTP {r.status_code}"


def _describe_http_error(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.ConnectError):
        return "connection refused"
    if isinstance(exc, httpx.TimeoutException):
        return "timed out"
    return exc.__class__.__name__


def _auth(conn: Connection) -> dict[str, str]:
    return {"Authorization": f"Bearer {conn.token}"} if conn.token else {}


def discover(configured: Connection | None = None) -> Connection:
    """The first candidate where the swap service answers; LLMError naming what was tried otherwise."""
    d = Discovery(configured)
    for conn in d.candidates():
        why = probe(conn)
        if why is None:
            return conn
        d.tried.append(f"{conn.source}: {why}")
    raise LLMError(f"No jupyter-swapserve server found. Tried: {'; '.join(d.tried)}. {CONFIGURE_HINT}")


def parse_error(response: httpx.Response, body: bytes) -> ServerError:
    text = body.decode("utf-8", "replace")
    message, code = text.strip()[:300] or f"HTTP {response.status_code}", None
    try:
        err = json.loads(text).get("error")
        if isinstance(err, dict):
            message, code = str(err.get("message") or message), err.get("code")
        elif isinstance(err, str):
            message = err
    except (ValueError, AttributeError):
        pass
    return ServerError(response.status_code, message, code, dict(response.headers))


@dataclass
class Stream:
    """An answer being streamed: the swap/queue headers, then text pieces as they arrive."""

    response: httpx.Response
    api: str  # "chat" or "completion"
    model: str
    finish_reason: str | None = None
    done: bool = False

    @property
    def swap_in_seconds(self) -> float:
        return _float_header(self.response, "x-swapserve-swap-in-seconds")

    @property
    def queue_seconds(self) -> float:
        return _float_header(self.response, "x-swapserve-queue-seconds")

    def __iter__(self) -> Iterator[str]:
        try:
            yield from self._pieces()
        except httpx.TransportError as exc:
            raise LLMError(f"{self.model}: the answer was cut off: {_describe_http_error(exc)}") from None

    def _pieces(self) -> Iterator[str]:
        for line in self.response.iter_lines():
            if not line.startswith("data:"):
                continue  # SSE comments, event names, blank separators
            data = line[5:].strip()
            if data == "[DONE]":
                self.done = True
                return
            try:
                chunk = json.loads(data)
            except ValueError:
                continue
            if "error" in chunk:
                err = chunk["error"]
                raise LLMError(f"{self.model}: {err.get('message', err) if isinstance(err, dict) else err}")
            for choice in chunk.get("choices") or []:
                if choice.get("finish_reason"):
                    self.finish_reason = choice["finish_reason"]
                piece = (choice.get("delta") or {}).get("content") if self.api == "chat" else choice.get("text")
                if piece:
                    yield piece
        if not self.done:
            # the relay ends a stream early when the engine fails mid-answer
            raise LLMError(f"{self.model}: the answer stopped early (the engine stopped or was swapped out?)")


def _float_header(response: httpx.Response, name: str) -> float:
    try:
        return float(response.headers.get(name, "0"))
    except ValueError:
        return 0.0


class SwapServeClient:
    """Talks to one swap service; finds it on first use and again once after a connection failure."""

    def __init__(self, configured: Connection | None = None) -> None:
        self.configured = configured
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._models: dict[str, dict[str, Any]] = {}
        self.http = httpx.Client(timeout=httpx.Timeout(30.0, read=READ_TIMEOUT))

    def configure(self, conn: Connection | None) -> None:
        with self._lock:
            self.configured, self._conn, self._models = conn, None, {}

    @property
    def connection(self) -> Connection:
        with self._lock:
            if self._conn is None:
                self._conn = discover(self.configured)
            return self._conn

    def forget(self) -> None:
        with self._lock:
            self._conn = None

    def close(self) -> None:
        self.http.close()

    # ---- plain requests ---------------------------------------------------------------------
    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """JSON from path (relative to the server base URL); one rediscovery after a connection failure."""
        for attempt in (0, 1):
            conn = self.connection
            try:
                r = self.http.request(method, conn.base_url + path, headers=_auth(conn), **kwargs)
            except httpx.TransportError as exc:
                self.forget()
                if attempt == 0:
                    continue
                raise LLMError(f"Cannot reach {conn.base_url} (from {conn.source}): "
                               f"{_describe_http_error(exc)}. {CONFIGURE_HINT}") from None
            if r.status_code >= 400:
                raise parse_error(r, r.content)
            return r.json()
        raise AssertionError("unreachable")

    def status(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.request("GET", "swapserve/api/status", timeout=timeout)

    def models(self, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """name → the ``swapserve`` part of GET /v1/models ({engine, api, state})."""
        if refresh or not self._models:
            data = self.request("GET", API_SUFFIX + "/models")
            self._models = {m["id"]: m.get("swapserve", {}) for m in data.get("data", [])}
        return self._models

    def model(self, name: str) -> dict[str, Any]:
        models = self.models()
        if name not in models:
            models = self.models(refresh=True)  # the models file may have changed
        if name not in models:
            listed = ", ".join(sorted(models)) or "none"
            raise LLMError(f"Unknown model '{name}'. Available models: {listed}.")
        return models[name]

    def prefetch(self, name: str) -> str | None:
        """An intent hint: the server starts swapping the model in ahead of the request if that evicts
        nothing busy, and answers at once ('running', 'starting' or why it declined). None when the
        hint could not be sent: the request itself will report any problem."""
        try:
            conn = self.connection
            r = self.http.post(f"{conn.base_url}swapserve/api/models/{name}/prefetch", headers=_auth(conn),
                               content=b"{}", timeout=5.0)
            return str(r.json().get("prefetch")) if r.status_code in (200, 202) else None
        except (httpx.HTTPError, ValueError, LLMError, AttributeError):
            return None

    def swap(self, name: str, direction: str) -> dict[str, Any]:
        return self.request("POST", f"swapserve/api/models/{name}/{direction}", content=b"{}")

    def events(self) -> Iterator[dict[str, Any]]:
        """Status documents from GET /swapserve/api/events, one on every change, until closed.

        Keepalives come every 15 s, so a read timeout well above that means a dead server."""
        conn = self.connection
        try:
            with self.http.stream("GET", conn.base_url + "swapserve/api/events", headers=_auth(conn),
                                  timeout=httpx.Timeout(10.0, read=60.0)) as r:
                if r.status_code >= 400:
                    raise parse_error(r, r.read())
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        try:
                            yield json.loads(line[5:])
                        except ValueError:
                            continue
        except httpx.TransportError as exc:
            self.forget()
            raise LLMError(f"Lost the status stream from {conn.base_url}: {_describe_http_error(exc)}") from None

    # ---- streaming --------------------------------------------------------------------------
    def stream(self, model: str, api: str, body: dict[str, Any]) -> _StreamContext:
        return _StreamContext(self, model, api, {**body, "model": model, "stream": True})


class _StreamContext:
    """``with client.stream(...) as s``: blocks until the first byte (after any queue and swap-in);
    leaving the block, normally or by KeyboardInterrupt, closes the connection."""

    def __init__(self, client: SwapServeClient, model: str, api: str, body: dict[str, Any]) -> None:
        self.client, self.model, self.api, self.body = client, model, api, body
        self._cm: Any = None

    def __enter__(self) -> Stream:
        path = API_SUFFIX + ("/chat/completions" if self.api == "chat" else "/completions")
        for attempt in (0, 1):
            conn = self.client.connection
            cm = self.client.http.stream("POST", conn.base_url + path, json=self.body, headers=_auth(conn))
            try:
                response = cm.__enter__()
            except httpx.ConnectError as exc:
                # refused before anything was sent: the server may have moved; safe to retry once
                self.client.forget()
                if attempt == 0:
                    continue
                raise LLMError(f"Cannot reach {conn.base_url} (from {conn.source}): "
                               f"{_describe_http_error(exc)}. {CONFIGURE_HINT}") from None
            except httpx.TransportError as exc:
                raise LLMError(f"{self.model}: the request failed: {_describe_http_error(exc)}") from None
            if response.status_code >= 400:
                try:
                    body = response.read()
                finally:
                    cm.__exit__(None, None, None)
                raise parse_error(response, body)
            self._cm = cm
            return Stream(response, self.api, self.model)
        raise AssertionError("unreachable")

    def __exit__(self, *exc: object) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)
            self._cm = None


def build_body(api: str, prompt: str, *, system: str | None = None, history: list[dict[str, str]] | None = None,
               max_tokens: int | None = None, temperature: float | None = None,
               seed: int | None = None) -> dict[str, Any]:
    """The request body for a model's API; history is earlier user/assistant messages, alternating."""
    history = history or []
    body: dict[str, Any] = {}
    if api == "completion":
        # a base model continues text: system text and earlier turns become a preamble
        parts = [system] if system else []
        parts += [history[i]["content"] + history[i + 1]["content"] for i in range(0, len(history) - 1, 2)]
        body["prompt"] = "\n\n".join([*parts, prompt])
        body["max_tokens"] = max_tokens or COMPLETION_DEFAULT_MAX_TOKENS
    else:
        messages = [{"role": "system", "content": system}] if system else []
        body["messages"] = [*messages, *history, {"role": "user", "content": prompt}]
        if max_tokens:
            body["max_tokens"] = max_tokens
    if temperature is not None:
        body["temperature"] = temperature
    if seed is not None:
        body["seed"] = seed
    return body


def wait_line(model: str, status: dict[str, Any], waited: float) -> str | None:
    """What to say while no byte of the answer has arrived yet, from the status document."""
    models = status.get("models", [])
    m = next((m for m in models if m.get("name") == model), None)
    if m is None:
        return None
    state = m.get("state")
    secs = f"({waited:.0f} s)"
    device = next((d for d in status.get("devices", []) if d.get("index") == m.get("device")), {})
    reserving = any(w.get("model") == model for w in device.get("waiting") or [])
    # models on the same device still answering: a swap-in waits for victims to drain and swap out
    busy = [o["name"] for o in models
            if o.get("device") == m.get("device") and o["name"] != model and o.get("in_flight")
            and (o.get("state") == "swapping_out" or (reserving and o.get("state") == "running"))]
    if state in ("swapping_in", "swapped_out") and (reserving or busy):
        why = f": {', '.join(busy)} {'is' if len(busy) == 1 else 'are'} answering" if busy else ""
        return f"{model} is waiting for memory{why}… {secs}"
    if state == "swapping_in":
        return f"{model} is swapping in… {secs}"
    if state in ("swapped_out", "swapping_out"):
        return f"{model} is waiting to swap in… {secs}"
    if state in ("starting", "stopped"):
        return f"{model} is starting… {secs}"
    if state == "failed":
        return f"{model} failed: {m.get('error') or 'see the server log'}"
    ahead = int(m.get("queue_depth") or 0) - 1  # this request is one of the queued
    if ahead > 0:
        return f"{model}: queued behind {ahead} request(s)… {secs}"
    return f"{model} is working on it… {secs}"


class Waiter:
    """Until the first byte of the answer arrives, says (from the status route) why it has not yet:
    queued, swapping in, starting. Runs beside the blocking request so the main thread stays
    interruptible, and in the cell's context so its output lands in the cell."""

    def __init__(self, client: SwapServeClient, model: str, show: Callable[[str], None]) -> None:
        self.client, self.model, self.show = client, model, show
        self._stop = threading.Event()
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._run,),
                                        name="swapserve-wait", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        if self._stop.wait(WAIT_DELAY):
            return
        shown = None
        while not self._stop.is_set():
            try:
                line = wait_line(self.model, self.client.status(timeout=PROBE_TIMEOUT), time.monotonic() - started)
            except Exception:  # the request itself will report a broken server
                line = None
            if line and line != shown and not self._stop.is_set():
                self.show(line)
                shown = line
            self._stop.wait(WAIT_POLL)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def seconds(value: float) -> str:
    """A duration for people: swaps on a virtual device take well under a millisecond."""
    if value < 0.001:
        return "<1 ms"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.1f} s"
