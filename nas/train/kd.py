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

`cached_kd_loss` is the same fused loss against a teacher cache (`nas.train.teacher_cache`): the
teacher's top-k log-probs and the mass of the rest, with the KL over those k + 1 buckets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from nas.device import autocast_for
from nas.model.head import head_weight, logit_softcap, softcap_, softcap_grad_

IGNORE_INDEX = -100


@dataclass(frozen=True)
class KDSpec:
    """How to combine the terms (see the module docstring)."""

    temperature: float = 1.0
    ce_weight: float = 0.0
    chunk_tokens: int = 1024
    compute_dtype: torch.dtype = torch.float32  # dtype of the head matmuls (bf16 under CUDA autocast)
    softcap: float | None = None  # the student's final-logit soft-cap (`nas.model.head`), None: none


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
    softcap: float | None = None,
    teacher_softcap: float | None = None,
) -> KDLoss:
    """Chunked forward KL(teacher || student) (+ optional CE) from final hidden states and LM-head weights.

    `hidden` [..., H] is the student's last hidden state, `head_weight` [V, H] its lm_head weight
    (the embedding when tied: autograd adds both gradients); `teacher_hidden` [..., H_t] and
    `teacher_head_weight` [V, H_t] the teacher's (no gradient flows to them). `labels` [...] are
    next-token ids (-100: ignored), needed when `ce_weight > 0` or there is no teacher. `softcap` /
    `teacher_softcap`: the models' final-logit soft-caps (`nas.model.head.logit_softcap`), applied to each
    chunk's logits as HF's forward applies them.
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
        float(temperature),
        float(ce_weight) if has_teacher else 1.0,
        int(chunk_tokens),
        _dtype(hidden),
        softcap,
    )
    target = (
        _DenseTarget(teacher_hidden, teacher_head_weight, spec.compute_dtype, teacher_softcap)
        if has_teacher
        else None
    )
    grad_on = torch.is_grad_enabled()  # forward always runs in no-grad mode: ask here
    loss, kl, ce = _FusedLinearKD.apply(hidden2, head_weight, target, labels, spec, grad_on)
    return KDLoss(loss, kl if has_teacher else None, ce if spec.ce_weight > 0 else None)


def cached_kd_loss(
    hidden: torch.Tensor,
    head_weight: torch.Tensor,
    top_ids: torch.Tensor,
    top_logp: torch.Tensor,
    log_rest: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk_tokens: int = 1024,
    softcap: float | None = None,
) -> KDLoss:
    """`kd_loss` against cached teacher outputs instead of the teacher's hidden states: per token the ids
    `top_ids` [..., k] of its k most likely tokens, their log-probs `top_logp` [..., k] at `temperature`,
    and `log_rest` [...], the log of the mass of all other tokens (-inf when k = vocab).

    The KL is the one between the teacher's and the student's distributions over k + 1 buckets (the
    top-k tokens and "the rest"), a lower bound of the full KL that equals it when k = vocab. Its
    gradient w.r.t. the student's logits is (q - p~) / T, p~ being the teacher's p on the top-k and the
    rest mass spread over the tail in proportion to the student's own q. No [tokens, vocab] teacher
    tensor is built: per chunk only the student's logits, as in `kd_loss`."""
    hidden2 = hidden.reshape(-1, hidden.shape[-1])
    k = top_ids.shape[-1]
    target = _CachedTarget(top_ids.reshape(-1, k).long(), top_logp.reshape(-1, k), log_rest.reshape(-1))
    if ce_weight > 0 and labels is None:
        raise ValueError("cached_kd_loss needs labels for the cross-entropy term")
    labels = labels.reshape(-1) if labels is not None else None
    spec = KDSpec(float(temperature), float(ce_weight), int(chunk_tokens), _dtype(hidden), softcap)
    grad_on = torch.is_grad_enabled()
    loss, kl, ce = _FusedLinearKD.apply(hidden2, head_weight, target, labels, spec, grad_on)
    return KDLoss(loss, kl, ce if spec.ce_weight > 0 else None)


