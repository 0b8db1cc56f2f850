"""Doors that must stay locked: every port of `slimtrain serve`'s embedded Ray head (and of the
test suite's own heads) listens on loopback only; its secrets are files only their owner can read;
`/metrics` shows nothing without the operator's metrics token, and a tenant's API token is not it."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from api.app import create_app
from service.artifacts import JobArtifacts, LocalArtifactStore
from service.settings import Settings
from tests.conftest import wait_for
from tests.plugins.fake_ray import RUNNING, FakeRay
from tests.plugins.server import ROOT, serve_app, wait_ready
from tests.raycluster import free_port, start_head

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
ALICE, BOB = "alice-token-0123456789", "bob-token-0123456789ab"
METRICS = "metrics-token-0123456789abcdef"


# --- what listens -----------------------------------------------------------------------------


def is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    # gRPC binds IPv4 loopback as the IPv4-mapped IPv6 address ::ffff:127.0.0.1
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def tree(root: int | None, marker: str) -> list[psutil.Process]:
    """`root` and its descendants, plus any process whose command line names `marker` (a Ray
    process re-parented to init still carries its session directory)."""
    procs = {}
    if root is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            top = psutil.Process(root)
            for p in [top, *top.children(recursive=True)]:
                procs[p.pid] = p
    for p in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            if marker in " ".join(p.info["cmdline"] or ()):
                procs[p.pid] = p
                for c in p.children(recursive=True):
                    procs[c.pid] = c
    return list(procs.values())


def listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP socket in LISTEN state the processes hold."""
    out = []
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            name = p.name()
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    out.append((name, c.laddr.ip, c.laddr.port))
    return out


def exposed(sockets: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [s for s in sockets if not is_loopback(s[1])]


def test_is_loopback():
    for ip in ("127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"):
        assert is_loopback(ip), ip
    for ip in ("0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2", "10.0.0.1"):
        assert not is_loopback(ip), ip


@dataclass
class Served:
    proc: subprocess.Popen
    url: str
    home: Path
    data_dir: Path
    ray_tmp: Path
    log: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """`slimtrain serve` as a user starts it: no Ray address, no tokens configured; its own
    HOME (where Ray keeps its token) and Ray temp dir, so the test finds its processes and files."""
    base = tmp_path_factory.mktemp("serve")
    home, ray_tmp = base / "home", Path("/tmp") / f"stray-sec-{os.getpid()}-{free_port()}"
    home.mkdir()
    data_dir = base / "data"  # serve creates it
    port = free_port()
    # XDG_CONFIG_HOME goes too: serve writes the CLI's config.toml there, and it must land in
    # this test's HOME, never in the real user's folder.
    drop = {
        "RAY_ADDRESS",
        "RAY_AUTH_TOKEN",
        "RAY_AUTH_TOKEN_PATH",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
        "XDG_CONFIG_HOME",
    }
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLIMTRAIN_")}
    env |= {
        "HOME": str(home),
        "RAY_TMPDIR": str(ray_tmp),
        "SLIMTRAIN_DATA_DIR": str(data_dir),
        "SLIMTRAIN_RAY_DASHBOARD_PORT": str(free_port()),
        "SLIMTRAIN_RUN_SCHEDULER": "false",
    }
    log = base / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "slimtrain"), "serve", "--port", str(port)],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    served = Served(proc, f"http://127.0.0.1:{port}", home, data_dir, ray_tmp, log)
    try:
        wait_ready(served.url, 180, proc)
        yield served
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)
        # whatever Ray left behind (raylet workers outlive a killed driver briefly)
        for p in tree(proc.pid, str(ray_tmp)):
            with contextlib.suppress(psutil.Error):
                p.kill()
        subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def _serve_processes(s: Served) -> list[psutil.Process]:
    return tree(s.proc.pid, str(s.ray_tmp))


