"""`Arch`: the shape of a model in nas's vocabulary and the HF config mapping (its analytic size:
`nas.model.size`).

A homogeneous model has identical blocks (`layer_types == ()`); a hybrid stack (Qwen3.5, Nemotron-H) records
each layer's block type in `layer_types` and counts its layers per type (`num_<type>_layers`). How a block
type, its units and its knobs are declared is the design note of `nas.model.blocks`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from nas.errors import InfeasibleError, ModelError
from nas.model.blocks import (
    CONFIG_ATTRS,
    FIXED,
    LAYER_KNOBS,
    LETTERS,
    WIDTH_KNOBS,
    hybrid_fields,
    shortened,
    type_units,
)
from nas.model.families import FAMILIES, Family, bias_flags, family_of, global_value

KNOBS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
MOE_KNOBS = (*KNOBS, "num_experts")  # mixture of experts: ffn_hidden_size is each expert's FFN width
MOE_ALIGN = 8  # expert widths in elements: 16 bytes in bf16, as torch's grouped_mm needs


@dataclass(frozen=True)
class Arch:
    """A homogeneous decoder-only architecture (the same widths in every layer)."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0  # 0: a dense model
    num_experts_per_tok: int = 0  # the router's top-k (never more than num_experts)
    head_dim_tied: bool = False  # hidden_size must be num_attention_heads * head_dim (Phi-3 longrope)
    # hybrid stacks (`nas.model.blocks`): () for a homogeneous model
    layer_types: tuple[str, ...] = ()  # each layer's block type, in order
    attn_output_gate: bool = False  # q_proj also gives a per-head sigmoid output gate (Qwen3.5)
    num_linear_key_heads: int = 0  # Gated DeltaNet query/key heads per linear-attention layer
    num_linear_value_heads: int = 0  # Gated DeltaNet value heads (a multiple of the key heads)
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel: int = 0
    num_mamba_heads: int = 0  # Mamba2 heads per mamba layer (a multiple of mamba_groups)
    mamba_head_dim: int = 0
    mamba_groups: int = 0  # the config's n_groups (B and C are shared within a group)
    ssm_state_size: int = 0
    mamba_conv_kernel: int = 0
    mamba_conv_bias: bool = False
    mamba_bias: bool = False  # in_proj and out_proj biases
    shared_expert_ffn_hidden_size: int = 0  # an always-on shared expert's width beside the routed ones (kept)
    # Gemma 4's full-attention layers (`global_attention` layers; fixed, `nas.model.blocks`): 0 where absent
    global_head_dim: int = 0  # their head_dim (the config's global_head_dim)
    num_global_query_groups: int = 0  # their KV groups (the config's num_global_key_value_heads)
    attention_k_eq_v: bool = False  # they have no v_proj: the keys are also the values

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer_types", tuple(self.layer_types))  # a JSON list from a stored dict
        if self.layer_types:
            self._check_hybrid()
        for name in (*KNOBS, "head_dim", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InfeasibleError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise InfeasibleError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_query_groups ({self.num_query_groups})"
            )
        if self.hidden_size % self.num_attention_heads:  # transformers' config validation rejects it
            raise InfeasibleError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads}), or transformers cannot load the saved model"
            )
        if self.head_dim_tied and self.hidden_size != self.num_attention_heads * self.head_dim:
            raise InfeasibleError(
                f"hidden_size ({self.hidden_size}) must equal num_attention_heads * head_dim "
                f"({self.num_attention_heads} * {self.head_dim}): this config's longrope factors are sized "
                "by hidden_size / num_attention_heads"
            )
        if self.num_experts and (self.hidden_size % MOE_ALIGN or self.ffn_hidden_size % MOE_ALIGN):
            raise InfeasibleError(
                f"a mixture of experts needs hidden_size ({self.hidden_size}) and ffn_hidden_size "
                f"({self.ffn_hidden_size}) that are multiples of {MOE_ALIGN}: transformers' grouped-matmul expert "
                "kernels need rows of a multiple of 16 bytes"
            )
        if self.num_experts and self.num_experts < self.family.min_experts:
            raise InfeasibleError(
                f"num_experts must be at least {self.family.min_experts} for {self.model_type}: its router takes "
                "the best two scores of each expert group"
            )
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise InfeasibleError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}"
            )

    def _check_hybrid(self) -> None:
        if len(self.layer_types) != self.num_layers:
            raise InfeasibleError(f"num_layers ({self.num_layers}) must equal len(layer_types) ({len(self.layer_types)})")
        blocks = self.blocks
        global_groups = self.num_global_query_groups
        if "global_attention" in blocks and (
            self.global_head_dim < 1 or global_groups < 1 or self.num_attention_heads % global_groups
        ):
            raise InfeasibleError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_global_query_groups "
                f"({self.num_global_query_groups}, the full-attention layers' KV heads, kept as the teacher's)"
            )
        if "linear_attention" in blocks and (
            self.num_linear_key_heads < 1 or self.num_linear_value_heads % self.num_linear_key_heads
        ):
            raise InfeasibleError(
                f"num_linear_value_heads ({self.num_linear_value_heads}) must be a positive multiple of "
                f"num_linear_key_heads ({self.num_linear_key_heads}): each key head serves whole value heads"
            )
        if "mamba" in blocks and (
            self.mamba_head_dim < 1 or self.mamba_groups < 1 or self.num_mamba_heads < 1
            or self.num_mamba_heads % self.mamba_groups
        ):
            raise InfeasibleError(
                f"num_mamba_heads ({self.num_mamba_heads}) must be a positive multiple of mamba_groups "
                f"({self.mamba_groups}) and mamba_head_dim ({self.mamba_head_dim}) positive: heads are kept "
                "evenly in each group"
            )

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def blocks(self) -> tuple[str, ...]:
        """The block types of this arch's layers, in nas's vocabulary, once each (homogeneous: attention, and
        mlp or moe)."""
        if not self.layer_types:
            return ("attention", "moe" if self.num_experts else "mlp")
        return tuple(dict.fromkeys(u for _, units in type_units(self.model_type, self.layer_types) for u in units))

    def layer_count(self, layer_type: str) -> int:
        """How many layers of type `layer_type` (homogeneous: every layer is an attention layer)."""
        return self.layer_types.count(layer_type) if self.layer_types else self.num_layers * (layer_type == "attention")

    def __getattr__(self, name: str) -> int:  # num_<type>_layers: the per-type layer counts
        for layer_type, knob in LAYER_KNOBS.items():
            if name == knob:
                return self.layer_count(layer_type)
        raise AttributeError(name)

    @property
    def knobs(self) -> tuple[str, ...]:
        """The size knobs of this arch: `KNOBS`, plus `num_experts` for a mixture of experts; a hybrid has one
        layer count per layer type instead of `num_layers`, and the width knobs of each of its block types."""
        if not self.layer_types:
            return MOE_KNOBS if self.num_experts else KNOBS
        depth = tuple(LAYER_KNOBS[t] for t in dict.fromkeys(self.layer_types))
        widths = ("hidden_size", *(k for b in self.blocks for k in WIDTH_KNOBS[b]))
        return depth + tuple(dict.fromkeys(widths))

    @property
    def linear_values_per_key(self) -> int:
        return self.num_linear_value_heads // max(self.num_linear_key_heads, 1)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def global_heads_per_group(self) -> int:
        """Query heads per KV group of a full-attention (`global_attention`) layer."""
        return self.num_attention_heads // max(self.num_global_query_groups, 1)

    @classmethod
    def from_hf_config(cls, config: Any) -> Arch:
        """Read an `Arch` from a transformers config of a supported family."""
        fam = family_of(config)
        qkv_bias, o_bias, mlp_bias = bias_flags(config)
        heads = config.num_attention_heads
        head_dim = global_value(config, "head_dim") or config.hidden_size // heads
        rope = getattr(config, "rope_parameters", None) or {}
        return cls(
            model_type=fam.model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_attention_heads=heads,
            num_query_groups=global_value(config, "num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)) and fam.ties_embeddings,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=fam.qk_norm is not None,
            **_ffn_fields(config, fam),
            head_dim_tied=fam.rope_factors_follow_hidden
            and any(isinstance(rope.get(k), list) for k in ("short_factor", "long_factor")),
            **hybrid_fields(config, fam),
        )

    def to_hf_config(self, base_config: Any, kept_layers: list[int] | None = None) -> Any:
        """A copy of `base_config` (the teacher's) reshaped to this arch; `head_dim` is written explicitly.

        `kept_layers` (teacher indices; default: the first `num_layers`, a hybrid's first layers of each type)
        select the entries of the family's per-layer config lists (attention types, NoPE layers, block types).
        """
        if family_of(base_config).model_type != self.model_type:
            raise InfeasibleError(
                f"arch is {self.model_type} but the base config is {base_config.model_type}"
            )
        config = copy.deepcopy(base_config)
        if "global_attention" in self.blocks:
            config.per_layer_config = None  # written again below, for the kept layers
        config.num_hidden_layers = self.num_layers
        config.hidden_size = self.hidden_size
        moe = self.family.experts
        if "mlp" in self.blocks or "moe" not in self.blocks:
            config.intermediate_size = self.ffn_hidden_size
        if "moe" in self.blocks:
            setattr(config, moe.ffn_attr, self.ffn_hidden_size)
            setattr(config, moe.num_experts_attr, self.num_experts)
            config.num_experts_per_tok = self.num_experts_per_tok
        config.num_attention_heads = self.num_attention_heads
        config.num_key_value_heads = self.num_query_groups
        config.head_dim = self.head_dim
        config.tie_word_embeddings = self.tie_word_embeddings
        kept = self._first_layers(base_config) if kept_layers is None else list(kept_layers)
        if len(kept) != self.num_layers:
            raise InfeasibleError(f"need {self.num_layers} kept layers, got {len(kept)}")
        fam = self.family
        for name in (*fam.layer_lists, *((fam.blocks.attr,) if fam.blocks else ())):
            values = getattr(base_config, name, None)
            if values is not None:
                setattr(config, name, [values[i] for i in kept])
        for block in self.blocks:
            for field_name, attr in CONFIG_ATTRS.get(block, ()):
                setattr(config, attr, getattr(self, field_name))
        if hasattr(config, "max_window_layers"):
            config.max_window_layers = min(config.max_window_layers, self.num_layers)
        if "global_attention" in self.blocks:  # Gemma 4: the full-attention layers' own shapes
            shape = {"head_dim": self.global_head_dim, "num_key_value_heads": self.num_global_query_groups}
            full = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
            config.per_layer_config = {i: dict(shape) for i in full}
        return config

    def _first_layers(self, base_config: Any) -> list[int]:
        """The teacher layers a cut keeps by default: the first `num_layers` (a hybrid: the first of each type)."""
        if not self.layer_types:
            return list(range(self.num_layers))
        fam, seen, kept = self.family, {}, []
        for i, hf_type in enumerate(getattr(base_config, fam.blocks.attr)):
            t = fam.blocks.layer_type(hf_type)
            seen[t] = seen.get(t, 0) + 1
            if seen[t] <= self.layer_count(t):
                kept.append(i)
        return kept

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON values (`layer_types` a list), as a study or an importance file stores them."""
        return dataclasses.asdict(self) | {"layer_types": list(self.layer_types)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Arch:
        return cls(**data)

    def replace(self, **knobs: int) -> Arch:
        """This arch with some knobs changed (see `knobs`); fewer experts than the router's top-k
        lower the top-k with them. A hybrid's layer counts (`num_<type>_layers`) drop the last layers of
        their type from `layer_types` (the cut decides which teacher layers stay); `num_layers=n` alone on a
        hybrid keeps the counts of the pattern's first n layers."""
        return dataclasses.replace(self, **self._changes(knobs))

    def sized(self, **knobs: int) -> Arch:
        """`replace` without the validity checks: a shape to count (the space bisects sizes with it), never to
        build."""
        arch = object.__new__(Arch)
        arch.__dict__.update(self.__dict__, **self._changes(knobs))
        return arch

    def _changes(self, knobs: dict[str, int]) -> dict[str, Any]:
        knobs = dict(knobs)
        if "num_experts" in knobs and "num_experts_per_tok" not in knobs:
            knobs["num_experts_per_tok"] = min(self.num_experts_per_tok, knobs["num_experts"])
        counts = {t: knobs.pop(k) for t, k in LAYER_KNOBS.items() if k in knobs}
        if counts and not self.layer_types:
            raise InfeasibleError(f"{', '.join(LAYER_KNOBS[t] for t in counts)}: not a hybrid stack; set num_layers")
        if self.layer_types and "num_layers" in knobs and not counts:  # the counts of the pattern's first layers
            prefix = self.layer_types[: knobs["num_layers"]]
            counts = {t: prefix.count(t) for t in dict.fromkeys(self.layer_types)}
        if counts:
            knobs["layer_types"] = shortened(self.layer_types, tuple(counts.items()))
            knobs["num_layers"] = len(knobs["layer_types"])
        return knobs

    def describe(self) -> str:
        """A short human-readable label, e.g. `L24 H2048 F5632 A16/G8` (MoE: `... E64/k8`; a hybrid:
        `L32=24D+8A H4096 F12288 A16/G4 D16/32` with linear-attention key/value heads, `M128x64` Mamba heads
        x head_dim)."""
        depth = f"L{self.num_layers}"
        if self.layer_types:
            depth += "=" + "+".join(f"{self.layer_count(t)}{LETTERS[t]}" for t in dict.fromkeys(self.layer_types))
        parts = [depth, f"H{self.hidden_size}"]
        blocks = self.blocks
        if "mlp" in blocks or "moe" in blocks:
            parts.append(f"F{self.ffn_hidden_size}")
        if "attention" in blocks:
            parts.append(f"A{self.num_attention_heads}/G{self.num_query_groups}")
        if "global_attention" in blocks:  # the full-attention layers' KV groups and head_dim (fixed)
            wide = f"W{self.num_attention_heads}/G{self.num_global_query_groups}x{self.global_head_dim}"
            parts.append(wide)
        if "linear_attention" in blocks:
            parts.append(f"D{self.num_linear_key_heads}/{self.num_linear_value_heads}")
        if "mamba" in blocks:
            parts.append(f"M{self.num_mamba_heads}x{self.mamba_head_dim}")
        if self.num_experts:
            parts.append(f"E{self.num_experts}/k{self.num_experts_per_tok}")
        return " ".join(parts)


def _ffn_fields(config: Any, fam: Family) -> dict[str, Any]:
    """`ffn_hidden_size` (the MLP's width, or each expert's) and the experts of a config. A hybrid stack has
    experts only where it has MoE layers; with MLP layers too (Nemotron-H), both must be one width."""
    moe = fam.experts
    types = set(getattr(config, fam.blocks.attr)) if fam.blocks else set()
    has_moe = moe is not None and (not fam.blocks or any("moe" in fam.blocks.units_of_hf(t) for t in types))
    has_mlp = not moe or (fam.blocks is not None and any("mlp" in fam.blocks.units_of_hf(t) for t in types))
    widths = {config.intermediate_size} if has_mlp or not has_moe else set()  # (no FFN layer: the config's)
    widths |= {getattr(config, moe.ffn_attr)} if has_moe else set()
    if len(widths) != 1:
        raise ModelError(
            f"this {fam.model_type} has MLP layers {config.intermediate_size} wide and experts "
            f"{getattr(config, moe.ffn_attr)} wide: nas prunes one FFN width (ffn_hidden_size) for both"
        )
    if not has_moe:
        return {"ffn_hidden_size": widths.pop()}
    shared = getattr(config, moe.shared_attr) if moe.shared_attr else 0
    return {"ffn_hidden_size": widths.pop(), "num_experts": getattr(config, moe.num_experts_attr),
            "num_experts_per_tok": config.num_experts_per_tok, "shared_expert_ffn_hidden_size": shared}  # fmt: skip


def check_prunable(teacher: Arch, arch: Arch) -> None:
    """Raise `InfeasibleError` unless `arch` can be cut out of `teacher` by keeping a subset of units."""
    fixed = ("model_type", "head_dim", "vocab_size", "qkv_bias", "o_bias", "mlp_bias", "qk_norm")
    fixed += ("head_dim_tied", "attn_output_gate", *(f for b in teacher.blocks for f in FIXED.get(b, ())))
    for name in fixed:
        if getattr(arch, name) != getattr(teacher, name):
            raise InfeasibleError(f"{name} must stay {getattr(teacher, name)!r}, got {getattr(arch, name)!r}")
    if bool(arch.num_experts) != bool(teacher.num_experts):
        raise InfeasibleError("a mixture-of-experts teacher gives mixture-of-experts students only")
    if arch.num_experts_per_tok != min(teacher.num_experts_per_tok, arch.num_experts):
        raise InfeasibleError(
            f"num_experts_per_tok must be min(teacher's {teacher.num_experts_per_tok}, num_experts) = "
            f"{min(teacher.num_experts_per_tok, arch.num_experts)}, got {arch.num_experts_per_tok}"
        )
    _check_layer_types(teacher, arch)
    for name in teacher.knobs:
        if getattr(arch, name) > getattr(teacher, name):
            raise InfeasibleError(
                f"{name}={getattr(arch, name)} is larger than the teacher's {getattr(teacher, name)}"
            )
    ratios = [("num_attention_heads", "num_query_groups", "heads_per_group", "heads per group")]
    if "linear_attention" in teacher.blocks:
        ratios.append(("num_linear_value_heads", "num_linear_key_heads", "linear_values_per_key",
                       "linear-attention value heads per key head"))  # fmt: skip
    for top, bottom, ratio, what in ratios:
        if getattr(arch, ratio) > getattr(teacher, ratio):
            raise InfeasibleError(
                f"{getattr(arch, top)} {top} over {getattr(arch, bottom)} {bottom} is {getattr(arch, ratio)} "
                f"{what}, more than the teacher's {getattr(teacher, ratio)}; keep {top} / {bottom} <= the "
                "teacher's ratio"
            )
    if arch.tie_word_embeddings and not teacher.tie_word_embeddings:
        raise InfeasibleError("cannot tie embeddings of a teacher whose lm_head is untied")


def _check_layer_types(teacher: Arch, arch: Arch) -> None:
    """A hybrid student keeps at least one layer of each of its teacher's layer types, and no other type."""
    if bool(arch.layer_types) != bool(teacher.layer_types):
        raise InfeasibleError("a hybrid teacher gives hybrid students only (and a homogeneous one homogeneous)")
    for t in dict.fromkeys(teacher.layer_types):
        if arch.layer_count(t) < 1:
            raise InfeasibleError(f"{LAYER_KNOBS[t]} must be at least 1: a student keeps every layer type")
    extra = set(arch.layer_types) - set(teacher.layer_types)
    if extra:
        raise InfeasibleError(f"layer types {sorted(extra)} are not in the teacher")
