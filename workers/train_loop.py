"""The training loop: a plain function over a validated spec, a dataset and a session.

It knows nothing of HTTP, databases or Ray: the `Session` it is given reports records and
persists checkpoints (Ray Train's in a job; a folder in tests and benchmarks). Every rank runs
it; rank 0 reports. Its steps are small and named: `build`, `restore`, `train_step`, `evaluate`,
`save`, `train`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from service.errors import TrainingDiverged
from service.spec import JobSpec, check_steps
from workers import init_weights
from workers.checkpoint import Loaded
from workers.compression import registry
from workers.compression.protocol import Context, Method
from workers.data import Dataset, streaming
from workers.data import sharding as sh
from workers.models import build_model
from workers.optim import build_optimizer, lr_at, set_lr
from workers.parallel import Dist, Strategy, get_strategy
from workers.precision import Precision

log = logging.getLogger(__name__)


class Session(Protocol):
    """The loop's only window on the outside world."""

    dist: Dist

    def emit(self, record: dict) -> None:
        """Report a metrics/event record (called on rank 0 only)."""

    def save(self, step: int, state: dict | None, rng: list[dict], meta: dict) -> None:
        """Persist a checkpoint; called on every rank, `state` is None except on rank 0."""

    def restore(self) -> Loaded | None:
        """The newest verified checkpoint of this job, or None."""


@dataclass
class Faults:
    """Test-only fault injection, set by operators through SLIMTRAIN_FAULTS (never by a spec)."""

    kill_at_step: int | None = None  # SIGKILL this process after that step completes ...
    kill_rank: int = 0  # ... on this rank ...
    once_file: str | None = None  # ... once: the file marks that it fired
    raise_at_step: int | None = None  # raise a RuntimeError after that step, on every attempt

    @classmethod
    def from_dict(cls, d: dict | None) -> Faults:
        return cls(**(d or {}))

    def after_step(self, step: int, rank: int) -> None:
        if self.raise_at_step is not None and step == self.raise_at_step:
            raise RuntimeError(f"injected failure at step {step}")
        if self.kill_at_step == step and rank == self.kill_rank:
            if self.once_file and os.path.exists(self.once_file):
                return
            if self.once_file:
                Path(self.once_file).write_text(str(step))
            log.warning("fault injection: SIGKILL rank %d at step %d", rank, step)
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Run:
    """Everything `build` makes; the loop threads it through its steps."""

    spec: JobSpec
    data: Dataset
    dist: Dist
    strategy: Strategy
    model: nn.Module  # as wrapped by the strategy
    optimizer: torch.optim.Optimizer
    precision: Precision
    methods: list[Method]  # the active compression methods, in registry order
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))
    loss_count: int = 0
    skipped_steps: int = 0
    train_seconds: float = 0.0  # rank 0's seconds inside train_step, over the kept steps
    wall_seconds: float = 0.0  # the loop's wall clock before this attempt (from the checkpoint)
    wall_from: float = 0.0  # perf_counter when this attempt's loop started
    feed: streaming.Feed | streaming.IdleFeed | None = None  # streamed data's batches (None: in memory)

    @property
    def module(self) -> nn.Module:
        return self.strategy.unwrap(self.model)

    def method(self, name: str) -> Method | None:
        """The active method of a `compression` section (for tools and benches; the loop itself
        calls every method alike)."""
        return next((m for m in self.methods if m.name == name), None)

    @property
    def pruner(self):
        """The pruning method's Pruner, or None (benches read its masks)."""
        return getattr(self.method("pruning"), "pruner", None)


def total_steps(spec: JobSpec, n_train: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) — raising ConfigError when the data is too small
    for one global batch or a schedule ends after the last step. The API makes the same check at
    submit (service.spec.schedule_errors) where the dataset's size is known from the spec."""
    return check_steps(spec, n_train)


def loss_fn_for(kind: str):
    if kind == "tokens":
        return lambda logits, y: F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return F.cross_entropy


def build(spec: JobSpec, data: Dataset, d: Dist, init_state: dict | None = None) -> Run:
    ctx, methods, spe = lay_out(spec, data, d, init_state)
    optimizer = build_optimizer(ctx.module, spec.train)
    precision = Precision(spec.precision, d.device)
    if precision.scaler is not None:
        precision.scaler = ctx.strategy.grad_scaler()
    return Run(
        spec,
        data,
        d,
        ctx.strategy,
        ctx.model,
        optimizer,
        precision,
        methods,
        spe,
        ctx.total_steps,
    )


