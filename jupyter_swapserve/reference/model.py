"""The model of the reference engine: Llama shapes (of public models, for random stand-ins) and
one decoder layer over a KV cache slice, in plain torch with Hugging Face's weight layout."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

GIB = 1024**3


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


LAYER_PARAMS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "input_layernorm", "post_attention_layernorm")


def layer_param_names() -> list[str]:
    """The Hugging Face names of one layer's parameters, in the order ``layer_forward`` takes them."""
    return [f"self_attn.{n}" if n.endswith("_proj") and n[0] in "qkvo" else
            f"mlp.{n}" if n.endswith("_proj") else n for n in LAYER_PARAMS]


def param_specs(sh: Shape) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, offset) of every parameter in the flat buffer, HF names without 'model.'."""
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
        entries += [(f"layers.{i}.{n}.weight", shapes[n]) for n in layer_param_names()]
    entries.append(("norm.weight", (sh.hidden,)))
    if not sh.tie_embeddings:
        entries.append(("lm_head.weight", (sh.vocab, sh.hidden)))
    specs, offset = [], 0
    for name, shape in entries:
        specs.append((name, shape, offset))
        offset += -(-math.prod(shape) // 128) * 128  # 256-byte aligned views for the GEMMs
    return specs
