"""Checks that a model is sound before any work uses it: its config.json names every field the family
needs (read from the file itself: transformers fills a missing field with its own default, e.g. a
4096-wide Llama), its weights are floating point (an integer tensor would be cast silently), every weight
is finite (a NaN teacher gives NaN scores that pruning and search would use), and its tokenizer fits the
embedding. Each failure is one `ModelError` naming the field or tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.errors import ModelError

# the fields `Arch.from_hf_config` reads without a fallback of its own
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# safetensors dtype codes of weights a supported family loads (the fp8/int codes are quantised checkpoints)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def check_config_fields(name: str, raw: dict[str, Any], family: Any, aliases: dict[str, str] | None = None) -> None:
    """ModelError naming the first field the family needs that `config.json` (`raw`, as read from the file)
    lacks or gives a non-positive value. `aliases`: the config class's `attribute_map` (transformers 5.24's
    Qwen3-MoE writes `num_local_experts` for `num_experts`); a field given under either name counts."""
    aliases = aliases or {}
    either = {**{v: k for k, v in aliases.items()}, **aliases}
    needed = list(REQUIRED_FIELDS)
    units = _hybrid_units(name, raw, family)
    if units is not None:  # a hybrid stack: its layer list counts the layers; FFN fields where it has such layers
        needed.remove("num_hidden_layers")
    if family.experts is not None and (units is None or "moe" in units):
        needed += [family.experts.ffn_attr, family.experts.num_experts_attr, "num_experts_per_tok"]
    if family.experts is None or (units is not None and "mlp" in units):
        needed.append("intermediate_size")
    for field in needed:
        value = raw.get(field, raw.get(either.get(field, field)))
        if value is None:
            raise ModelError(
                f"config.json of {name} lacks {field}, which a {family.model_type} model needs; "
                "add it (the model's own value) to config.json"
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelError(f"config.json of {name}: {field} must be a positive integer, got {value!r}")


# Nemotron-H's older `hybrid_override_pattern` letters (transformers' `NemotronHConfig._pattern_to_list`)
PATTERN_LETTERS = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}


def _hybrid_units(name: str, raw: dict[str, Any], family: Any) -> set[str] | None:
    """The nas block types of a hybrid stack's layers as `config.json` lists them (None: not a hybrid family)."""
    if family.blocks is None:
        return None
    types = raw.get(family.blocks.attr)
    if types is None and isinstance(raw.get("hybrid_override_pattern"), str):
        types = [PATTERN_LETTERS.get(c, c) for c in raw["hybrid_override_pattern"]]
    if not types:
        raise ModelError(
            f"config.json of {name} lacks {family.blocks.attr}, the type of each layer a {family.model_type} "
            "model needs; add it (the model's own list) to config.json"
        )
    return {u for t in dict.fromkeys(types) for u in family.blocks.units_of_hf(t)}


def check_weight_dtypes(file: Path, dtypes: dict[str, str]) -> None:
    """ModelError naming the first tensor of a safetensors file (`dtypes`: name -> dtype code from its
    header) that is not floating point."""
    bad = sorted(name for name, code in dtypes.items() if code not in FLOAT_DTYPES)
    if bad:
        raise ModelError(
            f"weights {file}: tensor {bad[0]} is {dtypes[bad[0]]}, not floating point "
            f"({len(bad)} such tensor(s)); a model's weights are {'/'.join(FLOAT_DTYPES)}"
        )


def check_finite(model: nn.Module, where: str) -> None:
    """ModelError naming the first floating tensor of `model` that holds NaN or infinity (one pass over
    the weights, no copy)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ModelError(
                f"weights {where}: tensor {name} holds {bad} NaN/inf value(s) of {tensor.numel()}; "
                "the model is numerically broken (re-export it, or use an earlier checkpoint)"
            )


def check_tokenizer_fits(tokenizer: Any, config: Any, name: str) -> None:
    """ModelError when the tokenizer has ids the model cannot embed (a smaller tokenizer than the padded
    embedding is normal). Ids past the embedding that are only a pad or unknown token are let through:
    nas packs without padding, and transformers' Qwen2 tokenizer adds such a token of its own at load."""
    unused = {tokenizer.pad_token_id, tokenizer.unk_token_id} - {
        tokenizer.eos_token_id,
        tokenizer.bos_token_id,
    }
    ids = [i for i in range(config.vocab_size, len(tokenizer)) if i not in unused]
    if ids:
        raise ModelError(
            f"the tokenizer of {name} has {len(tokenizer)} tokens but its vocab_size (the embedding) is "
            f"{config.vocab_size}: {len(ids)} id(s) from {ids[0]} on cannot be embedded; save the model's own "
            "tokenizer with it"
        )
