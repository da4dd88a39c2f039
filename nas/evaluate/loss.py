"""The held-out LM loss protocol (also used to rank candidates); see `nas.evaluate.harness` for the
protocol text and the lm-eval tasks."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nas.device import autocast_for, model_device
from nas.errors import DataError


@torch.no_grad()
def lm_loss(model: nn.Module, sequences: torch.Tensor, batch_size: int = 8) -> float:
    """Token-weighted mean next-token cross-entropy of `model` on packed `sequences` [N, T]; DataError when
    there is nothing to score (an empty set would report a loss of 0, a perplexity of 1)."""
    if len(sequences) == 0 or sequences.shape[-1] < 2:
        raise DataError(
            f"no validation tokens to score ({len(sequences)} sequences): ask for at least one sequence "
            "of at least 2 tokens"
        )
    was_training = model.training
    model.eval()
    device = model_device(model)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for start in range(0, len(sequences), batch_size):
        batch = torch.as_tensor(sequences[start : start + batch_size], dtype=torch.long).to(device)
        with autocast_for(device):
            logits = model(input_ids=batch, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum")
        total += loss.double()
        count += batch[:, 1:].numel()
        del logits, loss  # before the next batch's logits exist
    model.train(was_training)
    return total.item() / max(count, 1)  # one host sync, not one per batch (and none on fake tensors)


def perplexity(model: nn.Module, sequences: torch.Tensor, batch_size: int = 8) -> float:
    """exp of `lm_loss` under the same protocol."""
    return math.exp(lm_loss(model, sequences, batch_size))
