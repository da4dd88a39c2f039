"""The analytic size of an `Arch`: its exact parameter count (all, or those active per token), the KV cache and
recurrent state it keeps per sequence, and parameter counts read from text (`4B`, `350M`)."""

from __future__ import annotations

import math

import torch

from nas.errors import ConfigError, InfeasibleError
from nas.model.arch import Arch
from nas.model.blocks import block_kv, block_params, block_state, type_units
from nas.settings import BUDGET_KINDS


def _layer_units(arch: Arch) -> list[tuple[int, tuple[str, ...]]]:
    """(how many layers, their block types) for each layer type of `arch`."""
    if not arch.layer_types:
        return [(arch.num_layers, arch.blocks)]
    return [(arch.layer_types.count(t), units) for t, units in type_units(arch.model_type, arch.layer_types)]


def count_params(arch: Arch, active: bool = False) -> int:
    """Exact parameter count of the HF model built from `arch` (tied weights counted once).

    `active`: the parameters one token uses (a MoE counts `num_experts_per_tok` experts, and the whole router);
    for a dense model both counts are the same."""
    h = arch.hidden_size
    norms = len(arch.family.norms) * h
    layers = sum(
        n * (sum(block_params(arch, b, active) for b in units) + norms) for n, units in _layer_units(arch)
    )
    embed = arch.vocab_size * h
    lm_head = 0 if arch.tie_word_embeddings else arch.vocab_size * h
    return embed + layers + h + lm_head


def count_budget_params(arch: Arch, budget_kind: str = "total") -> int:
    """The parameters a budget of `budget_kind` ("total" or "active") measures."""
    if budget_kind not in BUDGET_KINDS:
        raise ConfigError(f"budget_kind {budget_kind!r} is not one of {', '.join(BUDGET_KINDS)}")
    return count_params(arch, active=budget_kind == "active")


def kv_cache_bytes(arch: Arch, seq_len: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of K and V cache for one sequence of `seq_len` tokens (attention layers only)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    per_token = sum(n * sum(block_kv(arch, b) for b in units) for n, units in _layer_units(arch))
    return per_token * seq_len * itemsize


def recurrent_state_bytes(arch: Arch, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of recurrent state (linear-attention / Mamba state and conv window) one sequence keeps, whatever its
    length (0 for a model of attention layers only)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return itemsize * sum(n * sum(block_state(arch, b) for b in units) for n, units in _layer_units(arch))


def parse_count(text: str | int | float) -> int:
    """A parameter count from `4B`, `350M`, `1.5e9`, `12k` or a plain number."""
    if isinstance(text, int | float):
        return int(text)
    s = str(text).strip().replace("_", "").replace(",", "")
    scale = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(s[-1:].upper())
    try:
        value = float(s[:-1]) * scale if scale else float(s)
    except ValueError:
        raise InfeasibleError(
            f"cannot read {text!r} as a parameter count; write e.g. 4B, 350M or 1.5e9"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise InfeasibleError(f"a parameter count must be a positive finite number, got {text!r}")
    return int(value)
