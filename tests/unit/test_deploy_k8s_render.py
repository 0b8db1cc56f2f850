"""deploy/k8s/ against docker-compose.yml, without a cluster or a container: the manifests are what
deploy/tools/render_k8s.py renders from the compose file, and, checked independently of the
renderer's own translation, both deployments give every process the same image, the same
environment (name for name, value for value), ports, `ray start` flags and probes, apart from
the differences listed in DIFFERENCES. Every SLIMTRAIN_* name either file mentions is a field of
service.settings.Settings or a listed deployment variable, so a renamed setting fails here."""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil

import pytest
import yaml

from service.settings import Settings
from tests.conftest import ROOT
from tests.unit.test_deploy_compose import env_example, interpolate

_spec = importlib.util.spec_from_file_location("render_k8s", ROOT / "deploy" / "tools" / "render_k8s.py")
render_k8s = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(render_k8s)

K8S = ROOT / "deploy" / "k8s"
REGISTRY = "registry.example.com"

# What may differ between the compose stack and the Kubernetes manifests, and why. Anything not
# listed here must be equal.
HOSTS = {"postgres": "slimtrain-postgres", "minio": "slimtrain-minio", "ray-head": "slimtrain-head-svc"}
DIFFERENCES = {
    "hosts": "compose service names become Kubernetes Service names (HOSTS; KubeRay names the "
    "head's Service <RayCluster>-head-svc)",
    "images": f"images built from this repository are pulled from a registry: {REGISTRY}/<compose image>",
    "secret files": "X_PATH / X_FILE naming a compose secret file (/run/secrets/NAME) is X from the "
    "Secret on Kubernetes; Ray and PostgreSQL read either",
    "$(VAR) inputs": "a value compose interpolates from a required variable expands $(VAR) on "
    "Kubernetes, so the container also holds VAR",
    "usage stats": "`ray start --disable-usage-stats` is RAY_USAGE_STATS_ENABLED=0: KubeRay passes "
    "rayStartParams as --key=value, which a bare flag refuses",
    "KubeRay's flags": "--head, --block and --address are set by KubeRay, not rayStartParams",
    "minio-init": "no depends_on on Kubernetes: the script retries its first step until MinIO answers",
    "k8s-only env": "K8S_ONLY_ENV below: what a Kubernetes volume or image user needs",
    "k8s-only": "resources, replicas, shm sizes, probe timings, the Ray head's probe (the head's own "
    "GCS, not its Service), NetworkPolicy, Ingress: the templates in deploy/tools/k8s_templates/",
}
K8S_ONLY_ENV = {
    "postgres": {"PGDATA"},  # a subfolder of the volume: its root holds lost+found
    "minio-init": {"HOME"},  # mc needs a writable home
}
# SLIMTRAIN_* names that configure the deployment, never read by a slimtrain process.
DEPLOYMENT_VARIABLES = {
    "SLIMTRAIN_API_IMAGE": "compose: the API image to run",
    "SLIMTRAIN_RAY_IMAGE": "compose: the Ray image to run",
    "SLIMTRAIN_API_PORT": "compose: the host port the API is published on",
    "SLIMTRAIN_BUCKET": "the bucket minio-init creates; slimtrain reads it inside SLIMTRAIN_ARTIFACT_URI",
    "SLIMTRAIN_TEST_POSTGRES_IMAGE": "compose.test.yaml: the PostgreSQL stand-in",
    "SLIMTRAIN_TEST_S3_IMAGE": "compose.test.yaml: the S3 stand-in",
}
SETTINGS = {f"SLIMTRAIN_{name.upper()}" for name in Settings.model_fields}


def _load_k8s() -> list[dict]:
    paths = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    return [d for p in paths for d in yaml.safe_load_all(p.read_text()) if d]


def _containers(docs: list[dict]) -> dict[str, dict]:
    """compose service -> the Kubernetes container that runs it."""
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    rc = by["RayCluster", "slimtrain"]["spec"]
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}

    def only(template):
        [c] = template["spec"]["containers"]
        return c

    return {
        "api": only(by["Deployment", "slimtrain-api"]["spec"]["template"]),
        "ray-head": only(rc["headGroupSpec"]["template"]),
        "ray-worker": only(groups["gpu"]["template"]),
        "ray-worker-cpu": only(groups["cpu"]["template"]),
        "postgres": only(by["StatefulSet", "slimtrain-postgres"]["spec"]["template"]),
        "minio": only(by["StatefulSet", "slimtrain-minio"]["spec"]["template"]),
        "minio-init": only(by["Job", "slimtrain-minio-init"]["spec"]["template"]),
    }


