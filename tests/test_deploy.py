"""deploy/kubernetes/ rendered and checked: every manifest parses and validates against the
Kubernetes API schema (kubernetes-validate, strict: no unknown field); the options it names exist
(SwapServe and ServerApp traits through traitlets' own command-line and config loaders, models-file
fields through the service's loader, JupyterHub's environment variables through its source); the
parts refer to each other consistently (hub service ↔ Kubernetes Service ↔ Deployment ↔ Secret
key); and the Zero to JupyterHub values validate against the chart's values schema and grant the
roles and scopes of examples/jupyterhub_config.py."""

from __future__ import annotations

import copy
import inspect
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from traitlets.config import Config
from traitlets.config.loader import KVArgParseConfigLoader

import jupyter_swapserve
from jupyter_swapserve.app import SwapServe
from jupyter_swapserve.config import load_models_file

from .server import ROOT

DEPLOY = ROOT / "deploy" / "kubernetes"
Z2JH_SCHEMA = Path(__file__).parent / "data" / "z2jh-values.schema.json"
#: the oldest Kubernetes the z2jh chart supports (its Chart.yaml: kubeVersion >=1.32)
KUBERNETES_VERSION = "1.32.0"
GIB = {"Gi": 1.0, "Ti": 1024.0, "Mi": 1 / 1024}


def rendered() -> list[dict[str, Any]]:
    """What ``kubectl apply -k deploy/kubernetes`` applies: the kustomization's resources, in order."""
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert set(kustomization) <= {"apiVersion", "kind", "resources"}, "only plain resources: nothing to patch"
    docs = []
    for resource in kustomization["resources"]:
        docs += [d for d in yaml.safe_load_all((DEPLOY / resource).read_text()) if d is not None]
    return docs


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in rendered() if d["kind"] == kind]


def named(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def values() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "z2jh-values.yaml").read_text())


def containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(d, c) for d in of_kind("Deployment") for c in d["spec"]["template"]["spec"]["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def server_classes() -> list[type]:
    from jupyter_server.serverapp import ServerApp

    return [SwapServe, ServerApp]


def check_config(config: Config, where: str) -> None:
    """Every section is SwapServe or ServerApp, every key one of its configurable traits, and the
    values load (traitlets validates them as the server would)."""
    classes = {cls.__name__: cls for cls in server_classes()}
    for section, entries in config.items():
        assert section in classes, f"{where}: {section} is not SwapServe or ServerApp"
        traits = classes[section].class_traits(config=True)
        unknown = set(entries) - set(traits)
        assert not unknown, f"{where}: {section} has no option {sorted(unknown)}"
    SwapServe(config=config)  # a bad value raises TraitError here


# ---- the manifests -----------------------------------------------------------------------------
def test_every_manifest_parses_and_validates_against_the_kubernetes_schema() -> None:
    docs = rendered()
    assert {d["kind"] for d in docs} == {"ServiceAccount", "Secret", "NetworkPolicy", "ConfigMap", "Deployment",
                                         "Service"}
    for doc in docs:
        assert doc["metadata"]["name"] and doc["metadata"]["labels"]["app.kubernetes.io/name"] == "swapserve"
        # strict: an unknown or misspelt field anywhere is an error
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_one_service_per_gpu_node_pinned_with_its_gpus() -> None:
    nodes = set()
    for deployment, container in containers():
        spec = deployment["spec"]
        pod = spec["template"]["spec"]
        node = pod["nodeSelector"]["kubernetes.io/hostname"]
        nodes.add(node)
        assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
        assert deployment["metadata"]["name"] == f"swapserve-{node}"
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert container["resources"]["requests"]["memory"] == limits["memory"]  # never evicted for memory
    assert nodes == {"gpu1", "gpu2"}


def test_privileges_are_stated_and_minimal() -> None:
    for deployment, container in containers():
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
        assert pod["automountServiceAccountToken"] is False
        assert not pod.get("hostPID") and not pod.get("hostNetwork") and not pod.get("hostIPC")
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
        assert not context.get("privileged") and context["readOnlyRootFilesystem"] is True
        # the only host path is the weights, read-only
        host_paths = [v for v in pod["volumes"] if "hostPath" in v]
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        assert all(mounts[v["name"]].get("readOnly") for v in host_paths)


def test_the_options_named_exist() -> None:
    checked = 0
    for deployment, container in containers():
        assert container["command"] == ["jupyter", "swapserve"]
        config = KVArgParseConfigLoader(container["args"], classes=server_classes()).load_config()
        check_config(config, deployment["metadata"]["name"])
        checked += len(container["args"])
        # JupyterHub's service auth reads these; a misspelt one would be silently ignored
        import jupyterhub.services.auth
        import jupyterhub.services.service

        hub_source = inspect.getsource(jupyterhub.services.auth) + inspect.getsource(jupyterhub.services.service)
        own_source = "".join(p.read_text() for p in Path(jupyter_swapserve.__file__).parent.rglob("*.py"))
        for name in env_of(container):
            if name.startswith("JUPYTERHUB_"):
                assert f"'{name}'" in hub_source or f'"{name}"' in hub_source, f"JupyterHub reads no {name}"
            if name.startswith("SWAPSERVE_"):
                assert name in own_source, f"jupyter-swapserve reads no {name}"
    for secret in of_kind("Secret"):
        for key, text in secret["stringData"].items():
            assert key.endswith(".json")
            check_config(Config(json.loads(text)), f"Secret {secret['metadata']['name']}")
            checked += 1
    client = values()["singleuser"]["extraFiles"]["swapserve-client"]
    assert client["mountPath"].startswith("/etc/jupyter/jupyter_server_config.d/")
    check_config(Config(client["data"]), "singleuser.extraFiles.swapserve-client")
    assert checked + 1 == 4  # both nodes' command lines, the database's Secret, the users' servers' config


def test_the_models_files_validate_and_fit_the_pod(tmp_path: Path) -> None:
    for deployment, container in containers():
        name = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        (models_arg,) = [a for a in container["args"] if a.startswith("--SwapServe.models_file=")]
        path = Path(models_arg.split("=", 1)[1])
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(path.parent))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        config_map = named("ConfigMap", volume["configMap"]["name"])
        local = tmp_path / name / path.name
        local.parent.mkdir()
        local.write_text(config_map["data"][path.name])
        models = load_models_file(local)
        assert models.errors == [], models.errors
        entries = yaml.safe_load(config_map["data"][path.name])["models"]
        assert len(models.models) == len(entries) >= 2
        # the pod can hold what it promises: every device its models name, and their host copies
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert max(max(m.devices) for m in models.models) < gpus, name
        memory = container["resources"]["limits"]["memory"]
        number, unit = re.fullmatch(r"(\d+)([GMT]i)", memory).groups()  # type: ignore[union-attr]
        assert sum(m.memory_gib or 0 for m in models.models) <= int(number) * GIB[unit], name
        assert all(m.memory_gib for m in models.models), f"{name}: reservations must not wait for a measurement"
        assert all(m.runtime == "process" for m in models.models), f"{name}: podman would need a privileged pod"


