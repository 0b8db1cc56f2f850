"""The CLI client against a real API server (uvicorn on loopback, SQLite, Ray stand-in): exit
codes (0 ok, 1 job failed, 2 bad input, 3 unreachable), --json, submit --wait, download."""

from __future__ import annotations

import json
import threading

import pytest
from typer.testing import CliRunner

from api.app import create_app
from api.cli import app as cli
from service.artifacts import JobArtifacts, LocalArtifactStore
from service.outcome import Outcome, write_outcome
from service.settings import Settings
from tests.conftest import wait_for
from tests.plugins.fake_ray import FAILED, RUNNING, SUCCEEDED, FakeRay
from tests.plugins.server import serve_app

pytestmark = pytest.mark.integration
TOKEN = "cli-token-0123456789abcdef"
runner = CliRunner()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("cli")
    settings = Settings(
        data_dir=data,
        api_tokens=f"{TOKEN}:cli",
        scheduler_interval_s=0.1,
        reconcile_interval_s=0.1,
        ingest_interval_s=0.1,
    )
    ray, artifacts = FakeRay(cpu=64), LocalArtifactStore(data / "artifacts")
    with serve_app(create_app(settings, ray=ray, artifacts=artifacts)) as url:
        yield url, ray, artifacts


@pytest.fixture
def spec_file(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("name: cli-job\nmodel: {name: mlp}\ndata: {name: digits}\ntrain: {epochs: 1}\n")
    return p


def run(server, *args, token=TOKEN):
    url = server[0]
    return runner.invoke(cli, [*args, "--url", url, *(["--token", token] if token else [])])


def finish_when_submitted(ray: FakeRay, artifacts, succeed: bool):
    """Play the Ray side of the first new submission."""
    before = set(ray.jobs)

    def play():
        sid = wait_for(lambda: next(iter(set(ray.jobs) - before), None), 20, 0.05, "a submission")
        arts = JobArtifacts(artifacts, sid)
        ray.set(sid, RUNNING)
        arts.put_bytes(
            "metrics.jsonl",
            b'{"kind": "phase", "phase": "preparing", "time": 1.0}\n'
            b'{"kind": "phase", "phase": "waiting_for_workers", "total_steps": 22, "time": 2.0}\n'
            b'{"kind": "event", "event": "start", "step": 0, "total_steps": 22}\n'
            b'{"kind": "phase", "phase": "training", "step": 0, "total_steps": 22, "time": 3.0}\n'
            b'{"kind": "train", "step": 22, "loss": 0.5}\n'
            b'{"kind": "eval", "step": 22, "val_accuracy": 0.9}\n'
            b'{"kind": "phase", "phase": "exporting", "time": 4.0}\n'
            b'{"kind": "phase", "phase": "verifying", "time": 5.5}\n',
        )
        if succeed:
            arts.put_json("report.json", {"name": "cli-job", "job_id": sid, "accuracy": 0.9})
            arts.write_manifest()
            write_outcome(arts, Outcome(1, "succeeded"))  # after the manifest, as the entrypoint does
            ray.set(sid, SUCCEEDED)
        else:
            write_outcome(arts, Outcome(1, "failed", "training_failed", "loss became NaN"))
            ray.set(sid, FAILED, "exit code 1")

    t = threading.Thread(target=play, daemon=True)
    t.start()
    return t


def test_submit_wait_succeeds_with_the_report(server, spec_file):
    t = finish_when_submitted(server[1], server[2], succeed=True)
    r = run(server, "submit", str(spec_file), "--wait")
    t.join(5)
    assert r.exit_code == 0, r.output
    assert "succeeded" in r.output and "Report: cli-job" in r.output and "Traceback" not in r.output
    # each state and phase once, in order: no replayed "queued" after the submit line
    lines = [line.strip() for line in r.stderr.splitlines() if line.strip() and "━" not in line]  # no bar
    assert lines[0].endswith("queued: waiting for the scheduler")
    said = [line.split(":")[0].split("  (")[0] for line in lines[1:]]
    # (the fake Ray may finish before the reconciler sees it running)
    assert [x for x in said if x != "running"] == [
        "starting",
        "preparing",
        "waiting for workers",
        "training from step 0 of 22",
        "exporting",
        "verifying",
        "succeeded",
    ], r.stderr
    assert "verifying  (exporting took 1.5 s)" in r.stderr
    assert "None" not in r.stderr


def test_submit_wait_json_exits_1_when_the_job_fails(server, spec_file):
    t = finish_when_submitted(server[1], server[2], succeed=False)
    r = run(server, "submit", str(spec_file), "--wait", "--json")
    t.join(5)
    assert r.exit_code == 1
    job = json.loads(r.stdout)
    assert job["state"] == "failed" and job["error"]["code"] == "training_failed"
    assert "loss became NaN" in r.stderr


def test_submit_without_wait_prints_the_id_and_idempotency_key_repeats_it(server, spec_file):
    a = run(server, "submit", str(spec_file), "--idempotency-key", "cli-k")
    b = run(server, "submit", str(spec_file), "--idempotency-key", "cli-k")
    assert a.exit_code == b.exit_code == 0 and a.stdout.strip() == b.stdout.strip()
    status = run(server, "status", a.stdout.strip(), "--json")
    assert json.loads(status.stdout)["id"] == a.stdout.strip()
    assert run(server, "cancel", a.stdout.strip()).exit_code == 0
    again = run(server, "cancel", a.stdout.strip())
    assert again.exit_code == 2 and "invalid_state" in again.output


def test_bad_input_exits_2_naming_the_field(server, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {name: mlp}\ndata: {name: digits}\nparallel: {workers: 9999}\n")
    r = run(server, "submit", str(bad))
    assert r.exit_code == 2 and "parallel.workers" in r.output and "Traceback" not in r.output
    r = run(server, "submit", str(tmp_path / "missing.yaml"))
    assert r.exit_code == 2
    r = run(server, "status", "20990101-000000-00000000")
    assert r.exit_code == 2 and "job_not_found" in r.output
    r = run(server, "jobs", "--state", "paused")
    assert r.exit_code == 2 and "state" in r.output


def test_server_side_limits_exit_2(server, tmp_path):
    big = tmp_path / "big.yaml"  # valid locally, above this server's max_workers (64)
    big.write_text(
        "name: x\nmodel: {name: mlp}\ndata: {name: digits}\n"
        "parallel: {workers: 128}\ntrain: {batch_size: 128}\n"
    )
    r = run(server, "submit", str(big))
    assert r.exit_code == 2 and "above this server's limit (64)" in r.output


def test_auth_and_reachability_exit_codes(server):
    r = run(server, "jobs", token="not-the-token-0000000")
    assert r.exit_code == 2 and "unauthorized" in r.output
    r = runner.invoke(cli, ["jobs", "--url", "http://127.0.0.1:9", "--token", TOKEN])
    assert r.exit_code == 3 and "unreachable" in r.output and "Traceback" not in r.output


def test_jobs_logs_report_and_download(server, spec_file, tmp_path):
    t = finish_when_submitted(server[1], server[2], succeed=True)
    r = run(server, "submit", str(spec_file), "--wait", "--json")
    t.join(5)
    job_id = json.loads(r.stdout)["id"]
    listed = json.loads(run(server, "jobs", "--json", "--state", "succeeded").stdout)["items"]
    assert job_id in [j["id"] for j in listed]
    # the job's progress keeps the driver's last phase and the total it announced
    progress = json.loads(run(server, "status", job_id, "--json").stdout)["progress"]
    assert (progress["phase"], progress["total_steps"]) == ("verifying", 22)
    table = runner.invoke(cli, ["jobs", "--url", server[0], "--token", TOKEN], env={"COLUMNS": "80"}).stdout
    assert "cli-job" in table and max(map(len, table.splitlines())) <= 80
    assert [line for line in table.splitlines() if job_id in line], table  # `| grep ID` finds it
    server[1].jobs[job_id].log = "hello from the driver\n"
    assert run(server, "logs", job_id).stdout == f"=== attempt 1 ({job_id}) ===\nhello from the driver\n"
    assert "hello from the driver" in run(server, "logs", job_id, "-f").stdout
    assert json.loads(run(server, "report", job_id, "--json").stdout)["accuracy"] == 0.9
    arts = JobArtifacts(server[2], job_id)
    arts.put_bytes("checkpoints/step-00000022/meta.json", b"{}")
    arts.write_manifest()
    r = run(server, "download", job_id, str(tmp_path / "out"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "report.json").is_file() and not (tmp_path / "out" / "checkpoints").exists()
    # what the manifest lists, and the manifest: not the reconciler's outcome.json
    got = {p.name for p in (tmp_path / "out").iterdir()} - {".slimtrain-job"}
    assert got == set(json.loads((tmp_path / "out" / "manifest.json").read_text())["files"]) | {
        "manifest.json"
    }
    assert arts.exists("outcome.json") and not (tmp_path / "out" / "outcome.json").exists()
    assert run(server, "download", job_id, str(tmp_path / "out")).exit_code == 0  # its own folder again
    arts.put_bytes("report.json", b'{"tampered": true}')  # no longer what the manifest says
    r = run(server, "download", job_id, str(tmp_path / "again"))
    assert r.exit_code == 3 and "checksum mismatch: report.json" in r.output


def _finished_job(server, spec_file) -> str:
    t = finish_when_submitted(server[1], server[2], succeed=True)
    r = run(server, "submit", str(spec_file), "--wait", "--json")
    t.join(5)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)["id"]


def test_download_refuses_a_folder_holding_another_jobs_files(server, spec_file, tmp_path):
    a, b = _finished_job(server, spec_file), _finished_job(server, spec_file)
    dest = tmp_path / "out"
    assert run(server, "download", a, str(dest)).exit_code == 0
    r = run(server, "download", b, str(dest))
    assert (
        r.exit_code == 2 and f"holds job {a}'s files" in " ".join(r.output.split()) and "--force" in r.output
    )
    assert json.loads((dest / "report.json").read_text())["job_id"] == a  # untouched
    r = run(server, "download", b, str(dest), "--force")
    assert r.exit_code == 0, r.output
    assert json.loads((dest / "report.json").read_text())["job_id"] == b
    assert (dest / ".slimtrain-job").read_text().strip() == b
    # a folder of the user's own with a clashing name is not overwritten either
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.json").write_text("my notes")
    r = run(server, "download", a, str(mine))
    assert r.exit_code == 2 and "report.json" in r.output and (mine / "report.json").read_text() == "my notes"


def test_download_verifies_a_job_finished_before_the_one_manifest_shape(server, spec_file, tmp_path):
    job_id = _finished_job(server, spec_file)
    arts = JobArtifacts(server[2], job_id)
    files = arts.get_json("manifest.json")["files"]
    old = {"job_id": job_id, "artifacts": [{"name": n, **e} for n, e in files.items()]}
    arts.put_json("manifest.json", old)
    r = run(server, "download", job_id, str(tmp_path / "old"))
    assert r.exit_code == 0, r.output
    assert (tmp_path / "old" / "report.json").is_file()
    arts.put_bytes("report.json", b'{"tampered": true}')
    r = run(server, "download", job_id, str(tmp_path / "old2"))
    assert r.exit_code == 3 and "checksum mismatch: report.json" in r.output
