"""Where work runs and in which precision: the one device and precision policy of every command."""

from __future__ import annotations

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU, where bf16 is far slower than fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
