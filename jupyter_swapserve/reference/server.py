"""The reference engine's HTTP API (OpenAI's completions and chat, vLLM's sleep protocol, its
stats) and command line: ``python -m jupyter_swapserve.reference``."""

from __future__ import annotations

import argparse
import json
import logging
import socket
import socketserver
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch

from . import __doc__ as PACKAGE_DOC
from .engine import Engine
from .model import SHAPES

log = logging.getLogger("swapserve.reference")


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


class UnixHTTPServer(ThreadingHTTPServer):
    """The same server on a Unix socket (``--uds``): who may open the socket may call it."""

    address_family = socket.AF_UNIX

    def server_bind(self) -> None:
        socketserver.TCPServer.server_bind(self)  # HTTPServer's own reads a host and port
        self.server_name, self.server_port = "localhost", 0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)  # a peer address for the request log


class Handler(BaseHTTPRequestHandler):
    server_version = "swapserve-reference/1"
    protocol_version = "HTTP/1.1"
    engine: Engine
    served_name: str

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    # ---- plumbing --------------------------------------------------------------------------
    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, exc: HttpError) -> None:
        self._json(exc.status, {"error": {"message": str(exc), "type": exc.kind, "param": None, "code": None}})

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise HttpError(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HttpError(400, "body must be a JSON object")
        return body

    def do_GET(self) -> None:
        path = urlparse(self.path).path
        eng = self.engine
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [
                {"id": self.served_name, "object": "model", "created": 0, "owned_by": "swapserve-reference",
                 "max_model_len": eng.max_len}]})
        elif path in ("/health", "/ping"):
            self._json(200, {"status": "ok"})
        elif path == "/is_sleeping":
            self._json(200, {"is_sleeping": bool(eng.sleeping)})
        elif path == "/startup_timings":
            self._json(200, eng.timings)
        elif path == "/stats":
            self._json(200, eng.stats())
        elif path == "/integrity":
            # what a swap must leave unchanged; as open as the rest of this API, which listens on the
            # loopback only (--host) for the service that launched it, and reads nothing but the engine
            try:
                now = eng.integrity()
            except RuntimeError as exc:
                self._error(HttpError(503, str(exc), "service_unavailable"))
                return
            self._json(200, {"now": now, "before_first_sleep": eng.integrity_before_first_sleep})
        else:
            self._error(HttpError(404, f"no route {path}", "not_found_error"))

    def do_POST(self) -> None:
        url = urlparse(self.path)
        try:
            body = self._body()
            if url.path == "/sleep":
                level = int((parse_qs(url.query).get("level") or [body.get("level", 1)])[0])
                if level not in (1, 2):
                    raise HttpError(400, "level must be 1 or 2")
                self._json(200, self.engine.sleep(level))
            elif url.path == "/wake_up":
                self._json(200, self.engine.wake())
            elif url.path == "/v1/completions":
                prompt = body.get("prompt", "")
                if isinstance(prompt, list):
                    prompt = prompt[0] if prompt and isinstance(prompt[0], str) else ""
                self._generate(body, str(prompt), chat=False)
            elif url.path == "/v1/chat/completions":
                messages = body.get("messages")
                if not isinstance(messages, list) or not messages:
                    raise HttpError(400, "'messages' must be a non-empty list")
                self._generate(body, self.engine.tokenizer.chat_prompt(messages), chat=True)
            else:
                raise HttpError(404, f"no route {url.path}", "not_found_error")
        except HttpError as exc:
            self._error(exc)

    def _generate(self, body: dict[str, Any], prompt: str, chat: bool) -> None:
        eng = self.engine
        try:
            max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
            raw_temperature = body.get("temperature")
            temperature = 1.0 if raw_temperature is None else float(raw_temperature)
            seed = body.get("seed")
            seed = int(seed) if seed is not None else None
        except (TypeError, ValueError):
            raise HttpError(400, "max_tokens, temperature and seed must be numbers") from None
        if max_tokens < 1:
            raise HttpError(400, "max_tokens must be at least 1")
        stops = body.get("stop") or []
        stops = [stops] if isinstance(stops, str) else [s for s in stops if isinstance(s, str)]
        stream = bool(body.get("stream"))
        ids = eng.tokenizer.encode(prompt)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        with eng.lock:
            if eng.sleeping:
                raise HttpError(503, "the engine is sleeping; POST /wake_up first", "service_unavailable")
            if stream:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")  # the body ends when the connection does
                self.end_headers()
                self.close_connection = True
                if chat:
                    self._sse(self._chunk(rid, created, chat, {"role": "assistant", "content": ""}, None))
            text, n, finish = "", 0, "length"
            t_start = time.perf_counter()
            for token in eng.stream(ids, max_tokens, temperature, seed):
                n += 1
                if n == 1 and eng.first_after_wake:
                    eng.first_after_wake = False
                    log.info("FIRST_TOKEN_AFTER_WAKE %s", json.dumps(
                        {"seconds": round(time.perf_counter() - t_start, 4), "prompt_tokens": len(ids)}))
                piece = eng.tokenizer.decode_one(token)
                if token in eng.tokenizer.eos_ids:
                    finish = "stop"
                    break
                text += piece
                stop_at = next((text.index(s) for s in stops if s in text), None)
                if stop_at is not None:
                    piece = piece[: max(0, len(piece) - (len(text) - stop_at))]
                    text = text[:stop_at]
                    finish = "stop"
                if stream and piece:
                    self._sse(self._chunk(rid, created, chat, {"content": piece} if chat else piece, None))
                if finish == "stop":
                    break
            usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
        if stream:
            self._sse(self._chunk(rid, created, chat, {} if chat else "", finish, usage))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
            return
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        self._json(200, {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                         "model": self.served_name, "choices": [choice], "usage": usage})

    def _chunk(self, rid: str, created: int, chat: bool, delta: Any, finish: str | None,
               usage: dict[str, int] | None = None) -> dict[str, Any]:
        if chat:
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        chunk: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                 "created": created, "model": self.served_name, "choices": [choice]}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def _sse(self, obj: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jupyter_swapserve.reference", description=PACKAGE_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face directory, or shape:NAME "
                   f"(random weights; NAME in {', '.join(SHAPES)})")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--uds", default=None, help="listen on this Unix socket instead of --host/--port")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="fraction of the GPU this engine may use; the KV pool gets what the weights leave")
    p.add_argument("--kv-cache-gib", type=float, default=None, help="KV pool size, overriding the utilisation")
    p.add_argument("--overhead-gib", type=float, default=1.0,
                   help="kept out of the KV budget for the CUDA context, graph pool and workspaces")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode layer")
    p.add_argument("--cuda-graphs", action="store_true", help="capture the decode step as a CUDA graph")
    p.add_argument("--memory-saver", default="auto", choices=["auto", "tms", "torch"],
                   help="how sleep releases memory: torch-memory-saver (keeps addresses) or plain torch")
    # huge pages measured better on the H100 (bench/results/2026-11-23-h100-swap_latency.md): 15 GB pinned
    # in 4.6 s instead of 11.4 s, and restored 0.36 s faster; it falls back to cudaHostAlloc by itself
    p.add_argument("--staging", default="hugepages", choices=["pinned", "hugepages"],
                   help="host memory the weights sleep in: registered transparent huge pages, or cudaHostAlloc")
    p.add_argument("--copy-out", default="changed", choices=["changed", "always"],
                   help="level-1 sleep: copy the weights out only when the host copy is not already "
                        "exact (changed), or on every sleep (always, as vLLM does)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (shape: models)")
    p.add_argument("--record-integrity", action="store_true",
                   help="take GET /integrity (the weights' digest, a fixed prompt's logits) just before the "
                        "first sleep, and report it beside the current one: the baseline of the swap tests")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(args)
    Handler.engine = engine
    Handler.served_name = args.served_model_name or args.model
    server = (UnixHTTPServer(args.uds, Handler) if args.uds else ThreadingHTTPServer((args.host, args.port), Handler))
    server.daemon_threads = True
    log.info("STARTUP_TIMINGS %s", json.dumps(engine.timings))
    log.info("serving %s on %s", Handler.served_name, f"unix:{args.uds}" if args.uds else f"http://{args.host}:{args.port}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
