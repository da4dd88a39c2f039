"""The unit scores of Minitron activation importance: one no-grad pass over calibration sequences with
forward hooks.

Each activation score is aggregated as the mean over the sequence, then the L2 norm over the batch
(the best-performing aggregation in the Minitron paper):
- attention heads: L2 norm of each head's slice of the `o_proj` input;
- KV (query) groups: the sum of their heads' scores;
- MLP channels: |input of `down_proj`| (= act(gate) * up);
- hidden (embedding) channels: |output| of every hidden-size RMSNorm (those of each block, pre- or post-norms
  as the family has them, and the final one), summed;
- experts (mixture of experts): per token, the router weight times the norm of the expert's output, summed
  over the tokens routed to it and divided by all tokens (`experts`); the routing mass alone is
  `expert_mass`; each expert's FFN channels score the L2 norm over its tokens of router weight * |act(gate) * up|;
- linear-attention (Gated DeltaNet) value heads: L2 norm of each head's slice of the `out_proj` input
  (`linear_heads`; a key head scores the sum of its value heads, `linear_key_heads`);
- Mamba2 heads: L2 norm of each head's slice of the `out_proj` input (`mamba_heads`), and each of the
  `mamba_head_dim` channels the norm over the heads of that channel (`mamba_head_dims`);
- layers: Block Importance 1 - cos(x_in, x_out), kept for every contiguous block (`block_bi[i, j]` is
  1 - cos between the input of layer i and the input of layer j), and the held-out LM loss with each
  layer removed (`layer_loss`). A hybrid stack compares layers within each type (`nas.prune.cut`).
Rows of layers without a unit kind (an attention score of a linear-attention layer) stay 0.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from tqdm.auto import tqdm

from nas.device import autocast_for, model_device
from nas.evaluate.loss import lm_loss
from nas.model.arch import Arch
from nas.model.families import (
    block_module,
    decoder_layers,
    expert_ffn,
    family_of,
    final_norm,
    layer_norms,
    layer_units,
)

BI_TOKENS_PER_BATCH = 512  # token positions sampled per batch for block BI (bounds memory on long sequences)


class _Accumulator:
    """Running sums of squares over samples of sequence-mean activations (for the L2 over the batch)."""

    def __init__(self, model: nn.Module, arch: Arch) -> None:
        dev = model_device(model)
        n_layers = arch.num_layers
        self.arch = arch
        self.heads = torch.zeros(n_layers, arch.num_attention_heads, device=dev, dtype=torch.float64)
        mlp_shape = (arch.num_experts, arch.ffn_hidden_size) if arch.num_experts else (arch.ffn_hidden_size,)
        self.mlp = torch.zeros(n_layers, *mlp_shape, device=dev, dtype=torch.float64)
        self.experts = torch.zeros(n_layers, arch.num_experts, device=dev, dtype=torch.float64)
        self.expert_mass = torch.zeros_like(self.experts)
        self.tokens = torch.zeros(n_layers, device=dev, dtype=torch.float64)
        self.linear_heads = torch.zeros(
            n_layers, arch.num_linear_value_heads, device=dev, dtype=torch.float64
        )
        self.mamba_heads = torch.zeros(n_layers, arch.num_mamba_heads, device=dev, dtype=torch.float64)
        self.mamba_head_dims = torch.zeros(n_layers, arch.mamba_head_dim, device=dev, dtype=torch.float64)
        self.norms: dict[str, torch.Tensor] = {}
        self.bi_sum = torch.zeros(n_layers + 1, n_layers + 1, device=dev, dtype=torch.float64)
        self.bi_count = 0
        self.boundaries: list[torch.Tensor | None] = [None] * (n_layers + 1)

    def add_heads(self, layer: int, x: torch.Tensor) -> None:
        per_head = x.float().unflatten(-1, (self.arch.num_attention_heads, -1))  # head_dim: the layer's own
        self.heads[layer] += per_head.norm(dim=-1).mean(dim=1).pow(2).sum(0).double()

    def add_linear_heads(self, layer: int, x: torch.Tensor) -> None:
        per_head = x.float().unflatten(
            -1, (self.arch.num_linear_value_heads, self.arch.linear_value_head_dim)
        )
        self.linear_heads[layer] += per_head.norm(dim=-1).mean(dim=1).pow(2).sum(0).double()

    def add_mamba_heads(self, layer: int, x: torch.Tensor) -> None:
        per_head = x.float().unflatten(-1, (self.arch.num_mamba_heads, self.arch.mamba_head_dim))
        self.mamba_heads[layer] += per_head.norm(dim=-1).mean(dim=1).pow(2).sum(0).double()
        self.mamba_head_dims[layer] += per_head.norm(dim=-2).mean(dim=1).pow(2).sum(0).double()

    def add_mlp(self, layer: int, x: torch.Tensor) -> None:
        # in a stack with MoE layers too (Nemotron-H) an MLP layer's row is [num_experts, ffn]: every row the same
        self.mlp[layer] += x.float().abs().mean(dim=1).pow(2).sum(0).double()

    def add_experts(
        self, layer: int, module: nn.Module, x: torch.Tensor, index: torch.Tensor, weights
    ) -> None:
        """One MoE block's routing ([tokens, top_k] expert indices and weights) and its experts' outputs,
        recomputed per expert from the fused parameters (gate rows, then up rows; or a gateless `up_proj`)."""
        if is_fake(index):  # the memory plan's dry run: where tokens go is data (no shapes to trace); the
            return  # recompute, one expert's tokens at a time, stays below what the experts' own forward holds
        x = x.float()
        self.tokens[layer] += x.shape[0]
        for e in index.unique().tolist():
            if not 0 <= e < self.arch.num_experts:
                continue
            token, slot = torch.where(index == e)
            w = weights[token, slot].float()
            if hasattr(module, "gate_up_proj"):
                h, y = expert_ffn(module, self.arch.family.experts, e, x[token])
            else:  # experts without a gate (Nemotron-H): act(up)
                h = module.act_fn(F.linear(x[token], module.up_proj[e].float()))
                y = F.linear(h, module.down_proj[e].float())
            self.expert_mass[layer, e] += w.sum().double()
            self.experts[layer, e] += (w * y.norm(dim=-1)).sum().double()
            self.mlp[layer, e] += (w[:, None] * h.abs()).pow(2).sum(0).double()

    def add_norm(self, name: str, y: torch.Tensor) -> None:
        sq = y.float().abs().mean(dim=1).pow(2).sum(0).double()
        self.norms[name] = self.norms.get(name, 0) + sq

    def add_boundary(self, index: int, h: torch.Tensor) -> None:
        positions = torch.linspace(0, h.shape[1] - 1, min(h.shape[1], BI_TOKENS_PER_BATCH)).long()
        flat = h[:, positions.to(h.device)].float().flatten(0, 1)
        self.boundaries[index] = torch.nn.functional.normalize(flat, dim=-1)

    def close_batch(self) -> None:
        flat = torch.stack(self.boundaries).flatten(1)  # [L+1, tokens * H] of unit vectors per token
        self.bi_sum += (flat @ flat.T).double()  # [i, j]: sum over tokens of cos(h_i, h_j)
        self.bi_count += self.boundaries[0].shape[0]
        self.boundaries = [None] * len(self.boundaries)

    def result(self) -> dict[str, torch.Tensor]:
        hidden = sum(sq.sqrt() for sq in self.norms.values())
        scores = {
            "heads": self.heads.sqrt().float().cpu(),
            "mlp": self.mlp.sqrt().float().cpu(),
            "hidden": hidden.float().cpu(),
            "block_bi": (1 - self.bi_sum / max(self.bi_count, 1)).float().cpu(),
        }
        blocks = self.arch.blocks
        if "linear_attention" in blocks:
            scores["linear_heads"] = self.linear_heads.sqrt().float().cpu()
        if "mamba" in blocks:
            scores["mamba_heads"] = self.mamba_heads.sqrt().float().cpu()
            scores["mamba_head_dims"] = self.mamba_head_dims.sqrt().float().cpu()
        if self.arch.num_experts:
            tokens = self.tokens.clamp(min=1)[:, None]
            scores["experts"] = (self.experts / tokens).float().cpu()
            scores["expert_mass"] = (self.expert_mass / tokens).float().cpu()
        return scores


def _hidden_states_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _mlp_hook(mlp: nn.Module, acc: _Accumulator, i: int):
    """MLP channels: the input of `down_proj`; MoE: the experts' routing and outputs."""
    if hasattr(mlp, "experts"):
        experts = mlp.experts

        def on_experts(m, args, kwargs):
            # (tokens, expert indices, routing weights), by position or by name (gpt-oss names them apart)
            names = (
                ("hidden_states",),
                ("top_k_index", "router_indices"),
                ("top_k_weights", "routing_weights"),
            )
            rest = (next(kwargs[n] for n in aliases if n in kwargs) for aliases in names[len(args) :])
            acc.add_experts(i, m, *args, *rest)

        return experts.register_forward_pre_hook(on_experts, with_kwargs=True)
    return mlp.down_proj.register_forward_pre_hook(lambda m, a: acc.add_mlp(i, a[0]))


