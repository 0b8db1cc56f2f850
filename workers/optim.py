"""Optimizers and learning-rate schedules. The learning rate is a pure function of the step, set
on the optimizer before every step: nothing to checkpoint, nothing to drift on resume."""

from __future__ import annotations

import math

import torch
from torch import nn

from service.spec import TrainSpec


def build_optimizer(model: nn.Module, cfg: TrainSpec) -> torch.optim.Optimizer:
    # Decay matrices and filters only: decaying biases and norm gains only hurts.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999))


def lr_at(cfg: TrainSpec, step: int, total_steps: int) -> float:
    """Learning rate for the optimizer step `step` (0-based) of a run of `total_steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        span = max(1, total_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    size = cfg.lr_step_size or max(1, total_steps // 3)
    return cfg.lr * cfg.lr_gamma ** (step // size)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
