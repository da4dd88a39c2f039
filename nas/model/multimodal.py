"""Multimodal checkpoints as users download them: a wrapper config (`gemma4`, `mistral3`, `qwen3_5`, ...) that
holds the text model's config in `text_config`, and weights for a vision (or audio) tower beside the text model.

nas prunes and distills the text model only. A wrapper checkpoint is loaded with its own transformers class
(`AutoModelForImageTextToText`, which reads every checkpoint layout the family has shipped), and its text model
(`model.language_model` + `lm_head`) is copied into the family's plain causal LM; everything downstream sees that.
At export the vision tower is either dropped (the default: a text-only causal LM) or kept: the wrapper model is
rebuilt with the pruned `text_config`, the text model's weights are the student's, the towers' are the
teacher's, and each tensor that meets the text model's residual stream (the projector's output, e.g.
`multi_modal_projector.linear_2`) keeps the student's hidden channels.

Why drop by default: nas distills and evaluates on text only, so a kept tower feeds a residual stream that the
distillation never showed it; its image quality is unmeasured. `vision = "keep"` is for users who will then
fine-tune on images, and it is recorded as such in `nas_pruning.json`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.errors import ModelError, first_line
from nas.settings import VISION  # noqa: F401  (re-exported: the choices of `vision`)

log = logging.getLogger(__name__)

TEXT_PREFIX = "model.language_model."  # where every supported wrapper keeps its text model
# wrapper config attributes (outside text_config) that equal the text model's hidden size and follow its cut
HIDDEN_FOLLOWERS = {"qwen3_5": ("vision_config.out_hidden_size",), "qwen3_5_moe": ("vision_config.out_hidden_size",)}


def is_wrapper(config: Any) -> bool:
    """A multimodal wrapper config: one that holds its text model's config in `text_config` (no text
    family's config has one)."""
    text = getattr(config, "text_config", None)
    return text is not None and text is not config


def text_config(config: Any) -> Any:
    """The text model's config of a wrapper (the config itself otherwise), with the wrapper's own tying."""
    if not is_wrapper(config):
        return config
    text = copy.deepcopy(config.text_config)
    if getattr(config, "tie_word_embeddings", None) is not None:  # the wrapper decides whether lm_head is tied
        text.tie_word_embeddings = bool(config.tie_word_embeddings)
    return text


def multimodal_note(vision: str) -> str:
    """What the export of a multimodal teacher holds, in words (the CLI's line and `nas_pruning.json`)."""
    if vision == "keep":
        return "kept (the teacher's vision tower around the pruned text model; not distilled on images)"
    return "dropped (a text-only causal LM)"


def wrapper_type(name_or_path: str | Path | None) -> str | None:
    """The wrapper `model_type` of a teacher (local directory or hub id), or None for a plain text model or a
    name that is no readable model."""
    from transformers import AutoConfig

    if not name_or_path:
        return None
    try:
        config = AutoConfig.from_pretrained(str(name_or_path))
    except (OSError, ValueError):
        return None
    return config.model_type if is_wrapper(config) else None


def _load_wrapper(name: str, dtype: torch.dtype) -> tuple[nn.Module, dict[str, Any]]:
    """The whole multimodal model and `from_pretrained`'s loading info (for the caller's strictness check)."""
    from transformers import AutoModelForImageTextToText

    try:
        model, info = AutoModelForImageTextToText.from_pretrained(
            name, dtype=dtype, output_loading_info=True, use_kernels=False  # kernels: nas.model.families.load_model
        )
    except Exception as e:  # safetensors, torch and transformers each raise their own types
        raise ModelError(f"cannot load the multimodal checkpoint {name!r}: {first_line(e)}") from e
    if not isinstance(getattr(getattr(model, "model", None), "language_model", None), nn.Module):
        raise ModelError(f"{name}: no text model at model.language_model; nas cannot take this wrapper apart")
    return model, info


def load_text_model(name: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, Any]]:
    """The text causal LM inside a wrapper checkpoint (its `model.language_model` and `lm_head`), and the
    wrapper's loading info (`nas.model.families.load_model` checks it is complete)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    wrapper, info = _load_wrapper(name, dtype)
    config = text_config(wrapper.config)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.model.load_state_dict(wrapper.model.language_model.state_dict(), strict=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    else:
        model.lm_head.load_state_dict(wrapper.lm_head.state_dict(), strict=True)
    log.info("%s: the text model (%s) of a %s checkpoint", name, config.model_type, wrapper.config.model_type)
    return model, info


def _fit(tensor: torch.Tensor, shape: torch.Size, hidden: torch.Tensor, teacher_hidden: int, name: str):
    """A tower tensor reshaped to the student wrapper: every axis that changed is the text hidden size, cut to
    the student's kept hidden channels."""
    for axis, (old, new) in enumerate(zip(tensor.shape, shape, strict=True)):
        if old != new:
            if old != teacher_hidden or new != len(hidden):
                raise ModelError(f"{name}: axis {axis} changes {old} -> {new}, not with the text hidden size")
            tensor = tensor.index_select(axis, hidden.to(tensor.device))
    return tensor.clone()


def with_vision(student: nn.Module, teacher: str, hidden: list[int]) -> nn.Module:
    """The teacher's wrapper model with the pruned text model inside (vision kept): tower weights from the
    teacher, cut to the `hidden` channels the student kept where they meet the text model."""
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    dtype = next(student.parameters()).dtype
    wrapper, _ = _load_wrapper(teacher, dtype)  # the same checkpoint the teacher was loaded from, strictly
    config = copy.deepcopy(wrapper.config)
    config.text_config = copy.deepcopy(student.config)
    if getattr(config, "tie_word_embeddings", None) is not None:
        config.tie_word_embeddings = student.config.tie_word_embeddings
    for path in HIDDEN_FOLLOWERS.get(config.model_type, ()):
        owner, attr = path.rsplit(".", 1)
        setattr(getattr(config, owner), attr, student.config.hidden_size)
    with no_init_weights():
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    text, towers = student.state_dict(), wrapper.state_dict()
    index, teacher_hidden = torch.tensor(hidden, dtype=torch.long), wrapper.config.text_config.hidden_size
    weights = {}
    for name, target in model.state_dict().items():
        if name.startswith(TEXT_PREFIX):
            weights[name] = text["model." + name[len(TEXT_PREFIX) :]]
        elif name == "lm_head.weight":
            weights[name] = text[name]
        else:
            weights[name] = _fit(towers[name], target.shape, index, teacher_hidden, name)
    model.load_state_dict(weights, strict=True)
    if student.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