def _map_hosts(value: str) -> str:
    return re.sub(rf"(?<![\w.-])({'|'.join(HOSTS)})(?=:\d)", lambda m: HOSTS[m.group(1)], value)


def _k8s_env(container: dict, docs: list[dict]) -> dict[str, str]:
    """The environment a container starts with, as Kubernetes resolves it."""
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    config = by["ConfigMap", "slimtrain-config"]["data"]
    secret = by["Secret", "slimtrain-secrets"]["stringData"]
    env: dict[str, str] = {}
    for src in container.get("envFrom", []):
        env.update(config if src["configMapRef"]["name"] == "slimtrain-config" else {})
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(e["value"])
            )
        elif "configMapKeyRef" in e["valueFrom"]:
            env[e["name"]] = config[e["valueFrom"]["configMapKeyRef"]["key"]]
        else:
            env[e["name"]] = secret[e["valueFrom"]["secretKeyRef"]["key"]]
    return env


def _compose_env(compose: dict, service: str, env_file: dict[str, str]) -> dict[str, str]:
    """The environment a compose container starts with, secret files read as what they hold."""
    svc = compose["services"][service]
    env = {}
    for name, value in svc.get("environment", {}).items():
        m = re.fullmatch(r"/run/secrets/(\w+)", str(value))
        if m and name.endswith(("_PATH", "_FILE")) and m.group(1) in svc.get("secrets", []):
            env[name.rsplit("_", 1)[0]] = env_file[compose["secrets"][m.group(1)]["environment"]]
        else:
            env[name] = _map_hosts(str(value))
    return env


def _url_port(url: str) -> int:
    return int(re.search(r":(\d+)(?:/|$)", url).group(1))


KUBERAY_FLAGS = ("head", "block", "address", "disable-usage-stats")


def _ray_flags(command: list[str]) -> dict[str, str | None]:
    assert command[:2] == ["ray", "start"], command
    return {a[2:].partition("=")[0]: (a.partition("=")[2] if "=" in a else None) for a in command[2:]}


