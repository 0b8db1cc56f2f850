"""Renders deploy/k8s/*.yaml from docker-compose.yml, so the Kubernetes deployment runs what the
compose deployment test (`make test-deploy`) runs: the same images, the same environment for the
API, the Ray head and the Ray workers, the same ports and `ray start` flags, the same secrets.

    python deploy/tools/render_k8s.py            # rewrite deploy/k8s/
    python deploy/tools/render_k8s.py --check    # exit 1, with a diff, if deploy/k8s/ has drifted

Why docker-compose.yml is the source, and not a third file both are rendered from: it is the file
the deployment test brings up, so what Kubernetes gets is what has run; it stays the hand-written,
commented file compose users read and edit; and a separate stack file would be one more copy that
could disagree with the one actually proven. What only Kubernetes has (resources, replicas,
affinity, NetworkPolicy, the Ingress, probes' timings, comments) lives in the templates in
deploy/tools/k8s_templates/, one per manifest; `{{ name }}` there is a value taken from the
compose file, and a `{{ name }}` alone on a line is a YAML block indented like it. The rendered
manifests are committed, so kustomize and readers need no tool.

How a compose service's `environment` becomes a container's `env`, name for name:
- a value that is one secret variable (SECRET_VARIABLES) -> secretKeyRef, key = the variable's
  name in kebab case without SLIMTRAIN_ (SLIMTRAIN_API_TOKENS -> api-tokens);
- X_PATH or X_FILE = /run/secrets/NAME (a compose secret mounted as a file) -> X from the
  Secret: Ray reads RAY_AUTH_TOKEN and PostgreSQL POSTGRES_PASSWORD directly;
- RAY_* constants (RAY_AUTH_MODE=token) stay inline: token auth is not a setting to patch off;
- a value that uses variables without a default (`${POSTGRES_USER:?...}`) -> inline, with
  Kubernetes' `$(VAR)` for each, VAR defined just above from the ConfigMap or the Secret;
- everything else -> configMapKeyRef into slimtrain-config under the same name, the value with
  compose's defaults (deploy/.env.example for required variables) and service names mapped to
  Kubernetes Service names (HOSTS), so one ConfigMap patch changes a setting for every pod.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / "deploy" / ".env.example"
TEMPLATES = ROOT / "deploy" / "tools" / "k8s_templates"
OUT = ROOT / "deploy" / "k8s"

# Where the images built from this repository are pushed: kustomization.yaml's `images:` (or an
# overlay) points them at yours. Same repository name and tag as in compose, a registry in front.
REGISTRY = "registry.example.com"
# compose service name -> the Kubernetes Service that answers for it (KubeRay names the head's
# <RayCluster name>-head-svc).
HOSTS = {"postgres": "slimtrain-postgres", "minio": "slimtrain-minio", "ray-head": "slimtrain-head-svc"}
# Variables of deploy/.env whose values go into the Secret, in the Secret's order. Grafana is
# compose-only (on Kubernetes, your own monitoring).
SECRET_VARIABLES = (
    "RAY_AUTH_TOKEN",
    "SLIMTRAIN_API_TOKENS",
    "SLIMTRAIN_METRICS_TOKEN",
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
)
COMPOSE_ONLY_SECRETS = ("GRAFANA_ADMIN_PASSWORD",)
CONFIG, SECRET = "slimtrain-config", "slimtrain-secrets"
# `ray start` flags KubeRay sets itself; --disable-usage-stats becomes RAY_USAGE_STATS_ENABLED=0
# (KubeRay passes rayStartParams as --key=value, which a bare flag refuses).
KUBERAY_SETS = ("head", "block", "address")
USAGE_STATS_ENV = {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"}
# Ray head ports other than those its flags name (gcs, dashboard, metrics): Ray Client's default.
OTHER_RAY_PORTS = {10001: "client"}

# Compose's interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, $VAR.
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_HOST = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, HOSTS)) + r")(?=:\d)")
_SECRET_FILE = re.compile(r"/run/secrets/([A-Za-z0-9_]+)")
_PLACEHOLDER = re.compile(r"\{\{ (\w+) \}\}")


class RenderError(ValueError):
    """docker-compose.yml holds something this renderer has no Kubernetes form for."""


def secret_key(var: str) -> str:
    return var.removeprefix("SLIMTRAIN_").lower().replace("_", "-")


def read_env_file(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def map_hosts(text: str) -> str:
    return _HOST.sub(lambda m: HOSTS[m.group(1)], text)


def unescape(text: str) -> str:
    """A compose string without variables of its own ($$ is a literal $), hosts mapped."""
    if any(m.group(0) != "$$" for m in _VAR.finditer(text)):
        raise RenderError(f"interpolation in {text!r}: no Kubernetes form")
    return map_hosts(text.replace("$$", "$"))


def _refs(value: str) -> list[re.Match]:
    return [m for m in _VAR.finditer(value) if m.group(0) != "$$"]


def _var(m: re.Match) -> str:
    return m.group(1) or m.group(4)


class _Renderer:
    def __init__(self, compose: dict, env_file: dict[str, str]):
        self.compose, self.env_file = compose, env_file
        self.config: dict[str, str] = {}
        self.secrets: set[str] = set()

    def _config_ref(self, key: str, value: str) -> dict:
        if self.config.setdefault(key, value) != value:
            raise RenderError(f"{key}: two services set it differently ({self.config[key]!r}, {value!r})")
        return {"configMapKeyRef": {"name": CONFIG, "key": key}}

    def _secret_ref(self, var: str) -> dict:
        if var not in SECRET_VARIABLES:
            raise RenderError(f"{var} is not one of SECRET_VARIABLES")
        self.secrets.add(var)
        return {"secretKeyRef": {"name": SECRET, "key": secret_key(var)}}

    def _required(self, var: str) -> str:
        if var not in self.env_file:
            raise RenderError(f"{var} has no default and deploy/.env.example does not set it")
        return self.env_file[var]

    def _input(self, var: str) -> dict:
        """An entry defining VAR for a $(VAR) below it."""
        if var in SECRET_VARIABLES:
            return {"name": var, "valueFrom": self._secret_ref(var)}
        return {"name": var, "valueFrom": self._config_ref(var, self._required(var))}

    def env(self, service: str) -> list[dict]:
        raw = self.compose["services"][service].get("environment", {})
        if not isinstance(raw, dict):
            raise RenderError(f"{service}: write `environment` as a mapping")
        out: list[dict] = []
        for name, value in raw.items():
            value = str(value)
            refs = _refs(value)
            whole = len(refs) == 1 and refs[0].span() == (0, len(value))
            secret_file = _SECRET_FILE.fullmatch(value)
            if secret_file and name.endswith(("_PATH", "_FILE")):
                var = self.compose["secrets"][secret_file.group(1)]["environment"]
                out.append({"name": name.rsplit("_", 1)[0], "valueFrom": self._secret_ref(var)})
            elif whole and _var(refs[0]) in SECRET_VARIABLES:
                out.append({"name": name, "valueFrom": self._secret_ref(_var(refs[0]))})
            elif not refs and name.startswith("RAY_"):
                out.append({"name": name, "value": unescape(value)})
            elif whole and refs[0].group(2) in (None, ":?", "?"):
                out.append({"name": name, "valueFrom": self._config_ref(name, self._required(_var(refs[0])))})
            else:
                needs = [_var(m) for m in refs if m.group(2) in (None, ":?", "?")]
                rendered = map_hosts(_VAR.sub(functools.partial(self._interpolate, needs=needs), value))
                if needs:
                    defined = {e["name"] for e in out}
                    out += [self._input(v) for v in dict.fromkeys(needs) if v not in defined]
                    out.append({"name": name, "value": rendered})
                else:  # a ConfigMap value is not expanded: compose's $$ is a plain $
                    out.append(
                        {"name": name, "valueFrom": self._config_ref(name, rendered.replace("$$", "$"))}
                    )
        return out

    def _interpolate(self, m: re.Match, needs: list[str]) -> str:
        if m.group(0) == "$$":
            return "$$"  # Kubernetes' escape of a literal $ too
        var, op, arg = _var(m), m.group(2), m.group(3)
        if var in needs:
            return f"$({var})"
        assert op in (":-", "-"), op
        return arg  # compose's default: what an env file that does not set it gives


def _scalar(value) -> str:
    if isinstance(value, int):
        return str(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).removesuffix("\n...\n").strip()
    return json.dumps(value) if text[0] in "'\"" else text


def _flow(value) -> str:
    """A list or mapping on one line, as the hand-written manifests write them."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):  # commands: every argument quoted, as a reader expects
        return "[" + ", ".join(json.dumps(v) if isinstance(v, str) else _flow(v) for v in value) + "]"
    return _scalar(value)


