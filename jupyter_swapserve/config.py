"""The models file: YAML or JSON → validated dataclasses.

Validation is per model so that one bad entry does not stop the good ones; every error
names the file, the model and the field, in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ENGINES = ("llamacpp", "llama-server", "command", "reference", "vllm", "sglang", "ollama", "trtllm", "transformers")


class ConfigError(ValueError):
    """The models file cannot be used at all (unreadable, not YAML/JSON, wrong top level)."""


@cache
def schema() -> dict[str, Any]:
    """The published JSON schema of the models file."""
    text = files("jupyter_swapserve").joinpath("schema/models.schema.json").read_text()
    return json.loads(text)


@dataclass(frozen=True)
class DeviceConfig:
    virtual: bool = False
    memory_gib: float | None = None
    name: str | None = None


@dataclass
class ModelConfig:
    name: str
    engine: str
    runtime: str = "process"
    model: str | None = None
    served_model_name: str | None = None
    command: list[str] | str | None = None
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    image: str | None = None
    volumes: list[str] = field(default_factory=list)
    shm_size: str | None = None
    api: str = "chat"
    system_prompt: str | None = None
    request_defaults: dict[str, float] = field(default_factory=dict)
    memory_gib: float | None = None
    device: int | list[int] = 0
    idle_timeout: float | None = None
    pinned: bool = False
    max_queue: int = 64
    concurrency: int = 1
    port: int | None = None
    ready_path: str = "/v1/models"
    start_timeout: float = 600.0
    drain_timeout: float = 60.0
    request_timeout: float = 600.0
    warmup: bool = True
    sleep_level: int = 1
    residual: str = "auto"
    swap: str = "auto"
    residency_quantum: float = 2.0
    residency_multiple: float = 4.0

    @property
    def devices(self) -> list[int]:
        """Every device the engine uses, in index order (the order reservations are taken in)."""
        return sorted(self.device) if isinstance(self.device, list) else [self.device]


@dataclass
class ModelsFile:
    devices: list[DeviceConfig] | None
    models: list[ModelConfig]
    errors: list[str]
    path: str | None = None


def _field_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "required":
        # the message says "'x' is a required property": name the missing field itself
        missing = error.message.split("'")[1] if "'" in error.message else "?"
        parts.append(missing)
    elif error.validator == "additionalProperties":
        extra = error.message.split("'")[1] if "'" in error.message else "?"
        parts.append(extra)
        return ".".join(parts) + " (unknown field)"
    return ".".join(parts) or "(top level)"


def _one_line(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return "is not a known field"
    if error.validator == "required":
        return "is required"
    return error.message.splitlines()[0]


def parse_models(data: Any, source: str = "<models>") -> ModelsFile:
    """Validate already-loaded data. Bad models are skipped and reported in ``errors``."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping with a 'models' list")
    top_schema = schema()
    top_errors = sorted(
        jsonschema.Draft202012Validator(top_schema).iter_errors(data), key=lambda e: list(e.absolute_path)
    )
    if top_errors:
        e = top_errors[0]
        raise ConfigError(f"{source}: field '{_field_path(e)}': {_one_line(e)}")

    devices = None
    if "devices" in data:
        devices = [DeviceConfig(**d) for d in data["devices"]]
        for i, d in enumerate(devices):
            if d.virtual and d.memory_gib is None:
                raise ConfigError(f"{source}: field 'devices.{i}.memory_gib': is required for a virtual device")

    model_validator = jsonschema.Draft202012Validator(
        {**top_schema["$defs"]["model"], "$defs": top_schema["$defs"]}
    )
    models: list[ModelConfig] = []
    errors: list[str] = []
    seen: set[str] = set()
    for index, entry in enumerate(data["models"]):
        label = f"model #{index}"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            # one line whatever the name holds: control characters escaped, long names cut
            shown = entry["name"].encode("unicode_escape").decode("ascii")
            label = f"model '{shown[:80]}{'…' if len(shown) > 80 else ''}'"
        entry_errors = sorted(model_validator.iter_errors(entry), key=lambda e: list(e.absolute_path))
        if entry_errors:
            e = entry_errors[0]
            errors.append(f"{source}: {label}: field '{_field_path(e)}': {_one_line(e)}")
            continue
        model = ModelConfig(**entry)
        if model.name in seen:
            errors.append(f"{source}: {label}: field 'name': duplicate model name")
            continue
        problem = _semantic_problem(model, devices)
        if problem:
            errors.append(f"{source}: {label}: {problem}")
            continue
        seen.add(model.name)
        models.append(model)
    return ModelsFile(devices=devices, models=models, errors=errors, path=source)


def _semantic_problem(model: ModelConfig, devices: list[DeviceConfig] | None) -> str | None:
    if model.engine == "command" and not model.command:
        return "field 'command': is required for engine 'command'"
    if model.engine in ("llamacpp", "llama-server", "reference", "vllm", "sglang", "transformers", "trtllm", "ollama") \
            and not model.model:
        return f"field 'model': is required for engine '{model.engine}'"
    if model.runtime == "podman" and not model.image:
        return "field 'image': is required for runtime 'podman'"
    for name in ("volumes", "shm_size", "image"):
        if model.runtime != "podman" and getattr(model, name):
            return f"field '{name}': is only for runtime 'podman'"
    missing = [d for d in model.devices if devices is not None and d >= len(devices)]
    if missing:
        return f"field 'device': {missing[0]} does not exist (the file declares {len(devices or [])} device(s))"
    if model.residual in ("keep", "auto") and len(model.devices) > 1:
        if model.residual == "keep":
            return "field 'residual': 'keep' is for single-device engines"
        model.residual = "checkpoint"  # auto: an engine spanning devices always checkpoints its residual
    return None


def load_models_file(path: str | Path) -> ModelsFile:
    """Read and validate a models file (YAML or JSON, chosen by content: JSON is YAML)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read models file: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{p}: not valid YAML/JSON{where}: {problem}") from None
    return parse_models(data, str(p))
