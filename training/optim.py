"""Optimizer with parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase
from typing import Protocol

import torch
from torch import nn

from training.config import OptimConfig


def parameter_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Three groups: matrices (weight decay), norms/biases/embedding-free vectors and the parameters named by
    cfg.no_weight_decay (no decay), Infini-attention gate logits (no decay, lr * gate_lr_multiplier). Every
    trainable parameter lands in exactly one group."""
    names = [name for name, _ in model.named_parameters()]
    unmatched = [p for p in cfg.no_weight_decay if not any(fnmatchcase(name, p) for name in names)]
    if unmatched:
        raise ValueError(f"optim.no_weight_decay: pattern(s) {unmatched} match no parameter name (names look like "
                         f"{names[:3]}; fnmatch syntax, `*` also matches dots)")
    decay, no_decay, gates = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith("gate_logit"):
            gates.append(param)
        elif param.dim() < 2 or any(fnmatchcase(name, p) for p in cfg.no_weight_decay):
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
    largest = torch.finfo(torch.float32).max  # the optimizers compute updates in float32: a larger lr overflows
    for name, value in (("optim.lr", cfg.lr), ("optim.lr * optim.gate_lr_multiplier", cfg.lr * cfg.gate_lr_multiplier)):
        if not (math.isfinite(value) and 0 <= value < largest):
            raise ValueError(f"{name}={value:g} must be finite, >= 0 and below float32's largest value {largest:.3g}")
    groups = parameter_groups(model, cfg)
    for group in groups:
        group["lr"] = cfg.lr * group["lr_multiplier"]
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=_fusable(groups))
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(groups, lr=cfg.lr)
    raise ValueError(f"optim.name={str(cfg.name)!r} has no optimizer here")


def _fusable(groups: list[dict]) -> bool | None:
    """PyTorch's fused AdamW (one kernel over every parameter per step instead of a loop of ~10 small ops per
    parameter; on CPU too) for plain floating-point tensors on CPU or CUDA; None (PyTorch's own choice) for anything
    else, e.g. FSDP2's sharded DTensor parameters."""
    params = [p for group in groups for p in group["params"]]
    plain = all(type(p.data) is torch.Tensor and p.is_floating_point() and p.device.type in ("cpu", "cuda")
                for p in params)
    return True if plain else None


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of every group's base lr at `step`: linear warmup over warmup_steps, then cosine decay to
    min_lr_ratio at max_steps (schedule=cosine) or constant (schedule=constant)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, max_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def stage_index(step: int, stage_steps: Sequence[int]) -> int:
    """The stage of 0-based optimizer step `step` given each stage's number of steps; steps past the end belong to
    the last stage (LambdaLR evaluates the step after the final one)."""
    end = 0
    for i, steps in enumerate(stage_steps):
        end += steps
        if step < end:
            return i
    return len(stage_steps) - 1


class Boundaries(Protocol):
    """Where each stage starts and how long it lasts (training.stages.Curriculum; may change during a run)."""

    def index_at(self, step: int) -> int: ...

    def span(self, index: int) -> tuple[int, int]: ...


class _FixedBoundaries:
    """Stages of fixed lengths, back to back."""

    def __init__(self, stage_steps: Sequence[int]):
        self.stage_steps = list(stage_steps)

    def index_at(self, step: int) -> int:
        return stage_index(step, self.stage_steps)

    def span(self, index: int) -> tuple[int, int]:
        return sum(self.stage_steps[:index]), self.stage_steps[index]


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int,
                    stages: Sequence[tuple[int, OptimConfig]] = (), boundaries: Boundaries | None = None):
    """LambdaLR of the global step. Without stages: lr_factor over max_steps. With stages ((steps, merged
    OptimConfig) in order, trainer.stages): every stage restarts the schedule, warmup then cosine or constant over
    its own steps, at its own lr. Groups keep their base lr optim.lr * lr_multiplier, scaled by stage lr / optim.lr
    (exactly 1.0 for a stage that keeps optim.lr), so the factor is a pure function of the step and the stage
    boundaries: a resumed scheduler (last_epoch restored) continues every stage's schedule exactly. `boundaries`
    (a Curriculum) gives the stages' actual starts when a stage may end early; default: the planned steps."""
    if not stages:
        lr_factor(cfg.warmup_steps, cfg, max_steps)  # validate the schedule name now, not at the end of warmup
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
    bounds = boundaries if boundaries is not None else _FixedBoundaries([steps for steps, _ in stages])
    ratios = []
    for i, (steps, stage_cfg) in enumerate(stages):
        lr_factor(stage_cfg.warmup_steps, stage_cfg, steps)
        if stage_cfg.lr == cfg.lr:
            ratios.append(1.0)
        elif cfg.lr == 0:
            raise ValueError(f"stage {i} has lr={stage_cfg.lr} but optim.lr=0: stage lrs scale the groups' base lr "
                             "optim.lr * lr_multiplier, so set optim.lr to a nonzero value (e.g. the first stage's)")
        else:
            ratios.append(stage_cfg.lr / cfg.lr)

    def factor(step: int) -> float:
        i = bounds.index_at(step)
        start, length = bounds.span(i)
        return ratios[i] * lr_factor(step - start, stages[i][1], length)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