def _env_block(entries: list[dict]) -> str:
    lines = []
    for e in entries:
        lines.append(f"- name: {e['name']}")
        lines += (
            [f"  value: {_scalar(e['value'])}"] if "value" in e else [f"  valueFrom: {_flow(e['valueFrom'])}"]
        )
    return "\n".join(lines)


def _mapping_block(mapping: dict) -> str:
    return "\n".join(f"{k}: {_scalar(v)}" for k, v in mapping.items())


def ray_start_flags(command: list[str]) -> dict[str, str | None]:
    """`ray start --k=v --flag` -> {k: v, flag: None}."""
    if command[:2] != ["ray", "start"]:
        raise RenderError(f"not a `ray start` command: {command}")
    flags = {}
    for arg in command[2:]:
        if not arg.startswith("--"):
            raise RenderError(f"{arg!r}: write `ray start` flags as --key=value")
        key, eq, value = arg[2:].partition("=")
        flags[key] = value if eq else None
    return flags


def ray_start_params(command: list[str]) -> dict[str, str]:
    params = {}
    for key, value in ray_start_flags(command).items():
        if key in KUBERAY_SETS or key == "disable-usage-stats":
            continue
        if value is None:
            raise RenderError(f"--{key}: a bare flag has no rayStartParams form")
        params[key] = unescape(value)
    return params


