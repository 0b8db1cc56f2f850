"""GPU check for model-parallel training, one command, a few minutes on one H100:

1. FSDP on one GPU (a one-rank NCCL group, `fully_shard` per block) through the training loop's
   own `build`/`train_step`, in bf16 and in fp16 (mixed-precision policy + autocast, sharded grad
   scaler), with GMP pruning active: the loss must fall, stay finite, and pruned weights must be
   exactly zero.
2. The AMP speed-up over fp32 for gpt (plain single-GPU training steps, the model big enough
   to be compute-bound): anchor 2-3x on tensor-core GPUs; fewer than 1.5x fails.

    .venv/bin/python -m bench.gpu_check [--steps 30] [--min-speedup 1.5]

Prints a table, writes bench/results/gpu_check/{table.md,results.json}, exits 1 when a check fails.
Without CUDA the GPU checks are NOT RUN, and the script says so: its status (the last line,
`bench status: not run: no GPU`, which bench.run_all reports as the bench's status, and
`status` in results.json) is "not run: no GPU", never "ok". It then runs check 1 on CPU over
gloo with a tiny model, only so that the script itself is exercised, and exits 0 (1 if that
smoke run fails). With --require-gpu it runs nothing and exits 3.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

from bench.common import machine, markdown_table, results_dir, save_json

FLAGSHIP = {"n_layer": 4, "n_head": 8, "n_embd": 512}  # ~12.7 M parameters
SPEED = {"n_layer": 8, "n_head": 12, "n_embd": 768}  # ~57 M parameters: compute-bound on an H100
TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32}

NOT_RUN = "not run: no GPU"
# The line bench.run_all reads a bench's status from (the last one wins).
STATUS_PREFIX = "bench status: "
# Exit status under --require-gpu without a GPU: not 1 (a check failed), not 2 (argparse's
# usage error).
EXIT_NOT_RUN = 3


def first_gpu() -> tuple[bool, torch.device]:
    """(CUDA is here, cuda:0 made current) or (False, cpu); a GPU is named in the output."""
    if not torch.cuda.is_available():
        return False, torch.device("cpu")
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    print(f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    return True, device


def init_one_rank(backend: str) -> None:
    """A one-process group: FSDP needs one to shard over, even when there is nothing to split."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(backend, rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))


def fsdp_check(precision: str, device: torch.device, model_args: dict, steps: int, batch: int) -> dict:
    """Train gpt under the FSDP strategy on `device`; return what the checks read."""
    # Imported here: without a GPU, --require-gpu answers before loading the training stack.
    from service.spec import parse_spec
    from workers.data import load_dataset
    from workers.data import sharding as sh
    from workers.parallel import Dist
    from workers.train_loop import _batch, build, train_step

    spec = parse_spec(
        {
            "name": f"gpu-check-fsdp-{precision}",
            "model": {"name": "gpt", "args": model_args},
            "data": {"name": "text", "args": {"block_size": 128, "max_chars": 400_000}},
            "train": {
                "epochs": 1,
                "max_steps": steps,
                "batch_size": batch,
                "optimizer": "adamw",
                "lr": 0.002,
                "weight_decay": 0.0,
                "warmup_steps": 5,
                "grad_clip_norm": 1.0,
            },
            "parallel": {
                "strategy": "fsdp",
                "workers": 1,
                "gpus_per_worker": 1 if device.type == "cuda" else 0,
            },
            "precision": precision,
            "compression": {
                "pruning": {"final_sparsity": 0.5, "start_step": 2, "end_step": steps - 2, "frequency": 2}
            },
        }
    )
    data = load_dataset(spec.data)
    run = build(spec, data, Dist(0, 1, device))
    from torch.distributed.tensor import DTensor

    sharded = all(isinstance(p, DTensor) for p in run.module.parameters())
    perm = sh.epoch_permutation(data.info.n_train, spec.train.seed, 0)
    losses = []
    for _ in range(steps):
        run.pruner.maybe_update(run.step, run.optimizer)
        x, y = _batch(run, perm, run.step)
        train_step(run, x, y)
        losses.append(float(run.loss_sum))
        run.loss_sum = torch.zeros(())
        run.step += 1
    zeros_ok = all(
        bool((w.to_local()[~m] == 0).all()) if isinstance(w, DTensor) else bool((w[~m] == 0).all())
        for w, m in zip(run.pruner.weights.values(), run.pruner.masks.values(), strict=True)
    )
    sparsity, _ = run.pruner.sparsity()
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    ok = sharded and zeros_ok and all(map(_finite, losses)) and tail < head
    return {
        "check": f"fsdp {precision}",
        "sharded": sharded,
        "first_loss": head,
        "last_loss": tail,
        "sparsity": sparsity,
        "pruned_zero": zeros_ok,
        "skipped_steps": run.skipped_steps,
        "ok": ok,
    }


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def step_time(precision: str, device: torch.device, model_args: dict, batch: int, steps: int) -> float:
    """Median seconds per training step of gpt (forward, backward, AdamW) in `precision`."""
    from torch.nn import functional as F

    from workers.data.info import DataInfo
    from workers.models import build_model
    from workers.precision import Precision

    info = DataInfo("tokens", (256,), "int64", 256)
    model = build_model("gpt", {**model_args, "dropout": 0.0}, info, seed=0).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    prec = Precision(precision, device)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (batch, 256), device=device, generator=g)
    times = []
    for i in range(steps + 5):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with prec.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float().reshape(-1, 256), x.reshape(-1))
        prec.backward(loss)
        prec.unscale_(opt)
        prec.step(opt)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= 5:  # warm-up: kernel selection, allocator
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


