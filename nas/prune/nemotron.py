"""Cutting one Nemotron-H block (`NemotronHBlock`, transformers 5.24): a pre-norm `norm` and one `mixer`, which is
a Mamba2 mixer, an attention (no rotary, no biases), a squared-ReLU MLP (`up_proj`, `down_proj`, no gate) or a
mixture of experts.

The MoE mixer: a sigmoid router `gate` (weight [num_experts, hidden] and the buffer `e_score_correction_bias`
[num_experts] that only steers the choice), gateless experts (`experts.up_proj` [E, ffn, in], `down_proj`
[E, in, ffn], `in` = hidden, or `moe_latent_size` behind the `fc1_latent_proj` / `fc2_latent_proj` projections,
which are kept whole), and one always-on `shared_experts` MLP. A kept expert keeps its own top FFN channels; the
shared expert keeps its own top channels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from nas.model.mamba import MambaShape, cut_mixer

MAMBA, ATTENTION, MLP, MOE = "linear_attention", "full_attention", "mlp", "moe"  # `layers_block_type` entries


@dataclass(frozen=True)
class BlockKeep:
    """The teacher units one kept block keeps (teacher indices, ascending; empty where the type has none)."""

    block_type: str
    heads: list[int] = field(default_factory=list)  # attention: query heads, grouped by kept KV group
    groups: list[int] = field(default_factory=list)  # attention: KV groups
    mlp: list = field(default_factory=list)  # MLP: channels; MoE: per kept expert, its channels
    experts: list[int] = field(default_factory=list)  # MoE
    shared: list[int] = field(default_factory=list)  # MoE: the shared expert's channels
    mamba_heads: list[int] = field(default_factory=list)  # Mamba2: heads, evenly per group, in group order
    mamba_channels: list[int] = field(default_factory=list)  # Mamba2: head channels (the same in every head)


def mamba_shape(config: Any) -> MambaShape:
    """The Mamba2 mixer sizes of a `NemotronHConfig`."""
    return MambaShape(
        num_heads=config.mamba_num_heads,
        head_dim=config.mamba_head_dim,
        n_groups=config.n_groups,
        state_size=config.ssm_state_size,
        conv_kernel=config.conv_kernel,
        proj_bias=bool(config.use_bias),
        conv_bias=bool(config.use_conv_bias),
    )


def _rows(units: list[int], size: int) -> torch.Tensor:
    return torch.tensor([u * size + r for u in units for r in range(size)], dtype=torch.long)


def _long(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def _take(t: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None = None) -> torch.Tensor:
    if rows is not None:
        t = t.index_select(0, rows.to(t.device))
    if cols is not None:
        t = t.index_select(1, cols.to(t.device))
    return t.clone()


def _mixer_rules(keep: BlockKeep, config: Any, hid: torch.Tensor) -> dict[str, tuple]:
    """(rows, cols) kept of each tensor of an attention, MLP or MoE mixer (names under `mixer.`)."""
    if keep.block_type == ATTENTION:
        d = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q, kv = _rows(keep.heads, d), _rows(keep.groups, d)
        return {"q_proj.weight": (q, hid), "k_proj.weight": (kv, hid), "v_proj.weight": (kv, hid),
                "o_proj.weight": (hid, q)}  # fmt: skip
    if keep.block_type == MLP:
        ffn = _long(keep.mlp)
        return {"up_proj.weight": (ffn, hid), "up_proj.bias": (ffn, None),
                "down_proj.weight": (hid, ffn), "down_proj.bias": (hid, None)}  # fmt: skip
    experts, shared = _long(keep.experts), _long(keep.shared)
    return {
        "gate.weight": (experts, hid), "gate.e_score_correction_bias": (experts, None),
        "shared_experts.up_proj.weight": (shared, hid), "shared_experts.up_proj.bias": (shared, None),
        "shared_experts.down_proj.weight": (hid, shared), "shared_experts.down_proj.bias": (hid, None),
        "fc1_latent_proj.weight": (None, hid), "fc1_latent_proj.bias": (None, None),
        "fc2_latent_proj.weight": (hid, None), "fc2_latent_proj.bias": (hid, None),
    }  # fmt: skip


def _cut_experts(tensor: torch.Tensor, kind: str, keep: BlockKeep, hid: torch.Tensor | None) -> torch.Tensor:
    """The kept experts of `experts.up_proj` [E, ffn, in] or `experts.down_proj` [E, in, ffn], each with its
    own kept FFN channels (`hid` None: the experts work in a latent space, kept whole)."""
    kept = []
    for e, channels in zip(keep.experts, keep.mlp, strict=True):
        ch = _long(channels)
        rows, cols = (ch, hid) if kind == "up_proj" else (hid, ch)
        kept.append(_take(tensor[e], rows, cols))
    return torch.stack(kept)


def cut_block(
    tensors: dict[str, torch.Tensor], keep: BlockKeep, config: Any, hid: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The tensors of one pruned block from the teacher block's `tensors` (names under the block, e.g.
    `norm.weight`, `mixer.in_proj.weight`), keeping the units of `keep` and the hidden channels `hid`."""
    out = {"norm.weight": _take(tensors["norm.weight"], hid)}
    mixer = {name.removeprefix("mixer."): t for name, t in tensors.items() if name.startswith("mixer.")}
    if keep.block_type == MAMBA:
        cut = cut_mixer(mixer, mamba_shape(config), keep.mamba_heads, keep.mamba_channels, hid)
        return out | {f"mixer.{name}": t for name, t in cut.items()}
    rules = _mixer_rules(keep, config, hid)
    latent = getattr(config, "moe_latent_size", None) is not None
    for name, t in mixer.items():
        if name.startswith("experts."):
            out[f"mixer.{name}"] = _cut_experts(t, name.split(".")[-1], keep, None if latent else hid)
        elif name in rules:
            out[f"mixer.{name}"] = _take(t, *rules[name])
        else:
            raise ValueError(f"unexpected tensor mixer.{name} in a {keep.block_type} block")
    return out


def cut_state_dict(
    teacher: Any, layers: list[int], keeps: list[BlockKeep], hidden: list[int]
) -> dict[str, torch.Tensor]:
    """The weights of a pruned Nemotron-H model: the teacher's embeddings (`model.embeddings`), final norm
    (`model.norm_f`) and head on the kept hidden channels, and each kept layer `layers[i]` cut by `keeps[i]`."""
    sd, hid = teacher.state_dict(), _long(hidden)
    out = {
        "model.embeddings.weight": _take(sd["model.embeddings.weight"], None, hid),
        "model.norm_f.weight": _take(sd["model.norm_f.weight"], hid),
        "lm_head.weight": _take(sd["lm_head.weight"], None, hid),
    }
    for new, (old, keep) in enumerate(zip(layers, keeps, strict=True)):
        src = f"model.layers.{old}."
        block = {name[len(src) :]: t for name, t in sd.items() if name.startswith(src)}
        out |= {
            f"model.layers.{new}.{name}": t for name, t in cut_block(block, keep, teacher.config, hid).items()
        }
    return out

