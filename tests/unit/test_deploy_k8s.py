"""deploy/k8s/, checked without a cluster: every manifest against the Kubernetes JSON schemas
(kubernetes-validate vendors them, strict: unknown fields are errors), the KubeRay RayCluster by
a structural schema of the ray.io/v1 fields it uses plus its pod templates by Kubernetes' own
PodTemplate schema, then what no schema knows: probes, references to ConfigMap/Secret keys,
selectors, the NetworkPolicy that keeps Ray inside, placeholders instead of secrets."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
RAY_PORTS = {6379, 8265, 10001}


def _docs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


DOCS = _docs()


def _kind(kind: str) -> list[dict]:
    return [d for _, d in DOCS if d["kind"] == kind]


def _one(kind: str, name: str) -> dict:
    [doc] = [d for d in _kind(kind) if d["metadata"]["name"] == name]
    return doc


def _k8s_validate(doc: dict) -> None:
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(map(str, e.path))
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} (k8s {version}): {where}: {e.message}")


def _pod_templates() -> list[tuple[str, dict]]:
    """(owner, pod template) of every workload, the RayCluster's groups included."""
    out = []
    for _, d in DOCS:
        name = f"{d['kind']}/{d['metadata']['name']}"
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            out.append((name, d["spec"]["template"]))
        elif d["kind"] == "RayCluster":
            out.append((f"{name}/head", d["spec"]["headGroupSpec"]["template"]))
            out += [(f"{name}/{g['groupName']}", g["template"]) for g in d["spec"]["workerGroupSpecs"]]
    return out


@pytest.mark.parametrize(
    "doc",
    [d for _, d in DOCS if d["kind"] != "RayCluster"],
    ids=lambda d: f"{d['kind']}-{d['metadata']['name']}",
)
def test_manifest_valid_against_kubernetes_schemas(doc):
    assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == "slimtrain"
    _k8s_validate(doc)


# The ray.io/v1 RayCluster fields this deployment uses, as KubeRay's CRD defines them (names,
# types, string-valued rayStartParams); unknown fields are errors, so a typo cannot slip by.
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_GROUP = {
    "rayStartParams": _STR_MAP,
    "template": {"type": "object", "required": ["spec"]},
}
RAYCLUSTER_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayCluster"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
            "properties": {
                "rayVersion": {"type": "string"},
                "enableInTreeAutoscaling": {"type": "boolean"},
                "autoscalerOptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                        "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                        "env": {"type": "array"},
                        "envFrom": {"type": "array"},
                        "resources": {"type": "object"},
                        "image": {"type": "string"},
                        "imagePullPolicy": {"type": "string"},
                        "securityContext": {"type": "object"},
                    },
                },
                "headGroupSpec": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["rayStartParams", "template"],
                    "properties": {
                        **_GROUP,
                        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                    },
                },
                "workerGroupSpecs": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["groupName", "rayStartParams", "template", "minReplicas", "maxReplicas"],
                        "properties": {
                            **_GROUP,
                            "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                            "replicas": {"type": "integer", "minimum": 0},
                            "minReplicas": {"type": "integer", "minimum": 0},
                            "maxReplicas": {"type": "integer", "minimum": 1},
                            "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                        },
                    },
                },
            },
        },
    },
}


@pytest.fixture(scope="module")
def raycluster() -> dict:
    [rc] = _kind("RayCluster")
    return rc


def test_raycluster_structure_and_its_pod_templates(raycluster):
    jsonschema.validate(raycluster, RAYCLUSTER_SCHEMA)
    opts = raycluster["spec"]["autoscalerOptions"]
    # the autoscaler sidecar's env and resources, through Kubernetes' own container schema
    sidecar = {"name": "autoscaler", "image": "x", "env": opts["env"], "resources": opts["resources"]}
    templates = [t for owner, t in _pod_templates() if owner.startswith("RayCluster")]
    templates.append({"spec": {"containers": [sidecar]}})
    for i, template in enumerate(templates):
        _k8s_validate(
            {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"t{i}"}, "template": template}
        )


def test_raycluster_gpu_group_autoscales_and_matches_the_installed_ray(raycluster):
    spec = raycluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    assert gpu["maxReplicas"] > gpu["minReplicas"], "the GPU group must be able to scale"
    [container] = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == gpu["rayStartParams"]["num-gpus"] == "1"
    assert any(t["key"] == "nvidia.com/gpu" for t in gpu["template"]["spec"]["tolerations"])
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["rayStartParams"]["num-gpus"] == "0"


def test_ray_token_auth_in_every_ray_process(raycluster):
    config = _one("ConfigMap", "slimtrain-config")["data"]
    envs = [raycluster["spec"]["autoscalerOptions"]["env"]]
    sources = []
    for owner, template in _pod_templates():
        if owner.startswith("RayCluster") or owner == "Deployment/slimtrain-api":
            for c in template["spec"]["containers"]:
                envs.append(c.get("env", []))
                sources.append(c.get("envFrom", []))
    for env, env_from in zip(envs, [[]] + sources, strict=True):
        values = {e["name"]: e for e in env}
        mode = values.get("RAY_AUTH_MODE", {}).get("value")
        from_config = any(s.get("configMapRef", {}).get("name") == "slimtrain-config" for s in env_from)
        if mode is None and from_config:
            mode = config["RAY_AUTH_MODE"]
        assert mode == "token"
        assert values["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
            "name": "slimtrain-secrets",
            "key": "ray-auth-token",
        }