def lay_out(
    spec: JobSpec, data: Dataset, d: Dist, init_state: dict | None = None
) -> tuple[Context, list[Method], int]:
    """The model as the loop starts from it, laid out by the strategy, with the compression
    methods converted and attached; and the steps per epoch. Everything of `build` but the
    optimizer: its first construction imports torch._dynamo, a slow import (bench/README, "Submit
    -> first metric") that the driver's step-0 evaluation does not need."""
    spe, total = total_steps(spec, data.info.n_train)
    torch.manual_seed(spec.train.seed)
    model = build_model(spec.model.name, spec.model.args, data.info, seed=spec.train.seed)
    if init_state is not None:
        # model.init: loaded strictly into the plain model, on every rank, before quantization
        # swaps layers and the strategy wraps, shards or splits it.
        init_weights.apply(model, init_state)
    methods = registry.build_methods(spec)
    # Methods change the plain model (fake-quantized layers) before the strategy wraps, shards
    # or splits it: what they swapped in then travels into every strategy's layout.
    for m in methods:
        m.convert(model)
    strategy = get_strategy(spec.parallel.strategy)(d, spec)
    wrapped = strategy.wrap(model)
    ctx = Context(spec, d, strategy, wrapped, total, calibration_inputs(spec, data, strategy, d.device, spe))
    for m in methods:
        m.attach(ctx)
    return ctx, methods, spe


def calibration_inputs(spec: JobSpec, data: Dataset, strategy, device: torch.device, spe: int):
    """`Context.inputs` of a run: this rank's share of the training batches of the steps asked
    for, as `_batch` cuts them (a pure function of the step: a resumed run calibrates on the
    same batches). None when the data streams."""
    if getattr(data, "streamed", False):
        return None

    def inputs(step: int, n: int):
        perms: dict[int, torch.Tensor] = {}
        for s in range(step, step + n):
            epoch = s // spe
            if epoch not in perms:
                perms[epoch] = sh.epoch_permutation(data.info.n_train, spec.train.seed, epoch)
            idx = sh.global_batch(perms[epoch], s % spe, spec.train.batch_size)
            yield data.x_train[sh.rank_slice(idx, *strategy.data_shard())].to(device)

    return inputs


def restore(run: Run, ckpt: Loaded | None) -> None:
    """Continue exactly where the checkpoint stopped: weights, optimizer, scaler, masks, step and
    every rank's RNG; the data position follows from the step (see workers.data.sharding)."""
    if ckpt is None:
        return
    s = ckpt.state
    run.strategy.load_full_state_dict(run.model, s["model"])
    run.strategy.load_optimizer_state_dict(run.model, run.optimizer, s["optimizer"])
    run.precision.load_state_dict(s["precision"])
    for m in run.methods:
        if m.state_key is not None:
            m.load_state_dict(s.get(m.state_key))
    run.step = int(s["step"])
    run.skipped_steps = int(s.get("skipped_steps", 0))
    run.train_seconds = float(s.get("train_seconds", 0.0))
    run.wall_seconds = float(s.get("wall_seconds", 0.0))
    if ckpt.meta.get("world_size") == run.dist.world_size:
        rng = ckpt.rng[run.dist.rank]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    else:  # another worker count: exact replay is impossible; reseed deterministically
        torch.manual_seed(run.spec.train.seed * 7919 + run.step * 31 + run.dist.rank)


