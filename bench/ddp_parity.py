"""DDP parity: steady-state samples/s of the same model, data and steps through

  (a) `slimtrain run` (Ray Train, 2 workers),
  (b) a plain PyTorch DDP script under `torchrun --nproc_per_node 2` (bench/torchrun_plain.py),
  (c) slimtrain's own loop under torchrun, no Ray (bench/torchrun_slimtrain.py),

interleaved over several rounds on this machine. Target: (a)/(b) >= 0.95.

    .venv/bin/python -m bench.ddp_parity [--rounds 3] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from bench.common import machine, markdown_table, median, out_dir, save_json

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WARMUP_WINDOWS = 2


def bench_spec(steps: int) -> dict:
    # Compute-bound enough that per-step framework costs would show: ~0.8M-parameter MLP,
    # 128 samples per worker per step, gradients all-reduced over gloo every step.
    return {
        "name": "ddp-parity",
        "model": {"name": "mlp", "args": {"hidden": [1024, 512]}},
        "data": {"name": "synthetic", "args": {"n_samples": 60000, "n_features": 256, "n_classes": 20}},
        "train": {
            "epochs": 100,
            "max_steps": steps,
            "batch_size": 256,
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "lr_schedule": "constant",
            "log_every_steps": 20,
            "eval_every_steps": steps,
        },
        "parallel": {"strategy": "ddp", "workers": 2},
        "precision": "fp32",
        "checkpoint": {"every_steps": steps, "keep": 1},
        "retries": 0,
    }


def steady(rates: list[float]) -> float:
    return median(rates[WARMUP_WINDOWS:] if len(rates) > WARMUP_WINDOWS + 2 else rates)


def run_slimtrain(spec_path: Path, tmp: Path) -> list[float]:
    out = tmp / "ray-job"
    subprocess.run(
        [str(BIN / "slimtrain"), "run", str(spec_path), "--out", str(out), "--json"],
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=900,
    )
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["samples_per_second"] for r in recs if r["kind"] == "train"]


def run_torchrun(script: str, spec_path: Path, tmp: Path) -> list[float]:
    res = tmp / f"{Path(script).stem}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", script, str(spec_path), str(res)],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=900,
    )
    return json.loads(res.read_text())["rates"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    out = out_dir("ddp_parity")
    results: dict[str, list[float]] = {
        "slimtrain run (Ray Train)": [],
        "plain torchrun DDP": [],
        "slimtrain loop under torchrun": [],
    }
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        spec_path = tmp / "spec.yaml"
        spec_path.write_text(yaml.safe_dump(bench_spec(args.steps)))
        for r in range(args.rounds):
            # Interleave the three so drift in machine load hits all of them alike.
            order = [0, 1, 2] if r % 2 == 0 else [2, 1, 0]
            for i in order:
                if i == 0:
                    rates = run_slimtrain(spec_path, tmp / f"r{r}")
                elif i == 1:
                    rates = run_torchrun("bench/torchrun_plain.py", spec_path, tmp)
                else:
                    rates = run_torchrun("bench/torchrun_slimtrain.py", spec_path, tmp)
                name = list(results)[i]
                results[name].append(steady(rates))
                print(f"round {r} {name}: {results[name][-1]:.0f} samples/s", flush=True)
    plain = median(results["plain torchrun DDP"])
    rows = [
        [name, median(v), median(v) / plain, ", ".join(f"{x:.0f}" for x in v)] for name, v in results.items()
    ]
    table = markdown_table(["path", "median samples/s", "ratio to plain torchrun", "per round"], rows)
    (out / "table.md").write_text(table + "\n")
    save_json(
        out / "results.json", {"results": results, "machine": machine(), "spec": bench_spec(args.steps)}
    )
    _plot(results, out / "ddp_parity.png")
    print(table)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(results)
    ax.bar(range(len(names)), [median(results[n]) for n in names], color=["#4c72b0", "#999999", "#55a868"])
    for i, n in enumerate(names):
        ax.plot([i] * len(results[n]), results[n], "k.", ms=6)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("steady-state samples/s (2 workers)")
    ax.set_title("DDP parity: medians (bars) and rounds (dots)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