def test_serve_ray_listens_on_loopback_only(served):
    # Ray starts its idle workers (each a gRPC server) after the head is up: wait for them, so
    # every kind of Ray process is among those checked.
    kinds = ("gcs_server", "raylet", "DashboardAgent", "ray::IDLE")

    def all_kinds():
        procs = _serve_processes(served)
        names = " ".join(" ".join(p.cmdline()) for p in procs if p.is_running())
        return all(k in names for k in kinds) and procs

    procs = wait_for(all_kinds, 90, 0.5, f"{kinds} under slimtrain serve")
    time.sleep(2)  # let the last worker bind
    sockets = listening(_serve_processes(served))
    names = {n for n, _, _ in sockets}
    assert {"gcs_server", "raylet"} <= names, sockets
    assert len(sockets) >= 8, sockets  # API, GCS, raylet x2, dashboard, agents, workers
    assert exposed(sockets) == [], f"listening beyond loopback: {exposed(sockets)}"
    assert len(procs) >= 5


def test_serve_says_where_ray_is(served):
    text = wait_for(lambda: "embedded Ray head" in (t := served.log.read_text()) and t, 10, 0.2, "message")
    line = next(li for li in text.splitlines() if "embedded Ray head" in li)
    assert "embedded Ray head at 127.0.0.1:" in line and "loopback" in line, line


def test_serve_secrets_are_private(served):
    """The Ray token file (Ray writes it world-readable when it creates it) and the generated
    API token file: 0600, in directories only their owner can list."""
    ray_token = served.home / ".ray" / "auth_token"
    api_tokens = served.data_dir / "api-tokens"
    for f in (ray_token, api_tokens):
        assert f.is_file(), f
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f"{f}: {oct(f.stat().st_mode)}"
    for d in (ray_token.parent, served.data_dir):
        assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0, f"{d}: {oct(d.stat().st_mode)}"


def test_test_suite_ray_head_listens_on_loopback_only():
    head = start_head(num_cpus=1, tag="sec")
    try:
        procs = wait_for(
            lambda: (ps := tree(None, str(head.temp_dir))) and "raylet" in {p.name() for p in ps} and ps,
            60,
            0.5,
            "the test head's processes",
        )
        time.sleep(2)
        sockets = listening(tree(None, str(head.temp_dir)))
        assert len(procs) >= 3 and len(sockets) >= 5, sockets
        assert exposed(sockets) == [], f"listening beyond loopback: {exposed(sockets)}"
    finally:
        head.stop()


# --- /metrics ---------------------------------------------------------------------------------


@dataclass
class MetricsApi:
    url: str
    running: dict[str, str]  # tenant -> id of a running job with progress

    def get(self, token: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(self.url + "/metrics", headers=headers, timeout=30)


@contextlib.contextmanager
def _metrics_api(tmp_path: Path, metrics_token: str | None) -> Iterator[MetricsApi]:
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
        api_tokens=f"{ALICE}:alice,{BOB}:bob",
        metrics_token=metrics_token,
        scheduler_interval_s=0.1,
        reconcile_interval_s=0.1,
        ingest_interval_s=0.1,
    )
    ray = FakeRay(cpu=1000)
    artifacts = LocalArtifactStore(tmp_path / "artifacts")
    with serve_app(create_app(settings, ray=ray, artifacts=artifacts)) as url:
        running = {}
        for tenant, token in (("alice", ALICE), ("bob", BOB)):
            h = {"Authorization": f"Bearer {token}"}
            spec = {"name": f"{tenant}-job", "model": {"name": "mlp"}, "data": {"name": "digits"}}
            job = httpx.post(url + "/v1/jobs", json=spec, headers=h, timeout=30).json()
            wait_for(lambda j=job: j["id"] in ray.jobs, 10, 0.05, "submission")
            ray.set(job["id"], RUNNING)
            JobArtifacts(artifacts, job["id"]).put_bytes(
                "metrics.jsonl", b'{"kind": "train", "step": 3, "loss": 0.5, "sparsity": 0.1}\n'
            )

            def stepped(j=job, h=h):
                r = httpx.get(f"{url}/v1/jobs/{j['id']}", headers=h, timeout=30).json()
                return r["state"] == "running" and (r.get("progress") or {}).get("step") == 3

            wait_for(stepped, 15, 0.05, f"{tenant}'s job running with progress")
            running[tenant] = job["id"]
        yield MetricsApi(url, running)


