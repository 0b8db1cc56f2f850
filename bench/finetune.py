"""Fine-tune-and-compress against compression from scratch, on the same budget.

For each model and seed, four real jobs, each trained and exported exactly as a job is
(`workers.train_loop.train` in this process with a `LocalSession`, no Ray, as bench.compression
does; then `workers.export.export`, the report's `baseline` from the step-0 evaluation, report.json
and the manifest, as `workers.driver.run_job` ends a job):

- `parent`: dense, P steps, random init;
- `finetune`: `model.init: {job: parent}`, the compression plan, B steps;
- `dense_continue`: `model.init: {job: parent}`, no compression, the same B steps (the same
  optimizer, learning-rate schedule and seed as `finetune`): the control that isolates what
  compression costs, since `finetune` also trains the parent B steps more;
- `scratch`: random init, the same compression plan, the same B steps (the same budget as the
  compression job it is compared with);
- `scratch_total`: random init, the same plan stretched over P + B steps (the same budget as
  parent and fine-tune together: what the fine-tuned model cost in all).

The plan's steps are fractions of the job's steps, so "the same plan" over P + B steps prunes and
quantizes at the same points of its run. Every figure is read from the job's report.json: the
metric of the exported artifact run in onnxruntime (`accuracy`; `perplexity` for token models),
`size.ratio` (fp32 parameters / packed artifact), `sparsity.global` counted on model.packed, and
for `finetune` the `baseline` (the parent's weights evaluated at step 0). The parent's validation
curve (every evaluation of its run) is kept too, to show whether it had flattened.

    .venv/bin/python -m bench.finetune [--models resnet gpt2] [--seeds 0 1 2] [--scale 1.0]
    .venv/bin/python -m bench.finetune --replot

Writes table.md, results.json and metric_vs_size.png to bench/results/finetune/ (BENCH_OUT/finetune
when BENCH_OUT is set). Prints PASS/FAIL for each target of issue 13; exits 0 either way (a
failed target is a finding, not a crash).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from bench.common import conditions, machine, markdown_table, results_dir, save_json

log = logging.getLogger("bench.finetune")

ARMS = ("parent", "finetune", "dense_continue", "scratch", "scratch_total")
ARM_LABELS = {
    "parent": "dense parent (P steps)",
    "finetune": "fine-tune + compress (init: parent, B steps)",
    "dense_continue": "dense continue (init: parent, B steps, no compression)",
    "scratch": "compress from scratch (B steps)",
    "scratch_total": "compress from scratch (P+B steps)",
}


@dataclass(frozen=True)
class Plan:
    """One model's recipe: the spec every job shares, the budgets and the compression plan."""

    label: str
    model: dict
    data: dict
    train: dict
    parent_steps: int  # P
    compress_steps: int  # B
    sparsity: float
    # Pruning from start to end (fractions of the job's steps); QAT from `qat` (None: no int8).
    prune_from: float
    prune_to: float
    qat: float | None
    exclude: tuple[str, ...] = ()
    metric: str = "accuracy"  # or "perplexity" (lower is better)