def _port(url: str) -> int:
    m = re.search(r":(\d+)(?:/|$)", url)
    if not m:
        raise RenderError(f"no port in {url!r}")
    return int(m.group(1))


def _volume_path(service: dict) -> str:
    [path] = [v.split(":")[1] for v in service.get("volumes", []) if not v.startswith(".")]
    return path


def _healthcheck(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":
        return ["sh", "-c", unescape(test[1])]
    if test[0] == "CMD":
        return [unescape(a) for a in test[1:]]
    raise RenderError(f"healthcheck {test}")


def _image(service: dict) -> str:
    m = re.fullmatch(r"\$\{[A-Z_]+:-([^}]+)\}", service["image"])
    return m.group(1) if m else service["image"]


def _option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def values(compose: dict, env_file: dict[str, str]) -> dict[str, str]:
    """Every {{ name }} of the templates, from the compose file."""
    r = _Renderer(compose, env_file)
    s = compose["services"]
    api, head, gpu, cpu = s["api"], s["ray-head"], s["ray-worker"], s["ray-worker-cpu"]
    own_images = {name: _image(s[name]) for name in ("api", "ray-head")}
    if {_image(gpu), _image(cpu)} != {own_images["ray-head"]}:
        raise RenderError("the Ray head and workers must share one image (the drivers run on the head)")

    api_port = int(_option(api["command"], "--port"))
    ready = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(api["healthcheck"]["test"]))
    if not ready or int(ready.group(1)) != api_port:
        raise RenderError("the api's healthcheck must GET a path on its own --port")
    api_env = r.env("api")
    head_flags = ray_start_flags(head["command"])
    head_env = r.env("ray-head")
    gpu_env, cpu_env = r.env("ray-worker"), r.env("ray-worker-cpu")
    for env, svc in ((head_env, head), (gpu_env, gpu), (cpu_env, cpu)):
        if "disable-usage-stats" in ray_start_flags(svc["command"]):
            env.append(dict(USAGE_STATS_ENV))
    metrics = {ray_start_flags(x["command"])["metrics-export-port"] for x in (head, gpu, cpu)}
    if len(metrics) != 1:
        raise RenderError(f"one metrics export port for every Ray node, not {metrics}")
    [metrics_port] = metrics
    port_names = {
        int(head_flags["port"]): "gcs",
        int(head_flags["dashboard-port"]): "dashboard",
        int(metrics_port): "metrics",
        **OTHER_RAY_PORTS,
    }
    head_ports = [{"name": port_names[int(p)], "containerPort": int(p)} for p in head["expose"]]
    ray_auth = {"services": {"x": {"environment": compose["x-ray-auth"]}}, "secrets": compose["secrets"]}
    ray_auth_env = _Renderer(ray_auth, env_file).env("x")

    pg, minio, init = s["postgres"], s["minio"], s["minio-init"]
    postgres_env = r.env("postgres")
    minio_env = r.env("minio")
    init_env = r.env("minio-init")
    db_url = next(e["value"] for e in api_env if e["name"] == "SLIMTRAIN_DATABASE_URL")
    s3_url = r.config["SLIMTRAIN_S3_ENDPOINT_URL"]
    script = unescape(init["command"][0]).rstrip("\n").split("\n")
    # No depends_on in Kubernetes: wait for MinIO by retrying the first step.
    if not script[0].startswith("mc alias set "):
        raise RenderError("minio-init's script must start with `mc alias set`")
    script[0] = f"until {script[0]}; do sleep 2; done"
    console = _option(minio["command"], "--console-address")

    config_order = [*(e["name"] for e in api_env + head_env + postgres_env + init_env)]
    config = {k: r.config[k] for k in dict.fromkeys(config_order) if k in r.config}
    assert config.keys() == r.config.keys()
    images = {"api": f"{REGISTRY}/{own_images['api']}", "ray": f"{REGISTRY}/{own_images['ray-head']}"}
    kustomize = [{"name": i.rsplit(":", 1)[0], "newTag": i.rsplit(":", 1)[1]} for i in images.values()]
    return {
        "config_data": _mapping_block(config),
        "secret_data": _mapping_block(
            {secret_key(v): env_file[v] for v in SECRET_VARIABLES if v in r.secrets}
        ),
        "kustomize_images": "\n".join(
            f"- name: {k['name']}\n  newTag: {_scalar(k['newTag'])}" for k in kustomize
        ),
        "api_image": images["api"],
        "api_command": _flow(api["command"]),
        "api_port": str(api_port),
        "api_env": _env_block(api_env),
        "api_ready_path": ready.group(2),
        "api_data_path": _volume_path(api),
        "ray_image": images["ray"],
        "ray_auth_env": _env_block(ray_auth_env),
        "head_params": _mapping_block(ray_start_params(head["command"])),
        "head_ports": "\n".join(f"- {_flow(p)}" for p in head_ports),
        "head_env": _env_block(head_env),
        "gpu_params": _mapping_block(ray_start_params(gpu["command"])),
        "cpu_params": _mapping_block(ray_start_params(cpu["command"])),
        "gpu_env": _env_block(gpu_env),
        "cpu_env": _env_block(cpu_env),
        "gpu_probe": _flow(_healthcheck(gpu)),
        "cpu_probe": _flow(_healthcheck(cpu)),
        "ray_gcs_port": head_flags["port"],
        "ray_dashboard_port": head_flags["dashboard-port"],
        "ray_metrics_port": metrics_port,
        "postgres_image": pg["image"],
        "postgres_port": str(_port(db_url.split("@", 1)[1])),
        "postgres_env": _env_block(postgres_env),
        "postgres_probe": _flow(_healthcheck(pg)),
        "postgres_data_path": _volume_path(pg),
        "minio_image": minio["image"],
        "minio_args": _flow([unescape(a) for a in minio["command"]]),
        "s3_port": str(_port(s3_url)),
        "minio_console_port": str(_port(console)),
        "minio_env": _env_block(minio_env),
        "minio_data_path": _volume_path(minio),
        "minio_init_image": init["image"],
        "minio_init_command": _flow(init["entrypoint"]),
        "minio_init_script": "\n".join(script),
        "minio_init_env": _env_block(init_env),
    }