def status(gpu: bool, failures: list[str]) -> str:
    """The bench's verdict: a CPU machine never passes a GPU check, it did not run it."""
    if failures:
        return "failed: " + ", ".join(failures)
    return "ok" if gpu else NOT_RUN


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--min-speedup", type=float, default=1.5)
    ap.add_argument(
        "--require-gpu",
        action="store_true",
        help=f"without a CUDA GPU, run nothing and exit {EXIT_NOT_RUN} (default: a CPU smoke run, exit 0)",
    )
    args = ap.parse_args(argv)

    gpu, device = first_gpu()
    if not gpu:
        print(f"gpu_check: {NOT_RUN}. The GPU checks (FSDP on a GPU, AMP speed-up) DID NOT RUN.", flush=True)
        if args.require_gpu:
            _save(False, [], [], [], NOT_RUN, f"gpu_check: {NOT_RUN} (--require-gpu: nothing ran)")
            print(f"{STATUS_PREFIX}{NOT_RUN}", flush=True)
            return EXIT_NOT_RUN
        print(
            "Running the FSDP check on CPU (gloo) with a tiny model, to exercise the script only.", flush=True
        )
    init_one_rank("nccl" if gpu else "gloo")
    rows, failures = [], []
    try:
        for precision in ("bf16", "fp16"):
            t0 = time.perf_counter()
            r = fsdp_check(
                precision, device, FLAGSHIP if gpu else TINY, args.steps if gpu else 8, 32 if gpu else 8
            )
            r["seconds"] = time.perf_counter() - t0
            rows.append(r)
            print(r, flush=True)
            if not r["ok"]:
                failures.append(r["check"])
    finally:
        dist.destroy_process_group()

    speed_rows = []
    if gpu:
        base = step_time("fp32", device, SPEED, 32, args.steps)
        for precision in ("fp32", "bf16", "fp16"):
            t = base if precision == "fp32" else step_time(precision, device, SPEED, 32, args.steps)
            speedup = base / t
            ok = precision == "fp32" or speedup >= args.min_speedup
            speed_rows.append({"precision": precision, "step_ms": 1000 * t, "speedup": speedup, "ok": ok})
            if not ok:
                failures.append(f"speed-up {precision}")

    table = markdown_table(
        ["check", "sharded", "first loss", "last loss", "sparsity", "pruned == 0", "skipped", "s", "ok"],
        [
            [
                r["check"],
                r["sharded"],
                r["first_loss"],
                r["last_loss"],
                r["sparsity"],
                r["pruned_zero"],
                r["skipped_steps"],
                r["seconds"],
                r["ok"],
            ]
            for r in rows
        ],
    )
    if speed_rows:
        table += "\n\n" + markdown_table(
            ["gpt 57M, batch 32x256", "step ms", "speed-up vs fp32", "ok"],
            [[r["precision"], r["step_ms"], r["speedup"], r["ok"]] for r in speed_rows],
        )
    else:
        table = (
            f"gpu_check: {NOT_RUN}. Below: the CPU smoke run of the script (gloo, tiny model), "
            "which proves nothing about GPUs.\n\n" + table + "\n\n(AMP speed-up: not measured, no CUDA GPU)"
        )
    print(table)
    verdict = status(gpu, failures)
    _save(gpu, rows, speed_rows, failures, verdict, table)
    if failures:
        print(f"FAILED: {', '.join(failures)}", file=sys.stderr)
    elif gpu:
        print("all GPU checks passed")
    else:
        print(f"gpu_check: {NOT_RUN} (the CPU smoke run of the script passed)")
    print(f"{STATUS_PREFIX}{verdict}", flush=True)
    return 1 if failures else 0


def _save(gpu: bool, rows: list, speed_rows: list, failures: list[str], verdict: str, table: str) -> None:
    out = results_dir("gpu_check")
    (out / "table.md").write_text(table + "\n")
    save_json(
        out / "results.json",
        {
            "machine": machine(),
            "status": verdict,
            "gpu": gpu,
            "fsdp": rows,
            "speed": speed_rows,
            "failures": failures,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
