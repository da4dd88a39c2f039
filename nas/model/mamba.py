"""The layout of a Mamba2 mixer (Nemotron-H's `NemotronHMamba2Mixer`, transformers 5.24): which rows and columns
of each tensor a set of kept heads and head channels keeps (its parameter count and recurrent state are
`nas.model.size.mamba_params` / `block_state`, its importance `nas.prune.importance`).

A mixer of `num_heads` heads of `head_dim` channels (`inner = num_heads * head_dim`), `n_groups` groups sharing
one B and one C of `state_size` each, and a depthwise causal conv of `conv_kernel` taps:
- `in_proj` [z (inner) | x (inner) | B (n_groups * state_size) | C (n_groups * state_size) | dt (num_heads), hidden];
- `conv1d` depthwise over [x | B | C] (weight [conv_dim, 1, conv_kernel], optional bias [conv_dim]);
- `dt_bias`, `A_log`, `D`: one value per head;
- `norm`: a gated RMSNorm over `inner` channels, normalised within each of the `n_groups` groups
  (group g holds heads g * heads_per_group ... (g + 1) * heads_per_group - 1, the heads that read B_g and C_g);
- `out_proj` [hidden, inner].
Channel `c` of z, x, the norm and `out_proj`'s input is head `c // head_dim`, head channel `c % head_dim`.

Heads are kept evenly inside each group and in group order (the group-aware rule of Minitron-SSM, arXiv
2504.11409, as ModelOpt implements it in `MambaNumHeadsHp`: a head reads the B and C of its group, so a head
moved to another group would compute something else), which keeps both the head -> group map and the gated norm's groups of the pruned mixer valid. Head
channels (`head_dim`) are the same in every head, as transformers has one `mamba_head_dim` per model.
B, C (`state_size`) and `n_groups` are kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MambaShape:
    """The sizes of one Mamba2 mixer."""

    num_heads: int
    head_dim: int
    n_groups: int
    state_size: int
    conv_kernel: int
    proj_bias: bool = False  # `use_bias`: in_proj and out_proj biases
    conv_bias: bool = True  # `use_conv_bias`

    @property
    def inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def bc(self) -> int:
        """Channels of B and of C together."""
        return 2 * self.n_groups * self.state_size

    @property
    def conv_dim(self) -> int:
        return self.inner + self.bc

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.n_groups


def channels(heads: list[int], dims: list[int], head_dim: int) -> torch.Tensor:
    """Indices into the teacher's `inner` channels of the kept heads' kept head channels, in order."""
    return torch.tensor([h * head_dim + p for h in heads for p in dims], dtype=torch.long)


def check_heads(heads: list[int], shape: MambaShape) -> None:
    """ValueError unless `heads` are in group order with the same number in every group."""
    per_group = len(heads) // shape.n_groups
    groups = [h // shape.heads_per_group for h in heads]
    if len(heads) % shape.n_groups or groups != sorted(groups) or any(
        groups.count(g) != per_group for g in range(shape.n_groups)
    ):
        raise ValueError(
            f"Mamba heads {heads} are not kept evenly in group order over {shape.n_groups} groups of "
            f"{shape.heads_per_group}"
        )


def mamba_rows(shape: MambaShape, heads: list[int], dims: list[int]) -> dict[str, torch.Tensor]:
    """The kept rows of each tensor of a teacher mixer of `shape` (hidden channels are cut apart: they are the
    columns of `in_proj` and the rows of `out_proj`). Keys: `in_proj`, `conv1d`, `heads` (dt_bias, A_log, D),
    `inner` (the gated norm, and `out_proj`'s columns)."""
    check_heads(heads, shape)
    ch = channels(heads, dims, shape.head_dim)
    inner, bc = shape.inner, torch.arange(shape.bc)
    kept_heads = torch.tensor(heads, dtype=torch.long)
    return {
        "in_proj": torch.cat([ch, inner + ch, 2 * inner + bc, 2 * inner + shape.bc + kept_heads]),
        "conv1d": torch.cat([ch, inner + bc]),
        "heads": kept_heads,
        "inner": ch,
    }


def cut_mixer(
    tensors: dict[str, torch.Tensor], shape: MambaShape, heads: list[int], dims: list[int], hidden: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The tensors of the pruned mixer, from a teacher mixer's `tensors` (names as in its state dict, e.g.
    `in_proj.weight`, `A_log`), keeping `heads` (in group order, evenly per group), the head channels `dims` of
    each, and the `hidden` channels of the residual stream."""
    rows = mamba_rows(shape, heads, dims)
    rule = {
        "in_proj.weight": (rows["in_proj"], hidden),
        "in_proj.bias": (rows["in_proj"], None),
        "conv1d.weight": (rows["conv1d"], None),
        "conv1d.bias": (rows["conv1d"], None),
        "dt_bias": (rows["heads"], None),
        "A_log": (rows["heads"], None),
        "D": (rows["heads"], None),
        "norm.weight": (rows["inner"], None),
        "out_proj.weight": (hidden, rows["inner"]),
        "out_proj.bias": (hidden, None),
    }
    out = {}
    for name, t in tensors.items():
        if name not in rule:
            raise ValueError(f"unexpected Mamba mixer tensor {name!r}")
        r, c = rule[name]
        t = t.index_select(0, r.to(t.device))
        out[name] = (t if c is None else t.index_select(1, c.to(t.device))).clone()
    return out

