"""docker-compose.yml, checked without Docker: the Compose Specification's JSON schema (vendored
by check-jsonschema, so offline) after interpolating deploy/.env.example as `docker compose
--env-file` would, then what the schema cannot know: the stack's shape, health checks, ports,
secrets, volumes, and that Prometheus and Grafana point at things that exist."""

from __future__ import annotations

import importlib.resources
import json
import re

import jsonschema
import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"
SERVICES = {
    "api",
    "ray-head",
    "ray-worker",
    "ray-worker-cpu",
    "postgres",
    "minio",
    "minio-init",
    "prometheus",
    "grafana",
}
RAY_SERVICES = ("ray-head", "ray-worker", "ray-worker-cpu")
SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN")

# Compose's interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, $VAR.
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict[str, str]):
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1) or m.group(4), m.group(2), m.group(3)
        val = env.get(name)
        if op in (":-", "-"):
            return (val if val else arg) if op == ":-" else (arg if val is None else val)
        if op in (":?", "?") and (not val if op == ":?" else val is None):
            raise KeyError(f"{name}: {arg}")
        if val is None:
            raise KeyError(f"${name} is unset and has no default")
        return val

    return _VAR.sub(sub, value)


def referenced_vars(text: str) -> dict[str, str | None]:
    """Every variable the compose file reads, with its operator (None for a bare reference)."""
    return {m.group(1) or m.group(4): m.group(2) for m in _VAR.finditer(text) if m.group(0) != "$$"}


def env_example() -> dict[str, str]:
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose(raw) -> dict:
    return interpolate(raw, env_example())


def test_valid_against_the_compose_specification(compose):
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = sorted(validator.iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


def test_env_example_defines_every_variable_and_holds_no_real_secret():
    env = env_example()
    for name, op in referenced_vars(COMPOSE.read_text()).items():
        if op not in (":-", "-"):
            assert name in env, f"docker-compose.yml needs {name}; deploy/.env.example does not set it"
    for key, value in env.items():
        if any(w in key for w in SECRET_WORDS):
            assert value.startswith("change-me"), f"{key} in .env.example must be a change-me placeholder"


def test_required_secrets_refuse_to_start_without_the_env_file(raw):
    with pytest.raises(KeyError, match="set .* in deploy/.env"):
        interpolate(raw, {})


def test_the_stack(compose):
    s = compose["services"]
    assert set(s) == SERVICES
    devices = s["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert s["ray-worker-cpu"]["profiles"] == ["cpu"] and "resources" not in s["ray-worker-cpu"]["deploy"]
    assert all("profiles" not in s[n] for n in SERVICES - {"ray-worker-cpu"})
    for name, svc in s.items():
        assert "build" in svc or re.search(r":[\w.-]+$", svc["image"]), f"{name}: pin the image tag"
        for dep in svc.get("depends_on", {}):
            assert dep in s, f"{name} depends on unknown {dep}"


def test_every_long_running_service_has_a_health_check(compose):
    for name, svc in compose["services"].items():
        if name == "minio-init":
            assert svc["restart"] == "no"
            continue
        assert svc["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL"), name
    api_deps = compose["services"]["api"]["depends_on"]
    assert api_deps == {
        "postgres": {"condition": "service_healthy"},
        "minio-init": {"condition": "service_completed_successfully"},
        "ray-head": {"condition": "service_healthy"},
    }


def test_only_the_api_is_published(compose):
    for name, svc in compose["services"].items():
        assert svc.get("network_mode") != "host", name
        ports = svc.get("ports", [])
        if name == "api":
            assert ports == ["8000:8000"]
        elif name == "grafana":
            assert all(str(p).startswith("127.0.0.1:") for p in ports)
        else:
            assert not ports, f"{name} publishes {ports}"


def test_ray_token_auth_everywhere_from_a_secret(compose):
    s = compose["services"]
    for name in ("api", *RAY_SERVICES):
        env = s[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token", name
        assert "ray_auth_token" in s[name]["secrets"], name
        assert "RAY_AUTH_TOKEN" not in env, f"{name}: the token belongs in the secret file"
    assert compose["secrets"]["ray_auth_token"] == {"environment": "RAY_AUTH_TOKEN"}


def test_secrets_and_volumes_are_declared(compose):
    declared_secrets, declared_volumes = set(compose["secrets"]), set(compose["volumes"])
    used_volumes = set()
    for name, svc in compose["services"].items():
        assert set(svc.get("secrets", [])) <= declared_secrets, name
        for v in svc.get("volumes", []):
            source = v.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared_volumes, f"{name} uses undeclared volume {source}"
                used_volumes.add(source)
        if "build" in svc:
            assert (ROOT / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name
    assert used_volumes == declared_volumes
    for name in ("postgres", "minio", "prometheus", "grafana"):
        volumes = compose["services"][name]["volumes"]
        assert any(not v.startswith(".") for v in volumes), f"{name} keeps no data"


def test_prometheus_scrapes_the_api_and_every_ray_node(compose):
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    hosts = set()
    for job in jobs.values():
        for sc in job.get("static_configs", []):
            hosts |= {t.split(":")[0] for t in sc["targets"]}
        for sd in job.get("dns_sd_configs", []):
            hosts |= set(sd["names"])
    assert hosts == {"api", *RAY_SERVICES} and hosts <= set(compose["services"])
    assert jobs["slimtrain-api"]["metrics_path"] == "/metrics"
    for name in RAY_SERVICES:  # the port Prometheus scrapes is the one each node exports on
        assert "--metrics-export-port=8080" in compose["services"][name]["command"], name


def test_grafana_provisions_the_dashboard_on_the_prometheus_datasource(compose):
    grafana = ROOT / "deploy" / "grafana"
    datasources = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [ds] = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    [provider] = yaml.safe_load((grafana / "provisioning" / "dashboards" / "slimtrain.yml").read_text())[
        "providers"
    ]
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("."))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    dash = json.loads((grafana / "dashboards" / "slimtrain.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) >= 10
    exprs = []
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == ds["uid"], p["title"]
        assert p["targets"] and all(t["datasource"]["uid"] == ds["uid"] and t["expr"] for t in p["targets"])
        exprs += [t["expr"] for t in p["targets"]]
    text = " ".join(exprs)
    for metric in (
        "slimtrain_jobs",
        "slimtrain_queue_length",
        "slimtrain_job_loss",
        "slimtrain_job_accuracy",
        "slimtrain_job_sparsity",
        "slimtrain_http_request_duration_seconds_bucket",
        "ray_node_gpus_utilization",
    ):
        assert metric in text, metric