def fill(template: str, context: dict[str, str]) -> str:
    out = []
    for line in template.split("\n"):
        block = re.fullmatch(r"( *)\{\{ (\w+) \}\}", line)
        if block:
            indent, name = block.groups()
            out += [indent + x if x else x for x in context[name].split("\n")]
        else:
            out.append(_PLACEHOLDER.sub(lambda m: context[m.group(1)], line))
    return "\n".join(out)


def header(name: str) -> str:
    return (
        f"# Rendered from docker-compose.yml and deploy/tools/k8s_templates/{name} by\n"
        "# `python deploy/tools/render_k8s.py`: edit those and render again (tests check it).\n"
    )


def render(compose: dict | None = None, env_file: dict[str, str] | None = None) -> dict[str, str]:
    """{file name: text} of every manifest."""
    compose = yaml.safe_load(COMPOSE.read_text()) if compose is None else compose
    context = values(compose, read_env_file() if env_file is None else env_file)
    out, used = {}, set()
    for path in sorted(TEMPLATES.glob("*.yaml")):
        template = path.read_text()
        used |= set(_PLACEHOLDER.findall(template))
        out[path.name] = header(path.name) + fill(template, context)
    if unused := set(context) - used:
        raise RenderError(f"values no template uses: {sorted(unused)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if OUT differs")
    parser.add_argument("--out", type=Path, default=OUT, help="the manifests' folder (default deploy/k8s)")
    args = parser.parse_args(argv)
    rendered = render()
    stale = sorted(p.name for p in args.out.glob("*.yaml") if p.name not in rendered)
    drift = []
    for name, text in rendered.items():
        path = args.out / name
        old = path.read_text() if path.exists() else ""
        if old != text:
            drift.append(name)
            if args.check:
                sys.stdout.writelines(
                    difflib.unified_diff(old.splitlines(True), text.splitlines(True), name, name)
                )
            else:
                path.write_text(text)
    if args.check:
        for name in drift + stale:
            print(f"{args.out / name}: differs from `python deploy/tools/render_k8s.py`", file=sys.stderr)
        return 1 if drift or stale else 0
    for name in stale:
        print(f"{args.out / name}: no template renders it; remove it or add a template", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