def _out_proj_hook(module: nn.Module, add) -> Any:
    """A per-head score from the input of the block's output projection (`o_proj` or `out_proj`)."""
    proj = module.o_proj if hasattr(module, "o_proj") else module.out_proj
    return proj.register_forward_pre_hook(lambda m, a: add(a[0]))


def _block_hooks(layer: nn.Module, units: tuple[str, ...], family, acc: _Accumulator, i: int) -> list:
    adds = {
        "attention": acc.add_heads,
        "global_attention": acc.add_heads,
        "linear_attention": acc.add_linear_heads,
        "mamba": acc.add_mamba_heads,
    }
    handles = []
    for block in units:
        module = block_module(layer, family, block)
        if block in adds:
            handles.append(_out_proj_hook(module, lambda x, add=adds[block]: add(i, x)))
        else:  # mlp, moe
            handles.append(_mlp_hook(module, acc, i))
    return handles


@contextmanager
def _hooks(model: nn.Module, acc: _Accumulator) -> Iterator[None]:
    handles = []
    layers = decoder_layers(model)
    family = family_of(model.config)
    for i, (layer, units) in enumerate(zip(layers, layer_units(model.config), strict=True)):
        handles += _block_hooks(layer, units, family, acc, i)
        for j, norm in enumerate(layer_norms(layer, family)):
            handles.append(norm.register_forward_hook(lambda m, a, y, key=f"{i}.{j}": acc.add_norm(key, y)))
        handles.append(
            layer.register_forward_pre_hook(
                lambda m, a, kw, i=i: acc.add_boundary(i, _hidden_states_arg(a, kw)), with_kwargs=True
            )
        )
    last = len(layers)
    handles.append(layers[-1].register_forward_hook(lambda m, a, y: acc.add_boundary(last, y)))
    handles.append(final_norm(model).register_forward_hook(lambda m, a, y: acc.add_norm("final", y)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def skip_layer(model: nn.Module, index: int) -> Iterator[None]:
    """Within the block, decoder layer `index` passes its input through unchanged."""
    layer = decoder_layers(model)[index]
    handle = layer.register_forward_hook(lambda m, a, kw, y: _hidden_states_arg(a, kw), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def activation_scores(model: nn.Module, calib: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Head, MLP, hidden-channel and block-BI scores from one pass over `calib` [N, T]."""
    arch = Arch.from_hf_config(model.config)
    acc = _Accumulator(model, arch)
    device = model_device(model)
    with _hooks(model, acc):
        for start in tqdm(range(0, len(calib), batch_size), desc="importance", unit="batch", disable=None):
            batch = torch.as_tensor(calib[start : start + batch_size], dtype=torch.long).to(device)
            with autocast_for(device):
                model.model(input_ids=batch, use_cache=False)
            acc.close_batch()
    return acc.result()


def layer_removal_losses(model: nn.Module, val: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """[num_layers]: held-out LM loss with each layer removed in turn."""
    n_layers = len(decoder_layers(model))
    losses = []
    for i in tqdm(range(n_layers), desc="layer drop loss", unit="layer", disable=None):
        with skip_layer(model, i):
            losses.append(lm_loss(model, val, batch_size))
    return torch.tensor(losses)
