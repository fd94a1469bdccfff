#!/usr/bin/env python3
"""An OpenAI-compatible engine on the stand-in CUDA driver (interposer/build/test/libcuda.so.1),
for testing ``swap: interposer`` through the adapter and the process runtime on a CPU machine.

Its "weights" are device memory (cuMemAlloc through ctypes, whose lookups go through dlsym, like
any engine's); every answer is computed from them, read back from the device at request time, so
an answer after a swap is the same as before only if every byte came back at the same address.

    cuda_engine.py --port N [--weights-mib 8] [--managed-mib 0] [--no-cuda]
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--weights-mib", type=int, default=8)
p.add_argument("--managed-mib", type=int, default=0)
p.add_argument("--no-cuda", action="store_true", help="a server that never touches CUDA")
args = p.parse_args()

weights = 0
size = args.weights_mib << 20
if not args.no_cuda:
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, ctx, ptr = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64()
    assert cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0
    assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0 and cuda.cuCtxSetCurrent(ctx) == 0
    assert cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(size)) == 0
    weights = ptr.value
    data = bytes((i * 31 + 7) & 0xFF for i in range(256)) * (size // 256)
    assert cuda.cuMemcpyHtoD_v2(ctypes.c_uint64(weights), data, ctypes.c_size_t(size)) == 0
    if args.managed_mib:
        managed = ctypes.c_uint64()
        assert cuda.cuMemAllocManaged(ctypes.byref(managed), ctypes.c_size_t(args.managed_mib << 20), 1) == 0


def answer(prompt: str) -> str:
    """The greedy answer: a function of the prompt and of every byte of the weights."""
    h = hashlib.sha256(prompt.encode())
    if weights:
        buf = ctypes.create_string_buffer(size)
        cuda.cuCtxSetCurrent(ctx)
        rc = cuda.cuMemcpyDtoH_v2(buf, ctypes.c_uint64(weights), ctypes.c_size_t(size))
        if rc != 0:
            raise RuntimeError(f"cuMemcpyDtoH: CUDA error {rc}")
        h.update(buf.raw)
    return h.hexdigest()[:16]


class Handler(BaseHTTPRequestHandler):
    def reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path in ("/v1/models", "/health"):
            self.reply(200, {"object": "list", "data": [{"id": "cuda-engine", "object": "model"}]})
        else:
            self.reply(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        try:
            text = answer(str(body.get("prompt") or body.get("messages")))
        except RuntimeError as exc:
            self.reply(500, {"error": {"message": str(exc)}})
            return
        self.reply(200, {"object": "text_completion", "model": "cuda-engine",
                         "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    def log_message(self, *a: object) -> None:
        pass


ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