def disagreements(raw_compose: dict, docs: list[dict], env_file: dict[str, str]) -> list[str]:
    """Where the compose stack and the manifests differ beyond DIFFERENCES."""
    compose = interpolate(raw_compose, env_file)
    s = compose["services"]
    containers = _containers(docs)
    rc = next(d for d in docs if d["kind"] == "RayCluster")
    ray_groups = {"ray-head": rc["spec"]["headGroupSpec"]}
    for g in rc["spec"]["workerGroupSpecs"]:
        ray_groups[{"gpu": "ray-worker", "cpu": "ray-worker-cpu"}[g["groupName"]]] = g
    # where KubeRay's workers join: the head's Service on the head's GCS port
    head_service = (
        f"{rc['metadata']['name']}-head-svc:{rc['spec']['headGroupSpec']['rayStartParams']['port']}"
    )
    out = []

    def check(what, compose_value, k8s_value):
        if compose_value != k8s_value:
            out.append(f"{what}: compose {compose_value!r} != k8s {k8s_value!r}")

    for service, c in containers.items():
        image = s[service]["image"]
        check(f"{service} image", f"{REGISTRY}/{image}" if "build" in s[service] else image, c["image"])
        want = _compose_env(compose, service, env_file)
        got = _k8s_env(c, docs)
        flags = _ray_flags(s[service]["command"]) if service.startswith("ray-") else {}
        allowed = set(K8S_ONLY_ENV.get(service, ()))
        allowed |= {v for e in c.get("env", []) for v in re.findall(r"\$\((\w+)\)", str(e.get("value", "")))}
        if "disable-usage-stats" in flags:
            want["RAY_USAGE_STATS_ENABLED"] = "0"
        for name in sorted(want.keys() | got.keys()):
            if name in want:
                check(f"{service} env {name}", want[name], got.get(name, "<unset>"))
            elif name not in allowed:
                out.append(f"{service} env {name}: set on k8s only")
        if flags:
            params = {k: v for k, v in flags.items() if k not in KUBERAY_FLAGS}
            check(f"{service} rayStartParams", params, ray_groups[service]["rayStartParams"])
            expose = s[service].get("expose") or [flags["metrics-export-port"]]
            check(f"{service} ports", {int(p) for p in expose}, {p["containerPort"] for p in c["ports"]})
            if "address" in flags:
                check(f"{service} --address", _map_hosts(flags["address"]), head_service)
            if service != "ray-head":
                for probe in ("readinessProbe", "livenessProbe"):
                    check(
                        f"{service} {probe}",
                        ["sh", "-c", s[service]["healthcheck"]["test"][1]],
                        c[probe]["exec"]["command"],
                    )
    api = containers["api"]
    check("api command", s["api"]["command"], api["command"])
    check(
        "api port",
        [f"{p.split(':')[-1]}" for p in s["api"]["ports"]],
        [str(p["containerPort"]) for p in api["ports"]],
    )
    check(
        "api --port",
        s["api"]["command"][s["api"]["command"].index("--port") + 1],
        str(api["ports"][0]["containerPort"]),
    )
    ready = re.search(r"http://127\.0\.0\.1:\d+(/\w+)", " ".join(s["api"]["healthcheck"]["test"])).group(1)
    check("api readiness path", ready, api["readinessProbe"]["httpGet"]["path"])
    for service in ("api", "postgres", "minio"):
        [target] = [v.split(":")[1] for v in s[service]["volumes"] if not v.startswith(".")]
        check(f"{service} data path", target, containers[service]["volumeMounts"][0]["mountPath"])
    check("minio args", s["minio"]["command"], containers["minio"]["args"])
    pg = s["postgres"]["healthcheck"]["test"]
    check("postgres probe", ["sh", "-c", pg[1]], containers["postgres"]["readinessProbe"]["exec"]["command"])
    # the ports other pods reach: Services and NetworkPolicy, against the URLs compose uses
    api_env = _compose_env(compose, "api", env_file)
    port = {
        "postgres": _url_port(api_env["SLIMTRAIN_DATABASE_URL"].rsplit("@", 1)[1]),
        "s3": _url_port(api_env["SLIMTRAIN_S3_ENDPOINT_URL"]),
        "gcs": _url_port(api_env["SLIMTRAIN_RAY_ADDRESS"]),
        "dashboard": _url_port(api_env["SLIMTRAIN_RAY_DASHBOARD_URL"]),
        "api": int(s["api"]["command"][s["api"]["command"].index("--port") + 1]),
        "metrics": int(_ray_flags(s["ray-head"]["command"])["metrics-export-port"]),
    }
    by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    for svc, key in (("slimtrain-postgres", "postgres"), ("slimtrain-minio", "s3")):
        check(f"Service/{svc} port", [port[key]], [p["port"] for p in by["Service", svc]["spec"]["ports"]])
    policy_ports = {
        "ray-inside-cluster": [port["gcs"], port["dashboard"], port["metrics"]],
        "postgres-from-api": [port["postgres"]],
        "minio-from-slimtrain": [port["s3"]],
        "api-from-anywhere": [port["api"]],
    }
    for name, want_ports in policy_ports.items():
        rules = by["NetworkPolicy", name]["spec"]["ingress"]
        got_ports = [p["port"] for r in rules for p in r.get("ports", [])]
        check(f"NetworkPolicy/{name} ports", want_ports, got_ports)
    init = containers["minio-init"]
    check("minio-init command", s["minio-init"]["entrypoint"], init["command"])
    script = _map_hosts(s["minio-init"]["command"][0]).rstrip("\n").split("\n")
    script[0] = f"until {script[0]}; do sleep 2; done"
    check("minio-init script", script, init["args"][0].rstrip("\n").split("\n"))
    return out


@pytest.fixture(scope="module")
def raw_compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    return _load_k8s()


