"""The models file: schema validation, one-line errors naming file/model/field, bad models skipped."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from jupyter_swapserve.config import ConfigError, load_models_file, parse_models, schema

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, data: object, name: str = "models.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if name.endswith(".yaml") else json.dumps(data))
    return p


def test_demo_and_example_files_are_valid() -> None:
    for name in ("demo.yaml", "models.example.yaml"):
        loaded = load_models_file(ROOT / "examples" / name)
        assert loaded.errors == [], name
        assert loaded.models
    demo = load_models_file(ROOT / "examples" / "demo.yaml")
    assert {m.name: m.api for m in demo.models} == {"gemma": "completion", "smollm2": "chat"}
    assert demo.devices is not None and demo.devices[0].virtual


def test_example_documents_every_schema_option() -> None:
    text = (ROOT / "examples" / "models.example.yaml").read_text()
    for option in schema()["$defs"]["model"]["properties"]:
        assert f"{option}:" in text, f"option {option!r} is not documented in models.example.yaml"
    for option in schema()["$defs"]["device"]["properties"]:
        assert f"{option}:" in text


def test_json_and_defaults(tmp_path: Path) -> None:
    p = write(tmp_path, {"models": [{"name": "m", "engine": "llamacpp", "model": "x.gguf"}]}, "m.json")
    loaded = load_models_file(p)
    m = loaded.models[0]
    defaults = (m.runtime, m.api, m.device, m.max_queue, m.pinned, m.idle_timeout)
    assert defaults == ("process", "chat", 0, 64, False, None)
    assert loaded.devices is None


def test_bad_model_reported_and_good_ones_kept(tmp_path: Path) -> None:
    p = write(tmp_path, {"models": [
        {"name": "good", "engine": "llamacpp", "model": "a.gguf"},
        {"name": "badapi", "engine": "llamacpp", "model": "a.gguf", "api": "embeddings"},
        {"name": "typo", "engine": "llamacpp", "model": "a.gguf", "max_queu": 3},
        {"name": "noengine"},
        {"name": "cmd", "engine": "command"},
        {"name": "good", "engine": "llamacpp", "model": "b.gguf"},
        {"name": "neg", "engine": "llamacpp", "model": "a.gguf", "memory_gib": -1},
    ]})
    loaded = load_models_file(p)
    assert [m.name for m in loaded.models] == ["good"]
    errors = loaded.errors
    assert len(errors) == 6
    assert all(e.startswith(f"{p}: model '") for e in errors)
    assert "model 'badapi': field 'api'" in errors[0]
    assert "model 'typo': field 'max_queu (unknown field)'" in errors[1]
    assert "model 'noengine': field 'engine': is required" in errors[2]
    assert "model 'cmd': field 'command'" in errors[3]
    assert "model 'good': field 'name': duplicate" in errors[4]
    assert "model 'neg': field 'memory_gib'" in errors[5]
    assert all("\n" not in e for e in errors)


def test_whole_file_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read models file"):
        load_models_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n  - name: x\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML/JSON at line \d+"):
        load_models_file(bad)
    with pytest.raises(ConfigError, match=r"field 'models': is required"):
        parse_models({"devices": []}, "f.yaml")
    with pytest.raises(ConfigError, match=r"field 'devices.0.memory_gib': is required for a virtual device"):
        parse_models({"devices": [{"virtual": True}], "models": []}, "f.yaml")
    with pytest.raises(ConfigError, match=r"field 'devices.0.virtual'"):
        parse_models({"devices": [{"virtual": "yes", "memory_gib": 1}], "models": []}, "f.yaml")


def test_device_must_exist(tmp_path: Path) -> None:
    loaded = parse_models({"devices": [{"virtual": True, "memory_gib": 2}],
                           "models": [{"name": "m", "engine": "llamacpp", "model": "a", "device": 1}]}, "f.yaml")
    assert loaded.models == [] and "field 'device': 1 does not exist" in loaded.errors[0]


def test_schema_is_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(schema())
