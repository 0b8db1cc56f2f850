"""bench.gpu_jobs: every job it would run is a valid spec; without a GPU it says it did not run;
a job that fails is a failed row and a failed bench, and a run cut short keeps what it finished."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_jobs
from bench.gpu_check import EXIT_NOT_RUN, NOT_RUN, STATUS_PREFIX
from service.spec import parse_spec


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_jobs, "results_dir", lambda name: tmp_path)
    return tmp_path


def _ok(name, raw, device, work) -> dict:
    return {"job": name, "precision": "fp32", "ok": True, "error": None, "accuracy": 0.9}


def _status(out: str) -> str:
    return [line for line in out.splitlines() if line.startswith(STATUS_PREFIX)][-1][len(STATUS_PREFIX) :]


def test_every_job_is_a_valid_spec_and_the_variants_change_what_they_name():
    jobs = gpu_jobs.jobs()
    assert set(gpu_jobs.VARIANTS) <= set(jobs) and gpu_jobs.SMOKE in jobs
    for name, raw in jobs.items():
        assert parse_spec(raw).name == raw["name"], name
    ptq = parse_spec(jobs["digits-gmp90-fp16-ptq"])
    assert (ptq.precision, ptq.compression.quantization.mode) == ("fp16", "ptq")
    assert ptq.compression.pruning.final_sparsity == 0.9  # the example's own, kept by the merge
    assert parse_spec(jobs["digits-resnet-channels50"]).compression.pruning.structure == "channel"


def test_merged_replaces_leaves_and_keeps_the_rest():
    base = {"a": 1, "b": {"c": 2, "d": 3}, "e": None}
    assert gpu_jobs.merged(base, {"b": {"c": 9}, "e": {"f": 1}}) == {
        "a": 1,
        "b": {"c": 9, "d": 3},
        "e": {"f": 1},
    }
    assert base == {"a": 1, "b": {"c": 2, "d": 3}, "e": None}  # not changed in place


def test_require_gpu_without_one_runs_nothing(no_gpu, monkeypatch, capsys):
    monkeypatch.setattr(gpu_jobs, "run_job", lambda *a: pytest.fail("nothing may run"))
    assert gpu_jobs.main(["--require-gpu"]) == EXIT_NOT_RUN
    assert _status(capsys.readouterr().out) == NOT_RUN


def test_without_a_gpu_the_smoke_run_passing_is_still_not_run(no_gpu, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(gpu_jobs, "run_job", lambda name, *a: ran.append(name) or _ok(name, *a))
    assert gpu_jobs.main([]) == 0
    assert ran == [gpu_jobs.SMOKE] and _status(capsys.readouterr().out) == NOT_RUN
    saved = json.loads((no_gpu / "results.json").read_text())
    assert (
        saved["status"] == NOT_RUN
        and saved["gpu"] is False
        and "only the script" in (no_gpu / "table.md").read_text()
    )


def test_a_failed_job_fails_the_bench_and_names_the_job(no_gpu, capsys):
    bad = {**gpu_jobs.jobs()[gpu_jobs.SMOKE], "precision": "fp8"}
    row = gpu_jobs.run_job("bad", bad, torch.device("cpu"), no_gpu)
    assert row["ok"] is False and "precision" in row["error"] and "Traceback" in row["traceback"]
    verdict, text = gpu_jobs.write(no_gpu, {}, True, "test", [row], done=True)
    assert verdict == "failed: bad" and "fp8" in text


def test_a_run_cut_short_keeps_its_finished_jobs_and_says_so(no_gpu):
    rows = [_ok("a", None, None, None)]
    verdict, _ = gpu_jobs.write(no_gpu, {}, True, "test", rows, done=False)
    assert verdict == "incomplete: 1 jobs finished" != "ok"
    assert json.loads((no_gpu / "results.json").read_text())["jobs"][0]["job"] == "a"
    assert gpu_jobs.write(no_gpu, {}, True, "test", rows, done=True)[0] == "ok"


def test_an_unknown_job_name_is_a_usage_error(no_gpu, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_jobs.main(["--only", "no-such-job"])
    assert e.value.code == 2 and "no-such-job" in capsys.readouterr().err
