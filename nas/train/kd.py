"""The distillation loss: forward KL(teacher || student) on logits, fused with the LM heads and chunked.

Why fused and chunked: at a 128k vocabulary, the fp32 logits of an 8k-token batch are 4 GB, and the
plain `kl_div(log_softmax(s), log_softmax(t))` holds several such tensors at once (both logits, both
log-softmaxes, their gradients). Here the LM heads are applied `chunk_tokens` rows at a time to the final
hidden states, and the gradients w.r.t. the student's hidden states and head weight are computed
analytically in the same pass (as Liger-Kernel's fused linear losses do). Peak memory is a few
`[chunk_tokens, vocab]` fp32 tensors, and backward only rescales the stored gradients (no recomputation).

Definitions (n tokens, T = temperature, p = softmax(t / T), q = softmax(s / T), s / t the student /
teacher logits of one token):

    kl   = (1 / n) * sum_tokens KL(p || q)                     d kl / d s = (q - p) / (T * n)
    ce   = (1 / m) * sum_labelled -log softmax(s)[label]       d ce / d s = (softmax(s) - onehot) / m
    loss = (1 - ce_weight) * kl + ce_weight * ce               (no teacher: loss = ce)

where m counts the labelled tokens (label != -100). The KL is *not* multiplied by T^2 (Hinton et al.
do, to keep the gradient scale across temperatures): at the default T = 1 both agree, and this way
`kl` is the true KL at temperature T, the number that is logged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nas.device import autocast_for
from nas.errors import ModelError

IGNORE_INDEX = -100


@dataclass(frozen=True)
class KDSpec:
    """How to combine the terms (see the module docstring)."""

    temperature: float = 1.0
    ce_weight: float = 0.0
    chunk_tokens: int = 1024
    compute_dtype: torch.dtype = torch.float32  # dtype of the head matmuls (bf16 under CUDA autocast)


@dataclass
class KDLoss:
    """The differentiable total `loss` and its detached parts (None when a term is not computed)."""

    loss: torch.Tensor
    kl: torch.Tensor | None
    ce: torch.Tensor | None


def kd_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head_weight: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk_tokens: int = 1024,
) -> KDLoss:
    """Chunked forward KL(teacher || student) (+ optional CE) from final hidden states and LM-head weights.

    `hidden` [..., H] is the student's last hidden state, `head_weight` [V, H] its lm_head weight
    (the embedding when tied: autograd adds both gradients); `teacher_hidden` [..., H_t] and
    `teacher_head_weight` [V, H_t] the teacher's (no gradient flows to them). `labels` [...] are
    next-token ids (-100: ignored), needed when `ce_weight > 0` or there is no teacher.
    """
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    has_teacher = teacher_hidden is not None
    if has_teacher:
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        teacher_head_weight = teacher_head_weight.detach()
    if (not has_teacher or ce_weight > 0) and labels is None:
        raise ValueError("kd_loss needs labels for the cross-entropy term")
    labels = labels.reshape(-1) if labels is not None else None
    spec = KDSpec(
        float(temperature), float(ce_weight) if has_teacher else 1.0, int(chunk_tokens), _dtype(hidden)
    )
    grad_on = torch.is_grad_enabled()  # forward always runs in no-grad mode: ask here
    loss, kl, ce = _FusedLinearKD.apply(
        hidden2, head_weight, teacher_hidden, teacher_head_weight, labels, spec, grad_on
    )
    return KDLoss(loss, kl if has_teacher else None, ce if spec.ce_weight > 0 else None)


def model_kd_loss(
    student: nn.Module,
    teacher: nn.Module | None,
    input_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk_tokens: int = 1024,
) -> KDLoss:
    """`kd_loss` of two HF causal LMs on token ids [B, T] (bf16 autocast on CUDA); no teacher: LM loss.
    The full logits are never built: each model's `.model` gives the last hidden state, and the heads
    are applied chunk by chunk inside `kd_loss`."""
    with autocast_for(input_ids.device):
        hidden = student.model(input_ids=input_ids, use_cache=False).last_hidden_state
        teacher_hidden = teacher_weight = None
        if teacher is not None:
            with torch.no_grad():
                teacher_hidden = teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state
            teacher_weight = head_weight(teacher)
        return kd_loss(
            hidden,
            head_weight(student),
            teacher_hidden,
            teacher_weight,
            next_token_labels(input_ids),
            temperature=temperature,
            ce_weight=ce_weight,
            chunk_tokens=chunk_tokens,
        )


@torch.no_grad()
def kl_to_teacher(
    student: nn.Module,
    teacher: nn.Module,
    sequences: torch.Tensor,
    batch_size: int = 8,
    chunk_tokens: int = 1024,
) -> float:
    """Token-weighted mean KL(teacher || student) at temperature 1 over all positions of `sequences` [N, T]."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(sequences), batch_size):
        batch = torch.as_tensor(sequences[start : start + batch_size], dtype=torch.long).to(device)
        total += model_kd_loss(student, teacher, batch, chunk_tokens=chunk_tokens).kl.item() * batch.numel()
        count += batch.numel()
    student.train(was_training)
    return total / max(count, 1)


