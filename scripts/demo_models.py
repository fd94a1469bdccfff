"""The demo's models file: examples/demo.yaml, plus vLLM (examples/demo-vllm.yaml) when it is installed.

    python scripts/demo_models.py OUT.yaml   → prints the models file to use (OUT.yaml or demo.yaml)

vLLM's interpreter and model come from .venv/swapserve-engines.json (scripts/install-vllm.sh).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def main(out: Path) -> Path:
    demo = ROOT / "examples" / "demo.yaml"
    engines_file = Path(sys.prefix) / "swapserve-engines.json"
    engines = json.loads(engines_file.read_text()) if engines_file.exists() else {}
    if "vllm" not in engines:
        return demo
    models = yaml.safe_load(demo.read_text())
    for entry in yaml.safe_load((ROOT / "examples" / "demo-vllm.yaml").read_text())["models"]:
        models["models"].append({**entry, "command": engines["vllm"]["command"], "model": engines["vllm"]["model"]})
    out.write_text("# examples/demo.yaml with examples/demo-vllm.yaml, made by scripts/demo_models.py\n"
                   + yaml.safe_dump(models, sort_keys=False))
    return out


if __name__ == "__main__":
    print(main(Path(sys.argv[1])))
