"""Which kernels each block type of a model runs on, and the one notice when a slow path is taken.

Without their fused kernels, transformers runs hybrid layers on reference PyTorch code that is correct but
slow and memory-hungry: the Gated DeltaNet layers of Qwen3.5 on `torch_chunk_gated_delta_rule` (more than
10x slower than flash-linear-attention's kernel on an H100, transformers' own comment), the Mamba2 layers
of Nemotron-H on its chunked scan (transformers 5.17 asks for 44 GiB in one tensor at 4 x 2048 tokens:
issue 31). The fast paths, as transformers chooses them (5.17 and 5.25: the original package when it is
installed and the inputs are on a device it runs on, else the Hub's kernels when the model is loaded with
them, else the torch code):

| block type | fast path | how to get it |
|---|---|---|
| linear_attention | `fla` (flash-linear-attention, a pure-Python wheel; Triton kernels, CUDA) | `pip install "nas[gpu]"` |
| mamba | `mamba_ssm` + `causal_conv1d` (CUDA, source builds) | `pip install --no-build-isolation mamba-ssm causal-conv1d` |
| both | the Hub's kernels (`kernels`), fetched at load, where the study's `kernels` setting allows | `kernels = "hub"` |

Detection asks whether a package is installed (`importlib.util.find_spec`) and imports nothing. Where the
model's layers show what they bound, that decides: transformers before the Hub-kernel wrappers (e.g. 5.17)
binds `self.chunk_gated_delta_rule = <fla's> or <torch's>` in each Gated DeltaNet layer and keeps a module-level
`is_fast_path_available` for Mamba2; 5.25 chooses per call by the inputs' device. fla's Triton kernels must
never see CPU tensors: the older binding has no device check, so `kernel_paths_of` rebinds such layers of a
model on the CPU to transformers' torch functions. Attention layers record the model's attention
implementation (`sdpa`, `flash_attention_2`, `eager`).
"""

from __future__ import annotations

import importlib.util
import logging
import sys

import torch
from torch import nn

from nas.errors import NasError

log = logging.getLogger(__name__)

# block type -> (the packages of its fused path, the pip command that installs them); README "GPU extras"
FAST_PATHS = {
    "linear_attention": (("fla",), 'pip install "nas[gpu]"  (flash-linear-attention)'),
    "mamba": (("mamba_ssm", "causal_conv1d"), "pip install --no-build-isolation mamba-ssm causal-conv1d"),
}
REFERENCE = "torch reference"  # transformers' PyTorch code path
HUB = "hub kernels"
_noticed: set[str] = set()  # the notices already logged by this process (each once)


def hub_kernels(*models: object) -> bool:
    """Whether the Hub's kernels are on for any of `models`: the study's `kernels = "hub"` setting loads them
    kernelized (transformers' `use_kernels`, True after `set_use_kernels(True)`); off: never."""
    return any(bool(getattr(model, "use_kernels", False)) for model in models if isinstance(model, nn.Module))


def installed(package: str) -> bool:
    """Whether `package` can be imported here, without importing it."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def kernel_paths(
    block_types: set[str] | tuple[str, ...],
    device_type: str,
    hub: bool,
    have: set[str],
    attention: str = "sdpa",
) -> dict[str, str]:
    """Block type -> the path it runs: the fused package(s) by name, `HUB`, `REFERENCE`, or for attention
    the attention implementation. `have`: the installed packages among `FAST_PATHS`'; `hub`: the Hub's
    kernels are allowed and the `kernels` package is there. Fused kernels run on CUDA only."""
    paths = {}
    for block in sorted(block_types):
        if block in FAST_PATHS:
            packages = FAST_PATHS[block][0]
            if device_type == "cuda" and set(packages) <= have:
                paths[block] = " + ".join(packages)
            else:
                paths[block] = HUB if device_type == "cuda" and hub else REFERENCE
        elif block in ("attention", "global_attention"):
            paths[block] = attention
    return paths


def kernel_paths_of(student: nn.Module, teacher: nn.Module | None, device: torch.device, hub: bool) -> dict:
    """`kernel_paths` of the block types of the student and (when a model) the teacher on `device`."""
    types: set[str] = set()
    for model in (student, teacher):
        if isinstance(model, nn.Module) and hasattr(model, "config"):
            types |= _block_types(model.config)
    have = {p for packages, _ in FAST_PATHS.values() for p in packages if installed(p)}
    attention = getattr(student.config, "_attn_implementation", None) or "sdpa"
    paths = kernel_paths(types, device.type, hub and installed("kernels"), have, attention)
    for model in (student, teacher):
        if isinstance(model, nn.Module):
            paths |= _bound_paths(model, device)
    return paths


def _bound_paths(model: nn.Module, device: torch.device) -> dict[str, str]:
    """The paths the layers of an older transformers bound at construction (see the module docstring);
    a Gated DeltaNet layer bound to fla on the CPU is rebound to the torch functions first."""
    paths = {}
    for module in model.modules():
        bound = getattr(module, "chunk_gated_delta_rule", None)
        modeling = sys.modules.get(type(module).__module__)
        if callable(bound) and not isinstance(bound, nn.Module):
            if getattr(bound, "__module__", "").startswith("fla") and device.type != "cuda":
                for name in ("chunk_gated_delta_rule", "recurrent_gated_delta_rule"):
                    setattr(module, name, getattr(modeling, f"torch_{name}", getattr(module, name)))
                bound = module.chunk_gated_delta_rule
            fused = getattr(bound, "__module__", "").startswith("fla")
            paths["linear_attention"] = "fla" if fused else REFERENCE
        elif type(module).__name__.endswith("Mamba2Mixer") and hasattr(modeling, "is_fast_path_available"):
            fast = modeling.is_fast_path_available and device.type == "cuda"
            paths["mamba"] = " + ".join(FAST_PATHS["mamba"][0]) if fast else REFERENCE
    return paths


def _block_types(config) -> set[str]:
    from nas.model.arch import Arch

    try:
        return set(Arch.from_hf_config(config).layer_types) or {"attention"}
    except (NasError, AttributeError, TypeError, ValueError):  # a model nas does not describe: its attention
        return {"attention"}


def notice_slow_paths(paths: dict[str, str], device: torch.device) -> str | None:
    """Log, once per process, one line naming the block types on the reference path and how to get the
    fast one; returns the line (None when nothing is slow or it was already logged)."""
    slow = [block for block, path in paths.items() if path == REFERENCE]
    if not slow:
        return None
    fixes = "; ".join(f"{block}: {FAST_PATHS[block][1]}" for block in slow)
    why = (
        "the fused kernels are not installed"
        if device.type == "cuda"
        else f"no fused kernel runs on {device.type}"
    )
    line = (
        f"slow path: the {', '.join(slow)} layers run transformers' reference PyTorch code ({why}: correct, "
        f"but much slower and with more memory); fast path on a CUDA GPU: {fixes}"
    )
    if line in _noticed:
        return None
    _noticed.add(line)
    log.warning(line)
    return line


def forget_notices() -> None:
    """Let every notice be logged again (a new run in the same process, e.g. a test)."""
    _noticed.clear()
