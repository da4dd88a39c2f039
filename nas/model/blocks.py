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
- `block_params(arch, type)` (in `nas.model.size`, beside the counts that add them up) is one block's parameter count (without the layer's hidden-size norms),
  `block_state(arch, type)` its recurrent state per sequence in elements (constant in the sequence length,
  unlike a KV cache), `block_kv(arch, type)` its KV-cache elements per token.
A new block type is one entry in each table here plus its `Arch` fields (defaults that mean "absent", so stored
Arch dicts of homogeneous models keep loading).
"""

from __future__ import annotations

import functools
from typing import Any

from nas.model.families import FAMILIES, Family, attention_shapes

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
