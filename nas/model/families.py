"""Per-family facts and module access (Llama, Mistral, Qwen2, Qwen3) in one place.

Every supported family shares the Llama module layout (`model.model.layers[i].self_attn.{q,k,v,o}_proj`,
`.mlp.{gate,up,down}_proj`, two RMSNorms per layer, `model.model.norm`, `model.lm_head`); they differ
in which projections carry a bias and whether attention has per-head q/k norms.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.device import precision_for
from nas.errors import ModelError, first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """What distinguishes one supported `model_type` from another."""

    model_type: str
    qkv_bias_attr: str | None  # config attribute that turns on q/k/v bias (None: never)
    qkv_bias_default: bool  # the family's value when the attribute is absent
    o_bias_follows_qkv: bool  # o_proj bias toggles with the same attribute (Llama's attention_bias)
    qk_norm: bool  # per-head RMSNorm on q and k (Qwen3)
    mlp_bias_attr: str | None = None  # config attribute that turns on MLP bias (None: never)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "attention_bias", False, True, False, mlp_bias_attr="mlp_bias"),
        Family("mistral", None, False, False, False),
        Family("qwen2", None, True, False, False),
        Family("qwen3", "attention_bias", False, True, True),
    )
}


def family_of(config: Any) -> Family:
    """The `Family` of an HF config; a clear error names the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ModelError(f"unsupported model_type {model_type!r}; nas supports {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]


def bias_flags(config: Any) -> tuple[bool, bool, bool]:
    """(qkv_bias, o_bias, mlp_bias) of a config, as its family builds the modules."""
    fam = family_of(config)
    qkv = fam.qkv_bias_default
    if fam.qkv_bias_attr is not None:
        qkv = bool(getattr(config, fam.qkv_bias_attr, fam.qkv_bias_default))
    o_bias = qkv if fam.o_bias_follows_qkv else False
    mlp = bool(getattr(config, fam.mlp_bias_attr, False)) if fam.mlp_bias_attr else False
    return qkv, o_bias, mlp


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM."""
    return model.model.layers


def final_norm(model: nn.Module) -> nn.Module:
    return model.model.norm


def layer_norms(layer: nn.Module) -> list[nn.Module]:
    """The hidden-size norms of one block (not the per-head q/k norms)."""
    return [layer.input_layernorm, layer.post_attention_layernorm]


def load_config(name_or_path: str | Path) -> Any:
    """The config of a supported causal LM (local directory or hub id), without loading weights."""
    from transformers import AutoConfig

    name = str(name_or_path)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise ModelError(f"model directory {name} does not exist; pass a local model directory or a hub id")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a model config from {name!r}: {first_line(e)}") from e
    family_of(config)
    return config


def load_model(
    name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> nn.Module:
    """Load a supported causal LM from a local directory or a hub id, in eval mode."""
    from transformers import AutoModelForCausalLM

    load_config(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(
            f"cannot load model weights from {str(name_or_path)!r} (corrupt or incomplete?): {first_line(e)}"
        ) from e
    return model.to(device).eval()


def load_teacher_and_student(
    teacher: str | Path, student: str | Path, device: torch.device, precision: str = "auto"
):
    """The frozen teacher and the trainable student on `device`, in the dtypes of the precision
    policy (`nas.device`; auto: bf16 teacher and fp32 student on CUDA, both fp32 on CPU)."""
    policy = precision_for(precision, device)
    return (
        load_model(teacher, dtype=policy.teacher_dtype, device=device),
        load_model(student, dtype=policy.student_dtype, device=device),
    )


def load_tokenizer(name_or_path: str | Path) -> Any:
    """The tokenizer saved with a model (local directory or hub id)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name_or_path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load a tokenizer from {str(name_or_path)!r}: {first_line(e)}") from e
