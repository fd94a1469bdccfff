"""A small OpenAI-compatible inference server around torch (and transformers for real models),
built to be swapped: the reference engine of jupyter-swapserve.

    python -m jupyter_swapserve.engines.reference_server --model shape:llama-3.1-8b --port 8001 \
        --gpu-memory-utilization 0.4 --compile --cuda-graphs

``--model`` is a local Hugging Face directory (weights loaded with transformers) or
``shape:NAME`` (a randomly initialised Llama of a known shape, bf16, nothing downloaded; a
byte-level tokenizer) for benchmarks where no weights can be fetched.

Its cold start has vLLM's parts: load the weights, size and allocate a KV-cache pool from
``--gpu-memory-utilization`` (util * total - what the process already uses), compile the decode
layer (``--compile``, torch.compile/inductor) and capture the decode step as a CUDA graph
(``--cuda-graphs``). The breakdown is logged (one ``STARTUP_TIMINGS {json}`` line) and served
at ``GET /startup_timings``.

It speaks vLLM's sleep protocol: ``POST /sleep?level=1`` releases the KV pool's device memory
(discarded) at once, then copies the weights to pinned host staging buffers (allocated on the
first sleep, kept across cycles: pinning is slow, copying is not) and releases them; ``level=2``
discards the weights too. Inference never writes the weights, so after the first cycle the host
copy is still exact and a level-1 sleep skips the copy (``--copy-out always`` copies every time).
``POST /wake_up`` maps the memory back and copies the weights in;
``GET /is_sleeping``. The memory is released either through torch-memory-saver (virtual
addresses are kept, so CUDA graphs stay valid) or with plain torch (storage resized to zero and
the cache emptied; graphs are re-captured when the addresses moved).

Weights live in one flat buffer (every parameter is a view into it), so sleeping and waking are
one device↔host copy each, at PCIe speed.

Requests are served one at a time (the swap service forwards one at a time by default); the
decode step runs batch 1. It also runs on the CPU (``--device cpu``), which is how CI tests it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import logging
import math
import mmap
import os
import queue
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

import torch
import torch.nn.functional as F

log = logging.getLogger("swapserve.reference")
GIB = 1024**3


def _process_age() -> float:
    """Seconds since this process was created (interpreter start included), from /proc."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


# ---- model shapes ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool
    rope_theta: float = 500_000.0
    rms_eps: float = 1e-5
    head_dim: int | None = None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads


# Shapes of public models, for randomly initialised stand-ins (the numbers of their config.json).
SHAPES: dict[str, Shape] = {
    "llama-3.2-1b": Shape(2048, 8192, 16, 32, 8, 128256, True),
    "llama-3.2-3b": Shape(3072, 8192, 28, 24, 8, 128256, True),
    "llama-3.1-8b": Shape(4096, 14336, 32, 32, 8, 128256, False),
    # small enough for CI on two CPU cores
    "tiny": Shape(64, 128, 2, 4, 2, 512, False, rope_theta=10_000.0),
}


def shape_from_hf_config(cfg: Any) -> Shape:
    return Shape(
        hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers,
        heads=cfg.num_attention_heads, kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        vocab=cfg.vocab_size, tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        rope_theta=float(getattr(cfg, "rope_theta", 10_000.0) or 10_000.0),
        rms_eps=float(getattr(cfg, "rms_norm_eps", 1e-5)), head_dim=getattr(cfg, "head_dim", None),
    )


# ---- tokenizers --------------------------------------------------------------------------------

class ByteTokenizer:
    """UTF-8 bytes in; out, each id maps to a printable ASCII character (random models emit noise,
    and noise should still be printable text)."""

    eos_ids: frozenset[int] = frozenset()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8")) or [0]

    def decode_one(self, token: int) -> str:
        return chr(32 + token % 95)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        return "".join(f"{m.get('role', 'user')}: {_content_text(m.get('content'))}\n" for m in messages) + "assistant:"