def model_cached_kd_loss(
    student: nn.Module,
    input_ids: torch.Tensor,
    targets: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk_tokens: int = 1024,
    loss_mask: torch.Tensor | None = None,
) -> KDLoss:
    """`cached_kd_loss` of an HF causal LM on token ids [B, T] and the teacher's cached
    (top_ids, top_logp, log_rest) of the same tokens ([B, T, k], [B, T, k], [B, T]); `loss_mask` as in
    `model_kd_loss`."""
    with autocast_for(input_ids.device):
        hidden = student.model(input_ids=input_ids, use_cache=False).last_hidden_state
        labels = next_token_labels(input_ids)
        if loss_mask is not None:
            keep = positions_of(loss_mask)
            if not keep.any():
                return _no_loss(hidden, True)
            hidden, labels, targets = hidden[keep], labels[keep], tuple(t[keep] for t in targets)
        return cached_kd_loss(
            hidden,
            head_weight(student),
            *targets,
            labels,
            temperature=temperature,
            ce_weight=ce_weight,
            chunk_tokens=chunk_tokens,
            softcap=logit_softcap(student),
        )


def model_kd_loss(
    student: nn.Module,
    teacher: nn.Module | None,
    input_ids: torch.Tensor,
    *,
    temperature: float = 1.0,
    ce_weight: float = 0.0,
    chunk_tokens: int = 1024,
    loss_mask: torch.Tensor | None = None,
) -> KDLoss:
    """`kd_loss` of two HF causal LMs on token ids [B, T] (bf16 autocast on CUDA); no teacher: LM loss.
    The full logits are never built: each model's `.model` gives the last hidden state, and the heads
    are applied chunk by chunk inside `kd_loss`. `loss_mask` [B, T] (1: train on this token, 0: context
    only, e.g. a chat's prompt turns): the loss is the mean over the positions that predict a 1 token."""
    with autocast_for(input_ids.device):
        hidden = student.model(input_ids=input_ids, use_cache=False).last_hidden_state
        teacher_hidden = teacher_weight = None
        if teacher is not None:
            with torch.no_grad():
                teacher_hidden = teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state
            teacher_weight = head_weight(teacher)
        labels = next_token_labels(input_ids)
        if loss_mask is not None:  # the fused loss sees only the positions that count
            keep = positions_of(loss_mask)
            if not keep.any():
                return _no_loss(hidden, teacher is not None)
            hidden, labels = hidden[keep], labels[keep]
            teacher_hidden = teacher_hidden[keep] if teacher_hidden is not None else None
        return kd_loss(
            hidden,
            head_weight(student),
            teacher_hidden,
            teacher_weight,
            labels,
            temperature=temperature,
            ce_weight=ce_weight,
            chunk_tokens=chunk_tokens,
            softcap=logit_softcap(student),
            teacher_softcap=logit_softcap(teacher),  # None without a teacher
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


def positions_of(token_mask: torch.Tensor) -> torch.Tensor:
    """The positions [B, T] (bool) whose loss counts, from a mask of the tokens to train on: position t
    predicts token t + 1; the last position, whose token is in the next row, follows its own token's."""
    token_mask = token_mask.to(torch.bool)
    return torch.cat([token_mask[:, 1:], token_mask[:, -1:]], dim=1)


def _no_loss(hidden: torch.Tensor, has_teacher: bool) -> KDLoss:
    """A zero loss (connected to the graph, so backward and DDP run as usual) for a batch with no position
    to train on."""
    zero = hidden.float().sum() * 0.0
    return KDLoss(zero, zero.detach() if has_teacher else None, None)


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
    def forward(ctx, hidden, weight, target, labels, spec: KDSpec, grad_on: bool):
        need_h, need_w = grad_on and ctx.needs_input_grad[0], grad_on and ctx.needs_input_grad[1]
        loss, kl, ce, grad_h, grad_w = _chunked(hidden, weight, target, labels, spec, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        grad_h = grad_h * grad_loss.to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_w * grad_loss.to(grad_w.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None, None, None, None


class _DenseTarget:
    """The teacher's full distribution, from its final hidden states and LM head, one chunk at a time."""

    def __init__(
        self, hidden: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, cap: float | None
    ) -> None:
        self.hidden, self.weight, self.dtype, self.cap = hidden, weight.to(dtype), dtype, cap

    def kl_chunk(self, rows: slice, logits, temperature: float, scale: float):
        teacher_logits = torch.mm(self.hidden[rows].to(self.dtype), self.weight.t()).to(logits.dtype)
        softcap_(teacher_logits, self.cap)
        return _kl_chunk(logits, teacher_logits, temperature, scale)


class _CachedTarget:
    """The teacher's top-k log-probs plus the log of the rest of its mass (see `cached_kd_loss`)."""

    def __init__(self, ids: torch.Tensor, logp: torch.Tensor, log_rest: torch.Tensor) -> None:
        self.ids, self.logp, self.log_rest = ids, logp, log_rest

    def kl_chunk(self, rows: slice, logits, temperature: float, scale: float):
        logp = self.logp[rows].to(logits.dtype)
        return _cached_kl_chunk(logits, self.ids[rows], logp, self.log_rest[rows].to(logits.dtype),
                                temperature, scale)  # fmt: skip


def _chunked(hidden, weight, target, labels, spec: KDSpec, need_h: bool, need_w: bool):
    """Loop over row chunks; returns (loss, kl, ce, grad_hidden, grad_weight) with empty grads if unneeded."""
    n, device = hidden.shape[0], hidden.device
    has_teacher = target is not None
    n_labelled = int((labels != IGNORE_INDEX).sum()) if labels is not None and spec.ce_weight > 0 else 0
    kd_scale = (1.0 - spec.ce_weight) / (spec.temperature * n) if has_teacher else 0.0
    ce_scale = spec.ce_weight / max(n_labelled, 1)
    grad_h = torch.empty_like(hidden) if need_h else hidden.new_empty(0)
    acc = torch.promote_types(spec.compute_dtype, torch.float32)  # softmax / accumulation dtype
    grad_w = torch.zeros(weight.shape, dtype=acc, device=device) if need_w else weight.new_empty(0)
    kl_sum = torch.zeros((), dtype=torch.float64, device=device)
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    w = weight.detach().to(spec.compute_dtype)
    with torch.no_grad():
        for start in range(0, n, spec.chunk_tokens):
            rows = slice(start, min(start + spec.chunk_tokens, n))
            h = hidden[rows].detach().to(spec.compute_dtype)
            logits = softcap_(torch.mm(h, w.t()).to(acc), spec.softcap)
            grad = None
            if has_teacher:
                kl, grad = target.kl_chunk(rows, logits, spec.temperature, kd_scale)
                kl_sum += kl
            if spec.ce_weight > 0:
                ce, ce_grad = _ce_chunk(logits, labels[rows], ce_scale)
                ce_sum += ce
                grad = ce_grad if grad is None else grad.add_(ce_grad)
            softcap_grad_(grad, logits, spec.softcap)  # from the capped logits back to the raw ones
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


def _cached_kl_chunk(logits, ids, logp, log_rest, temperature: float, scale: float):
    """Sum over the rows of the bucketed KL (top-k tokens + one "rest" bucket), and `scale * (q - p~)`
    where p~ is p on the top-k and the rest mass spread like the student's tail (r * q_j / q_rest)."""
    log_q = torch.log_softmax(logits / temperature if temperature != 1.0 else logits, dim=-1)
    log_q_top = log_q.gather(1, ids)
    tail = log_q.scatter_(1, ids, -math.inf)  # in place: log q on the tail, -inf on the top-k
    log_q_rest = torch.logsumexp(tail, dim=-1)  # -inf when k = vocab
    p_top, has_rest = logp.exp(), torch.isfinite(log_rest)
    rest_kl = torch.where(has_rest, log_rest.exp() * (log_rest - log_q_rest), 0.0)
    kl = ((p_top * (logp - log_q_top)).sum() + rest_kl.sum()).double()
    # q_j - r q_j / q_rest in log space: log q_j + log r - log q_rest <= log r, so exp never overflows
    log_ratio = torch.where(has_rest, log_rest - log_q_rest, -math.inf).unsqueeze(1)
    grad = tail.exp()
    grad.sub_(tail.add_(log_ratio).exp_())
    del tail
    grad.scatter_(1, ids, log_q_top.exp() - p_top)
    return kl, grad.mul_(scale)


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