PLANS: dict[str, Plan] = {
    # ResNet-8 (width 16) on digits: 22 steps per epoch; GMP to 80% + int8 QAT as in
    # examples/digits-resnet-gmp80-int8.yaml (pruning, then QAT once the masks are final).
    "resnet": Plan(
        label="ResNet-8 (w16), digits",
        model={"name": "resnet", "args": {"depth": 8, "width": 16}},
        data={"name": "digits", "val_fraction": 0.2},
        train={
            "batch_size": 64,
            "optimizer": "sgd",
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "lr_schedule": "cosine",
        },
        parent_steps=220,  # 10 epochs
        compress_steps=110,  # 5 epochs
        sparsity=0.8,
        prune_from=0.1,
        prune_to=0.6,
        qat=0.6,
    ),
    # A 2-layer GPT-2 (HuggingFace transformers, Conv1D layers, tied embeddings) on the built-in
    # text corpus (characters of the standard library's sources); GMP to 50% of every prunable
    # weight (global scope, the tied embedding counted once), no quantization: the target is
    # about pruning alone.
    "gpt2": Plan(
        label="GPT-2 (2 layers, 64 dims), text",
        model={
            "name": "hf_causal_lm",
            "args": {
                "config": {
                    "model_type": "gpt2",
                    "n_layer": 2,
                    "n_head": 2,
                    "n_embd": 64,
                    "n_positions": 64,
                    "resid_pdrop": 0.0,
                    "embd_pdrop": 0.0,
                    "attn_pdrop": 0.0,
                }
            },
        },
        data={"name": "text", "args": {"block_size": 64, "max_chars": 200_000}, "val_fraction": 0.1},
        train={
            "batch_size": 32,
            "optimizer": "adamw",
            "lr": 0.003,
            "momentum": 0.9,
            "weight_decay": 0.1,
            "lr_schedule": "cosine",
            "warmup_steps": 20,
            "grad_clip_norm": 1.0,
        },
        # P: long enough that the parent's validation perplexity has flattened (its last two
        # evaluations, one epoch of ~88 steps apart, within ~2%), so the target measures what
        # pruning costs rather than what more training gains.
        parent_steps=1200,
        compress_steps=300,
        sparsity=0.5,
        prune_from=0.1,
        prune_to=0.7,
        qat=None,
        metric="perplexity",
    ),
}


