"""Minitron activation importance: one no-grad pass over calibration sequences with forward hooks.

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

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from tqdm.auto import tqdm

from nas.device import autocast_for, model_device
from nas.errors import ModelError
from nas.evaluate.loss import lm_loss
from nas.io import atomic_path, require_same
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

log = logging.getLogger(__name__)

BI_TOKENS_PER_BATCH = 512  # token positions sampled per batch for block BI (bounds memory on long sequences)
TENSORS = ("heads", "mlp", "hidden", "block_bi", "layer_loss")
MOE_TENSORS = ("experts", "expert_mass")
HYBRID_TENSORS = ("linear_heads", "mamba_heads", "mamba_head_dims")
OPTIONAL_TENSORS = (*MOE_TENSORS, *HYBRID_TENSORS)


@dataclass
class Importance:
    """Importance scores of one teacher; computed once and reused by every candidate."""

    heads: torch.Tensor  # [num_layers, num_attention_heads]
    mlp: torch.Tensor  # [num_layers, ffn_hidden_size] (MoE: [num_layers, num_experts, ffn_hidden_size])
    hidden: torch.Tensor  # [hidden_size]
    block_bi: torch.Tensor  # [num_layers + 1, num_layers + 1]
    layer_loss: torch.Tensor  # [num_layers], LM loss with that layer removed
    base_loss: float  # LM loss of the whole teacher on the same sequences
    num_samples: int
    teacher_arch: dict = field(default_factory=dict)
    experts: torch.Tensor | None = None  # [num_layers, num_experts] (MoE only)
    expert_mass: torch.Tensor | None = None  # [num_layers, num_experts]: mean router weight per token
    linear_heads: torch.Tensor | None = None  # [num_layers, num_linear_value_heads] (Gated DeltaNet only)
    mamba_heads: torch.Tensor | None = None  # [num_layers, num_mamba_heads] (Mamba2 only)
    mamba_head_dims: torch.Tensor | None = None  # [num_layers, mamba_head_dim] (Mamba2 only)
    identity: dict = field(
        default_factory=dict
    )  # the settings that decided the scores (`importance_identity`)

    @property
    def groups(self) -> torch.Tensor:
        """[num_layers, num_query_groups]: the sum of each group's head scores."""
        num_groups = self.teacher_arch["num_query_groups"]
        return self.heads.reshape(self.heads.shape[0], num_groups, -1).sum(-1)

    @property
    def global_groups(self) -> torch.Tensor:
        """[num_layers, num_global_query_groups]: the sum of each full-attention KV group's head scores (Gemma 4)."""
        num_groups = self.teacher_arch["num_global_query_groups"]
        return self.heads.reshape(self.heads.shape[0], num_groups, -1).sum(-1)

    @property
    def linear_key_heads(self) -> torch.Tensor:
        """[num_layers, num_linear_key_heads]: the sum of the scores of the value heads each key head serves."""
        keys = self.teacher_arch["num_linear_key_heads"]
        return self.linear_heads.reshape(self.linear_heads.shape[0], keys, -1).sum(-1)

    @property
    def layer_bi(self) -> torch.Tensor:
        """[num_layers]: 1 - cos(input, output) of each layer."""
        return torch.diagonal(self.block_bi, offset=1).clone()

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (scores as tensors, the rest as metadata), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = [n for n in (*TENSORS, *OPTIONAL_TENSORS) if getattr(self, n) is not None]
        tensors = {name: getattr(self, name).float().contiguous() for name in names}
        meta = {
            "base_loss": json.dumps(self.base_loss),
            "num_samples": str(self.num_samples),
            "teacher_arch": json.dumps(self.teacher_arch),
            "identity": json.dumps(self.identity, sort_keys=True),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Importance:
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"importance file {path} does not exist; compute it with `nas importance`")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            return cls(
                **{name: tensors[name] for name in TENSORS},
                **{name: tensors.get(name) for name in OPTIONAL_TENSORS},
                base_loss=json.loads(meta["base_loss"]),
                num_samples=int(meta["num_samples"]),
                teacher_arch=json.loads(meta["teacher_arch"]),
                identity=json.loads(meta.get("identity", "{}")),
            )
        except (SafetensorError, KeyError, ValueError, TypeError, OSError) as e:
            raise ModelError(
                f"importance file {path} is corrupt or not a nas importance file ({e}); delete it and recompute"
            ) from e

    def check_matches(self, teacher: Arch) -> None:
        """Raise unless these scores were computed on a teacher of this shape."""
        if Arch.from_dict(self.teacher_arch) != teacher:
            raise ModelError(
                "the importance file was computed for a different teacher "
                f"({Arch.from_dict(self.teacher_arch).describe()} vs {teacher.describe()}); recompute it"
            )


