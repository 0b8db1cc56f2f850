"""Every command the images run — Dockerfile CMDs and health checks, compose commands, the
Kubernetes API container and the RayCluster's `ray start` parameters — names a command that
exists and options it accepts: `slimtrain ...` is parsed by the package's own CLI (its console
script in pyproject.toml), `ray ...` by Ray's, `python -c` code must compile."""

from __future__ import annotations

import json
import re
import shlex
import tomllib

import click
import pytest
import typer.main
import yaml
from ray.scripts.scripts import cli as ray_cli

from api.cli import app as slimtrain_app
from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
IMAGES = {"api": DEPLOY / "Dockerfile.api", "ray": DEPLOY / "Dockerfile.ray"}


def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def check_command(argv: list[str]) -> None:
    """Parse argv with the real CLI that would run it; raises on an unknown command or option."""
    program, args = argv[0], argv[1:]
    if program == "slimtrain":
        assert console_scripts()["slimtrain"] == "api.cli:main"
        group = typer.main.get_command(slimtrain_app)
    elif program == "ray":
        group = ray_cli
    elif program == "python":
        assert args[0] == "-c", argv
        compile(args[1], "<healthcheck>", "exec")
        return
    else:
        raise AssertionError(f"{argv}: not a command these images provide")
    name, rest = args[0], args[1:]
    assert name in group.commands, f"{program} has no command {name!r}"
    # Typer ships its own click: each CLI parses with its own Context class.
    parent = group.make_context(program, [name], resilient_parsing=True)
    group.commands[name].make_context(name, list(rest), parent=parent)


def dockerfile_instructions(path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_dockerfile_cmd_and_healthcheck_name_real_commands(image):
    instructions = dockerfile_instructions(IMAGES[image])
    assert not [i for i in instructions if i[0] == "ENTRYPOINT"], "images run CMD directly"
    cmds = [rest for word, rest in instructions if word == "CMD"]
    assert cmds, "no CMD"
    check_command(json.loads(cmds[-1]))  # exec form: no shell between Docker and the command
    for word, rest in instructions:
        if word == "HEALTHCHECK":
            check_command(json.loads(rest.split(" CMD ", 1)[1]))
    users = [rest for word, rest in instructions if word == "USER"]
    assert users and users[-1] != "root", "the image must not run as root"


def test_dockerfiles_install_the_right_torch_build():
    ray_df, api_df = IMAGES["ray"].read_text(), IMAGES["api"].read_text()
    # Ray: the CUDA build unless TORCH_BUILD=cpu picks the locked CPU build, and torch before
    # the package, so that pip keeps that build for `torch>=...`
    assert re.search(r"TORCH_INDEX_URL=https://download.pytorch.org/whl/cu\d+", ray_df)
    assert "ARG TORCH_BUILD=cuda" in ray_df and '"$TORCH_BUILD" = cpu' in ray_df
    assert ray_df.index('pip install "torch==') < ray_df.index("pip install --no-deps .")
    # API: no torch at all; the import check in its build proves the API needs none
    assert "torch==" not in api_df and "--drop torch " in api_df
    assert "check_api_imports.py" in api_df
    for df in (ray_df, api_df):
        assert "--require-hashes" in df  # the locked versions the tests ran against
        assert "RAY_AUTH_MODE=token" in df


def test_api_image_has_what_the_dashboard_reads_from_the_source_tree():
    from api.routes.dashboard import EXAMPLES_DIR

    assert EXAMPLES_DIR == ROOT / "examples"  # beside api/: the image keeps that layout
    df = IMAGES["api"].read_text()
    assert "COPY examples ./examples" in df and "pip install --no-deps -e ." in df
    assert "!examples/" in (DEPLOY / "Dockerfile.api.dockerignore").read_text()


def test_compose_commands_name_real_commands():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    checked = 0
    for svc in compose["services"].values():
        if "build" not in svc:
            continue  # third-party images run their own commands
        check_command(svc["command"])
        test = svc["healthcheck"]["test"]
        if test[0] == "CMD":
            check_command(test[1:])
        checked += 1
    assert checked == 4  # api, ray-head, ray-worker, ray-worker-cpu


def test_kubernetes_commands_and_ray_start_params_are_accepted():
    paths = sorted((DEPLOY / "k8s").glob("*.yaml"))
    docs = [d for p in paths for d in yaml.safe_load_all(p.read_text()) if d]
    [api] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "slimtrain-api"]
    [container] = api["spec"]["template"]["spec"]["containers"]
    check_command(container["command"])
    [rc] = [d for d in docs if d["kind"] == "RayCluster"]
    groups = [(True, rc["spec"]["headGroupSpec"])] + [(False, g) for g in rc["spec"]["workerGroupSpecs"]]
    for head, group in groups:
        # KubeRay turns each rayStartParams entry into --key=value after `ray start`
        args = ["start", "--head" if head else "--address=slimtrain-head-svc:6379", "--block"]
        args += [f"--{k}={v}" for k, v in group["rayStartParams"].items()]
        check_command(["ray", *args])
        for c in group["template"]["spec"]["containers"]:
            for probe in ("readinessProbe", "livenessProbe"):
                cmd = c[probe]["exec"]["command"]
                if cmd[0] == "ray":
                    check_command(cmd)
                else:  # a shell probe: it must at least be valid shell
                    assert cmd[:2] == ["sh", "-c"] and shlex.split(cmd[2])


def test_the_checks_can_fail():
    with pytest.raises(click.NoSuchOption):
        check_command(["ray", "start", "--head", "--no-such-flag"])
    with pytest.raises(AssertionError, match="no command"):
        check_command(["slimtrain", "no-such-command"])
    with pytest.raises(AssertionError, match="not a command"):
        check_command(["uvicorn", "api.app:app"])
