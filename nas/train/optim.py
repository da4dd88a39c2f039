"""The optimizer of every run: AdamW as the precision policy and `cfg.optimizer` ask, and its
learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from nas.device import precision_for
from nas.errors import ConfigError
from nas.settings import DistillConfig


def lr_at(step: int, cfg: DistillConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then cosine / WSD / constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps - 1)
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    decay_start = max(cfg.warmup_steps, round(cfg.steps * (1 - cfg.decay_fraction)))
    if step < decay_start:
        return cfg.lr
    progress = (step - decay_start + 1) / max(1, cfg.steps - decay_start)
    return cfg.lr + (cfg.min_lr - cfg.lr) * min(progress, 1.0)


def build_optimizer(student: nn.Module, cfg: DistillConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only, as `cfg.optimizer` / `precision` / `offload_optimizer`
    ask: torch's (fused on CUDA, foreach elsewhere) for fp32 states on fp32 weights; torchao's for
    8-bit states and for bf16 weights (stochastic rounding); torchao's CPU offload around torch's. A
    setting the optimizer refuses is one ConfigError."""
    try:
        return _build_optimizer(student, cfg, device)
    except ValueError as e:  # torch and torchao check lr, betas, eps, weight_decay with bare ValueErrors
        raise ConfigError(f"the optimizer ({cfg.optimizer}) refuses the settings: {e}") from None


def _build_optimizer(student: nn.Module, cfg: DistillConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    bf16 = precision_for(cfg.precision, device).student_dtype == torch.bfloat16
    if cfg.offload_optimizer:
        return _offloaded(groups, cfg, device, bf16)
    if cfg.optimizer == "adamw" and not bf16:
        fast = {"fused": True} if device.type == "cuda" and cfg.fused_optimizer else {"foreach": True}
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **fast)
    from torchao.optim import AdamW8bit, _AdamW

    cls = AdamW8bit if cfg.optimizer == "adamw-8bit" else _AdamW
    return cls(groups, lr=cfg.lr, betas=cfg.betas, bf16_stochastic_round=bf16)


def _offloaded(groups: list[dict], cfg: DistillConfig, device: torch.device, bf16: bool):
    """torchao's CPUOffloadOptimizer: states, master copies and the step on the CPU (CUDA only)."""
    if device.type != "cuda":
        raise ConfigError("offload_optimizer moves optimizer states from a GPU to the CPU; it needs CUDA")
    from torchao.optim import CPUOffloadOptimizer, _AdamW

    if bf16:  # bf16 weights: torchao's AdamW with stochastic rounding, on the CPU copies
        return CPUOffloadOptimizer(groups, _AdamW, lr=cfg.lr, betas=cfg.betas, bf16_stochastic_round=True)
    return CPUOffloadOptimizer(groups, torch.optim.AdamW, lr=cfg.lr, betas=cfg.betas)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's learning rate (torchao keeps it as a tensor, updated in place)."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
