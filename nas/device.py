"""Where work runs and in which precision: the one device and precision policy of every command."""

from __future__ import annotations

import torch
from torch import nn

from nas.errors import ConfigError


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU, where bf16 is far slower than fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA when available, else CPU; anything else is passed to torch.device and must name a
    device this machine has (ConfigError otherwise, instead of a failure at the first tensor moved)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from e
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (device.index or 0) >= count:
            have = f"{count} CUDA device(s): cuda:0 to cuda:{count - 1}" if count else "no CUDA device"
            raise ConfigError(f"--device {name}: this machine has {have}; use auto or cpu")
        return device
    backend = getattr(torch.backends, device.type, None)
    if backend is None or not getattr(backend, "is_available", lambda: False)():
        raise ConfigError(f"--device {name}: no {device.type} device on this machine; use auto or cpu")
    return device