class HfTokenizer:
    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        eos = self.tok.eos_token_id
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text)) or [0]

    def decode_one(self, token: int) -> str:
        return self.tok.decode([token])

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        msgs = [{"role": m.get("role", "user"), "content": _content_text(m.get("content"))} for m in messages]
        if getattr(self.tok, "chat_template", None):
            return str(self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
        return ByteTokenizer.chat_prompt(ByteTokenizer(), msgs)


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


# ---- the model ---------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layer_forward(x: torch.Tensor, w: tuple[torch.Tensor, ...], kc: torch.Tensor, vc: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                  nh: int, nkv: int, hd: int, eps: float) -> torch.Tensor:
    """One Llama decoder layer over T new tokens at positions ``pos`` (HF weight layout).

    K/V of the new tokens are written into the layer's cache slice ``kc``/``vc`` ([S, nkv, hd])
    and attention runs over the whole slice with ``mask`` ([T, S] bool), or causally over the T
    tokens when ``mask`` is None (prefill from position 0). Shapes are static for a given T, so
    the decode step (T = 1) can be compiled once for every layer and captured as a graph.
    """
    wq, wk, wv, wo, wg, wu, wd, ln1, ln2 = w
    t = x.shape[0]
    h = rms_norm(x, ln1, eps)
    q = (h @ wq.T).view(t, nh, hd)
    k = (h @ wk.T).view(t, nkv, hd)
    v = (h @ wv.T).view(t, nkv, hd)
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    q = q * c + rotate_half(q) * s
    k = k * c + rotate_half(k) * s
    kc.index_copy_(0, pos, k)
    vc.index_copy_(0, pos, v)
    qh = q.transpose(0, 1).unsqueeze(0)
    if mask is None:
        kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        attn = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=nkv != nh)
    else:
        kh, vh = kc.transpose(0, 1).unsqueeze(0), vc.transpose(0, 1).unsqueeze(0)
        attn = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.view(1, 1, t, -1), enable_gqa=nkv != nh)
    x = x + attn[0].transpose(0, 1).reshape(t, nh * hd) @ wo.T
    h = rms_norm(x, ln2, eps)
    return x + (F.silu(h @ wg.T) * (h @ wu.T)) @ wd.T


_LAYER_PARAMS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                 "input_layernorm", "post_attention_layernorm")


class MemorySaver:
    """Releases and re-maps the device memory of the weights and the KV pool.

    ``tms``: torch-memory-saver keeps the virtual addresses (graphs stay valid) and releases the
    physical pages. ``torch``: the storages are resized to zero and the allocator's cache emptied;
    the addresses may change on wake.
    """

    def __init__(self, kind: str, device: torch.device) -> None:
        self.kind = kind
        self.device = device
        self._tms: Any = None
        if kind == "tms":
            from torch_memory_saver import torch_memory_saver

            # in-process pluggable allocator: no LD_PRELOAD needed when the service launches us
            torch_memory_saver.hook_mode = "torch"
            self._tms = torch_memory_saver

    def region(self, tag: str) -> contextlib.AbstractContextManager[Any]:
        if self._tms is not None:
            return self._tms.region(tag=tag)
        return contextlib.nullcontext()

    def release(self, tag: str, tensor: torch.Tensor) -> None:
        if self._tms is not None:
            self._tms.pause(tag)
        else:
            tensor.untyped_storage().resize_(0)

    def remap(self, tag: str, tensor: torch.Tensor, nbytes: int) -> None:
        if self._tms is not None:
            self._tms.resume(tag)
        else:
            tensor.untyped_storage().resize_(nbytes)


