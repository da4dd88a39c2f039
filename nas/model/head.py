"""The LM head as nas's losses apply it: the head weight, and the family's final-logit transform.

The losses never build a model's full `[tokens, vocab]` logits: they take the decoder's last hidden state
(`model.model`) and apply the head a chunk of rows at a time (`nas.train.kd`, `nas.evaluate.loss`). What HF's
`forward` does after the head must then be done here too. Among the supported families that is Gemma's
`final_logit_softcapping` (logits -> cap * tanh(logits / cap)); a config without it (or with None) has none.
"""

from __future__ import annotations

import torch
from torch import nn

from nas.errors import ModelError


def head_weight(model: nn.Module) -> torch.Tensor:
    """The LM-head weight [V, H] (the embedding when tied)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ModelError("nas distillation supports LM heads without bias only")
    return head.weight


def logit_softcap(model: nn.Module) -> float | None:
    """The cap of the model's final-logit soft-capping (Gemma's `final_logit_softcapping`), or None."""
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return float(cap) if cap else None


def softcap_(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`cap * tanh(logits / cap)` in place (no-op for None), as HF's forward applies it."""
    if cap:
        logits.div_(cap).tanh_().mul_(cap)
    return logits


def softcap_grad_(grad: torch.Tensor, capped: torch.Tensor, cap: float | None) -> torch.Tensor:
    """`grad` (w.r.t. the capped logits) times d capped / d raw = 1 - (capped / cap)^2, in place. Consumes
    `capped` (overwritten with the factor)."""
    if cap:
        grad.mul_(capped.div_(cap).square_().neg_().add_(1.0))
    return grad


def chunked_head(model: nn.Module) -> tuple[nn.Module, torch.Tensor, float | None] | None:
    """(decoder, head weight, softcap) when the losses may apply the head themselves: the model has a
    decoder at `.model` and a bias-free linear head; None otherwise (score from HF's full logits)."""
    decoder, head = getattr(model, "model", None), model.get_output_embeddings()
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Linear) or head.bias is not None:
        return None
    return decoder, head.weight, logit_softcap(model)
