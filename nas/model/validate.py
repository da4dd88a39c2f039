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


def check_config_fields(name: str, raw: dict[str, Any], family: Any) -> None:
    """ModelError naming the first field the family needs that `config.json` (`raw`, as read from the file)
    lacks or gives a non-positive value."""
    needed = list(REQUIRED_FIELDS)
    if family.experts is not None:
        needed += [family.experts.ffn_attr, family.experts.num_experts_attr, "num_experts_per_tok"]
    else:
        needed.append("intermediate_size")
    for field in needed:
        value = raw.get(field)
        if value is None:
            raise ModelError(
                f"config.json of {name} lacks {field}, which a {family.model_type} model needs; "
                "add it (the model's own value) to config.json"
            )
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ModelError(f"config.json of {name}: {field} must be a positive integer, got {value!r}")


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
