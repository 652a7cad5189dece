"""Optimizer with parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import OptimConfig


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Three groups: matrices (weight decay), norms/biases/embedding-free vectors (no decay), Infini-attention
    gate logits (no decay, lr * gate_lr_multiplier). Every trainable parameter lands in exactly one group."""
    decay, no_decay, gates = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("gate_logit"):
            gates.append(param)
        elif param.dim() < 2:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": cfg.weight_decay, "lr_multiplier": 1.0},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr_multiplier": 1.0},
        {"name": "gates", "params": gates, "weight_decay": 0.0, "lr_multiplier": cfg.gate_lr_multiplier},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_multiplier"]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    raise ValueError(f"optim.name={cfg.name!r} is not one of ('adamw', 'adafactor')")


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of every group's base lr at `step`: linear warmup over warmup_steps, then cosine decay to
    min_lr_ratio at max_steps (schedule=cosine) or constant (schedule=constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule != "cosine":
        raise ValueError(f"optim.schedule={cfg.schedule!r} is not one of ('cosine', 'constant')")
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    lr_factor(cfg.warmup_steps, cfg, max_steps)  # validate the schedule name now, not at the end of warmup
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
