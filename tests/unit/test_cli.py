"""The CLI without a server: input errors exit 2 with the field named (no traceback), where it
finds the API token, `report` of folders and ids, the jobs table's ids, the progress bar."""

import io
import json
import stat
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from api import render_jobs
from api.cli import RunProgress, StepsColumn, app
from api.client import NoToken, config_path, read_config, resolve_credentials, write_config
from service.records import Phase, phase_record
from service.settings import get_settings

runner = CliRunner()


def test_validate_bad_spec_exits_2_naming_the_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nmodel: {name: lenet5}\ndata: {name: digits}\ntrain: {optimizer: adam}\n")
    r = runner.invoke(app, ["validate", str(p)])
    assert r.exit_code == 2
    assert "train.optimizer" in r.output and "'sgd' or 'adamw'" in r.output
    assert "Traceback" not in r.output


def test_run_bad_spec_exits_2_before_starting_ray(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"name": "x", "model": {"name": "nope"}, "data": {"name": "digits"}}))
    r = runner.invoke(app, ["run", str(p)])
    assert r.exit_code == 2 and "model.name" in r.output


def test_missing_file_exits_2(tmp_path):
    r = runner.invoke(app, ["run", str(tmp_path / "none.yaml")])
    assert r.exit_code == 2 and "No such file" in r.output