def _batch(run: Run, perm: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = sh.global_batch(perm, step % run.steps_per_epoch, run.spec.train.batch_size)
    idx = sh.rank_slice(idx, *run.strategy.data_shard())  # pipeline: the whole batch
    dev = run.dist.device
    return run.data.x_train[idx].to(dev), run.data.y_train[idx].to(dev)


def _streamed_batch(run: Run) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    x, y = run.feed.train_batch(run.step)
    if x is None:  # a pipeline stage between the first and the last reads no data
        return None, None
    dev = run.dist.device
    return x.to(dev), y.to(dev)


def open_feed(run: Run, session: Session) -> None:
    """A streamed dataset: this rank reads its batches from its Ray Data shard, as
    workers.data.streaming.reads decides (ddp, fsdp: its share of each global batch; pipeline:
    the first and last stages the whole batch, the stages between nothing)."""
    if not getattr(run.data, "streamed", False):
        return
    run.feed = streaming.feed_for(
        run.spec.parallel.strategy,
        run.dist.rank,
        run.dist.world_size,
        session.dataset_shards,
        run.spec.train.batch_size,
        run.steps_per_epoch,
        run.spec.train.seed,
        run.data.info.n_val,
    )


def train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> None:
    opt, prec = run.optimizer, run.precision
    set_lr(opt, lr_at(run.spec.train, run.step, run.total_steps))
    for m in run.methods:
        m.before_forward(run.step)
    opt.zero_grad(set_to_none=True)
    loss = run.strategy.forward_backward(run.model, x, y, loss_fn_for(run.data.info.kind), prec)
    # Unscaled first: a method sees real gradients, and masking cannot hide an inf from the
    # scaler's check.
    prec.unscale_(opt)
    for m in run.methods:
        m.after_backward()
    if run.spec.train.grad_clip_norm:
        run.strategy.clip_grad_norm_(run.model, run.spec.train.grad_clip_norm)
    if not prec.step(opt):
        run.skipped_steps += 1
    # Unconditionally, also after a step the GradScaler skipped (masks, clamps hold).
    for m in run.methods:
        m.after_optimizer_step()
    run.loss_sum += loss.cpu()
    run.loss_count += 1


def evaluate(run: Run) -> dict:
    """Loss and accuracy on the validation split, each rank scoring its share, summed."""
    return score(run.data, run.dist, run.strategy, run.model, run.feed)


@torch.no_grad()  # here, not on evaluate: evaluate_initial calls this directly
def score(data: Dataset, d: Dist, strategy: Strategy, wrapped: nn.Module, feed=None) -> dict:
    """`evaluate` of a model as `strategy` laid it out (`feed`: streamed data's, else None)."""
    if feed is not None:
        # Streamed: a chunk per batch of the validation stream on every rank, maybe empty
        # (FSDP gathers the weights in each forward, so every rank runs as many).
        chunks = ((xx.to(d.device), yy.to(d.device)) for xx, yy in feed.val_chunks())
    else:
        shard, shards = strategy.data_shard()
        sl = sh.eval_slice(len(data.x_val), shard, shards)
        x, y = data.x_val[sl].to(d.device), data.y_val[sl].to(d.device)
        # As many chunks on every rank, some maybe empty: FSDP gathers weights in each forward
        # and pipeline stages pass activations on, so no rank may run one forward fewer.
        per_rank = -(-len(data.x_val) // shards)
        n_chunks = max(1, -(-per_rank // 512))
        chunks = zip(x.tensor_split(n_chunks), y.tensor_split(n_chunks), strict=True)
    model = strategy.unwrap(wrapped)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)
    for xx, yy in chunks:
        logits = strategy.infer(wrapped, xx)
        if logits is None:  # a pipeline stage before the last
            continue
        logits = logits.float()
        if data.info.kind == "tokens":
            logits, yy = logits.reshape(-1, logits.shape[-1]), yy.reshape(-1)
        sums[0] += F.cross_entropy(logits, yy, reduction="sum").item()
        sums[1] += (logits.argmax(-1) == yy).sum().item()
        sums[2] += yy.numel()
    model.train(was_training)
    sums = d.all_reduce_sum(sums)
    loss = float(sums[0] / sums[2])
    out = {"val_loss": loss, "val_accuracy": float(sums[1] / sums[2])}
    if data.info.kind == "tokens":
        out["val_perplexity"] = float(torch.tensor(loss).exp())
    return out


def update_masks(run: Run, session: Session) -> None:
    """Every method's schedule at `run.step` (on every rank); rank 0 reports what changed."""
    for m in run.methods:
        event = m.on_step(run.step, run.optimizer)
        if event is not None and run.dist.rank == 0:
            session.emit({"kind": "event", **event})


def nonfinite_weights(module: nn.Module) -> int:
    """How many of this rank's weight tensors (its shard or stage) hold a NaN or an inf."""
    local = [p.to_local() if hasattr(p, "to_local") else p for p in module.parameters()]
    if not local:
        return 0
    return int(torch.stack([~torch.isfinite(t.detach()).all() for t in local]).sum())


def _raise_if_diverged(run: Run, nonfinite_everywhere: float) -> None:
    # Every rank sees the same all-reduced count and raises together: none is left waiting
    # in a collective for a rank that stopped.
    if nonfinite_everywhere > 0:
        raise TrainingDiverged(
            f"training diverged by step {run.step}: {int(nonfinite_everywhere)} weight tensor(s) hold "
            "NaN or inf; lower train.lr or set train.grad_clip_norm"
        )


def save(run: Run, session: Session) -> None:
    # A checkpoint is only ever written from finite weights, so a retry resumes from a sane state.
    bad = run.dist.all_reduce_sum(torch.tensor([float(nonfinite_weights(run.module))], dtype=torch.float64))
    _raise_if_diverged(run, float(bad[0]))
    rng = {"torch": torch.get_rng_state()}
    if run.dist.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.dist.device)
    rngs = run.dist.all_gather_object(rng)
    model_state = run.strategy.full_state_dict(run.model)
    opt_state = run.strategy.optimizer_state_dict(run.model, run.optimizer)
    # Every method key is written, None for a method that is off: one layout for every spec.
    method_states = dict.fromkeys(registry.state_keys())
    for m in run.methods:
        if m.state_key is not None:
            method_states[m.state_key] = m.state_dict()
    state = None
    if run.dist.rank == 0:
        state = {
            "step": run.step,
            "model": model_state,
            "optimizer": opt_state,
            "precision": run.precision.state_dict(),
            **method_states,
            "skipped_steps": run.skipped_steps,
            "train_seconds": run.train_seconds,
            "wall_seconds": loop_seconds(run),
        }
    meta = {"world_size": run.dist.world_size, "strategy": run.strategy.name, "total_steps": run.total_steps}
    session.save(run.step, state, rngs, meta)
    if run.dist.rank == 0:
        session.emit({"kind": "event", "event": "checkpoint", "step": run.step})


def device_name(device: torch.device) -> str:
    """`cpu`, or `cuda:0 (NVIDIA H200)`: the index this process sees and the GPU's model."""
    if device.type != "cuda":
        return str(device)
    return f"{device} ({torch.cuda.get_device_name(device)})"


def loop_seconds(run: Run) -> float:
    """Wall clock of the training loop so far: this attempt's, plus what the checkpoint it resumed
    from had kept (work lost to a failure after that checkpoint is redone, and counted once)."""
    return run.wall_seconds + time.perf_counter() - run.wall_from


def _log_train(run: Run, session: Session, window_start: float, window_steps: int) -> None:
    local = [float(run.loss_count), float(nonfinite_weights(run.module))]
    stats = run.dist.all_reduce_sum(
        torch.cat([run.loss_sum.double().reshape(1), torch.tensor(local).double()])
    )
    run.loss_sum, run.loss_count = torch.zeros(()), 0
    _raise_if_diverged(run, float(stats[2]))
    # On every rank: with sharded or staged weights, measuring (sparsity) is a collective.
    parts = [m.train_part(run.step) for m in run.methods]
    if run.dist.rank != 0:
        return
    elapsed = max(time.perf_counter() - window_start, 1e-9)
    rec = {
        "kind": "train",
        "step": run.step,
        "epoch": run.step / run.steps_per_epoch,
        "loss": float(stats[0] / max(stats[1], 1)),
        "lr": run.optimizer.param_groups[0]["lr"],
        "samples_per_second": window_steps * run.spec.train.batch_size / elapsed,
        "skipped_steps": run.skipped_steps,
    }
    for part in parts:
        rec.update(part)
    session.emit(rec)


def _eval_due(run: Run) -> bool:
    every = run.spec.train.eval_every_steps
    if run.step == run.total_steps:
        return True
    return run.step % every == 0 if every else run.step % run.steps_per_epoch == 0


def evaluate_initial(spec: JobSpec, data: Dataset, init_state: dict | None) -> dict:
    """The step-0 evaluation in this one process, on its CPU: the model every rank starts from
    (the same seed, initial weights and compression conversion, by `lay_out`), scored by `score`
    over the whole validation split. The strategy is DDP's, which at one process is the plain
    model: FSDP's shards and pipeline stages compute the same function, and `infer` runs no
    autocast under any strategy. Data held in memory only (a streamed split is the workers')."""
    one = spec.model_copy(update={"parallel": spec.parallel.model_copy(update={"strategy": "ddp"})})
    ctx, _methods, _spe = lay_out(one, data, Dist(), init_state)
    return score(data, ctx.dist, ctx.strategy, ctx.model)


def train(
    spec: JobSpec,
    data: Dataset,
    session: Session,
    faults: Faults | None = None,
    step0_evaluated: bool = False,
) -> dict:
    """Train to the last step, resuming from the session's newest checkpoint if there is one.
    Returns a summary on every rank: step; samples (global: every rank's); wall_seconds (the
    loop's wall clock: data, steps, evaluation, checkpoints); samples_per_second (samples over
    wall_seconds); train_seconds (rank 0's time inside `train_step` only).
    `step0_evaluated`: the caller has scored the initial weights (the driver does, with
    `evaluate_initial`, while the workers start), so the loop does not evaluate before its first
    step."""
    faults = faults or Faults()
    ckpt = session.restore()
    # A resumed run takes its weights from the checkpoint: the initial ones are not read again.
    init_state = init_weights.load_init_state(spec, getattr(session, "store", None)) if ckpt is None else None
    run = build(spec, data, session.dist, init_state)
    restore(run, ckpt)
    open_feed(run, session)
    rank0 = session.dist.rank == 0
    if rank0:
        start = {
            "kind": "event",
            "event": "start",
            "step": run.step,
            "resumed_from": ckpt.step if ckpt else None,
            "total_steps": run.total_steps,
            "steps_per_epoch": run.steps_per_epoch,
            "world_size": session.dist.world_size,
            "target_curve": None,  # a scheduled method's whole curve (below), for charts
        }
        for m in run.methods:
            start.update(m.start_part())
        session.emit(start)
    if init_state is not None and not step0_evaluated:
        # The report's baseline: the initial weights, by the same evaluation, before any step.
        ev = evaluate(run)
        if rank0:
            session.emit({"kind": "eval", "step": 0, "baseline": True, **ev})
    run.model.train()
    perm = None
    window_start, window_steps = time.perf_counter(), 0
    run.wall_from = window_start
    memory_first_step = memory_first_eval = None
    sampler = streaming.MemorySampler().start()
    while run.step < run.total_steps:
        epoch = run.step // run.steps_per_epoch
        if run.feed is None and (perm is None or run.step % run.steps_per_epoch == 0):
            perm = sh.epoch_permutation(data.info.n_train, spec.train.seed, epoch)
        update_masks(run, session)
        x, y = _batch(run, perm, run.step) if run.feed is None else _streamed_batch(run)
        t0 = time.perf_counter()
        train_step(run, x, y)
        run.train_seconds += time.perf_counter() - t0
        if memory_first_step is None:
            memory_first_step = streaming.memory_now()
        run.step += 1
        window_steps += 1
        if run.step % spec.train.log_every_steps == 0 or run.step == run.total_steps:
            _log_train(run, session, window_start, window_steps)
            window_start, window_steps = time.perf_counter(), 0
        if _eval_due(run):
            ev = evaluate(run)
            if memory_first_eval is None:
                memory_first_eval = streaming.memory_now()
            if rank0:
                session.emit({"kind": "eval", "step": run.step, **ev})
        if run.step % spec.checkpoint.every_steps == 0 and run.step < run.total_steps:
            save(run, session)
        faults.after_step(run.step, session.dist.rank)
    update_masks(run, session)  # a schedule may end exactly at the last step
    if ckpt is None or ckpt.step < run.total_steps:
        save(run, session)  # the final state, which export reads
    wall = loop_seconds(run)
    samples = run.step * spec.train.batch_size  # the global batch: all ranks' samples
    summary = {
        "step": run.step,
        "train_seconds": run.train_seconds,
        "wall_seconds": wall,
        "samples": samples,
        "samples_per_second": samples / wall if wall > 0 else None,
        "skipped_steps": run.skipped_steps,
        # Where each rank trained, by rank: the report says it, not the spec that asked for it.
        "devices": session.dist.all_gather_object(device_name(session.dist.device)),
        # Each rank's resident memory (bytes: rss, anon, shmem): when its session started
        # (before it fetched any data), after this attempt's first step and first evaluation,
        # and the peaks over the loop (rss_hwm: the process's lifetime peak). What
        # bench/data.py and the streaming tests measure.
        "worker_memory": session.dist.all_gather_object(
            {
                "start": getattr(session, "memory_start", None),
                "first_step": memory_first_step,
                "first_eval": memory_first_eval,
                "peak": sampler.stop(),
                "rss_hwm": streaming.peak_rss(),
            }
        ),
    }
    if rank0:
        session.emit({"kind": "event", "event": "done", **summary})
    return summary
