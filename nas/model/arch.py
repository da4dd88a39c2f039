"""`Arch`: the shape of a model in nas's vocabulary, its analytic size, and the HF config mapping."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from nas.errors import InfeasibleError
from nas.model.families import bias_flags, family_of

KNOBS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


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

    def __post_init__(self) -> None:
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

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @classmethod
    def from_hf_config(cls, config: Any) -> Arch:
        """Read an `Arch` from a transformers config of a supported family."""
        fam = family_of(config)
        qkv_bias, o_bias, mlp_bias = bias_flags(config)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(
            model_type=fam.model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            ffn_hidden_size=config.intermediate_size,
            num_attention_heads=heads,
            num_query_groups=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=fam.qk_norm,
        )

    def to_hf_config(self, base_config: Any, layer_types: list[str] | None = None) -> Any:
        """A copy of `base_config` (the teacher's) reshaped to this arch; `head_dim` is written explicitly.

        `layer_types` are the kept layers' attention types where the family has per-layer types.
        """
        if family_of(base_config).model_type != self.model_type:
            raise InfeasibleError(
                f"arch is {self.model_type} but the base config is {base_config.model_type}"
            )
        config = copy.deepcopy(base_config)
        config.num_hidden_layers = self.num_layers
        config.hidden_size = self.hidden_size
        config.intermediate_size = self.ffn_hidden_size
        config.num_attention_heads = self.num_attention_heads
        config.num_key_value_heads = self.num_query_groups
        config.head_dim = self.head_dim
        config.tie_word_embeddings = self.tie_word_embeddings
        if getattr(base_config, "layer_types", None) is not None:
            types = layer_types or list(base_config.layer_types)[: self.num_layers]
            if len(types) != self.num_layers:
                raise InfeasibleError(f"need {self.num_layers} layer types, got {len(types)}")
            config.layer_types = list(types)
        if hasattr(config, "max_window_layers"):
            config.max_window_layers = min(config.max_window_layers, self.num_layers)
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Arch:
        return cls(**data)

    def replace(self, **knobs: int) -> Arch:
        """This arch with some knobs changed (see `KNOBS`)."""
        return dataclasses.replace(self, **knobs)

    def describe(self) -> str:
        """A short human-readable label, e.g. `L24 H2048 F5632 A16/G8`."""
        return (
            f"L{self.num_layers} H{self.hidden_size} F{self.ffn_hidden_size} "
            f"A{self.num_attention_heads}/G{self.num_query_groups}"
        )


def check_prunable(teacher: Arch, arch: Arch) -> None:
    """Raise `InfeasibleError` unless `arch` can be cut out of `teacher` by keeping a subset of units."""
    fixed = ("model_type", "head_dim", "vocab_size", "qkv_bias", "o_bias", "mlp_bias", "qk_norm")
    for name in fixed:
        if getattr(arch, name) != getattr(teacher, name):
            raise InfeasibleError(f"{name} must stay {getattr(teacher, name)!r}, got {getattr(arch, name)!r}")
    for name in KNOBS:
        if getattr(arch, name) > getattr(teacher, name):
            raise InfeasibleError(
                f"{name}={getattr(arch, name)} is larger than the teacher's {getattr(teacher, name)}"
            )
    if arch.heads_per_group > teacher.heads_per_group:
        raise InfeasibleError(
            f"{arch.num_attention_heads} heads over {arch.num_query_groups} query groups is "
            f"{arch.heads_per_group} heads per group, more than the teacher's {teacher.heads_per_group}; "
            "keep num_attention_heads / num_query_groups <= the teacher's ratio"
        )
    if arch.tie_word_embeddings and not teacher.tie_word_embeddings:
        raise InfeasibleError("cannot tie embeddings of a teacher whose lm_head is untied")


def count_params(arch: Arch) -> int:
    """Exact parameter count of the HF model built from `arch` (tied weights counted once)."""
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    attn = h * q + 2 * h * kv + q * h
    attn += (q + 2 * kv) if arch.qkv_bias else 0
    attn += h if arch.o_bias else 0
    attn += 2 * d if arch.qk_norm else 0
    mlp = 3 * h * f + ((2 * f + h) if arch.mlp_bias else 0)
    per_layer = attn + mlp + 2 * h  # two RMSNorms
    embed = arch.vocab_size * h
    lm_head = 0 if arch.tie_word_embeddings else arch.vocab_size * h
    return embed + arch.num_layers * per_layer + h + lm_head


def kv_cache_bytes(arch: Arch, seq_len: int = 1, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of K and V cache for one sequence of `seq_len` tokens."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * arch.num_layers * arch.num_query_groups * arch.head_dim * seq_len * itemsize


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
