"""CLI input errors exit 2 with the field named (no traceback)."""

import json

from typer.testing import CliRunner

from api.cli import app

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