def compression_for(plan: Plan, steps: int) -> dict:
    """The plan over a job of `steps` steps (pure): its schedule at the same fractions of the run."""
    start, end = round(plan.prune_from * steps), round(plan.prune_to * steps)
    pruning = {
        "schedule": "cubic",
        "final_sparsity": plan.sparsity,
        "start_step": start,
        "end_step": end,
        "frequency": max(1, (end - start) // 10),
    }
    if plan.exclude:
        pruning["exclude"] = list(plan.exclude)
    out = {"pruning": pruning}
    if plan.qat is not None:
        out["quantization"] = {"mode": "qat", "bits": 8, "start_step": round(plan.qat * steps)}
    return out


def job_specs(name: str, plan: Plan, seed: int, scale: float = 1.0) -> list[tuple[str, str, dict]]:
    """(arm, job id, spec dict) of one seed, parent first (the fine-tune job starts from it)."""
    p, b = max(1, round(plan.parent_steps * scale)), max(1, round(plan.compress_steps * scale))
    parent_id = f"{name}-s{seed}-parent"

    def spec(arm: str, steps: int, compression: dict, init: dict | None = None) -> dict:
        model = {**plan.model, **({"init": init} if init else {})}
        return {
            "name": f"bench-finetune-{name}-{arm}",
            "model": model,
            "data": plan.data,
            # epochs only bounds the run: max_steps is the budget.
            "train": {**plan.train, "epochs": 100_000, "max_steps": steps, "seed": seed},
            "compression": compression,
            "checkpoint": {"every_steps": 100_000, "keep": 1},
        }

    plan_b, plan_pb = compression_for(plan, b), compression_for(plan, p + b)
    return [
        ("parent", parent_id, spec("parent", p, {})),
        ("finetune", f"{name}-s{seed}-finetune", spec("finetune", b, plan_b, {"job": parent_id})),
        (
            "dense_continue",
            f"{name}-s{seed}-dense_continue",
            spec("dense_continue", b, {}, {"job": parent_id}),
        ),
        ("scratch", f"{name}-s{seed}-scratch", spec("scratch", b, plan_b)),
        ("scratch_total", f"{name}-s{seed}-scratch_total", spec("scratch_total", p + b, plan_pb)),
    ]


def run_job(store, data, spec_dict: dict, job_id: str, latency_repeats: int) -> dict:
    """One job, trained and exported in this process the way `workers.driver.run_job` ends one:
    export, the baseline from the step-0 evaluation, report.json, manifest (which a later job's
    `model.init: {job: ...}` is resolved against)."""
    from service.artifacts import JobArtifacts
    from service.spec import parse_spec
    from service.uploads import resolve_init
    from workers import export, init_weights
    from workers.session import LocalSession
    from workers.train_loop import train

    spec = resolve_init(parse_spec(spec_dict), "default", store)
    session = LocalSession(store, job_id)
    t0 = time.perf_counter()
    summary = train(spec, data, session)
    t1 = time.perf_counter()
    run_info = {"steps": summary["step"], "train_wall_seconds": summary["wall_seconds"]}
    rep = export.export(spec, data, store, job_id, summary["step"], run_info, latency_repeats)
    init_weights.rebase(rep, init_weights.baseline_of(session.records, data.info.kind))
    arts = JobArtifacts(store, job_id)
    arts.put_json("report.json", rep)
    arts.write_manifest()
    rep["_train_s"], rep["_export_s"] = t1 - t0, time.perf_counter() - t1
    rep["_evals"] = [r for r in session.records if isinstance(r, dict) and r.get("kind") == "eval"]
    return rep


def row_of(name: str, plan: Plan, arm: str, seed: int, rep: dict) -> dict:
    base = rep.get("baseline") or {}
    return {
        "model": name,
        "arm": arm,
        "seed": seed,
        "steps": rep["steps"],
        "metric": plan.metric,
        "value": rep[plan.metric],  # of the exported artifact, run in onnxruntime
        "float_accuracy": rep.get("float_accuracy"),
        "baseline": base.get(plan.metric),  # fine-tune: the parent's weights at step 0
        "sparsity": rep["sparsity"]["global"],
        "dense_bytes": rep["size"]["dense_bytes"],
        "packed_bytes": rep["size"]["compressed_bytes"],
        "ratio": rep["size"]["ratio"],
        "artifact": rep["accuracy_source"].split()[0],
        "train_s": rep["_train_s"],
        "export_s": rep["_export_s"],
        # The run's validation curve (torch, during training): [step, metric] per evaluation.
        "evals": [
            [e["step"], e.get(f"val_{plan.metric}")] for e in rep.get("_evals", []) if not e.get("baseline")
        ],
    }


def _spread(xs: list[float]) -> dict:
    return {
        "mean": statistics.fmean(xs),
        "min": min(xs),
        "max": max(xs),
        "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
    }


def change(metric: str, value: float, ref: float) -> float:
    """`value` against `ref` (pure): accuracy in points, perplexity in percent (positive = worse)."""
    return 100 * (value / ref - 1) if metric == "perplexity" else 100 * (value - ref)


def last_eval_change(metric: str, evals: list) -> float | None:
    """The last validation evaluation of a run against the one before (`change`), None with fewer
    than two: how far the run still moved at its end (pure)."""
    vals = [v for _, v in evals if v is not None]
    return change(metric, vals[-1], vals[-2]) if len(vals) >= 2 else None


def summarise(rows: list[dict]) -> list[dict]:
    """Per model and arm: the metric, ratio and sparsity over seeds (mean, min, max, std), and the
    change against the dense parent and against the dense_continue control of the same seed,
    averaged over seeds (points of accuracy, or percent of perplexity). Pure."""
    ref = {(r["model"], r["arm"], r["seed"]): r for r in rows if r["arm"] in ("parent", "dense_continue")}
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for arm in ARMS:
            rs = [r for r in rows if r["model"] == model and r["arm"] == arm]
            if not rs:
                continue
            metric = rs[0]["metric"]

            def deltas(against: str, rs=rs, metric=metric, model=model) -> dict | None:
                ds = [
                    change(metric, r["value"], ref[(model, against, r["seed"])]["value"])
                    for r in rs
                    if (model, against, r["seed"]) in ref
                ]
                return _spread(ds) if ds else None

            tails = [last_eval_change(metric, r.get("evals") or []) for r in rs]
            tails = [t for t in tails if t is not None]
            baselines = [r["baseline"] for r in rs if r["baseline"] is not None]
            out.append(
                {
                    "model": model,
                    "arm": arm,
                    "metric": metric,
                    "seeds": len(rs),
                    "steps": rs[0]["steps"],
                    "value": _spread([r["value"] for r in rs]),
                    "vs_parent": None if arm == "parent" else deltas("parent"),
                    "vs_continue": None if arm in ("parent", "dense_continue") else deltas("dense_continue"),
                    "last_eval_change": _spread(tails) if tails else None,
                    "ratio": _spread([r["ratio"] for r in rs]),
                    "sparsity": _spread([r["sparsity"] for r in rs]),
                    "packed_bytes": statistics.fmean(r["packed_bytes"] for r in rs),
                    "artifact": rs[0]["artifact"],
                    "baseline": statistics.fmean(baselines) if baselines else None,
                }
            )
    return out


# Issue 13's targets, checked on the fine-tuned model against its dense parent (mean of seeds).
MAX_POINTS_LOST = {"resnet": 1.0}  # accuracy points
MIN_RATIO = {"resnet": 10.0}
MAX_PERPLEXITY_RISE = {"gpt2": 5.0}  # percent


def check_targets(summary: list[dict]) -> list[dict]:
    """One record per target that the summary has the rows for: what, measured, limit, passed.
    Pure. The sparsity is part of each target ("at 80%", "pruned 50%"): it must be reached too."""
    by = {(s["model"], s["arm"]): s for s in summary}
    out = []
    for model, plan in PLANS.items():
        ft, parent = by.get((model, "finetune")), by.get((model, "parent"))
        if ft is None or parent is None:
            continue
        reached = ft["sparsity"]["mean"] >= plan.sparsity - 1e-3
        if model in MAX_POINTS_LOST:
            lost = 100 * (parent["value"]["mean"] - ft["value"]["mean"])
            out.append(
                {
                    "model": model,
                    "target": f"{plan.sparsity:.0%} sparse + int8 loses <= {MAX_POINTS_LOST[model]:g} "
                    "point against the dense parent",
                    "measured": f"{-lost:+.2f} points at sparsity {ft['sparsity']['mean']:.3f}",
                    "passed": reached and lost <= MAX_POINTS_LOST[model],
                }
            )
        if model in MIN_RATIO:
            ratio = ft["ratio"]["mean"]
            out.append(
                {
                    "model": model,
                    "target": f"{plan.sparsity:.0%} sparse + int8 is >= {MIN_RATIO[model]:g}x smaller "
                    "(fp32 parameters / packed artifact)",
                    "measured": f"{ratio:.1f}x",
                    "passed": reached and ratio >= MIN_RATIO[model],
                }
            )
        if model in MAX_PERPLEXITY_RISE:
            rise = 100 * (ft["value"]["mean"] / parent["value"]["mean"] - 1)
            out.append(
                {
                    "model": model,
                    "target": f"pruned {plan.sparsity:.0%} loses <= {MAX_PERPLEXITY_RISE[model]:g}% "
                    "perplexity against the dense parent",
                    "measured": f"{rise:+.2f}% perplexity at sparsity {ft['sparsity']['mean']:.3f}",
                    "passed": reached and rise <= MAX_PERPLEXITY_RISE[model],
                }
            )
        # The same limits against the dense model trained the same B steps more: what compression
        # alone costs. Informational: issue 13 states its targets against the dense parent.
        cont = by.get((model, "dense_continue"))
        if cont is not None and (model in MAX_POINTS_LOST or model in MAX_PERPLEXITY_RISE):
            c = change(plan.metric, ft["value"]["mean"], cont["value"]["mean"])
            if model in MAX_PERPLEXITY_RISE:
                limit, what = MAX_PERPLEXITY_RISE[model], f"{c:+.2f}% perplexity"
                ok, unit = c <= limit, "% perplexity"
            else:
                limit, what = MAX_POINTS_LOST[model], f"{c:+.2f} points"
                ok, unit = -c <= limit, " point"
            out.append(
                {
                    "model": model,
                    "target": f"vs dense_continue (informational): {plan.sparsity:.0%} sparse loses "
                    f"<= {limit:g}{unit} against the dense parent trained the same B steps more",
                    "measured": f"{what} at sparsity {ft['sparsity']['mean']:.3f}",
                    "passed": reached and ok,
                    "informational": True,
                }
            )
    return out


def verdict(t: dict) -> str:
    return "PASS" if t["passed"] else "FAIL"


def _fmt(metric: str, v: float) -> str:
    return f"{100 * v:.2f}%" if metric == "accuracy" else f"{v:.3f}"


def table(summary: list[dict]) -> str:
    headers = [
        "model",
        "arm",
        "steps",
        "artifact metric (mean, min-max)",
        "std",
        "vs dense parent (same seed)",
        "vs dense_continue (same seed)",
        "step-0 baseline",
        "sparsity (packed)",
        "packed size (B)",
        "ratio vs fp32",
        "runtime artifact",
    ]
    rows = []
    for s in summary:
        m, v = s["metric"], s["value"]
        unit = "points" if m == "accuracy" else "% ppl"
        vp, vc = s["vs_parent"], s.get("vs_continue")
        rows.append(
            [
                PLANS[s["model"]].label if s["model"] in PLANS else s["model"],
                ARM_LABELS[s["arm"]],
                s["steps"],
                f"{m} {_fmt(m, v['mean'])} ({_fmt(m, v['min'])}-{_fmt(m, v['max'])})",
                f"{100 * v['std']:.2f}" if m == "accuracy" else f"{v['std']:.3f}",
                "-" if vp is None else f"{vp['mean']:+.2f} {unit}",
                "-" if vc is None else f"{vc['mean']:+.2f} {unit}",
                "-" if s["baseline"] is None else _fmt(m, s["baseline"]),
                f"{s['sparsity']['mean']:.3f}",
                f"{s['packed_bytes']:,.0f}",
                f"{s['ratio']['mean']:.1f}x",
                s["artifact"],
            ]
        )
    return markdown_table(headers, rows)


MARKERS = {"parent": "o", "finetune": "*", "dense_continue": "D", "scratch": "v", "scratch_total": "s"}
# The compressed arms share one size ratio: drawn side by side (x times this) to stay visible.
NUDGE = {"parent": 0.97, "finetune": 0.94, "dense_continue": 1.03, "scratch": 1.0, "scratch_total": 1.06}


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(s["model"] for s in summary))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        pts = [s for s in summary if s["model"] == model]
        metric = pts[0]["metric"]
        k = 100 if metric == "accuracy" else 1
        for s in pts:
            v = s["value"]
            ax.errorbar(
                [s["ratio"]["mean"] * NUDGE[s["arm"]]],
                [k * v["mean"]],
                yerr=[[k * (v["mean"] - v["min"])], [k * (v["max"] - v["mean"])]],
                fmt=MARKERS[s["arm"]],
                markersize=11 if s["arm"] == "finetune" else 7,
                capsize=3,
                label=f"{ARM_LABELS[s['arm']].split(' (')[0]} ({s['steps']} steps)",
            )
        parent = next((s for s in pts if s["arm"] == "parent"), None)
        if parent is not None:
            pm = parent["value"]["mean"]
            if model in MAX_POINTS_LOST:
                ax.axhline(k * pm - MAX_POINTS_LOST[model], color="grey", ls=":", lw=1)
                ax.text(1.0, k * pm - MAX_POINTS_LOST[model], " parent - 1 point", fontsize=8, color="grey")
            if model in MAX_PERPLEXITY_RISE:
                limit = pm * (1 + MAX_PERPLEXITY_RISE[model] / 100)
                ax.axhline(limit, color="grey", ls=":", lw=1)
                ax.text(1.0, limit, " parent + 5%", fontsize=8, color="grey")
            if model in MIN_RATIO:
                ax.axvline(MIN_RATIO[model], color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("size ratio (fp32 parameters / packed artifact; compressed arms nudged apart)")
        ax.set_ylabel(
            "accuracy of the exported artifact (%)"
            if metric == "accuracy"
            else "perplexity of the exported artifact (lower is better)"
        )
        ax.set_title(PLANS[model].label if model in PLANS else model)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Fine-tune + compress vs from scratch\n(mean of seeds, min-max bars)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(out: Path, rows: list[dict], machines: dict, args: dict) -> list[dict]:
    """table.md, results.json and the plot. `machines` and `args`: per model, the conditions and
    the command line of the run that measured it (each model may come from its own run: --keep)."""
    summary = summarise(rows)
    targets = check_targets(summary)
    md = table(summary)
    verdicts = "\n".join(f"- {verdict(t)}: {t['target']}: {t['measured']}" for t in targets)
    tails = [
        f"- {PLANS[s['model']].label if s['model'] in PLANS else s['model']}: the dense parent's last "
        f"validation evaluation against the one before: {s['last_eval_change']['mean']:+.2f}"
        f"{' points' if s['metric'] == 'accuracy' else '% perplexity'} (mean of seeds)"
        for s in summary
        if s["arm"] == "parent" and s.get("last_eval_change")
    ]
    if tails:
        verdicts += "\n\n" + "\n".join(tails)
    measured = "\n".join(f"- {model}: {conditions(m)}" for model, m in machines.items())
    (out / "table.md").write_text(f"{md}\n\n{verdicts}\n\n{measured}\n")
    save_json(
        out / "results.json",
        {"machine": machines, "args": args, "runs": rows, "summary": summary, "targets": targets},
    )
    plot(summary, out / "metric_vs_size.png")
    return targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=list(PLANS), choices=list(PLANS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--scale", type=float, default=1.0, help="Multiply every budget (P and B) by this (smoke runs)."
    )
    ap.add_argument(
        "--latency-repeats", type=int, default=20, help="Export's latency runs (not reported here)."
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-CPU machine more threads only contend; "
        "the figures are accuracy and size, not speed).",
    )
    ap.add_argument(
        "--keep",
        action="store_true",
        help="Keep the other models' runs in the existing results.json (run one model at a time).",
    )
    ap.add_argument("--replot", action="store_true", help="Redraw table and plot from results.json.")
    args = ap.parse_args()
    out = results_dir("finetune")
    if args.replot:
        doc = json.loads((out / "results.json").read_text())
        targets = write(out, doc["runs"], doc["machine"], doc["args"])
    else:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        log.setLevel(logging.INFO)
        warnings.filterwarnings("ignore")
        import torch

        from service.artifacts import LocalArtifactStore
        from service.spec import parse_spec
        from workers.data import load_dataset

        torch.set_num_threads(args.threads)
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            store = LocalArtifactStore(tmp)
            for name in args.models:
                plan = PLANS[name]
                data = None
                for seed in args.seeds:
                    for arm, job_id, spec in job_specs(name, plan, seed, args.scale):
                        if data is None:  # one dataset per model: every arm sees the same splits
                            data = load_dataset(parse_spec(spec).data)
                        rep = run_job(store, data, spec, job_id, args.latency_repeats)
                        r = row_of(name, plan, arm, seed, rep)
                        log.info(
                            "%s seed %d %-13s %5d steps  %s %.4f (baseline %s)  sparsity %.3f  %5.1fx  "
                            "(train %.0fs, export %.0fs)",
                            name, seed, arm, r["steps"], r["metric"], r["value"], r["baseline"],
                            r["sparsity"], r["ratio"], r["train_s"], r["export_s"],
                        )  # fmt: skip
                        rows.append(r)
        machines = {name: machine() for name in args.models}
        run_args = {name: vars(args) | {"out": str(out)} for name in args.models}
        if args.keep and (out / "results.json").exists():
            old = json.loads((out / "results.json").read_text())
            rows = [r for r in old["runs"] if r["model"] not in args.models] + rows
            machines = {k: v for k, v in old["machine"].items() if k not in args.models} | machines
            run_args = {k: v for k, v in old["args"].items() if k not in args.models} | run_args
        targets = write(out, rows, machines, run_args)
    print((out / "table.md").read_text())
    for t in targets:
        print(f"{verdict(t)} [{t['model']}] {t['target']}: {t['measured']}")


if __name__ == "__main__":
    main()