def test_a_model_is_offered_by_both_nodes() -> None:
    offered: dict[str, set[str]] = {}
    for config_map in of_kind("ConfigMap"):
        node = config_map["metadata"]["labels"]["swapserve.jupyter.org/node"]
        for entry in yaml.safe_load(config_map["data"]["models.yaml"])["models"]:
            offered.setdefault(entry["name"], set()).add(node)
    assert {"gpu1", "gpu2"} in offered.values()


def test_hub_services_services_and_deployments_refer_to_each_other() -> None:
    hub_services = values()["hub"]["services"]
    assert set(hub_services) == {d["metadata"]["name"] for d in of_kind("Deployment")}
    for name, entry in hub_services.items():
        deployment = named("Deployment", name)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = env_of(container)
        service = named("Service", name)
        (port,) = service["spec"]["ports"]
        assert entry["url"] == f"http://{name}:{port['port']}"
        container_port = next(p for p in container["ports"] if p["name"] == port["targetPort"])
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert env["JUPYTERHUB_SERVICE_NAME"] == name
        assert env["JUPYTERHUB_SERVICE_PREFIX"] == f"/services/{name}/"
        assert env["JUPYTERHUB_SERVICE_URL"] == f"http://0.0.0.0:{container_port['containerPort']}"
        assert env["JUPYTERHUB_CLIENT_ID"] == f"service-{name}"  # JupyterHub's id for the service's OAuth client
        # the token the z2jh chart made for this service (its Secret "hub", key hub.services.<key>.apiToken)
        assert env["JUPYTERHUB_API_TOKEN"] == {"secretKeyRef": {"name": "hub", "key": f"hub.services.{name}.apiToken"}}
        # the probes ask the service's own status route, on its port and prefix
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            script = container[probe]["exec"]["command"][-1]
            assert f"http://127.0.0.1:{container_port['containerPort']}/services/{name}/swapserve/api/status" in script
        # the database URL comes from the Secret, mounted where Jupyter reads its config
        quota = next(m for m in container["volumeMounts"] if m["name"] == "quota-db")
        secret_volume = next(v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "quota-db")
        secret = named("Secret", secret_volume["secret"]["secretName"])
        assert quota["subPath"] in secret["stringData"] and quota["mountPath"].endswith("/" + quota["subPath"])
        assert "postgresql+psycopg://" in secret["stringData"][quota["subPath"]]
        assert "postgresql" not in json.dumps(container), "no database URL in the pod spec"
    policy = named("NetworkPolicy", "swapserve")
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]