def test_validate_fills_defaults(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text("name: x\nmodel: {name: lenet5}\ndata: {name: digits}\n")
    r = runner.invoke(app, ["validate", str(p)])
    assert r.exit_code == 0 and json.loads(r.stdout)["train"]["epochs"] == 10


def test_report_of_a_folder(tmp_path):
    (tmp_path / "report.json").write_text(
        json.dumps(
            {
                "name": "n",
                "job_id": "j",
                "accuracy": 0.9,
                "size": {"dense_bytes": 10, "compressed_bytes": 2, "ratio": 5.0},
            }
        )
    )
    r = runner.invoke(app, ["report", str(tmp_path), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["accuracy"] == 0.9
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 0 and "5.0x" in r.stdout


# --- where the CLI finds the API's token ---------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty HOME and no SLIMTRAIN_/XDG variables: nothing of the machine's own setup leaks in."""
    for var in ("SLIMTRAIN_TOKEN", "SLIMTRAIN_URL", "XDG_CONFIG_HOME", "SLIMTRAIN_API_TOKENS"):
        monkeypatch.delenv(var, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("SLIMTRAIN_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield home
    get_settings.cache_clear()


def _config(home: Path, text: str) -> Path:
    path = home / ".config" / "slimtrain" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _data_dir_token(token):
    return lambda: (token, Path("/data/api-tokens"))


def test_token_order_flag_env_config_data_dir(home, monkeypatch):
    def resolve(url=None, token=None):
        return resolve_credentials(url, token, data_dir_token=_data_dir_token("from-data-dir"))

    assert resolve().source == "/data/api-tokens"  # the last resort: a server on this machine
    _config(home, 'url = "http://127.0.0.1:8000"\ntoken = "from-config"\n')
    assert resolve().token == "from-config"
    monkeypatch.setenv("SLIMTRAIN_TOKEN", "from-env")
    assert resolve().token == "from-env"
    assert resolve(token="from-flag").token == "from-flag"


def test_config_file_gives_the_url_and_respects_xdg(home, monkeypatch, tmp_path):
    xdg = tmp_path / "xdg"
    (xdg / "slimtrain").mkdir(parents=True)
    (xdg / "slimtrain" / "config.toml").write_text('url = "http://gpu-box:9000/"\ntoken = "t-xdg"\n')
    _config(home, 'token = "t-home"\n')
    monkeypatch.setenv("XDG_CONFIG_HOME", str(xdg))
    creds = resolve_credentials(None, None)
    assert (creds.url, creds.token) == ("http://gpu-box:9000/", "t-xdg")
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")  # the XDG rules: only absolute paths
    assert resolve_credentials(None, None).token == "t-home"


def test_stored_tokens_are_not_sent_to_another_server(home):
    _config(home, 'url = "http://127.0.0.1:8000"\ntoken = "for-local"\n')
    with pytest.raises(NoToken) as e:
        resolve_credentials("http://elsewhere:8000", None, data_dir_token=_data_dir_token("local-too"))
    msg = str(e.value)
    assert "its token is for http://127.0.0.1:8000" in msg and "only for a server on this machine" in msg


def test_no_token_exits_2_naming_every_place_looked(home):
    r = runner.invoke(app, ["jobs"])
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    for place in (
        "--token",
        "SLIMTRAIN_TOKEN",
        str(home / ".config" / "slimtrain" / "config.toml"),
        "api-tokens",
    ):
        assert place in out, place
    assert "Traceback" not in r.output


def test_malformed_config_exits_2_naming_the_file(home):
    path = _config(home, 'token = "unterminated\n')
    r = runner.invoke(app, ["jobs"])
    assert r.exit_code == 2 and "not valid TOML" in r.output and "config.toml" in " ".join(r.output.split())
    path.write_text("token = 42\n")
    r = runner.invoke(app, ["jobs"])
    assert r.exit_code == 2 and "token must be a non-empty string" in r.output


def test_serve_writes_the_config_once_mode_0600_and_never_over_the_users(home):
    path = config_path()
    assert write_config(path, "http://127.0.0.1:8000", "tok-1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_config(path) == {"url": "http://127.0.0.1:8000", "token": "tok-1"}
    assert write_config(path, "http://127.0.0.1:8001", "tok-2")  # still serve's own file: replaced
    assert read_config(path)["token"] == "tok-2"
    path.write_text('token = "mine"\n')  # the user's file (no mark): left alone
    assert not write_config(path, "http://127.0.0.1:8000", "tok-3")
    assert read_config(path) == {"token": "mine"}


# --- report: a folder or a job id -----------------------------------------------------------------


@pytest.mark.parametrize("target", ["runs/x", "./x", "~/nowhere-slimtrain-test"])
def test_report_of_a_missing_folder_says_so(home, target):
    r = runner.invoke(app, ["report", target, "--url", "http://127.0.0.1:9", "--token", "t" * 20])
    assert r.exit_code == 2, r.output
    assert f"folder {target} does not exist" in r.output and "unreachable" not in r.output


def test_report_of_neither_a_folder_nor_a_job_id(home):
    r = runner.invoke(app, ["report", "no such", "--url", "http://127.0.0.1:9", "--token", "t" * 20])
    assert r.exit_code == 2 and "neither a folder here nor a job id" in r.output


def test_report_of_a_folder_without_a_report_and_of_a_report_file(tmp_path):
    r = runner.invoke(app, ["report", str(tmp_path)])
    assert r.exit_code == 2 and "report.json does not exist" in " ".join(r.output.split())
    (tmp_path / "report.json").write_text(json.dumps({"name": "n", "accuracy": 0.5}))
    r = runner.invoke(app, ["report", str(tmp_path / "report.json"), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["accuracy"] == 0.5


def test_report_of_an_id_that_is_not_here_mentions_both(home):
    r = runner.invoke(
        app, ["report", "20990101-000000-abcdef00", "--url", "http://127.0.0.1:9", "--token", "t" * 20]
    )
    assert r.exit_code == 3 and "no folder '20990101-000000-abcdef00' here" in " ".join(r.output.split())


# --- jobs: ids are never broken ----------------------------------------------------------------------


def test_jobs_table_keeps_each_id_whole_at_80_columns(monkeypatch):
    jobs = [
        {
            "id": f"20990101-00000{i}-0123abcd",
            "name": "a-rather-long-job-name-that-needs-room-" * 2,
            "state": "running",
            "progress": {"step": 120, "total_steps": 600, "val_accuracy": 0.91, "sparsity": 0.5},
            "created_at": "2099-01-01T00:00:00+00:00",
            "reason": "waiting for resources: needs 2 CPU; 0 CPU free " * 3,
        }
        for i in range(3)
    ]
    monkeypatch.setenv("COLUMNS", "80")
    console = Console(file=io.StringIO(), width=80)
    console.print(render_jobs.jobs_table(jobs))
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for j in jobs:
        assert [line for line in text.splitlines() if j["id"] in line], f"{j['id']} broken:\n{text}"


def test_jobs_table_shows_the_phase_of_a_running_job():
    job = {"state": "running", "progress": {"phase": "exporting", "step": 600, "total_steps": 600}}
    assert render_jobs._progress(job).startswith("exporting  step 600/600")
    assert "exporting" not in render_jobs._progress({**job, "state": "succeeded"})


# --- the progress bar: phases with their own progress, no made-up state ----------------------------


def _seen(bar: RunProgress) -> tuple[str, float | None, str]:
    task = bar.progress.tasks[0]
    return task.description, task.total, StepsColumn().render(task).plain


def test_progress_follows_states_and_phases_never_showing_none():
    bar = RunProgress(enabled=False, state="queued", reason="waiting for the scheduler")
    seen = [_seen(bar)]
    bar.state_changed("queued", "waiting for the scheduler")  # the replayed first event
    seen.append(_seen(bar))
    for state in ("starting", "running"):
        bar.state_changed(state)
        seen.append(_seen(bar))
    records = [
        phase_record(Phase.PREPARING),
        phase_record(Phase.WAITING_FOR_WORKERS, total_steps=600),
        {"kind": "event", "event": "start", "step": 0, "total_steps": 600, "attempt": 1},
        phase_record(Phase.TRAINING, step=0, total_steps=600),
        {"kind": "train", "step": 300, "loss": 0.5},
        {"kind": "train", "step": 600, "loss": 0.25},
        phase_record(Phase.EXPORTING),
        phase_record(Phase.VERIFYING),
        phase_record(Phase.DONE),
    ]
    for rec in records:
        bar(rec)
        seen.append(_seen(bar))
    bar.state_changed("succeeded")
    seen.append(_seen(bar))
    labels = [d for d, _, _ in seen]
    assert labels[:4] == ["queued", "queued", "starting", "running"]  # no "starting" before "queued"
    assert [d for i, d in enumerate(labels) if i == 0 or d != labels[i - 1]] == [
        "queued",
        "starting",
        "running",
        "preparing",
        "waiting for workers",
        "training",
        "exporting",
        "verifying",
        "done",
        "succeeded",
    ]
    assert ("training", 600, "300/600") in seen and ("training", 600, "600/600") in seen
    assert all("None" not in steps for _, _, steps in seen)
    # outside training: a spinner and a pulsing bar, no step count
    assert all(steps == "" for d, _, steps in seen if d != "training")


def test_a_running_state_event_does_not_hide_the_phase():
    bar = RunProgress(enabled=False, state="starting")
    bar(phase_record(Phase.PREPARING))  # the driver's first record may come before "running"
    bar.state_changed("running")
    assert _seen(bar)[0] == "preparing"
    bar.state_changed("queued", "attempt 1 failed; resubmitting")  # a retry starts anew
    assert _seen(bar)[0] == "queued"


def test_report_shows_one_latency_where_the_dense_model_is_what_ships():
    from rich.console import Console

    from api.render import report_table

    rep = {
        "latency_ms": {"dense": 0.5, "compressed": 0.5, "dense_batch64": 2.0, "compressed_batch64": 2.0},
        "latency_setup": {"runtime": "onnxruntime", "statistic": "median", "same_artifact": True},
    }
    console = Console(width=200, record=True)
    console.print(report_table(rep))
    text = console.export_text()
    assert "1.00x" not in text
    assert "the dense model is what ships" in text
    rep["latency_setup"]["same_artifact"] = False
    rep["latency_ms"]["compressed_batch64"] = 1.0
    console = Console(width=200, record=True)
    console.print(report_table(rep))
    assert "(2.00x)" in console.export_text()


def test_the_cli_runs_as_a_module_with_every_command_group():
    """`python -m api.cli` (how the Ray tests and the docs start it) imports its command groups
    without a cycle: api.sweep_cli once imported api.cli, which under -m is a second module."""
    import subprocess
    import sys

    for group in ("model", "dataset", "sweep"):
        done = subprocess.run(
            [sys.executable, "-m", "api.cli", group, "--help"], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr


def test_report_says_where_it_trained_by_rank_and_older_reports_say_nothing():
    from rich.console import Console

    from api.render import devices_text, report_table

    assert devices_text(["cpu", "cpu"]) == "2 x cpu"
    assert devices_text(["cuda:0 (NVIDIA H200)"]) == "cuda:0 (NVIDIA H200)"
    assert devices_text(["cuda:0 (A)", "cuda:0 (A)", "cuda:1 (A)"]) == "2 x cuda:0 (A), cuda:1 (A)"
    assert devices_text(None) is None and devices_text([]) is None
    console = Console(width=200, record=True)
    console.print(report_table({"devices": ["cpu", "cpu"]}))
    text = console.export_text()
    assert "trained on" in text and "2 x cpu" in text
    console = Console(width=200, record=True)
    console.print(report_table({}))
    assert "trained on" not in console.export_text()
