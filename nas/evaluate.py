"""Evaluation: the fixed held-out LM-loss / perplexity protocol (also used to rank candidates).

Protocol: the text is tokenized with the teacher's tokenizer (no BOS added), documents are joined
with EOS and packed into non-overlapping blocks of `seq_len` tokens (stride = seq_len). Each block
is scored on its own: every position but the first predicts the next token, and the loss is the
token-weighted mean cross-entropy over all scored positions of all blocks. Perplexity = exp(loss).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def lm_loss(model: nn.Module, sequences: torch.Tensor, batch_size: int = 8) -> float:
    """Token-weighted mean next-token cross-entropy of `model` on packed `sequences` [N, T]."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = torch.as_tensor(sequences[start : start + batch_size], dtype=torch.long).to(device)
        with autocast_for(device):
            logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total / max(count, 1)


def perplexity(model: nn.Module, sequences: torch.Tensor, batch_size: int = 8) -> float:
    """exp of `lm_loss` under the same protocol."""
    return math.exp(lm_loss(model, sequences, batch_size))


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA; a no-op on CPU, where bf16 is far slower than fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> CUDA when available, else CPU; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