# ---- the Zero to JupyterHub values ------------------------------------------------------------------
def without_required(schema: Any) -> Any:
    """The schema less the ``required`` lists of its objects: helm merges the chart's own
    values.yaml first, which provides those; every field we set is still checked (name, type, no
    unknown field). A ``oneOf`` branch that is only a ``required`` list (one of data/stringData)
    keeps it."""
    if isinstance(schema, dict):
        return {k: without_required(v) for k, v in schema.items() if k != "required" or "properties" not in schema}
    if isinstance(schema, list):
        return [without_required(v) for v in schema]
    return schema


def test_values_validate_against_the_z2jh_schema() -> None:
    schema = json.loads(Z2JH_SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(without_required(schema))
    errors = sorted(validator.iter_errors(values()), key=lambda e: list(e.absolute_path))
    assert not errors, [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]
    broken = copy.deepcopy(values())
    broken["hub"]["loadRole"] = broken["hub"].pop("loadRoles")  # the schema does catch a misspelt key
    assert list(validator.iter_errors(broken))


def test_hub_services_and_roles_are_jupyterhubs() -> None:
    from jupyterhub.scopes import scope_definitions
    from jupyterhub.services.service import Service

    hub = values()["hub"]
    service_traits = set(Service.class_traits()) | {"api_token"}
    for name, entry in hub["services"].items():
        assert set(entry) <= service_traits, f"{name}: JupyterHub services have no {set(entry) - service_traits}"
        assert "command" not in entry  # external: the node's pod runs it
    custom = set(hub["config"]["JupyterHub"]["custom_scopes"])
    for name, role in hub["loadRoles"].items():
        assert set(role) <= {"name", "description", "scopes", "users", "services", "groups"}, name
        for scope in role["scopes"]:
            base, _, target = scope.partition("!")
            assert base in scope_definitions or base in custom, f"{name}: {scope} is not a scope"
            assert not target or target in ("user", "server", "service") or re.fullmatch(
                r"(user|server|service|group)=[\w./-]+", target), f"{name}: {scope} has a bad filter"


def example_roles(services: list[str]) -> dict[str, set[str]]:
    """The roles examples/jupyterhub_config.py makes for these services (as SWAPSERVE_NODES)."""
    nodes = [{"name": s.removeprefix("swapserve-"), "models_file": "x.yaml", "port": 1 + i}
             for i, s in enumerate(services)]

    class Section(dict):
        def __getattr__(self, key: str) -> Any:
            return self.setdefault(key, Section())

        def __setattr__(self, key: str, value: Any) -> None:
            self[key] = value

    config = Section()
    before = os.environ.get("SWAPSERVE_NODES")
    os.environ["SWAPSERVE_NODES"] = json.dumps(nodes)
    try:
        path = ROOT / "examples" / "jupyterhub_config.py"
        exec(compile(path.read_text(), str(path), "exec"), {"get_config": lambda: config, "__file__": str(path)})
    finally:
        if before is None:
            del os.environ["SWAPSERVE_NODES"]
        else:
            os.environ["SWAPSERVE_NODES"] = before
    assert [s["name"] for s in config.JupyterHub.services] == services
    return {role["name"]: set(role["scopes"]) for role in config.JupyterHub.load_roles}


def test_values_grant_the_roles_of_the_example_config() -> None:
    hub = values()["hub"]
    expected = example_roles(sorted(hub["services"]))
    assert {name: set(role["scopes"]) for name, role in hub["loadRoles"].items()} == expected
    assert hub["config"]["JupyterHub"]["custom_scopes"].keys() == {"custom:swapserve:admin"}
    for entry in hub["services"].values():
        assert entry["oauth_no_confirm"] is True  # as the example's service


def test_users_servers_may_reach_the_nodes() -> None:
    (rule,) = values()["singleuser"]["networkPolicy"]["egress"]
    assert rule["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "swapserve"}}}]
    ports = {p["containerPort"] for _, c in containers() for p in c["ports"]}
    assert {p["port"] for p in rule["ports"]} == ports


@pytest.mark.parametrize("path", ["README.md", "Containerfile"])
def test_the_instructions_name_the_files_that_exist(path: str) -> None:
    text = (DEPLOY / path).read_text()
    for mentioned in re.findall(r"deploy/kubernetes/([\w.-]+\.(?:yaml|md))", text):
        assert (DEPLOY / mentioned).exists(), mentioned


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (its kustomize renders offline)")
def test_kustomize_renders_what_these_tests_check() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out)}
    assert by_name == {(d["kind"], d["metadata"]["name"]): d for d in rendered()}
