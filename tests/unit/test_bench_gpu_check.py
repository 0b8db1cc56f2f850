"""bench.gpu_check without a GPU says it did not run, never "ok", and bench.run_all reports that
status as it is: a distinct one, a failure only under --require-gpu."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_check, run_all
from bench.gpu_check import EXIT_NOT_RUN, NOT_RUN, STATUS_PREFIX


@pytest.fixture
def no_gpu(monkeypatch, tmp_path):
    """A machine without CUDA; outputs under tmp_path; no process group (the smoke run's checks
    are replaced by `rows`)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpu_check, "results_dir", lambda name: tmp_path)
    monkeypatch.setattr(gpu_check, "init_one_rank", lambda backend: None)
    monkeypatch.setattr(gpu_check.dist, "destroy_process_group", lambda: None)
    return tmp_path


def _row(precision: str, ok: bool) -> dict:
    return {
        "check": f"fsdp {precision}",
        "sharded": True,
        "first_loss": 5.5,
        "last_loss": 5.2 if ok else float("nan"),
        "sparsity": 0.5,
        "pruned_zero": True,
        "skipped_steps": 0,
        "ok": ok,
    }


def _last_status(out: str) -> str:
    return [line for line in out.splitlines() if line.startswith(STATUS_PREFIX)][-1][len(STATUS_PREFIX) :]


def test_require_gpu_without_one_runs_nothing_and_exits_non_zero(no_gpu, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "fsdp_check", lambda *a: pytest.fail("nothing may run"))
    assert gpu_check.main(["--require-gpu"]) == EXIT_NOT_RUN != 0
    out = capsys.readouterr().out
    assert NOT_RUN in out and _last_status(out) == NOT_RUN == "not run: no GPU"
    assert json.loads((no_gpu / "results.json").read_text())["status"] == NOT_RUN


def test_without_a_gpu_the_status_is_not_run_even_when_the_smoke_run_passes(no_gpu, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "fsdp_check", lambda precision, *a: _row(precision, True))
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert _last_status(out) == NOT_RUN and "all GPU checks passed" not in out
    results = json.loads((no_gpu / "results.json").read_text())
    assert results["status"] == NOT_RUN and results["gpu"] is False and results["speed"] == []
    assert (no_gpu / "table.md").read_text().startswith(f"gpu_check: {NOT_RUN}")


def test_a_failing_smoke_run_fails(no_gpu, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "fsdp_check", lambda precision, *a: _row(precision, precision == "bf16"))
    assert gpu_check.main([]) == 1
    assert _last_status(capsys.readouterr().out) == "failed: fsdp fp16"


@pytest.mark.parametrize(
    "gpu, failures, expected",
    [(True, [], "ok"), (False, [], NOT_RUN), (True, ["speed-up bf16"], "failed: speed-up bf16")],
)
def test_status(gpu, failures, expected):
    assert gpu_check.status(gpu, failures) == expected


@pytest.mark.parametrize(
    "rc, elapsed, lines, expected",
    [
        (0, 1, ["table\n"], "ok"),
        (0, 1, [f"{STATUS_PREFIX}{NOT_RUN}\n"], NOT_RUN),
        (0, 1, [f"{STATUS_PREFIX}ok\n", f"{STATUS_PREFIX}{NOT_RUN}\n"], NOT_RUN),  # the last
        (EXIT_NOT_RUN, 1, [f"{STATUS_PREFIX}{NOT_RUN}\n"], f"failed (exit 3): {NOT_RUN}"),
        (1, 1, [], "failed (exit 1)"),
        (0, 1, [f"{STATUS_PREFIX}failed: x\n"], "failed (exit 0): failed: x"),
        (-9, 60, [f"{STATUS_PREFIX}{NOT_RUN}\n"], "failed (timeout 60 s)"),
    ],
)
def test_run_all_status(rc, elapsed, lines, expected):
    assert run_all.status_of(rc, elapsed, 60, lines) == expected


def test_not_run_fails_the_run_all_only_when_asked():
    results = [{"bench": "gpu_check", "status": NOT_RUN}, {"bench": "api", "status": "ok"}]
    assert run_all.failed(results) == []
    assert run_all.failed([*results, {"bench": "load", "status": "failed (exit 1)"}]) == ["load"]
    assert run_all.STATUS_PREFIX == STATUS_PREFIX
    (bench,) = [b for b in run_all.BENCHES if b.module == "bench.gpu_check"]
    assert bench.takes_require_gpu


def test_run_all_runs_the_real_gpu_check_and_reports_not_run(tmp_path, monkeypatch):
    """The real script in its own process, as run_all starts it, on a machine without a GPU
    (CUDA hidden): its exit status and its status line, as run_all reads them."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    bench = run_all.Bench(
        "gpu_check", "bench.gpu_check", [], [], str(tmp_path), str(tmp_path), takes_require_gpu=True
    )
    monkeypatch.setattr(run_all, "QUICK_OUT", tmp_path)
    r = run_all.run_one(bench, False, tmp_path, timeout=600, require_gpu=True)
    assert r["status"] == f"failed (exit {EXIT_NOT_RUN}): {NOT_RUN}", r
    assert json.loads((tmp_path / "gpu_check" / "results.json").read_text())["status"] == NOT_RUN
    assert NOT_RUN in (tmp_path / "gpu_check.log").read_text()
