"""The analytic size of an `Arch`: its exact parameter count (all, or those active per token), the KV cache and
recurrent state it keeps per sequence, and parameter counts read from text (`4B`, `350M`)."""

from __future__ import annotations

import math

import torch

from nas.errors import ConfigError, InfeasibleError
from nas.model.arch import Arch
from nas.model.blocks import type_units
from nas.settings import BUDGET_KINDS

# ---- one block -----------------------------------------------------------------------------------


def attention_params(arch: Arch) -> int:
    """q/k/v/o projections (+ biases, q/k norms; a gated q_proj has twice the query rows)."""
    h, d = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    q_rows = 2 * q if arch.attn_output_gate else q
    n = h * q_rows + 2 * h * kv + q * h
    n += (q_rows + 2 * kv) if arch.qkv_bias else 0
    n += h if arch.o_bias else 0
    n += arch.num_attention_heads if arch.family.attention_sinks else 0  # one sink logit per head (gpt-oss)
    return n + {"head": 2 * d, "proj": q + kv, None: 0}[arch.family.qk_norm]


def global_attention_params(arch: Arch) -> int:
    """A Gemma 4 full-attention block: q/k/o projections of `global_head_dim` channels a head over
    `num_global_query_groups` KV groups, a v projection unless its keys are its values (`attention_k_eq_v`),
    per-head q/k norms (v_norm has no weight)."""
    h, d = arch.hidden_size, arch.global_head_dim
    q, kv = arch.num_attention_heads * d, arch.num_global_query_groups * d
    kv_mats = 1 if arch.attention_k_eq_v else 2
    n = 2 * h * q + kv_mats * h * kv
    n += (q + kv_mats * kv + h) if arch.qkv_bias else 0  # Gemma's attention_bias: q/k/v and o biases
    return n + 2 * d


def mlp_params(arch: Arch, ffn: int | None = None, bias: bool | None = None) -> int:
    """A gated MLP (gate, up, down) or, in a family without the gate (Nemotron-H's squared ReLU), up and down."""
    h, f = arch.hidden_size, arch.ffn_hidden_size if ffn is None else ffn
    mats = 3 if arch.family.gated_mlp else 2
    bias = arch.mlp_bias if bias is None else bias
    return mats * h * f + (((mats - 1) * f + h) if bias else 0)


def moe_params(arch: Arch, active: bool = False) -> int:
    """The router, the experts (biased in gpt-oss only) and a shared expert if any, with its sigmoid gate
    Linear(hidden, 1) where the family has one (active: the router, the top-k experts one token uses and the
    shared expert)."""
    experts = arch.num_experts_per_tok if active else arch.num_experts
    spec, h = arch.family.experts, arch.hidden_size
    shared = mlp_params(arch, arch.shared_expert_ffn_hidden_size) if arch.shared_expert_ffn_hidden_size else 0
    shared += h if shared and spec.shared_gate else 0
    bias = spec.bias  # a biased router and biased experts (gpt-oss)
    return arch.num_experts * (h + bias) + experts * mlp_params(arch, bias=bias) + shared


def linear_attention_params(arch: Arch) -> int:
    """Gated DeltaNet (transformers' Qwen3_5GatedDeltaNet): in_proj_qkv, in_proj_z, in_proj_b, in_proj_a,
    a depthwise conv over q/k/v without bias, dt_bias and A_log per value head, one gated RMSNorm over a value
    head, out_proj."""
    h, vh = arch.hidden_size, arch.num_linear_value_heads
    key, value = arch.num_linear_key_heads * arch.linear_key_head_dim, vh * arch.linear_value_head_dim
    conv = 2 * key + value
    n = h * conv + h * value + 2 * h * vh + conv * arch.linear_conv_kernel + 2 * vh
    return n + arch.linear_value_head_dim + value * h


def mamba_params(arch: Arch) -> int:
    """Mamba2 (transformers' NemotronHMamba2Mixer): in_proj to [gate, x, B, C, dt], a depthwise conv over
    [x, B, C], dt_bias, A_log and D per head, a gated group RMSNorm over the inner width, out_proj."""
    h, heads = arch.hidden_size, arch.num_mamba_heads
    inner = heads * arch.mamba_head_dim
    conv = inner + 2 * arch.mamba_groups * arch.ssm_state_size
    proj = inner + conv + heads
    n = h * proj + conv * arch.mamba_conv_kernel + 3 * heads + inner + inner * h
    n += conv if arch.mamba_conv_bias else 0
    return n + ((proj + h) if arch.mamba_bias else 0)


def block_params(arch: Arch, block: str, active: bool = False) -> int:
    """Parameters of one block of type `block` (without the layer's hidden-size norms)."""
    if block == "moe":
        return moe_params(arch, active)
    return {
        "attention": attention_params,
        "global_attention": global_attention_params,
        "linear_attention": linear_attention_params,
        "mamba": mamba_params,
        "mlp": mlp_params,
    }[block](arch)


def block_state(arch: Arch, block: str) -> int:
    """Recurrent-state elements one sequence keeps in one block of type `block` (0: none), whatever its length:
    the SSM/delta-rule state plus the causal conv's window (transformers caches `conv_kernel` columns)."""
    if block == "linear_attention":
        key = arch.num_linear_key_heads * arch.linear_key_head_dim
        conv = 2 * key + arch.num_linear_value_heads * arch.linear_value_head_dim
        state = arch.num_linear_value_heads * arch.linear_key_head_dim * arch.linear_value_head_dim
        return state + conv * arch.linear_conv_kernel
    if block == "mamba":
        inner = arch.num_mamba_heads * arch.mamba_head_dim
        conv = inner + 2 * arch.mamba_groups * arch.ssm_state_size
        return inner * arch.ssm_state_size + conv * arch.mamba_conv_kernel
    return 0


def block_kv(arch: Arch, block: str) -> int:
    """KV-cache elements per token of one block of type `block` (K and V of every KV group; keys reused as
    values are still cached as two tensors: transformers caches the v-normed values beside the keys)."""
    if block == "global_attention":
        return 2 * arch.num_global_query_groups * arch.global_head_dim
    return 2 * arch.num_query_groups * arch.head_dim if block == "attention" else 0


# ---- a whole model --------------------------------------------------------------------------------


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
