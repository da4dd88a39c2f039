"""The held-out LM loss protocol (also used to rank candidates); see `nas.evaluate.harness` for the
protocol text and the lm-eval tasks.

The loss never holds a batch's full `[tokens, vocab]` logits: at a 128k vocabulary the fp32 logits of
8 x 4096 tokens are 17 GB. The decoder's last hidden state is scored with the LM head applied
`CHUNK_TOKENS` rows at a time (with the family's final-logit soft-cap, `nas.model.head`), the same way
the distillation loss applies it; a model without a plain linear head is scored from HF's logits."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nas.device import autocast_for, model_device
from nas.errors import DataError
from nas.model.head import chunked_head, softcap_

CHUNK_TOKENS = 1024  # rows of logits alive at a time


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
        total += _summed_ce(model, batch)
        count += batch[:, 1:].numel()
    model.train(was_training)
    return total.item() / max(count, 1)  # one host sync, not one per batch (and none on fake tensors)


@torch.no_grad()
def sequence_losses(model: nn.Module, sequences: torch.Tensor, batch_size: int = 8) -> list[float]:
    """Mean next-token cross-entropy of each of `sequences` [N, T], same protocol as `lm_loss` (their mean
    is `lm_loss`: every sequence has T - 1 scored tokens); for the bootstrap of the validation noise."""
    if len(sequences) == 0 or sequences.shape[-1] < 2:
        raise DataError(f"no validation tokens to score ({len(sequences)} sequences)")
    was_training = model.training
    model.eval()
    device = model_device(model)
    out = []
    for start in range(0, len(sequences), batch_size):
        batch = torch.as_tensor(sequences[start : start + batch_size], dtype=torch.long).to(device)
        out += (_token_ce(model, batch).view(len(batch), -1).mean(dim=1)).tolist()
    model.train(was_training)
    return out


def _summed_ce(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of one batch [B, T] (float64 scalar), the logits in float32."""
    return _token_ce(model, batch).sum()


def _token_ce(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every position of one batch [B, T] (float64 [B * (T - 1)])."""
    labels = batch[:, 1:].flatten()
    head = chunked_head(model)
    with autocast_for(batch.device):
        if head is None:
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].flatten(0, 1)
            return F.cross_entropy(logits.float(), labels, reduction="none").double()
        decoder, weight, cap = head
        hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state[:, :-1].flatten(0, 1)
        parts = []
        for start in range(0, len(hidden), CHUNK_TOKENS):
            rows = slice(start, start + CHUNK_TOKENS)
            logits = softcap_(F.linear(hidden[rows], weight).float(), cap)
            parts.append(F.cross_entropy(logits, labels[rows], reduction="none").double())
        return torch.cat(parts)


def perplexity(model: nn.Module, sequences: torch.Tensor, batch_size: int = 8) -> float:
    """exp of `lm_loss` under the same protocol."""
    return math.exp(lm_loss(model, sequences, batch_size))
