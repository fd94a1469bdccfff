"""Swap integrity, provable: what an engine offers to show that a swap left its model unchanged,
taken before the first sleep and compared after every wake.

What each engine offers (docs/testing.md has the table):

- **reference**: ``GET /integrity`` on the engine's own port: a bit-exact digest of its weight
  buffer and the logits of a fixed prompt (digest and top 8); ``--record-integrity`` keeps the
  report taken just before its first sleep, so a test reaching the engine only after the service's
  startup snapshot still has a baseline no swap has touched.
- **llama.cpp** (llama-cpp-python, llama-server), **vLLM**, **SGLang**: no access to the weights;
  the OpenAI API's ``logprobs`` of a fixed greedy completion stand for the logits. On the virtual
  device their swap is freeze/thaw, which moves no memory (nothing there to corrupt).
- **Ollama**, **TensorRT-LLM**, ``command``: the greedy answer to a fixed prompt only.

Weights that a random seed or a reload reproduces cannot show that a wake copied them back: a wake
that regenerates them gives the same bits. The tests that must catch such a wake run an engine
whose weights exist only in its memory (:func:`write_tiny_checkpoint`, or weights changed in
place in an in-process engine).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import httpx

#: logits of the same prompt through the same kernels on the same device are bit-identical; on a GPU
#: a restored CUDA graph or another cuBLAS algorithm may reorder a sum, so the GPU tests allow this
GPU_LOGITS_RTOL = 1e-2


def report(base_url: str, timeout: float = 120) -> dict[str, Any]:
    """The reference engine's ``GET /integrity`` (``now`` and ``before_first_sleep``)."""
    r = httpx.get(base_url.rstrip("/") + "/integrity", timeout=timeout)
    r.raise_for_status()
    return r.json()


async def report_async(client: httpx.AsyncClient, base_url: str) -> dict[str, Any]:
    r = await client.get(base_url.rstrip("/") + "/integrity", timeout=120)
    r.raise_for_status()
    return r.json()


def differences(now: dict[str, Any], baseline: dict[str, Any], exact_logits: bool = True) -> list[str]:
    """What changed between two ``/integrity`` reports: nothing may, for the weights; for the logits
    nothing on the CPU (``exact_logits``), or no more than :data:`GPU_LOGITS_RTOL` of the largest."""
    found = []
    if now["weights_digest"] != baseline["weights_digest"] or now["weights_bytes"] != baseline["weights_bytes"]:
        found.append(f"weights changed: digest {baseline['weights_digest'][:16]} -> {now['weights_digest'][:16]}")
    if now["prompt"] != baseline["prompt"]:
        found.append("the reports are of different prompts")
    if exact_logits:
        if now["logits_digest"] != baseline["logits_digest"]:
            found.append(f"logits changed: top {baseline['top_logits'][:3]} -> {now['top_logits'][:3]}")
    else:
        scale = max(abs(v) for v in baseline["top_logits"]) or 1.0
        if now["top_ids"][:1] != baseline["top_ids"][:1] or not all(
                math.isclose(a, b, rel_tol=0, abs_tol=GPU_LOGITS_RTOL * scale)
                for a, b in zip(now["top_logits"], baseline["top_logits"], strict=True)):
            found.append(f"logits changed: {baseline['top_ids'][:3]} {baseline['top_logits'][:3]} -> "
                         f"{now['top_ids'][:3]} {now['top_logits'][:3]}")
    return found


def logprobs_fingerprint(choice: Any) -> tuple[str, list[float], list[dict[str, float]]]:
    """What an OpenAI completion choice (asked with ``logprobs``) says of the engine's logits: the
    text, each token's logprob and the top alternatives. Equal for a greedy completion of the same
    prompt by the same weights on the same device."""
    logprobs = choice.logprobs
    return choice.text, list(logprobs.token_logprobs or []), [dict(t or {}) for t in logprobs.top_logprobs or []]


def write_tiny_checkpoint(path: Path, seed: int = 1234) -> Path:
    """A Hugging Face Llama checkpoint as small as ``shape:tiny``, randomly initialised by
    transformers (not by the reference engine's seeded init): the engine loads these weights from
    disk, and no seed of its own regenerates them."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                                   max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path