def head_weight(model: nn.Module) -> torch.Tensor:
    """The LM-head weight [V, H] (the embedding when tied)."""
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ModelError("nas distillation supports LM heads without bias only")
    return head.weight


def next_token_labels(input_ids: torch.Tensor) -> torch.Tensor:
    """Labels for position i are input_ids[i + 1]; the last position of every sequence is ignored."""
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def _dtype(hidden: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for the tensor's device, else its own dtype."""
    kind = hidden.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return hidden.dtype


class _FusedLinearKD(torch.autograd.Function):
    """Forward computes the loss and, if needed, the input gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, labels, spec: KDSpec, grad_on: bool):
        need_h, need_w = grad_on and ctx.needs_input_grad[0], grad_on and ctx.needs_input_grad[1]
        loss, kl, ce, grad_h, grad_w = _chunked(
            hidden, weight, teacher_hidden, teacher_weight, labels, spec, need_h, need_w
        )
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_loss.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_w * grad_loss.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None, None


def _chunked(
    hidden, weight, teacher_hidden, teacher_weight, labels, spec: KDSpec, need_h: bool, need_w: bool
):
    """Loop over row chunks; returns (loss, kl, ce, grad_hidden, grad_weight) with empty grads if unneeded."""
    n, device = hidden.shape[0], hidden.device
    has_teacher = teacher_hidden is not None
    n_labelled = int((labels != IGNORE_INDEX).sum()) if labels is not None and spec.ce_weight > 0 else 0
    kd_scale = (1.0 - spec.ce_weight) / (spec.temperature * n) if has_teacher else 0.0
    ce_scale = spec.ce_weight / max(n_labelled, 1)
    grad_h = torch.empty_like(hidden) if need_h else hidden.new_empty(0)
    acc = torch.promote_types(spec.compute_dtype, torch.float32)  # softmax / accumulation dtype
    grad_w = torch.zeros(weight.shape, dtype=acc, device=device) if need_w else weight.new_empty(0)
    kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    w = weight.detach().to(spec.compute_dtype)
    tw = teacher_weight.to(spec.compute_dtype) if has_teacher else None
    with torch.no_grad():
        for start in range(0, n, spec.chunk_tokens):
            rows = slice(start, min(start + spec.chunk_tokens, n))
            h = hidden[rows].detach().to(spec.compute_dtype)
            logits = torch.mm(h, w.t()).to(acc)
            grad = None
            if has_teacher:
                teacher_logits = torch.mm(teacher_hidden[rows].to(spec.compute_dtype), tw.t()).to(acc)
                kl, grad = _kl_chunk(logits, teacher_logits, spec.temperature, kd_scale)
                kl_sum += kl
            if spec.ce_weight > 0:
                ce, ce_grad = _ce_chunk(logits, labels[rows], ce_scale)
                ce_sum += ce
                grad = ce_grad if grad is None else grad.add_(ce_grad)
            del logits
            if need_h:
                grad_h[rows] = torch.mm(grad.to(spec.compute_dtype), w).to(hidden.dtype)
            if need_w:
                grad_w += torch.mm(grad.t().to(spec.compute_dtype), h).to(acc)
    kl_mean = (kl_sum / n).to(acc)
    ce_mean = (ce_sum / max(n_labelled, 1)).to(acc)
    loss = (1.0 - spec.ce_weight) * kl_mean + spec.ce_weight * ce_mean if has_teacher else ce_mean.clone()
    return loss, kl_mean, ce_mean, grad_h, grad_w.to(weight.dtype)


def _kl_chunk(logits, teacher_logits, temperature: float, scale: float):
    """Sum over the chunk's rows of KL(p || q), and `scale * (q - p)`; in place to keep ~3 [c, V] alive."""
    if temperature != 1.0:
        logits = logits / temperature
        teacher_logits.div_(temperature)
    log_q = torch.log_softmax(logits, dim=-1)
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    del teacher_logits
    p = log_p.exp()
    kl = torch.dot(p.view(-1), log_p.sub_(log_q).view(-1)).double()  # sum p * (log p - log q)
    del log_p
    grad = log_q.exp_().sub_(p).mul_(scale)
    return kl, grad


def _ce_chunk(logits, labels, scale: float):
    """Sum of -log softmax(s)[label] over labelled rows, and `scale * (softmax(s) - onehot)`."""
    mask = labels != IGNORE_INDEX
    safe = labels.clamp(min=0).unsqueeze(1)
    log_s = torch.log_softmax(logits, dim=-1)
    ce = -(log_s.gather(1, safe).squeeze(1) * mask).double().sum()
    grad = log_s.exp_()
    grad.scatter_add_(1, safe, -mask.to(grad.dtype).unsqueeze(1))
    grad.mul_(mask.to(grad.dtype).unsqueeze(1) * scale)
    return ce, grad
