"""Every example job, trained on one GPU and exported, as a worker of a GPU job does it:
`python -m bench.gpu_jobs [--only NAME ...] [--require-gpu]`.

bench.gpu_check covers FSDP and mixed precision in a few steps. This runs the whole of each job in
`examples/` (and two variants the examples lack: fp16 with int8 PTQ, and channel pruning) through
the training loop on `cuda:0` (one rank, `workers.session.LocalSession`: no Ray, which the GPU
machines this was written for do not have) and then `workers.export.export`, which writes every
artifact, checks them against each other and measures them. A job passes when both finish and
the report has its accuracy, sparsity and size. What a CPU run cannot show: a tensor left on the
wrong device, a dtype an op lacks on the GPU, an export that reads GPU weights.

Without CUDA the status is "not run: no GPU" (as bench.gpu_check's); then the dense digits job
runs on the CPU only so that the script itself is exercised. Writes
bench/results/gpu_jobs/{table.md,results.json} (BENCH_OUT/gpu_jobs with BENCH_OUT set)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml

from bench.common import ROOT, machine, markdown_table, results_dir, save_json
from bench.gpu_check import EXIT_NOT_RUN, NOT_RUN, STATUS_PREFIX, first_gpu

EXAMPLES = ROOT / "examples"
# Jobs beside the examples: what no example trains (name -> (example, changes to it)).
VARIANTS = {
    "digits-gmp90-fp16-ptq": (
        "digits-gmp90.yaml",
        {"precision": "fp16", "compression": {"quantization": {"mode": "ptq", "bits": 8}}},
    ),
    "digits-resnet-channels50": (
        "digits-resnet-dense.yaml",
        {
            "precision": "bf16",
            "compression": {
                "pruning": {
                    "schedule": "cubic",
                    "final_sparsity": 0.5,
                    "start_step": 30,
                    "end_step": 180,
                    "frequency": 15,
                    "structure": "channel",
                }
            },
        },
    ),
}
SMOKE = "digits-dense"  # the CPU run's one job


def merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = merged(out.get(k) or {}, v) if isinstance(v, dict) else v
    return out


def jobs() -> dict[str, dict]:
    """name -> raw spec: every example (sweeps are not jobs), then the variants."""
    out = {p.stem: yaml.safe_load(p.read_text()) for p in sorted(EXAMPLES.glob("*.yaml"))}
    for name, (example, changes) in VARIANTS.items():
        out[name] = merged(yaml.safe_load((EXAMPLES / example).read_text()), {"name": name, **changes})
    return out


def run_job(name: str, raw: dict, device: torch.device, work: Path) -> dict:
    """Train `raw` on `device` as rank 0 of 1, export it; what the table shows."""
    from service.artifacts import LocalArtifactStore
    from service.spec import parse_spec
    from workers import export, train_loop
    from workers.data import load_dataset
    from workers.parallel import Dist
    from workers.session import LocalSession

    row: dict = {"job": name, "precision": raw.get("precision", "fp32"), "ok": False, "error": None}
    try:
        spec = parse_spec(raw)
        data = load_dataset(spec.data)
        store = LocalArtifactStore(work / name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        summary = train_loop.train(spec, data, LocalSession(store, name, Dist(0, 1, device)))
        row["train_s"] = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            # Evidence that the loop trained on the GPU, not beside it on the CPU.
            row["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["steps"], row["devices"] = summary["step"], summary["devices"]
        t0 = time.perf_counter()
        if getattr(data, "streamed", False):  # as the driver: export scores the validation split
            data = data.for_export(export.CALIBRATION_SAMPLES)
        rep = export.export(spec, data, store, name, summary["step"], {})
        row["export_s"] = time.perf_counter() - t0
        row["accuracy"] = rep["accuracy"]
        row["accuracy_source"] = rep["accuracy_source"]
        row["sparsity"] = rep["sparsity"]["global"]
        row["size_ratio"] = rep["size"]["ratio"]
        row["ok"] = all(row.get(k) is not None for k in ("accuracy", "sparsity", "size_ratio"))
    except Exception as e:  # a failed job is a row of the table, not the end of the bench
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()
        print(row["traceback"], file=sys.stderr, flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", help="Job names (example file stems or variants).")
    ap.add_argument(
        "--require-gpu", action="store_true", help=f"without CUDA run nothing, exit {EXIT_NOT_RUN}"
    )
    a = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    out = results_dir("gpu_jobs")
    if not gpu and a.require_gpu:
        print(f"gpu_jobs: {NOT_RUN} (--require-gpu: nothing ran)\n{STATUS_PREFIX}{NOT_RUN}", flush=True)
        return EXIT_NOT_RUN
    all_jobs = jobs()
    names = a.only or (list(all_jobs) if gpu else [SMOKE])
    if unknown := sorted(set(names) - set(all_jobs)):
        ap.error(f"--only: unknown {unknown}; allowed: {', '.join(all_jobs)}")
    gpu, device = first_gpu()
    if not gpu:
        print(f"gpu_jobs: {NOT_RUN}. Running {names} on the CPU to exercise the script only.", flush=True)
    m = machine()
    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({NOT_RUN}: only the script is tested)"
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="slimtrain-gpu-jobs-") as tmp:
        for name in names:
            row = run_job(name, all_jobs[name], device, Path(tmp))
            print({k: v for k, v in row.items() if k != "traceback"}, flush=True)
            rows.append(row)
            # after every job: a run stopped at a time limit keeps what it finished
            verdict, text = write(out, m, gpu, where, rows, done=len(rows) == len(names))
    print(text)
    print(f"{STATUS_PREFIX}{verdict}", flush=True)
    return 0 if verdict in ("ok", NOT_RUN) else 1


def write(out: Path, m: dict, gpu: bool, where: str, rows: list[dict], done: bool) -> tuple[str, str]:
    failures = [r["job"] for r in rows if not r["ok"]]
    if failures:
        verdict = "failed: " + ", ".join(failures)
    elif not done:
        verdict = f"incomplete: {len(rows)} jobs finished"
    else:
        verdict = "ok" if gpu else NOT_RUN
    cols = [
        "job",
        "precision",
        "steps",
        "train_s",
        "gpu_peak_mib",
        "export_s",
        "accuracy",
        "sparsity",
        "size_ratio",
    ]
    table = markdown_table(
        [*cols, "ok", "error"], [[r.get(c) for c in cols] + [r["ok"], r["error"]] for r in rows]
    )
    text = f"Trained and exported on {where}, one rank, no Ray. Status: {verdict}.\n\n{table}\n"
    (out / "table.md").write_text(text)
    save_json(out / "results.json", {"machine": m, "status": verdict, "gpu": gpu, "jobs": rows})
    return verdict, text


if __name__ == "__main__":
    sys.exit(main())