def importance_identity(teacher: str, teacher_arch: Arch, data_fingerprint: str, num_samples: int,
                        val_sequences: int, **extra: Any) -> dict[str, Any]:  # fmt: skip
    """The settings that decide a teacher's importance scores: the teacher (where it was loaded from, and
    its shape), the data (fingerprint), how many calibration and validation sequences; `extra`: more
    (e.g. the study's teacher-correction steps)."""
    local = Path(teacher).expanduser()
    return {
        "teacher": str(local.resolve()) if local.exists() else teacher,
        "teacher_arch": teacher_arch.to_dict(),
        "data": data_fingerprint,
        "num_samples": num_samples,
        "val_sequences": val_sequences,
        **extra,
    }


def ensure_importance(
    path: str | Path,
    teacher: nn.Module | Callable[[], nn.Module],
    data: Any,
    identity: dict[str, Any],
    batch_size: int,
    ways_out: str,
    recompute: bool = False,
) -> tuple[Importance, bool]:
    """The importance at `path` when it was computed with `identity` (`importance_identity`; other
    settings: ConfigError ending in `ways_out`), else computed on `data` (a `nas.data.tokens.TokenData`:
    identity's num_samples calibration and val_sequences validation sequences) and saved there.
    `teacher`: the model, or a function that loads it (called only to compute). Returns (importance,
    whether it was computed now). `recompute`: compute it even when the file is there (and replace it)."""
    path = Path(path)
    if path.is_file() and not recompute:
        importance = Importance.load(path)
        if importance.identity:  # files written before identities were recorded have none
            require_same(importance.identity, identity, f"importance file {path}", ways_out)
        importance.check_matches(Arch.from_dict(identity["teacher_arch"]))
        return importance, False
    model = teacher if isinstance(teacher, nn.Module) else teacher()
    calib, val = data.calib(identity["num_samples"]), data.val(identity["val_sequences"])
    importance = compute_importance(model, calib, val, batch_size)
    importance.identity = identity
    importance.save(path)
    return importance, True


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
        self.linear_heads = torch.zeros(n_layers, arch.num_linear_value_heads, device=dev, dtype=torch.float64)
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
        per_head = x.float().unflatten(-1, (self.arch.num_linear_value_heads, self.arch.linear_value_head_dim))
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
        if is_fake(index):  # the memory plan's dry run: which tokens go where is data (no shapes to trace); the
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
            names = (("hidden_states",), ("top_k_index", "router_indices"), ("top_k_weights", "routing_weights"))
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


def _check_finite_scores(scores: dict[str, Any], layer_loss: torch.Tensor, base: float) -> None:
    """ModelError when the teacher's outputs overflow (finite weights can still give inf activations):
    NaN scores would rank every unit arbitrarily."""
    bad = [name for name, t in scores.items() if t is not None and not bool(torch.isfinite(t).all())]
    bad += ["layer_loss"] * (not bool(torch.isfinite(layer_loss).all()))
    if bad or not torch.isfinite(torch.tensor(base)):
        raise ModelError(
            f"the teacher's outputs are not finite (base val loss {base:.4g}; non-finite scores: "
            f"{', '.join(bad) or 'none'}): its weights overflow the activations; check the model"
        )


def compute_importance(
    model: nn.Module, calib: torch.Tensor, val: torch.Tensor, batch_size: int = 8
) -> Importance:
    """All importance scores of `model` (the teacher), never modifying it."""
    if len(calib) == 0 or len(val) == 0:
        raise ModelError("importance needs at least one calibration and one validation sequence")
    was_training = model.training
    model.eval()
    scores = activation_scores(model, calib, batch_size)
    layer_loss = layer_removal_losses(model, val, batch_size)
    base = lm_loss(model, val, batch_size)
    model.train(was_training)
    _check_finite_scores(scores, layer_loss, base)
    log.info("importance: %d calibration sequences, base val loss %.4f", len(calib), base)
    return Importance(
        **scores,
        layer_loss=layer_loss,
        base_loss=base,
        num_samples=len(calib),
        teacher_arch=Arch.from_hf_config(model.config).to_dict(),
    )
