"""Pruning overhead: the whole step loop with the examples' pruning schedules, against dense.

Each case trains one model three ways on the same batches, in one process and one thread:
dense; pruned with the schedule (and clipping) of an example spec, masks updated as the loop
updates them; and pruned the same way with the mask thresholds found by the bisection that
every update used before (`kth_smallest_bisect`, which sharded ranks still use), so the cost
of the old updates is measured in the same run. Rounds interleave the three, in a rotating order.

What is timed per step is what the training loop runs per step: `update_masks` (a no-op except
at the schedule's update steps, where it recomputes the masks, checks them and measures the
sparsity) and `train_step` (forward, backward, gradient masking, optimizer step, weight
masking, clipping). Data loading, evaluation and checkpoints are the same for every variant
and are left out. Two clocks: wall time, and this thread's CPU time, which on a machine shared
with other work does not count the slices the scheduler gave to other processes.

Separately, one mask update (`Pruner.update`, the threshold and the masks) is timed on each
case's model with both selections, each time from the weights as the update before it left them.

    .venv/bin/python -m bench.pruning_overhead [--rounds 2] [--steps N] [--update-repeats 15]
        [--models lenet5 mlp] [--out DIR]

Writes table.md, results.json (with the run's conditions) and pruning_overhead.png to
bench/results/pruning_overhead/ (committed), or --out.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.common import conditions, machine, markdown_table, median, results_dir, save_json
from service.artifacts import LocalArtifactStore
from service.spec import parse_spec
from workers import train_loop
from workers.compression import pruning, schedules
from workers.data import load_dataset
from workers.parallel.base import Dist
from workers.session import LocalSession
from workers.train_loop import train

ROOT = Path(__file__).resolve().parent.parent

LENET = ({"name": "lenet5"}, {"name": "digits"}, 64)
MLP = (
    {"name": "mlp", "args": {"hidden": [1024, 512]}},
    {"name": "synthetic", "args": {"n_samples": 30000, "n_features": 256, "n_classes": 20}},
    256,
)
# (label, model/data/batch, the example whose compression block is used). The mlp runs with
# both examples' schedules: synthetic-large's is the mlp example's, digits-gmp90's updates
# twice as often and under global scope (the most updates any example makes).
CASES = [
    ("mlp 1024-512 / synthetic, batch 256", MLP, "digits-gmp90.yaml"),
    ("lenet5 / digits, batch 64", LENET, "digits-gmp90.yaml"),
    ("mlp 1024-512 / synthetic, batch 256", MLP, "synthetic-large.yaml"),
]
VARIANTS = ("dense", "pruned", "pruned, bisection")


def example_compression(example: str) -> dict:
    """The example's pruning and clipping blocks (its quantization is not pruning's cost)."""
    spec = yaml.safe_load((ROOT / "examples" / example).read_text())
    comp = spec.get("compression", {})
    return {k: comp[k] for k in ("pruning", "clipping") if k in comp}


def spec(model, data, batch, steps, compression: dict | None):
    s = {
        "name": "overhead",
        "model": model,
        "data": data,
        "train": {
            "epochs": 1000,
            "max_steps": steps,
            "batch_size": batch,
            "lr_schedule": "constant",
            "log_every_steps": steps,
            "eval_every_steps": steps,
        },
        "checkpoint": {"every_steps": steps},
    }
    if compression:
        s["compression"] = compression
    return parse_spec(s)


class Clocks:
    """Wraps the loop's `update_masks` and `train_step` (train() looks both names up in its
    module at each step) and adds up wall and thread CPU time inside them; the update steps'
    `update_masks` calls are also kept one by one."""

    def __init__(self):
        self.wall = self.cpu = 0.0
        self.updates: list[tuple[float, float]] = []
        self.inner_step, self.inner_update = train_loop.train_step, train_loop.update_masks

    def step(self, run, x, y):
        w, c = time.perf_counter(), time.thread_time()
        try:
            return self.inner_step(run, x, y)
        finally:
            self.wall += time.perf_counter() - w
            self.cpu += time.thread_time() - c

    def update(self, run, session):
        before = run.pruner.last_update if run.pruner is not None else None
        w, c = time.perf_counter(), time.thread_time()
        try:
            return self.inner_update(run, session)
        finally:
            dw, dc = time.perf_counter() - w, time.thread_time() - c
            self.wall += dw
            self.cpu += dc
            if run.pruner is not None and run.pruner.last_update != before:
                self.updates.append((dw, dc))

    def __enter__(self):
        train_loop.train_step, train_loop.update_masks = self.step, self.update
        return self

    def __exit__(self, *exc):
        train_loop.train_step, train_loop.update_masks = self.inner_step, self.inner_update


class Bisection:
    """Thresholds by bisection where the loop would select them locally: the old updates."""

    def __enter__(self):
        self.local = pruning.kth_smallest_local
        pruning.kth_smallest_local = pruning.kth_smallest_bisect

    def __exit__(self, *exc):
        pruning.kth_smallest_local = self.local


def run_once(s, data, bisection: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp, Clocks() as clk:
        if bisection:
            with Bisection():
                out = train(s, data, LocalSession(LocalArtifactStore(tmp), "o"))
        else:
            out = train(s, data, LocalSession(LocalArtifactStore(tmp), "o"))
    # The loop's last update_masks call follows the last step; per step means per trained step.
    n = out["step"]
    return {
        "wall_ms_per_step": 1000 * clk.wall / n,
        "cpu_ms_per_step": 1000 * clk.cpu / n,
        "updates": len(clk.updates),
        "update_wall_ms": [1000 * w for w, _ in clk.updates],
        "update_cpu_ms": [1000 * c for _, c in clk.updates],
    }


def one_update_ms(s, data, repeats: int) -> dict:
    """Median wall and CPU ms of one `Pruner.update` at the schedule's middle update, with the
    local selection and with the bisection. The weights are first pruned by the update before
    it, as in the loop: the runs of exact zeros earlier updates leave are part of the cost (a
    selection that compares values slowed down tenfold on them)."""
    run = train_loop.build(s, data, Dist())
    p, cfg = run.pruner, s.compression.pruning
    ups = [t for t in range(cfg.start_step, cfg.end_step + 1) if schedules.is_update_step(cfg, t)]
    prev, step = ups[len(ups) // 2 - 1], ups[len(ups) // 2]
    p.update(prev)
    saved = {n: w.detach().clone() for n, w in p.weights.items()}
    saved_masks = {n: m.clone() for n, m in p.masks.items()}
    out = {
        "step": step,
        "target_sparsity": schedules.target_sparsity(cfg, step),
        "from_sparsity": schedules.target_sparsity(cfg, prev),
    }
    masks = {}
    for name, ctx in (("bisection", Bisection), ("local", None)):
        walls, cpus = [], []
        for _ in range(repeats):
            with torch.no_grad():
                for n, w in p.weights.items():
                    w.copy_(saved[n])
            p.masks = {n: m.clone() for n, m in saved_masks.items()}
            p.last_update = prev
            w0, c0 = time.perf_counter(), time.thread_time()
            if ctx is None:
                p.update(step)
            else:
                with ctx():
                    p.update(step)
            walls.append(1000 * (time.perf_counter() - w0))
            cpus.append(1000 * (time.thread_time() - c0))
        masks[name] = {n: m.clone() for n, m in p.masks.items()}
        out[name] = {"wall_ms": median(walls), "cpu_ms": median(cpus), "wall_all": walls, "cpu_all": cpus}
    # The point of the change: the same masks, cheaper.
    out["same_masks"] = all(torch.equal(masks["local"][n], masks["bisection"][n]) for n in masks["local"])
    out["params"] = sum(w.numel() for w in p.weights.values())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    # 2 rounds x 3 variants x 3 cases: about 5 minutes of CPU time here.
    ap.add_argument("--rounds", type=int, default=2)
    # By default each case runs 20 steps past its schedule's end (600 or 800), so a run pays
    # for every update; the two examples' own runs last 660 and 936 steps.
    ap.add_argument("--steps", type=int, help="Steps per run (default: the schedule's end + 20).")
    ap.add_argument("--update-repeats", type=int, default=15)
    ap.add_argument(
        "--models",
        nargs="+",
        choices=sorted({c[1][0]["name"] for c in CASES}),
        help="Only the cases of these models (run_all's quick mode: lenet5).",
    )
    ap.add_argument(
        "--out", type=Path, help="Default: bench/results/pruning_overhead (committed), or BENCH_OUT's."
    )
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out = args.out or results_dir("pruning_overhead")
    args.out.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()
    cases = []
    for label, (model, data_cfg, batch), example in CASES:
        if args.models and model["name"] not in args.models:
            continue
        comp = example_compression(example)
        steps = args.steps or comp["pruning"]["end_step"] + 20
        specs = {
            "dense": spec(model, data_cfg, batch, steps, None),
            "pruned": spec(model, data_cfg, batch, steps, comp),
        }
        specs["pruned, bisection"] = specs["pruned"]
        data = load_dataset(specs["dense"].data)
        update = one_update_ms(specs["pruned"], data, args.update_repeats)
        # Warm-up (allocator, kernels): a short dense run.
        run_once(spec(model, data_cfg, batch, 100, None), data, False)
        runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
            for v in order:
                runs[v].append(run_once(specs[v], data, v == "pruned, bisection"))
        case = {
            "label": label,
            "example": f"examples/{example}",
            "steps": steps,
            "compression": comp,
            "one_update": update,
            "runs": runs,
        }
        cases.append(case)
        print(label, example, _summary(case), flush=True)
        # After every case, so a run cut short on a loaded machine keeps what it measured.
        write(args, cases, time.monotonic() - t_all)
    print((args.out / "table.md").read_text())


def write(args, cases: list[dict], elapsed: float) -> None:
    cond = {**machine(), "torch_threads": torch.get_num_threads()}
    note = (
        f"{args.rounds} interleaved rounds per case, each variant's run as many steps as the case "
        f"(its schedule's end + 20 unless --steps); one process, "
        f"1 thread, fp32; one-update timings: median of {args.update_repeats}; "
        f"{elapsed:.0f} s in all. {conditions(cond)}"
    )
    (args.out / "table.md").write_text(render(cases) + "\n\n" + note + "\n")
    meta = {**vars(args), "out": str(args.out)}
    save_json(args.out / "results.json", {"machine": cond, "args": meta, "cases": cases, "note": note})
    plot(cases, args.out / "pruning_overhead.png")


def _paired(case: dict, variant: str, key: str) -> float:
    """Median over rounds of variant/dense: each round's runs ran close together and share
    the machine's load of the moment."""
    runs = case["runs"]
    return median([v[key] / d[key] for v, d in zip(runs[variant], runs["dense"], strict=True)])