def test_the_committed_manifests_are_the_rendered_ones(tmp_path, capsys):
    rendered = render_k8s.render()
    assert rendered == {p.name: p.read_text() for p in K8S.glob("*.yaml")}, (
        "deploy/k8s/ differs from its render: run `python deploy/tools/render_k8s.py`"
    )
    # --check: 0 on the committed copy, 1 with a diff once a file drifts
    out = tmp_path / "k8s"
    shutil.copytree(K8S, out)
    assert render_k8s.main(["--check", "--out", str(out)]) == 0
    (out / "configmap.yaml").write_text(
        (out / "configmap.yaml").read_text().replace("us-east-1", "eu-west-1")
    )
    assert render_k8s.main(["--check", "--out", str(out)]) == 1
    assert "+  AWS_DEFAULT_REGION: us-east-1" in capsys.readouterr().out


def test_compose_and_kubernetes_agree(raw_compose, docs):
    assert disagreements(raw_compose, docs, env_example()) == []
    # kustomize's image list is what the manifests run: the compose images, from the registry
    compose = interpolate(raw_compose, env_example())
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    built = {f"{REGISTRY}/{svc['image']}" for svc in compose["services"].values() if "build" in svc}
    assert {f"{i['name']}:{i['newTag']}" for i in kustomization["images"]} == built


def _set_env(service, name, value):
    return lambda c: c["services"][service]["environment"].update({name: value})


def _config(d):
    return next(x for x in d if x["kind"] == "ConfigMap")["data"]


DRIFTS = {  # id: (which copy, mutation, what the report must name)
    "env-value": (
        "compose",
        _set_env("api", "SLIMTRAIN_RAY_DASHBOARD_URL", "http://ray-head:8266"),
        "api env SLIMTRAIN_RAY_DASHBOARD_URL",
    ),
    "head-env": (
        "compose",
        _set_env("ray-head", "SLIMTRAIN_ARTIFACT_URI", "s3://other/artifacts"),
        "ray-head env SLIMTRAIN_ARTIFACT_URI",
    ),
    "ray-flag": (
        "compose",
        lambda c: c["services"]["ray-worker"]["command"].append("--num-cpus=8"),
        "ray-worker rayStartParams",
    ),
    "image": (
        "compose",
        lambda c: c["services"]["api"].update(image="${SLIMTRAIN_API_IMAGE:-slimtrain-api:0.2.0}"),
        "api image",
    ),
    "ray-auth": ("k8s", lambda d: _containers(d)["ray-head"]["env"].pop(0), "ray-head env RAY_AUTH_MODE"),
    "configmap": (
        "k8s",
        lambda d: _config(d).update(SLIMTRAIN_ARTIFACT_URI="s3://other/a"),
        "api env SLIMTRAIN_ARTIFACT_URI",
    ),
    "extra-env": (
        "k8s",
        lambda d: _containers(d)["api"]["env"].append({"name": "SLIMTRAIN_RUN_SCHEDULER", "value": "0"}),
        "api env SLIMTRAIN_RUN_SCHEDULER: set on k8s only",
    ),
    "secret-key": (
        "k8s",
        lambda d: next(e for e in _containers(d)["api"]["env"] if e["name"] == "SLIMTRAIN_API_TOKENS")[
            "valueFrom"
        ]["secretKeyRef"].update(key="metrics-token"),
        "api env SLIMTRAIN_API_TOKENS",
    ),
    "policy-port": (
        "k8s",
        lambda d: next(x for x in d if x["metadata"]["name"] == "ray-inside-cluster")["spec"]["ingress"][1][
            "ports"
        ][0].update(port=6380),
        "NetworkPolicy/ray-inside-cluster ports",
    ),
    "port": ("k8s", lambda d: _containers(d)["api"]["ports"][0].update(containerPort=8080), "api port"),
}


@pytest.mark.parametrize("drift", DRIFTS)
def test_a_drift_is_caught(raw_compose, docs, drift):
    where, mutate, expect = DRIFTS[drift]
    compose, manifests = copy.deepcopy(raw_compose), copy.deepcopy(docs)
    mutate(compose if where == "compose" else manifests)
    found = disagreements(compose, manifests, env_example())
    assert any(expect in f for f in found), found
    if where == "compose":  # and the renderer turns it into a new deploy/k8s, or refuses it
        try:
            assert render_k8s.render(compose) != render_k8s.render(raw_compose)
        except render_k8s.RenderError as e:
            assert drift == "head-env" and "two services set it differently" in str(e)