class Engine:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.timings: dict[str, float] = {"import_s": round(_process_age(), 3)}
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:  # mem_get_info and friends want an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        if args.dtype == "auto":
            self.dtype = torch.bfloat16 if self.cuda else torch.float32
        else:
            self.dtype = getattr(torch, args.dtype)
        self.lock = threading.Lock()
        self.sleeping = 0  # 0 awake, else the level it sleeps at
        self.staging: torch.Tensor | None = None
        #: the staging buffer holds exactly the weights on the device (set by a copy either way)
        self.staging_current = False
        self.last_sleep: dict[str, Any] = {}
        self.last_wake: dict[str, Any] = {}
        self.graph: Any = None
        self.prefill_layer: Any = layer_forward  # compiled in _compile_prefill with --compile
        self.first_after_wake = False
        self.cycles = 0
        self.max_len = args.max_model_len
        t0 = time.perf_counter()
        if self.cuda:
            torch.cuda.set_device(self.device)
            torch.cuda.init()
            torch.empty(1, device=self.device)  # creates the context, so it is not counted as load
            self.free_at_init = torch.cuda.mem_get_info(self.device)[0]
        self.timings["init_device_s"] = round(time.perf_counter() - t0, 3)
        self.saver = MemorySaver(self._saver_kind(args.memory_saver), self.device)
        self._load()
        self._alloc_kv()
        self._compile()
        self._capture()
        # every forward pass runs on this one thread: a thread's first matmuls set up its own CUDA
        # library state (~50 ms), which a server starting a thread per request paid on every
        # first token; requests are served one at a time anyway
        self.gpu_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="gpu")
        self.gpu_thread.submit(self._warmup).result()

    # ---- startup parts -------------------------------------------------------------------------
    def _saver_kind(self, wanted: str) -> str:
        if not self.cuda:
            return "torch"
        if wanted in ("auto", "tms"):
            try:
                import torch_memory_saver  # noqa: F401
                return "tms"
            except ImportError:
                if wanted == "tms":
                    raise
        return "torch"

    def _load(self) -> None:
        t0 = time.perf_counter()
        args = self.args
        hf_state: dict[str, torch.Tensor] | None = None
        inv_freq: torch.Tensor | None = None
        attention_scaling = 1.0
        if args.model.startswith("shape:"):
            name = args.model.split(":", 1)[1]
            if name not in SHAPES:
                raise SystemExit(f"unknown shape '{name}' (known: {', '.join(SHAPES)})")
            self.shape = SHAPES[name]
            self.tokenizer: ByteTokenizer | HfTokenizer = ByteTokenizer()
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            cfg = AutoConfig.from_pretrained(args.model)
            self.shape = shape_from_hf_config(cfg)
            try:
                self.tokenizer = HfTokenizer(args.model)
            except (OSError, ValueError) as exc:  # a checkpoint without tokenizer files
                log.warning("no tokenizer in %s (%s): using bytes", args.model, exc)
                self.tokenizer = ByteTokenizer()
            hf_model = AutoModelForCausalLM.from_pretrained(args.model, dtype=self.dtype)
            hf_state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
            rotary = getattr(getattr(hf_model, "model", hf_model), "rotary_emb", None)
            if rotary is not None:  # honours the model's rope scaling (llama3, yarn, ...)
                inv_freq = rotary.inv_freq.detach().float().cpu()
                attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
            del hf_model
        sh = self.shape
        self.specs = self._param_specs()
        numel = max(offset + math.prod(shape) for _, shape, offset in self.specs)
        with self.saver.region("weights"):
            self.flat = torch.empty(numel, dtype=self.dtype, device=self.device)
        self.weights_bytes = self.flat.numel() * self.flat.element_size()
        self.w: dict[str, torch.Tensor] = {}
        for name, shape, offset in self.specs:
            self.w[name] = self.flat[offset:offset + math.prod(shape)].view(shape)
        if hf_state is None:
            self._random_init()
        else:
            for name, _, _ in self.specs:
                self.w[name].copy_(hf_state[name])
        if sh.tie_embeddings:
            self.w["lm_head.weight"] = self.w["embed_tokens.weight"]
        names = self._layer_param_names()
        self.layer_w = [tuple(self.w[f"layers.{i}.{n}.weight"] for n in names) for i in range(sh.layers)]
        if inv_freq is None:
            inv_freq = 1.0 / (sh.rope_theta ** (torch.arange(0, sh.hd, 2, dtype=torch.float32) / sh.hd))
        freqs = torch.outer(torch.arange(self.max_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = (emb.cos() * attention_scaling).to(self.dtype).to(self.device)
        self.sin = (emb.sin() * attention_scaling).to(self.dtype).to(self.device)
        self.positions = torch.arange(self.max_len, device=self.device)
        self._sync()
        self.timings["load_s"] = round(time.perf_counter() - t0, 3)
        log.info("weights: %.2f GiB (%s, %s), memory saver: %s", self.weights_bytes / GIB, args.model, self.dtype,
                 self.saver.kind)

    @staticmethod
    def _layer_param_names() -> list[str]:
        return [f"self_attn.{n}" if n.endswith("_proj") and n[0] in "qkvo" else
                f"mlp.{n}" if n.endswith("_proj") else n for n in _LAYER_PARAMS]

    def _param_specs(self) -> list[tuple[str, tuple[int, ...], int]]:
        """(name, shape, offset) of every parameter in the flat buffer, HF names without 'model.'."""
        sh = self.shape
        q, kv = sh.heads * sh.hd, sh.kv_heads * sh.hd
        shapes: dict[str, tuple[int, ...]] = {
            "self_attn.q_proj": (q, sh.hidden), "self_attn.k_proj": (kv, sh.hidden),
            "self_attn.v_proj": (kv, sh.hidden), "self_attn.o_proj": (sh.hidden, q),
            "mlp.gate_proj": (sh.intermediate, sh.hidden), "mlp.up_proj": (sh.intermediate, sh.hidden),
            "mlp.down_proj": (sh.hidden, sh.intermediate),
            "input_layernorm": (sh.hidden,), "post_attention_layernorm": (sh.hidden,),
        }
        entries: list[tuple[str, tuple[int, ...]]] = [("embed_tokens.weight", (sh.vocab, sh.hidden))]
        for i in range(sh.layers):
            entries += [(f"layers.{i}.{n}.weight", shapes[n]) for n in self._layer_param_names()]
        entries.append(("norm.weight", (sh.hidden,)))
        if not sh.tie_embeddings:
            entries.append(("lm_head.weight", (sh.vocab, sh.hidden)))
        specs, offset = [], 0
        for name, shape in entries:
            specs.append((name, shape, offset))
            offset += -(-math.prod(shape) // 128) * 128  # 256-byte aligned views for the GEMMs
        return specs

    @torch.inference_mode()
    def _random_init(self) -> None:
        gen = torch.Generator(device=self.device).manual_seed(self.args.seed)
        self.flat.normal_(0.0, 0.02, generator=gen)
        for name, _, _ in self.specs:
            if name.endswith("layernorm.weight") or name == "norm.weight":
                self.w[name].fill_(1.0)

    def _kv_token_bytes(self) -> int:
        sh = self.shape
        return sh.layers * 2 * sh.kv_heads * sh.hd * torch.finfo(self.dtype).bits // 8

    @torch.inference_mode()
    def _alloc_kv(self) -> None:
        """Size the KV pool like vLLM: profile a full-length prefill, then give the KV cache
        util * total - (what this process holds + its activation peak + a margin for the context,
        the graph pool and the compiler's workspaces)."""
        t0 = time.perf_counter()
        sh, args = self.shape, self.args
        token_bytes = self._kv_token_bytes()
        min_tokens = self.max_len
        if args.kv_cache_gib is not None:
            tokens = int(args.kv_cache_gib * GIB // token_bytes)
        elif self.cuda:
            # a throwaway one-sequence cache for the profiling pass
            torch.cuda.empty_cache()
            reserved0 = torch.cuda.memory_reserved(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            one_seq = (sh.layers, 2, self.max_len, sh.kv_heads, sh.hd)
            self.kv = torch.empty(one_seq, dtype=self.dtype, device=self.device)
            self._prefill(torch.zeros(self.max_len, dtype=torch.long, device=self.device))
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_reserved(self.device)
            activations = peak - reserved0 - self.kv.numel() * self.kv.element_size()
            del self.kv
            torch.cuda.empty_cache()
            free, total = torch.cuda.mem_get_info(self.device)
            own = self.free_at_init - free  # weights, tables, kernels: everything since the context existed
            budget = args.gpu_memory_utilization * total - own - max(activations, 0) - args.overhead_gib * GIB
            budget = min(budget, free - max(activations, 0) - 0.5 * GIB)  # never ask for what others hold
            tokens = int(max(budget, 0) // token_bytes)
            self.timings["profile_activations_gib"] = round(activations / GIB, 3)
            if tokens < min_tokens:
                raise SystemExit(
                    f"--gpu-memory-utilization {args.gpu_memory_utilization} leaves room for {tokens} KV tokens, "
                    f"fewer than one sequence of {min_tokens}: weights {self.weights_bytes / GIB:.2f} GiB, "
                    f"free {free / GIB:.2f} of {total / GIB:.2f} GiB")
        else:
            tokens = 2 * self.max_len
        tokens = max(tokens, min_tokens)
        with self.saver.region("kv"):
            self.kv = torch.empty((sh.layers, 2, tokens, sh.kv_heads, sh.hd), dtype=self.dtype, device=self.device)
            # attention masks unused slots by weight, and 0 * NaN is NaN: garbage there (uninitialised
            # memory) must not be NaN; zeroing costs a memset (~15 ms for 40 GB on an H100)
            self.kv.zero_()
        self.kv_tokens = tokens
        self.kv_bytes = self.kv.numel() * self.kv.element_size()
        self._sync()
        self.timings["kv_alloc_s"] = round(time.perf_counter() - t0, 3)
        log.info("KV pool: %d tokens, %.2f GiB", tokens, self.kv_bytes / GIB)

    def _compile(self) -> None:
        self.decode_layer = layer_forward
        if not self.args.compile:
            self.timings["compile_s"] = 0.0
            return
        t0 = time.perf_counter()
        # one compiled graph serves every layer (same shapes, weights are inputs)
        self.decode_layer = torch.compile(layer_forward, dynamic=False, fullgraph=True)
        self._setup_static()
        with torch.inference_mode():
            self._decode_eager()  # compiles now, not during the graph capture or the first request
        self._sync()
        self.timings["compile_s"] = round(time.perf_counter() - t0, 3)
        self._compile_prefill()

    def _compile_prefill(self) -> None:
        """The prefill, compiled for any prompt length (dynamic): eager, a short prompt's ~400 small
        kernels took 20-105 ms on the H100, compiled 13-15 ms (bench/first_token_profile.py)."""
        t0 = time.perf_counter()
        # dynamic in the token count only (marked in _prefill): the head counts stay static ints
        self.prefill_layer = torch.compile(layer_forward, fullgraph=True)
        try:
            with torch.inference_mode():
                for n in (5, 9):  # the second must not recompile
                    self._prefill(torch.zeros(n, dtype=torch.long, device=self.device))
            self._sync()
        except Exception as exc:  # an inductor limit on this machine: the eager prefill still works
            log.warning("compiling the prefill failed, it stays eager: %s", str(exc).splitlines()[0][:300])
            self.prefill_layer = layer_forward
        self.timings["compile_prefill_s"] = round(time.perf_counter() - t0, 3)

    def _setup_static(self) -> None:
        if getattr(self, "static_tok", None) is None:
            self.static_tok = torch.zeros(1, dtype=torch.long, device=self.device)
            self.static_pos = torch.zeros(1, dtype=torch.long, device=self.device)

    def _capture(self) -> None:
        if not (self.args.cuda_graphs and self.cuda):
            self.timings["graph_s"] = 0.0
            return
        t0 = time.perf_counter()
        self._capture_graph()
        self.timings["graph_s"] = round(time.perf_counter() - t0, 3)

    @torch.inference_mode()
    def _capture_graph(self) -> None:
        self._setup_static()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_eager()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=getattr(self, "graph_pool", None)):
            self.static_logits = self._decode_eager()
        self.graph_pool = graph.pool()
        self.graph = graph
        self.graph_ptrs = self._ptrs()

    def _ptrs(self) -> tuple[int, int]:
        return self.flat.data_ptr(), self.kv.data_ptr()

    def _warmup(self) -> None:
        t0 = time.perf_counter()
        for _ in self.generate(self.tokenizer.encode("warm up"), 2, 0.0, None):
            pass
        self.timings["warmup_s"] = round(time.perf_counter() - t0, 3)
        self.timings["ready_s"] = round(_process_age(), 3)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # ---- forward -------------------------------------------------------------------------------
    def _cache(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        # the running sequence uses the first max_len tokens of the pool
        return self.kv[i, 0, :self.max_len], self.kv[i, 1, :self.max_len]

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        sh = self.shape
        t = ids.shape[0]
        x = F.embedding(ids, self.w["embed_tokens.weight"])
        pos = self.positions[:t]
        cos, sin = self.cos[:t], self.sin[:t]
        # one token is a size the compiler specialises (0/1): such a prompt runs eager
        layer = self.prefill_layer if t >= 2 else layer_forward
        compiled = layer is not layer_forward
        if compiled:
            for tensor in (pos, cos, sin):
                torch._dynamo.mark_dynamic(tensor, 0)
        for i in range(sh.layers):
            kc, vc = self._cache(i)
            if compiled:
                torch._dynamo.mark_dynamic(x, 0)
            x = layer(x, self.layer_w[i], kc, vc, cos, sin, pos, None, sh.heads, sh.kv_heads, sh.hd, sh.rms_eps)
        x = rms_norm(x[-1:], self.w["norm.weight"], sh.rms_eps)
        return (x @ self.w["lm_head.weight"].T).float()

    def _decode_eager(self) -> torch.Tensor:
        """One token at ``static_pos`` from ``static_tok``: static shapes, graph-capturable."""
        sh = self.shape
        pos = self.static_pos
        x = F.embedding(self.static_tok, self.w["embed_tokens.weight"])
        cos, sin = self.cos[pos], self.sin[pos]
        mask = (self.positions <= pos).view(1, -1)
        for i in range(sh.layers):
            kc, vc = self._cache(i)
            x = self.decode_layer(x, self.layer_w[i], kc, vc, cos, sin, pos, mask, sh.heads, sh.kv_heads, sh.hd,
                                  sh.rms_eps)
        x = rms_norm(x, self.w["norm.weight"], sh.rms_eps)
        return (x @ self.w["lm_head.weight"].T).float()

    def _decode(self, token: int, position: int) -> torch.Tensor:
        self._setup_static()
        self.static_tok.fill_(token)
        self.static_pos.fill_(position)
        if self.graph is not None:
            self.graph.replay()
            return self.static_logits
        return self._decode_eager()

    @torch.inference_mode()
    def generate(self, ids: list[int], max_tokens: int, temperature: float, seed: int | None) -> Iterator[int]:
        """Token ids, one at a time. The caller holds ``self.lock``."""
        ids = ids[-(self.max_len - 1):]
        budget = min(max_tokens, self.max_len - len(ids))
        if budget <= 0:
            return
        gen = None
        if temperature > 0 and seed is not None:
            gen = torch.Generator(device=self.device).manual_seed(seed)
        logits = self._prefill(torch.tensor(ids, dtype=torch.long, device=self.device))
        position = len(ids)
        for n in range(budget):
            if temperature > 0:
                probs = torch.softmax(logits[0] / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=gen).item())
            else:
                token = int(torch.argmax(logits[0]).item())
            yield token
            if token in self.tokenizer.eos_ids or n == budget - 1:
                return
            logits = self._decode(token, position)
            position += 1

    def stream(self, ids: list[int], max_tokens: int, temperature: float, seed: int | None) -> Iterator[int]:
        """generate() on the engine's GPU thread, its tokens handed over one by one. Stopping early
        (a stop string, a client gone) stops the generation after the token in progress."""
        tokens: queue.Queue[Any] = queue.Queue()
        stop, finished = threading.Event(), threading.Event()
        end = object()

        def produce() -> None:
            try:
                for token in self.generate(ids, max_tokens, temperature, seed):
                    tokens.put(token)
                    if stop.is_set():
                        break
            except BaseException as exc:  # raised again in the consumer's thread
                tokens.put(exc)
            finally:
                finished.set()
                tokens.put(end)

        self.gpu_thread.submit(produce)
        try:
            while (item := tokens.get()) is not end:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            # the step in progress ends before the caller lets go of the engine's lock (a sleep
            # must never release memory under a running forward pass)
            finished.wait()

    # ---- sleep / wake ------------------------------------------------------------------------
    def sleep(self, level: int) -> dict[str, Any]:
        with self.lock:
            if self.sleeping:
                return {"already": True, **self.last_sleep}
            t0 = time.perf_counter()
            info: dict[str, Any] = {"level": level, "weights_gib": round(self.weights_bytes / GIB, 3),
                                    "kv_gib": round(self.kv_bytes / GIB, 3), "memory_saver": self.saver.kind}
            self._sync()
            # the KV cache first: it is discarded, not copied, so its memory can go back to the
            # driver at once, before the weights' copy; the service hands what NVML shows freed to
            # a waiting engine while this hook still runs, and that engine's H2D copy then overlaps
            # this one's D2H (PCIe is full duplex)
            t = time.perf_counter()
            self.saver.release("kv", self.kv)
            if self.cuda:
                torch.cuda.empty_cache()  # plain torch: the freed pool must leave the allocator's cache
                self._sync()
            info["kv_release_s"] = round(time.perf_counter() - t, 4)
            if level == 1:
                t = time.perf_counter()
                if self.staging is None:
                    # pinned once, reused on every cycle: pinning 16 GB takes seconds, copying it 0.3 s
                    self.staging = self._alloc_staging(self.flat.numel())
                    info["pin_s"] = round(time.perf_counter() - t, 4)
                    info["staging"] = self.staging_kind
                t = time.perf_counter()
                if self.staging_current and self.args.copy_out == "changed":
                    # inference never writes the weights: the host copy of the last cycle is still
                    # exact, so this sleep frees at once and puts nothing on PCIe (a waiting engine's
                    # wake then copies in at full speed instead of sharing the link with this copy)
                    info["d2h_skipped"] = True
                else:
                    self.staging.copy_(self.flat, non_blocking=True)
                    self._sync()
                    self.staging_current = True
                info["d2h_s"] = round(time.perf_counter() - t, 4)
            else:
                self.staging_current = False  # level 2 discards the weights; a reload replaces them
            t = time.perf_counter()
            self.saver.release("weights", self.flat)
            info["release_s"] = round(time.perf_counter() - t, 4)
            if self.cuda:
                # what the allocator still caches (prefill activations) would be checkpointed for nothing
                t = time.perf_counter()
                torch.cuda.empty_cache()
                self._sync()
                info["empty_cache_s"] = round(time.perf_counter() - t, 4)
            info["staging_gib"] = round(self.staging.numel() * self.staging.element_size() / GIB, 3) \
                if self.staging is not None else 0.0
            info["total_s"] = round(time.perf_counter() - t0, 4)
            info["resident_gib"] = self._resident_gib()
            self.sleeping = level
            self.last_sleep = info
            log.info("SLEEP %s", json.dumps(info))
            return info

    def _alloc_staging(self, numel: int) -> torch.Tensor:
        """Host memory the weights sleep in, registered with the driver for DMA-speed copies.

        ``pinned``: cudaHostAlloc through torch. ``hugepages``: an anonymous mapping advised to
        use transparent huge pages, then cudaHostRegister'ed: 512x fewer pages for the driver to
        pin now and to re-map when the process is restored from a checkpoint.
        """
        self.staging_kind = "pageable"
        if not self.cuda:
            return torch.empty(numel, dtype=self.dtype)
        if self.args.staging == "hugepages":
            nbytes = numel * torch.finfo(self.dtype).bits // 8
            buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            with contextlib.suppress(AttributeError, OSError):
                buf.madvise(mmap.MADV_HUGEPAGE)
            host = torch.frombuffer(buf, dtype=torch.uint8)
            cudart = torch.cuda.cudart()
            rc = cudart.cudaHostRegister(host.data_ptr(), nbytes, 0)
            if int(rc) == 0:
                self._staging_mapping = buf  # keeps the mapping alive as long as the tensor
                self.staging_kind = "hugepages"
                return host.view(self.dtype)
            log.warning("cudaHostRegister of the huge-page staging buffer failed (%s): using pinned memory", rc)
            del host
            buf.close()
        self.staging_kind = "pinned"
        return torch.empty(numel, dtype=self.dtype, pin_memory=True)

    def wake(self) -> dict[str, Any]:
        with self.lock:
            if not self.sleeping:
                return {"already": True}
            t0 = time.perf_counter()
            info: dict[str, Any] = {"memory_saver": self.saver.kind}
            # both mapped before the copy: pages another process has just freed (a victim's, in an
            # overlapped eviction) take the driver ~70 ms to hand out, and doing that while the
            # copy runs slowed the copy by more (measured on an H100)
            self.saver.remap("weights", self.flat, self.weights_bytes)
            self.saver.remap("kv", self.kv, self.kv_bytes)
            with torch.inference_mode():  # the pool is an inference tensor
                self.kv.zero_()  # remapped pages hold garbage: see the KV pool allocation
            self._sync()
            info["remap_s"] = round(time.perf_counter() - t0, 4)
            t = time.perf_counter()
            if self.sleeping == 1 and self.staging is not None:
                self.flat.copy_(self.staging, non_blocking=True)
            else:  # level 2: the weights were discarded; load them again
                self._reload_weights()
            self._sync()
            info["h2d_s"] = round(time.perf_counter() - t, 4)
            if self.graph is not None and self._ptrs() != self.graph_ptrs:
                # plain torch gave the memory back at other addresses: the graph points at the old ones
                t = time.perf_counter()
                self.graph = None
                self.graph_pool = None  # the old graph's pool went with it; capturing into it asserts
                self._capture_graph()
                info["recapture_s"] = round(time.perf_counter() - t, 4)
            info["total_s"] = round(time.perf_counter() - t0, 4)
            self.sleeping = 0
            self.first_after_wake = True
            self.cycles += 1
            self.last_wake = info
            log.info("WAKE %s", json.dumps(info))
            return info

    def _reload_weights(self) -> None:
        if self.args.model.startswith("shape:"):
            self._random_init()
            if self.shape.tie_embeddings:
                self.w["lm_head.weight"] = self.w["embed_tokens.weight"]
            return
        from transformers import AutoModelForCausalLM

        hf_model = AutoModelForCausalLM.from_pretrained(self.args.model, dtype=self.dtype)
        state = {k.removeprefix("model."): v for k, v in hf_model.state_dict().items()}
        with torch.inference_mode():
            for name, _, _ in self.specs:
                self.w[name].copy_(state[name])

    def _resident_gib(self) -> float | None:
        """Device memory this process still holds (what a checkpoint will copy), from NVML."""
        if not self.cuda:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(self.device.index or 0)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid == os.getpid() and p.usedGpuMemory:
                    return round(p.usedGpuMemory / GIB, 3)
        except Exception:  # NVML missing or not allowed: report torch's view only
            pass
        return round(torch.cuda.memory_reserved(self.device) / GIB, 3)

    def stats(self) -> dict[str, Any]:
        return {
            "model": self.args.model, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "weights_gib": round(self.weights_bytes / GIB, 3), "kv_gib": round(self.kv_bytes / GIB, 3),
            "kv_tokens": self.kv_tokens, "max_model_len": self.max_len, "memory_saver": self.saver.kind,
            "compiled": bool(self.args.compile), "cuda_graph": self.graph is not None,
            "sleeping": bool(self.sleeping), "cycles": self.cycles,
            "startup_timings": self.timings, "last_sleep": self.last_sleep, "last_wake": self.last_wake,
        }


# ---- HTTP --------------------------------------------------------------------------------------

class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


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
    p = argparse.ArgumentParser(prog="python -m jupyter_swapserve.engines.reference_server", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face directory, or shape:NAME "
                   f"(random weights; NAME in {', '.join(SHAPES)})")
    p.add_argument("--served-model-name", default=None, help="model id in the API (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
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
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(args)
    Handler.engine = engine
    Handler.served_name = args.served_model_name or args.model
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    log.info("STARTUP_TIMINGS %s", json.dumps(engine.timings))
    log.info("serving %s on http://%s:%d", Handler.served_name, args.host, args.port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