def _ms(case: dict, variant: str, key: str) -> float:
    return median([r[key] for r in case["runs"][variant]])


def _summary(case: dict) -> dict:
    return {
        v: (round(_ms(case, v, "cpu_ms_per_step"), 3), round(_paired(case, v, "cpu_ms_per_step"), 3))
        for v in VARIANTS
    }


def _update_ms(case: dict, variant: str, key: str) -> float:
    return median([x for r in case["runs"][variant] for x in r[key]])


def render(cases: list[dict]) -> str:
    loop_rows, update_rows = [], []
    for c in cases:
        sched = c["compression"]["pruning"]
        what = (
            f"{c['label']}; {c['example']}: {sched.get('schedule')} to {sched['final_sparsity']}, "
            f"steps {sched['start_step']}-{sched['end_step']} every {sched['frequency']}, "
            f"{sched.get('scope', 'global')} scope"
            + (", clipping" if "clipping" in c["compression"] else "")
            + f"; {c['steps']} steps"
        )
        for clock, key in (("wall", "wall_ms_per_step"), ("CPU", "cpu_ms_per_step")):
            loop_rows.append(
                [
                    what,
                    clock,
                    _ms(c, "dense", key),
                    _ms(c, "pruned", key),
                    _paired(c, "pruned", key),
                    _ms(c, "pruned, bisection", key),
                    _paired(c, "pruned, bisection", key),
                ]
            )
        u = c["one_update"]
        update_rows.append(
            [
                what,
                f"{u['params']:,}",
                f"{u['step']} ({u['from_sparsity']:.3f} -> {u['target_sparsity']:.3f})",
                u["bisection"]["wall_ms"],
                u["local"]["wall_ms"],
                u["bisection"]["cpu_ms"],
                u["local"]["cpu_ms"],
                u["bisection"]["cpu_ms"] / u["local"]["cpu_ms"],
                "yes" if u["same_masks"] else "NO",
                _update_ms(c, "pruned, bisection", "update_cpu_ms"),
                _update_ms(c, "pruned", "update_cpu_ms"),
                int(median([r["updates"] for r in c["runs"]["pruned"]])),
            ]
        )
    loop = markdown_table(
        [
            "case",
            "clock",
            "dense ms/step",
            "pruned ms/step",
            "pruned / dense",
            "pruned (bisection) ms/step",
            "pruned (bisection) / dense",
        ],
        loop_rows,
    )
    upd = markdown_table(
        [
            "case",
            "pruned weights",
            "update at step (sparsity before -> target)",
            "bisection wall ms",
            "local wall ms",
            "bisection CPU ms",
            "local CPU ms",
            "CPU speed-up",
            "same masks",
            "in the loop, bisection: CPU ms per update",
            "in the loop, local: CPU ms per update",
            "updates per run",
        ],
        update_rows,
    )
    return (
        "## The step loop (update_masks + train_step), median ms per step; ratios: median of "
        "per-round ratios\n\n" + loop + "\n\n## One mask update: bisection (before) and local "
        "selection (after)\n\n" + upd
    )


def plot(cases: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(cases) + 1
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 7.6), squeeze=False)
    for row, (clock, key) in enumerate((("CPU", "cpu"), ("wall", "wall"))):
        for ax, c in zip(axes[row], cases, strict=False):
            data = [[r[f"{key}_ms_per_step"] for r in c["runs"][v]] for v in VARIANTS]
            ax.boxplot(data, tick_labels=["dense", "pruned", "pruned,\nbisection"])
            ax.set_title(f"{c['label']}\n{c['example']}", fontsize=8)
            ax.set_ylabel(f"{clock} ms / step (update_masks + train_step)", fontsize=8)
        ax = axes[row][-1]
        x = np.arange(len(cases))
        ax.bar(x - 0.2, [c["one_update"]["bisection"][f"{key}_ms"] for c in cases], 0.4, label="bisection")
        ax.bar(x + 0.2, [c["one_update"]["local"][f"{key}_ms"] for c in cases], 0.4, label="local selection")
        ticks = [f"{c['label'].split(' /')[0]}\n{c['example'].split('/')[-1]}" for c in cases]
        ax.set_xticks(x, ticks, fontsize=7)
        ax.set_ylabel(f"{clock} ms per mask update", fontsize=8)
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.set_title("one mask update (Pruner.update)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
