"""Where nas computes and in which dtypes: the one precision policy of every command.

A policy fixes three things (`Precision`): the teacher's dtype (it only runs forward), the dtype
of the student's master weights (what the optimizer updates), and the autocast dtype of the
matmuls. `auto` is `bf16-mixed` on CUDA and `fp32` elsewhere (bf16 matmuls are slow on most CPUs):

| policy     | teacher | student weights                         | matmuls |
|------------|---------|-----------------------------------------|---------|
| fp32       | fp32    | fp32                                    | fp32    |
| bf16-mixed | bf16    | fp32 (master weights, AMP)              | bf16    |
| bf16       | bf16    | bf16, stochastic rounding in the update | bf16    |

`bf16` follows torchao's recipe for training without fp32 master weights (stochastic rounding keeps
the small updates unbiased): https://github.com/pytorch/ao/tree/main/torchao/optim#stochastic-rounding-for-bf16-weight.
The policy of a run is entered with `use_precision`; `autocast_for` reads it, so the loss, the
evaluation and the importance pass all compute in the run's dtypes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from nas.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16")
# dense (not 2:4-sparse) BF16 tensor-core TFLOP/s, NVIDIA's datasheets: H100 SXM and H200 SXM print only "1,979
# with sparsity" (dense is half); A100 312 | 624, L40S 362 | 733, A10 125 | 250 (dense | sparse). "H100" also
# matches the H100 PCIe card, whose dense peak is lower (756), so its MFU reads low
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@dataclass(frozen=True)
class Precision:
    """The dtypes of one policy (see the module docstring)."""

    name: str
    teacher_dtype: torch.dtype
    student_dtype: torch.dtype
    autocast_dtype: torch.dtype | None  # None: matmuls in the weights' dtype


_POLICIES = {
    "fp32": Precision("fp32", torch.float32, torch.float32, None),
    "bf16-mixed": Precision("bf16-mixed", torch.bfloat16, torch.float32, torch.bfloat16),
    "bf16": Precision("bf16", torch.bfloat16, torch.bfloat16, torch.bfloat16),
}
_current: ContextVar[str] = ContextVar("nas_precision", default="auto")


def precision_for(name: str, device: torch.device) -> Precision:
    """The policy `name` (one of PRECISIONS) resolved for `device`."""
    if name == "auto":
        name = "bf16-mixed" if device.type == "cuda" else "fp32"
    if name not in _POLICIES:
        raise ValueError(f"unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}")
    return _POLICIES[name]


def current_precision(device: torch.device) -> Precision:
    """The policy entered with `use_precision` (default `auto`) on `device`."""
    return precision_for(_current.get(), device)


@contextlib.contextmanager
def use_precision(name: str) -> Iterator[None]:
    """Within the block, `autocast_for` and `current_precision` follow policy `name`."""
    precision_for(name, torch.device("cpu"))  # validate
    token = _current.set(name)
    try:
        yield
    finally:
        _current.reset(token)


def autocast_for(device: torch.device):
    """Autocast in the current policy's matmul dtype on `device` (a no-op for `fp32`)."""
    dtype = current_precision(device).autocast_dtype
    if dtype is None:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


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


def visible_gpu_memory() -> int | None:
    """Total bytes of the first visible CUDA device, or None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory


def peak_bf16_tflops(device: torch.device) -> float | None:
    """The datasheet dense bf16 peak of `device` in TFLOP/s (`PEAK_BF16_TFLOPS`), None off CUDA or for a
    GPU not in the table."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
