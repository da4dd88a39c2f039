"""Block types of hybrid stacks: what one block of each type holds, its knobs, its size and its state.

Design note (how a hybrid family plugs in; keep this interface stable, announce changes in an `Arch:` commit):

- Every layer of a hybrid stack has one *layer type*, named in nas's vocabulary (`BLOCK_TYPES`):
  `attention` (softmax attention with a KV cache), `global_attention` (Gemma 4's full-attention layers, of
  their own head_dim and KV heads), `linear_attention` (Gated DeltaNet: Qwen3.5, Qwen3-Next),
  `mamba` (Mamba2: Nemotron-H), `mlp` (a dense MLP on its own: Nemotron-H), `moe` (a sparse MoE block on its
  own: Nemotron-H). A layer may hold more than its own block (a Qwen3.5 layer is a mixer *and* an MLP).
- A family declares its stack with `Family.blocks = Blocks(attr, layers, modules)` (`nas.model.families`):
  `attr` is the config list naming each layer's type (Qwen3.5 `layer_types`, Nemotron-H `layers_block_type`);
  `layers` maps each value of that list to the nas block types the layer holds, the layer's own type first
  (Qwen3.5: `"linear_attention" -> ("linear_attention", "mlp")`; Nemotron-H: `"linear_attention" -> ("mamba",)`);
  `modules` maps a nas block type to the attribute of the decoder layer holding it (Qwen3.5:
  `linear_attention -> "linear_attn"`, `attention -> "self_attn"`; Nemotron-H: every type -> `"mixer"`).
- `Arch.layer_types` is the tuple of the layers' nas types, in order. `num_<type>_layers` (e.g.
  `num_linear_attention_layers`, `num_mamba_layers`: `LAYER_KNOBS`) counts the layers of one type; those
  counts are the depth knobs of a hybrid (budgeted and searched per type), and `num_layers` is their sum.
  `Arch.replace(num_<type>_layers=n)` drops the last layers of that type from the pattern; the cut keeps,
  within each type, the layers importance ranks first, so the saved model's pattern (its config and
  `nas_pruning.json`, with the kept teacher indices) can order them differently; counts, parameters and
  memory are the same.
- Each block type's width knobs (`WIDTH_KNOBS`) and the fields a student keeps from its teacher (`FIXED`) are
  `Arch` fields, read from / written to the HF config through `CONFIG_ATTRS` (Arch field -> config attribute):
  - attention: `num_attention_heads`, `num_query_groups` (`head_dim` fixed; `attn_output_gate`: q_proj also
    gives a per-head sigmoid gate, Qwen3.5);
  - global_attention (Gemma 4's full-attention layers beside its sliding-window `attention` layers): the same
    `num_attention_heads` (one knob for both types: transformers gives every layer the config's head count);
    `global_head_dim` (its own head_dim), `num_global_query_groups` (its own KV heads, the config's
    `num_global_key_value_heads`) and `attention_k_eq_v` (no v_proj: the keys are the values) are fixed, so
    query heads are pruned inside the teacher's global KV groups by the same per-head scores as elsewhere and
    `num_attention_heads` must be a multiple of `num_global_query_groups`; all three are written to the
    student's config as `per_layer_config` overrides of its full-attention layers;
  - mlp: `ffn_hidden_size`; moe: `num_experts` (each expert `ffn_hidden_size` wide, as for MoE families;
    a model with MLP and MoE layers, Nemotron-H, has one FFN width for both; a shared expert,
    `shared_expert_ffn_hidden_size`, keeps its width and is cut along hidden_size only, with its sigmoid gate
    where it has one, Qwen3.5-MoE's `shared_expert_gate`);
  - linear_attention: `num_linear_key_heads`, `num_linear_value_heads` (a multiple of the key heads: each key
    head serves `num_linear_value_heads // num_linear_key_heads` consecutive value heads, so value heads are
    pruned within their key head, like query heads within a KV group); `linear_key_head_dim`,
    `linear_value_head_dim`, `linear_conv_kernel` fixed;
  - mamba: `num_mamba_heads` (a multiple of `mamba_groups`, the config's `n_groups`: heads are pruned evenly
    inside each group, the group-aware rule of Minitron-SSM, arXiv 2504.11409 §3), `mamba_head_dim`;
    `mamba_groups`, `ssm_state_size`, `mamba_conv_kernel`, `mamba_conv_bias`, `mamba_bias` fixed.
- `block_params(arch, type)` is one block's parameter count (without the layer's hidden-size norms),
  `block_state(arch, type)` its recurrent state per sequence in elements (constant in the sequence length,
  unlike a KV cache), `block_kv(arch, type)` its KV-cache elements per token.
A new block type is one entry in each table here plus its `Arch` fields (defaults that mean "absent", so stored
Arch dicts of homogeneous models keep loading).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from nas.model.families import FAMILIES, Family, attention_shapes

if TYPE_CHECKING:
    from nas.model.arch import Arch

BLOCK_TYPES = ("attention", "global_attention", "linear_attention", "mamba", "mlp", "moe")
LAYER_KNOBS = {t: f"num_{t}_layers" for t in BLOCK_TYPES}  # depth knobs of a hybrid, one per layer type
# in `describe` (W: Gemma 4's wide full-attention layers)
LETTERS = {"attention": "A", "global_attention": "W", "linear_attention": "D", "mamba": "M", "mlp": "F",
           "moe": "E"}  # fmt: skip
WIDTH_KNOBS = {
    "attention": ("num_attention_heads", "num_query_groups"),
    "global_attention": ("num_attention_heads",),  # the sliding layers' query heads; its KV groups fixed
    "linear_attention": ("num_linear_key_heads", "num_linear_value_heads"),
    "mamba": ("num_mamba_heads", "mamba_head_dim"),
    "mlp": ("ffn_hidden_size",),
    "moe": ("ffn_hidden_size", "num_experts"),
}
FIXED = {
    "global_attention": ("global_head_dim", "num_global_query_groups", "attention_k_eq_v"),
    "moe": ("shared_expert_ffn_hidden_size",),
    "linear_attention": ("linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel"),
    "mamba": ("mamba_groups", "ssm_state_size", "mamba_conv_kernel", "mamba_conv_bias", "mamba_bias"),
}
CONFIG_ATTRS = {  # Arch field -> HF config attribute (transformers 5.24: Qwen3_5TextConfig, NemotronHConfig)
    "linear_attention": (
        ("num_linear_key_heads", "linear_num_key_heads"),
        ("num_linear_value_heads", "linear_num_value_heads"),
        ("linear_key_head_dim", "linear_key_head_dim"),
        ("linear_value_head_dim", "linear_value_head_dim"),
        ("linear_conv_kernel", "linear_conv_kernel_dim"),
    ),
    "mamba": (
        ("num_mamba_heads", "mamba_num_heads"),
        ("mamba_head_dim", "mamba_head_dim"),
        ("mamba_groups", "n_groups"),
        ("ssm_state_size", "ssm_state_size"),
        ("mamba_conv_kernel", "conv_kernel"),
        ("mamba_conv_bias", "use_conv_bias"),
        ("mamba_bias", "use_bias"),
    ),
}


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


def hybrid_fields(config: Any, fam: Family) -> dict[str, Any]:
    """The `Arch` fields of a hybrid stack read from its config (none for a homogeneous family)."""
    if fam.blocks is None:
        return {}
    types = tuple(fam.blocks.layer_type(t) for t in getattr(config, fam.blocks.attr))
    fields: dict[str, Any] = {"layer_types": types, "attn_output_gate": fam.attn_output_gate}
    for layer_type in dict.fromkeys(types):
        for block in fam.blocks.units(layer_type):
            fields |= {name: getattr(config, attr) for name, attr in CONFIG_ATTRS.get(block, ())}
    if "global_attention" in types:  # Gemma 4: per-layer overrides of its full-attention layers
        head_dim, groups = attention_shapes(config)["full_attention"]
        fields |= {"global_head_dim": head_dim, "num_global_query_groups": groups,
                   "attention_k_eq_v": bool(getattr(config, "attention_k_eq_v", False))}  # fmt: skip
    return fields


@functools.lru_cache(maxsize=4096)  # the space asks for the same few patterns for every width
def type_units(model_type: str, layer_types: tuple[str, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(layer type, the block types a layer of it holds) for each layer type of a hybrid, in order."""
    units = FAMILIES[model_type].blocks.units
    return tuple((t, units(t)) for t in dict.fromkeys(layer_types))


@functools.lru_cache(maxsize=4096)
def shortened(layer_types: tuple[str, ...], counts: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    """`layer_types` with only the first `n` layers of each type `t` of the `(t, n)` in `counts`."""
    counts = dict(counts)
    seen: dict[str, int] = {}
    kept = []
    for t in layer_types:
        seen[t] = seen.get(t, 0) + 1
        if seen[t] <= counts.get(t, len(layer_types)):
            kept.append(t)
    return tuple(kept)
