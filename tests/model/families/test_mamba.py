"""Golden facts of one Mamba2 mixer (Nemotron-H's), at the module level: keep-all is the identity, and cutting
heads (evenly per group), head channels and hidden channels equals masking them (the model-level facts are in
tests/model/families/test_nemotron.py)."""

import pytest
import torch
from torch import nn

from nas.model.mamba import (
    MambaShape,
    channels,
    check_heads,
    cut_mixer,
)

SHAPE = MambaShape(num_heads=8, head_dim=8, n_groups=2, state_size=8, conv_kernel=4, proj_bias=True)
HIDDEN = 64


def mixer_config(shape: MambaShape = SHAPE, hidden: int = HIDDEN):
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=32, hidden_size=hidden, layers_block_type=["linear_attention"], mamba_num_heads=shape.num_heads,
        mamba_head_dim=shape.head_dim, n_groups=shape.n_groups, ssm_state_size=shape.state_size,
        conv_kernel=shape.conv_kernel, chunk_size=8, use_bias=shape.proj_bias, use_conv_bias=shape.conv_bias,
    )  # fmt: skip


def mixer(shape: MambaShape = SHAPE, hidden: int = HIDDEN, seed: int = 0) -> nn.Module:
    """A Mamba2 mixer with every parameter random (A_log, D, dt_bias and the norm too)."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    torch.manual_seed(seed)
    module = NemotronHMamba2Mixer(mixer_config(shape, hidden), layer_idx=0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name in ("A_log", "dt_bias"):
                p.uniform_(-1.0, 1.0)
            elif name in ("D", "norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.2)
    return module.eval()


class MaskedGatedNorm(nn.Module):
    """The mixer's gated RMSNorm with channels masked out: they output zero and do not count in their group's
    mean square (a pruned group normalises over the channels it keeps)."""

    def __init__(self, norm: nn.Module, keep: torch.Tensor, n_groups: int) -> None:
        super().__init__()
        self.norm, self.n_groups = norm, n_groups
        self.mask = torch.zeros(norm.weight.numel())
        self.mask[keep] = 1.0

    def forward(self, x, gate):
        y = (x.float() * nn.functional.silu(gate.float()) * self.mask).unflatten(-1, (self.n_groups, -1))
        m = self.mask.unflatten(-1, (self.n_groups, -1))
        var = y.pow(2).sum(-1, keepdim=True) / m.sum(-1, keepdim=True)
        return self.norm.weight * (y * torch.rsqrt(var + self.norm.variance_epsilon)).flatten(-2)


def test_heads_must_be_kept_evenly_in_group_order():
    check_heads([0, 3, 5, 6], SHAPE)
    for bad in ([0, 1, 2, 4], [4, 5, 0, 1], [0, 4, 5]):
        with pytest.raises(ValueError, match="evenly"):
            check_heads(bad, SHAPE)


def test_keep_all_is_the_identity():
    teacher = mixer()
    student = mixer(seed=1)
    every = list(range(SHAPE.num_heads)), list(range(SHAPE.head_dim)), torch.arange(HIDDEN)
    student.load_state_dict(cut_mixer(teacher.state_dict(), SHAPE, *every), strict=True)
    x = torch.randn(2, 19, HIDDEN)
    with torch.no_grad():
        assert torch.equal(student(x), teacher(x))


@pytest.mark.parametrize(
    "heads,dims,hidden",
    [
        ([1, 2, 4, 7], list(range(8)), 64),  # heads: two of each group
        ([0, 1, 2, 3, 4, 5, 6, 7], [0, 2, 3, 6], 64),  # head channels
        ([3, 6], [1, 4, 5, 7], 40),  # one head a group, head channels and hidden channels together
    ],
)
def test_cutting_heads_head_channels_and_hidden_channels_equals_masking(heads, dims, hidden):
    teacher = mixer()
    kept_hidden = torch.randperm(HIDDEN, generator=torch.Generator().manual_seed(2))[:hidden].sort().values
    small = MambaShape(len(heads), len(dims), SHAPE.n_groups, SHAPE.state_size, SHAPE.conv_kernel, proj_bias=True)
    student = mixer(small, hidden)
    student.load_state_dict(cut_mixer(teacher.state_dict(), SHAPE, heads, dims, kept_hidden), strict=True)
    x = torch.randn(2, 19, HIDDEN)
    masked_x = torch.zeros_like(x)
    masked_x[..., kept_hidden] = x[..., kept_hidden]  # dropped hidden channels carry nothing in
    teacher.norm = MaskedGatedNorm(teacher.norm, channels(heads, dims, SHAPE.head_dim), SHAPE.n_groups)
    with torch.no_grad():
        want = teacher(masked_x)[..., kept_hidden]
        got = student(x[..., kept_hidden])
    assert (got - want).abs().max() < 1e-5