@pytest.fixture(scope="module")
def metrics_api(tmp_path_factory) -> Iterator[MetricsApi]:
    with _metrics_api(tmp_path_factory.mktemp("metrics"), METRICS) as api:
        yield api


def _unauthorized(r: httpx.Response, api: MetricsApi) -> str:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == "unauthorized"
    for job_id in api.running.values():
        assert job_id not in r.text
    return body["error"]["message"]


def test_metrics_token_reads_every_series(metrics_api):
    r = metrics_api.get(METRICS)
    assert r.status_code == 200, r.text
    for tenant, job_id in metrics_api.running.items():
        assert f'slimtrain_job_loss{{job_id="{job_id}",tenant="{tenant}"}} 0.5' in r.text
    assert 'slimtrain_jobs{state="running"} 2.0' in r.text


def test_metrics_without_token_is_401_json(metrics_api):
    message = _unauthorized(metrics_api.get(), metrics_api)
    assert "SLIMTRAIN_METRICS_TOKEN" in message
    _unauthorized(metrics_api.get("not-the-metrics-token-0123456789"), metrics_api)
    r = httpx.get(metrics_api.url + "/metrics", headers={"Authorization": f"Basic {METRICS}"}, timeout=30)
    _unauthorized(r, metrics_api)


def test_tenant_api_token_reads_no_job_series(metrics_api):
    """A tenant's API token is not the metrics token: it sees neither its own series nor, above
    all, another tenant's job ids and figures (its own jobs' metrics are under /v1/jobs)."""
    for token in (ALICE, BOB):
        message = _unauthorized(metrics_api.get(token), metrics_api)
        assert "metrics token" in message
    own = httpx.get(
        f"{metrics_api.url}/v1/jobs/{metrics_api.running['alice']}/metrics",
        headers={"Authorization": f"Bearer {ALICE}"},
        timeout=30,
    )
    assert own.status_code == 200 and own.json()["items"][0]["data"]["loss"] == 0.5
    other = httpx.get(
        f"{metrics_api.url}/v1/jobs/{metrics_api.running['bob']}/metrics",
        headers={"Authorization": f"Bearer {ALICE}"},
        timeout=30,
    )
    assert other.status_code == 404


def test_metrics_closed_when_no_metrics_token_configured(tmp_path):
    with _metrics_api(tmp_path, None) as api:
        for token in (None, ALICE, METRICS):
            message = _unauthorized(api.get(token), api)
            assert "SLIMTRAIN_METRICS_TOKEN" in message


def test_deploy_gives_prometheus_the_metrics_token():
    """Compose and Kubernetes set SLIMTRAIN_METRICS_TOKEN on the API, and compose's Prometheus
    sends the same secret (a file, never in prometheus.yml) on its scrape of /metrics."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    [api_job] = [j for j in prom["scrape_configs"] if j["job_name"] == "slimtrain-api"]
    assert api_job["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/metrics_token"}
    assert "metrics_token" in compose["services"]["prometheus"]["secrets"]
    assert compose["secrets"]["metrics_token"] == {"environment": "SLIMTRAIN_METRICS_TOKEN"}
    api_env = compose["services"]["api"]["environment"]
    assert api_env["SLIMTRAIN_METRICS_TOKEN"].startswith("${SLIMTRAIN_METRICS_TOKEN:?")
    env_example = (ROOT / "deploy" / ".env.example").read_text()
    assert "\nSLIMTRAIN_METRICS_TOKEN=change-me-" in env_example

    k8s = ROOT / "deploy" / "k8s"
    secret = yaml.safe_load((k8s / "secrets.yaml").read_text())
    assert secret["stringData"]["metrics-token"].startswith("change-me-")
    docs = yaml.safe_load_all((k8s / "api.yaml").read_text())
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["SLIMTRAIN_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "slimtrain-secrets",
        "key": "metrics-token",
    }