def test_every_workload_container_has_probes():
    for owner, template in _pod_templates():
        if owner.startswith("Job/"):
            continue
        for c in template["spec"]["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, f"{owner}/{c['name']}"
    [api] = _one("Deployment", "slimtrain-api")["spec"]["template"]["spec"]["containers"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_the_api_runs_two_replicas_on_one_database_with_a_rolling_update():
    """Several API replicas (issue 17.4) are safe only on one shared database and an external
    Ray cluster: the leader lease lives in the database, and an embedded Ray head per pod would
    be a cluster per replica."""
    api = _one("Deployment", "slimtrain-api")
    spec = api["spec"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0  # an update never drops to 0 serving
    [container] = spec["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SLIMTRAIN_DATABASE_URL"]["value"].startswith("postgresql+psycopg://")
    config = _one("ConfigMap", "slimtrain-config")["data"]
    assert config["SLIMTRAIN_RAY_ADDRESS"] and config["SLIMTRAIN_RAY_DASHBOARD_URL"]
    assert "SLIMTRAIN_RUN_SCHEDULER" not in config and "SLIMTRAIN_RUN_SCHEDULER" not in env  # all campaign
    [pdb] = _kind("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]
    assert pdb["spec"]["minAvailable"] == 1 < spec["replicas"]


def test_config_and_secret_references_resolve():
    config = set(_one("ConfigMap", "slimtrain-config")["data"])
    secret = set(_one("Secret", "slimtrain-secrets")["stringData"])
    [rc] = _kind("RayCluster")
    containers = [c for _, t in _pod_templates() for c in t["spec"]["containers"]]
    containers.append({"env": rc["spec"]["autoscalerOptions"]["env"]})
    for c in containers:
        for e in c.get("env", []):
            ref = e.get("valueFrom", {})
            if "configMapKeyRef" in ref:
                assert ref["configMapKeyRef"]["name"] == "slimtrain-config"
                assert ref["configMapKeyRef"]["key"] in config, e
            if "secretKeyRef" in ref:
                assert ref["secretKeyRef"]["name"] == "slimtrain-secrets"
                assert ref["secretKeyRef"]["key"] in secret, e
        for src in c.get("envFrom", []):
            assert src == {"configMapRef": {"name": "slimtrain-config"}}


def test_secrets_in_the_repo_are_placeholders():
    for s in _kind("Secret"):
        for key, value in s["stringData"].items():
            if any(w in key for w in ("password", "secret", "token")):
                assert value.startswith("change-me"), key


def test_services_select_pods_that_exist():
    pod_labels = [t["metadata"]["labels"] for _, t in _pod_templates()]
    for svc in _kind("Service"):
        sel = svc["spec"]["selector"]
        assert any(sel.items() <= labels.items() for labels in pod_labels), svc["metadata"]["name"]
    for kind in ("Deployment", "StatefulSet"):
        for d in _kind(kind):
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_network_policy_keeps_ray_inside_the_cluster():
    policies = {p["metadata"]["name"]: p["spec"] for p in _kind("NetworkPolicy")}
    assert policies["default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    for name, spec in policies.items():
        for rule in spec.get("ingress", []):
            assert all("ipBlock" not in peer for peer in rule.get("from", [])), name
    [ray_policy] = [
        p for p in policies.values() if p["podSelector"].get("matchLabels", {}).get("ray.io/cluster")
    ]
    for rule in ray_policy["ingress"]:
        peers = rule["from"]
        assert peers, "a rule without peers would open Ray to everyone"
        open_ports = {p["port"] for p in rule.get("ports", [])}
        for peer in peers:
            if "namespaceSelector" in peer:  # another namespace: the metrics port only
                assert open_ports == {8080}
            else:
                assert set(peer) == {"podSelector"}
    # the one policy open to every source is the API's HTTP port
    for name, spec in policies.items():
        for rule in spec.get("ingress", []):
            if "from" not in rule:
                assert spec["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "slimtrain-api"}, name
                assert [p["port"] for p in rule["ports"]] == [8000]
    # and no Service exposes Ray's ports outside the cluster
    for svc in _kind("Service"):
        if svc["spec"].get("type") in ("NodePort", "LoadBalancer"):
            assert not RAY_PORTS & {p["port"] for p in svc["spec"]["ports"]}


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    images = {i["name"] for i in kustomization["images"]}
    used = {c["image"].rsplit(":", 1)[0] for _, t in _pod_templates() for c in t["spec"]["containers"]}
    assert {i for i in used if i.startswith("registry.example.com/")} == images


def test_schemas_catch_a_broken_manifest():
    """The checks above can fail: a misspelled field is refused by both kinds of schema."""
    deployment = copy.deepcopy(_one("Deployment", "slimtrain-api"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)
    [rc] = copy.deepcopy(_kind("RayCluster"))
    rc["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-gpus"] = 1  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rc, RAYCLUSTER_SCHEMA)