def slimtrain_names(text: str) -> set[str]:
    return set(re.findall(r"\bSLIMTRAIN_[A-Z0-9_]*[A-Z0-9]", text))


def unknown_settings(texts: dict[str, str], settings: set[str]) -> list[str]:
    """SLIMTRAIN_* names in any of the texts that are neither settings nor deployment variables."""
    return sorted(
        f"{where}: {name}"
        for where, text in texts.items()
        for name in slimtrain_names(text) - settings - DEPLOYMENT_VARIABLES.keys()
    )


def test_every_slimtrain_name_is_a_setting_or_a_listed_deployment_variable(raw_compose, docs):
    texts = {
        p.name: p.read_text()
        for p in (
            ROOT / "docker-compose.yml",
            ROOT / "deploy" / ".env.example",
            ROOT / "deploy" / "compose.test.yaml",
        )
    }
    texts |= {f"k8s/{p.name}": p.read_text() for p in K8S.glob("*.yaml")}
    assert unknown_settings(texts, SETTINGS) == []
    assert not DEPLOYMENT_VARIABLES.keys() & SETTINGS, "a deployment variable shadows a setting"
    # what the slimtrain processes get (API, Ray head: the job drivers) are settings, in both
    compose = interpolate(raw_compose, env_example())
    for service in ("api", "ray-head"):
        k8s_names = {e["name"] for e in _containers(docs)[service]["env"]}
        for name in slimtrain_names(" ".join(compose["services"][service]["environment"])) | slimtrain_names(
            " ".join(k8s_names)
        ):
            assert name in SETTINGS, f"{service}: {name} is no field of service.settings.Settings"
    # a setting renamed in service/settings.py is caught
    renamed = SETTINGS - {"SLIMTRAIN_RAY_DASHBOARD_URL"} | {"SLIMTRAIN_RAY_JOBS_URL"}
    assert "docker-compose.yml: SLIMTRAIN_RAY_DASHBOARD_URL" in unknown_settings(texts, renamed)


class _OverrideLoader(yaml.SafeLoader):
    """Compose's !override and !reset tags, read as the plain values they carry."""


def _construct_override(loader, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_OverrideLoader.add_constructor("!override", _construct_override)
_OverrideLoader.add_constructor("!reset", lambda loader, node: None)


def test_the_compose_test_changes_only_test_sizing_of_what_kubernetes_gets(raw_compose):
    """make test-deploy runs docker-compose.yml with deploy/compose.test.yaml: the API's and Ray's
    environment and image names are the production ones, and its `ray start` commands differ only
    by sizing for one small machine (object store, one CPU per worker) — so what the test proves is
    what the manifests are rendered from."""
    override = yaml.load((ROOT / "deploy" / "compose.test.yaml").read_text(), Loader=_OverrideLoader)
    sizing = {"object-store-memory", "num-cpus"}
    for name in ("api", "ray-head", "ray-worker", "ray-worker-cpu"):
        svc = override["services"].get(name, {})
        assert not {"environment", "image", "secrets", "volumes", "ports"} & svc.keys(), name
        if "command" in svc:
            test, prod = _ray_flags(svc["command"]), _ray_flags(raw_compose["services"][name]["command"])
            changed = {k for k in test.keys() | prod.keys() if test.get(k, "-") != prod.get(k, "-")}
            assert changed <= sizing, f"{name}: the test changes {changed - sizing}"


def test_every_secret_variable_goes_to_the_secret(raw_compose):
    text = (ROOT / "docker-compose.yml").read_text()
    secret_like = {
        v for v in re.findall(r"\$\{(\w+)", text) if re.search("PASSWORD|SECRET|TOKEN|ACCESS_KEY", v)
    }
    secret_like |= {s["environment"] for s in raw_compose["secrets"].values()}
    assert secret_like <= set(render_k8s.SECRET_VARIABLES) | set(render_k8s.COMPOSE_ONLY_SECRETS)
    assert render_k8s.HOSTS == HOSTS and render_k8s.REGISTRY == REGISTRY
    # distinct placeholders, so the value-for-value comparison tells a swapped secret key apart
    [secret] = [d for d in _load_k8s() if d["kind"] == "Secret"]
    values = list(secret["stringData"].values())
    assert len(set(values)) == len(values)
