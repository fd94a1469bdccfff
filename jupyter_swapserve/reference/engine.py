"""The reference engine's cold start (load, KV pool, compile, graph capture, warm-up) and its
forward passes; sleep and wake are in :mod:`.memory`."""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from ..runtime.procfs import process_age
from .memory import MemorySaver, SleepWake
from .model import GIB, SHAPES, layer_forward, layer_param_names, param_specs, rms_norm, shape_from_hf_config
from .tokenizer import ByteTokenizer, HfTokenizer

log = logging.getLogger("swapserve.reference")

#: the prompt whose logits ``GET /integrity`` reports: the same every time, so reports compare
INTEGRITY_PROMPT = "Swapped out and back in, the same weights give the same logits."
#: 16-bit words summed per step of the digest: 4 Mi words keep every partial sum inside int64
#: (< 2^16 * 2^16 * 2^22) and its temporaries at ~100 MB on a device that is nearly full
DIGEST_CHUNK = 1 << 22


def buffer_digest(buf: torch.Tensor) -> str:
    """A bit-exact digest of a tensor's raw bytes, computed where the tensor lives (a GPU's 16 GB of
    weights never cross PCIe for it): per chunk of 16-bit words, their sum and their sum weighted
    by position (mod 65521), then SHA-256 over those pairs. Any changed bit changes the first sum;
    moved words change the second. The same bits give the same digest on any device."""
    words = buf.detach().reshape(-1).view(torch.int16)
    sums = []
    for start in range(0, words.numel(), DIGEST_CHUNK):
        w = words[start:start + DIGEST_CHUNK].to(torch.int64) & 0xFFFF
        weight = torch.arange(start, start + w.numel(), device=w.device, dtype=torch.int64) % 65521 + 1
        sums.append(torch.stack((w.sum(), (w * weight).sum())))
    pairs = torch.stack(sums).cpu() if sums else torch.zeros((0, 2), dtype=torch.int64)
    return hashlib.sha256(pairs.numpy().tobytes()).hexdigest()


class Engine(SleepWake):
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.timings: dict[str, float] = {"import_s": round(process_age(), 3)}
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
        #: GET /integrity as it was just before the first sleep (with --record-integrity)
        self.integrity_before_first_sleep: dict[str, Any] | None = None
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
        self.specs = param_specs(self.shape)
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
        names = layer_param_names()
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
        self.timings["ready_s"] = round(process_age(), 3)

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
            from torch._dynamo import mark_dynamic

            for tensor in (pos, cos, sin):
                mark_dynamic(tensor, 0)
        for i in range(sh.layers):
            kc, vc = self._cache(i)
            if compiled:
                mark_dynamic(x, 0)
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

    # ---- weights again after a level-2 sleep (memory.py) ------------------------------------
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

    # ---- what a swap must leave unchanged (GET /integrity) -----------------------------------
    def integrity(self) -> dict[str, Any]:
        """The weights' digest and the logits of :data:`INTEGRITY_PROMPT`, now. The weights must be
        bit-identical after a sleep/wake cycle; the logits too on the same device, where the same
        kernels run on the same bits. Raises RuntimeError while the engine sleeps."""
        with self.lock:
            if self.sleeping:
                raise RuntimeError("the engine is sleeping; POST /wake_up first")
            return self.gpu_thread.submit(self._integrity_now).result()

    @torch.inference_mode()
    def _integrity_now(self) -> dict[str, Any]:
        ids = self.tokenizer.encode(INTEGRITY_PROMPT)[-(self.max_len - 1):]
        logits = self._prefill(torch.tensor(ids, dtype=torch.long, device=self.device))[0]
        top = torch.topk(logits, min(8, logits.numel()))
        return {"weights_digest": buffer_digest(self.flat), "weights_bytes": self.weights_bytes,
                "prompt": INTEGRITY_PROMPT, "logits_digest": buffer_digest(logits),
                "top_ids": top.indices.tolist(), "top_logits": top.values.tolist()}

    def sleep(self, level: int) -> dict[str, Any]:
        if self.args.record_integrity and self.integrity_before_first_sleep is None and not self.sleeping:
            # the baseline a test compares every wake with, taken before any swap could touch the
            # weights (a service snapshots an engine right after its start: no client gets in first)
            self.integrity_before_first_sleep = self.integrity()
        return super().sleep(level)

    def stats(self) -> dict[str, Any]:
        return {
            "model": self.args.model, "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
            "weights_gib": round(self.weights_bytes / GIB, 3), "kv_gib": round(self.kv_bytes / GIB, 3),
            "kv_tokens": self.kv_tokens, "max_model_len": self.max_len, "memory_saver": self.saver.kind,
            "compiled": bool(self.args.compile), "cuda_graph": self.graph is not None,
            "sleeping": bool(self.sleeping), "cycles": self.cycles,
            "startup_timings": self.timings, "last_sleep": self.last_sleep, "last_wake": self.last_wake,
        }

