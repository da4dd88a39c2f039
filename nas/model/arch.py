"""`Arch`: the shape of a model in nas's vocabulary, its analytic size, and the HF config mapping."""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from nas.errors import ConfigError, InfeasibleError
from nas.model.families import FAMILIES, Family, bias_flags, family_of
from nas.settings import BUDGET_KINDS

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
        if self.num_experts and not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise InfeasibleError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], got {self.num_experts_per_tok}"
            )

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    @property
    def knobs(self) -> tuple[str, ...]:
        """The size knobs of this arch: `KNOBS`, plus `num_experts` for a mixture of experts."""
        return MOE_KNOBS if self.num_experts else KNOBS

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
        moe = fam.experts
        rope = getattr(config, "rope_parameters", None) or {}
        return cls(
            model_type=fam.model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            ffn_hidden_size=getattr(config, moe.ffn_attr if moe else "intermediate_size"),
            num_attention_heads=heads,
            num_query_groups=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=config.vocab_size,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=mlp_bias,
            qk_norm=fam.qk_norm is not None,
            num_experts=getattr(config, moe.num_experts_attr) if moe else 0,
            num_experts_per_tok=config.num_experts_per_tok if moe else 0,
            head_dim_tied=fam.rope_factors_follow_hidden
            and any(isinstance(rope.get(k), list) for k in ("short_factor", "long_factor")),
        )

    def to_hf_config(self, base_config: Any, kept_layers: list[int] | None = None) -> Any:
        """A copy of `base_config` (the teacher's) reshaped to this arch; `head_dim` is written explicitly.

        `kept_layers` (teacher indices; default: the first `num_layers`) select the entries of the
        family's per-layer config lists (attention types, NoPE layers).
        """
        if family_of(base_config).model_type != self.model_type:
            raise InfeasibleError(
                f"arch is {self.model_type} but the base config is {base_config.model_type}"
            )
        config = copy.deepcopy(base_config)
        config.num_hidden_layers = self.num_layers
        config.hidden_size = self.hidden_size
        moe = self.family.experts
        setattr(config, moe.ffn_attr if moe else "intermediate_size", self.ffn_hidden_size)
        if moe:
            setattr(config, moe.num_experts_attr, self.num_experts)
            config.num_experts_per_tok = self.num_experts_per_tok
        config.num_attention_heads = self.num_attention_heads
        config.num_key_value_heads = self.num_query_groups
        config.head_dim = self.head_dim
        config.tie_word_embeddings = self.tie_word_embeddings
        kept = list(range(self.num_layers)) if kept_layers is None else list(kept_layers)
        if len(kept) != self.num_layers:
            raise InfeasibleError(f"need {self.num_layers} kept layers, got {len(kept)}")
        for name in self.family.layer_lists:
            values = getattr(base_config, name, None)
            if values is not None:
                setattr(config, name, [values[i] for i in kept])
        if hasattr(config, "max_window_layers"):
            config.max_window_layers = min(config.max_window_layers, self.num_layers)
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Arch:
        return cls(**data)

    def replace(self, **knobs: int) -> Arch:
        """This arch with some knobs changed (see `knobs`); fewer experts than the router's top-k
        lower the top-k with them."""
        if "num_experts" in knobs and "num_experts_per_tok" not in knobs:
            knobs["num_experts_per_tok"] = min(self.num_experts_per_tok, knobs["num_experts"])
        return dataclasses.replace(self, **knobs)

    def describe(self) -> str:
        """A short human-readable label, e.g. `L24 H2048 F5632 A16/G8` (MoE: `... E64/k8`)."""
        label = (
            f"L{self.num_layers} H{self.hidden_size} F{self.ffn_hidden_size} "
            f"A{self.num_attention_heads}/G{self.num_query_groups}"
        )
        return f"{label} E{self.num_experts}/k{self.num_experts_per_tok}" if self.num_experts else label


def check_prunable(teacher: Arch, arch: Arch) -> None:
    """Raise `InfeasibleError` unless `arch` can be cut out of `teacher` by keeping a subset of units."""
    fixed = ("model_type", "head_dim", "vocab_size", "qkv_bias", "o_bias", "mlp_bias", "qk_norm")
    fixed += ("head_dim_tied",)
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
    for name in teacher.knobs:
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


def count_params(arch: Arch, active: bool = False) -> int:
    """Exact parameter count of the HF model built from `arch` (tied weights counted once).

    `active`: the parameters one token uses (a MoE counts `num_experts_per_tok` experts, and the whole router);
    for a dense model both counts are the same."""
    fam = arch.family
    h, f, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * d, arch.num_query_groups * d
    attn = h * q + 2 * h * kv + q * h
    attn += (q + 2 * kv) if arch.qkv_bias else 0
    attn += h if arch.o_bias else 0
    attn += {"head": 2 * d, "proj": q + kv, None: 0}[fam.qk_norm]
    attn += arch.num_attention_heads if fam.attention_sinks else 0
    mlp = 3 * h * f + ((2 * f + h) if arch.mlp_bias else 0)
    if arch.num_experts:  # router (+ its bias) + experts
        router = arch.num_experts * (h + fam.experts.bias)
        mlp = router + (arch.num_experts_per_tok if active else arch.num_experts) * mlp
    per_layer = attn + mlp + len(fam.norms) * h
    embed = arch.vocab_size * h
    lm_head = 0 if arch.tie_word_embeddings else arch.vocab_size * h
    return embed + arch.num_layers * per_layer + h + lm_head


def count_budget_params(arch: Arch, budget_kind: str = "total") -> int:
    """The parameters a budget of `budget_kind` ("total" or "active") measures."""
    if budget_kind not in BUDGET_KINDS:
        raise ConfigError(f"budget_kind {budget_kind!r} is not one of {', '.join(BUDGET_KINDS)}")
    return count_params(arch, active=budget_kind == "active")


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
