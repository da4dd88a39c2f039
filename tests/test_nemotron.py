"""Nemotron-H golden facts at the block level: cutting every unit kind of its four block types (Mamba2 heads
evenly per group and head channels, attention heads and KV groups, MLP channels, experts, expert and shared-expert
channels, whole layers) equals masking the same units in the teacher; keeping everything reproduces it."""

import copy

import pytest
import torch
from test_mamba import MaskedGatedNorm

from nas.model.mamba import channels
from nas.prune.nemotron import ATTENTION, MAMBA, MLP, MOE, BlockKeep, cut_state_dict
from nas.testing import tiny_model

TOKENS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))


def tiny_nemotron(seed: int = 0, num_layers: int = 4, **sizes):
    """A tiny Nemotron-H of `num_layers` blocks cycling Mamba2, MoE, attention, MLP."""
    return tiny_model("nemotron_h", seed=seed, num_layers=num_layers, **sizes)


def all_units(config, block_type: str) -> BlockKeep:
    d = config
    if block_type == MAMBA:
        return BlockKeep(MAMBA, mamba_heads=list(range(d.mamba_num_heads)), mamba_channels=list(range(d.mamba_head_dim)))
    if block_type == ATTENTION:
        return BlockKeep(ATTENTION, heads=list(range(d.num_attention_heads)), groups=list(range(d.num_key_value_heads)))
    if block_type == MLP:
        return BlockKeep(MLP, mlp=list(range(d.intermediate_size)))
    experts = list(range(d.n_routed_experts))
    return BlockKeep(MOE, experts=experts, mlp=[list(range(d.moe_intermediate_size))] * len(experts),
                     shared=list(range(d.moe_shared_expert_intermediate_size)))  # fmt: skip


def student_of(teacher, layers: list[int], keeps: list[BlockKeep], hidden: list[int]):
    """The pruned model: a config of the kept sizes (every kept block of a type keeps as many units) and the
    cut weights."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.config)
    config.layers_block_type = [teacher.config.layers_block_type[i] for i in layers]
    config.hidden_size = len(hidden)
    for keep in keeps:
        if keep.block_type == MAMBA:
            config.mamba_num_heads, config.mamba_head_dim = len(keep.mamba_heads), len(keep.mamba_channels)
        elif keep.block_type == ATTENTION:
            config.num_attention_heads, config.num_key_value_heads = len(keep.heads), len(keep.groups)
        elif keep.block_type == MLP:
            config.intermediate_size = len(keep.mlp)
        else:
            config.n_routed_experts, config.moe_intermediate_size = len(keep.experts), len(keep.mlp[0])
            config.num_experts_per_tok = min(config.num_experts_per_tok, len(keep.experts))
            config.moe_shared_expert_intermediate_size = len(keep.shared)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(cut_state_dict(teacher, layers, keeps, hidden), strict=True)
    return model.eval()


def masked(teacher, layers: list[int], keeps: list[BlockKeep]):
    """The teacher with every dropped unit masked: a dropped layer's mixer outputs zero; dropped attention heads,
    MLP and expert channels have zero output columns; a dropped expert is never routed to (its router bias is
    -inf: Nemotron-H's router scores experts by a sigmoid each, so the kept ones score as before); dropped Mamba
    heads and head channels are zero and left out of their group's gated norm."""
    model = copy.deepcopy(teacher)
    c = teacher.config
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            mixer, kind = layer.mixer, layer.block_type
            if index not in layers:
                outputs = {MAMBA: ["out_proj.weight"], ATTENTION: ["o_proj.weight"], MLP: ["down_proj.weight"],
                           MOE: ["experts.down_proj", "shared_experts.down_proj.weight"]}[kind]  # fmt: skip
                for name in outputs:
                    mixer.get_parameter(name).zero_()
                continue
            keep = keeps[layers.index(index)]
            if kind == MAMBA:
                kept = channels(keep.mamba_heads, keep.mamba_channels, c.mamba_head_dim)
                mixer.norm = MaskedGatedNorm(mixer.norm, kept, c.n_groups)
            elif kind == ATTENTION:
                for head in set(range(c.num_attention_heads)) - set(keep.heads):
                    mixer.o_proj.weight[:, head * c.head_dim : (head + 1) * c.head_dim] = 0
            elif kind == MLP:
                mixer.down_proj.weight[:, sorted(set(range(c.intermediate_size)) - set(keep.mlp))] = 0
            else:
                for e, chans in zip(keep.experts, keep.mlp, strict=True):
                    mixer.experts.down_proj[e][:, sorted(set(range(c.moe_intermediate_size)) - set(chans))] = 0
                dropped = sorted(set(range(c.n_routed_experts)) - set(keep.experts))
                mixer.gate.e_score_correction_bias[dropped] = float("-inf")
                mixer.gate.top_k = min(c.num_experts_per_tok, len(keep.experts))
                shared = mixer.shared_experts.down_proj.weight
                shared[:, sorted(set(range(c.moe_shared_expert_intermediate_size)) - set(keep.shared))] = 0
    return model


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_keep_all_reproduces_the_teacher():
    teacher = tiny_nemotron()
    c = teacher.config
    keeps = [all_units(c, t) for t in c.layers_block_type]
    student = student_of(teacher, list(range(4)), keeps, list(range(c.hidden_size)))
    assert torch.equal(logits(student), logits(teacher))


def pick(n: int, k: int, seed: int) -> list[int]:
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


CASES = {
    "mamba-heads": {MAMBA: lambda c: BlockKeep(MAMBA, mamba_heads=[1, 2, 4, 7], mamba_channels=list(range(8)))},
    "mamba-head-channels": {MAMBA: lambda c: BlockKeep(MAMBA, mamba_heads=list(range(8)), mamba_channels=[0, 3, 4, 6])},
    "attention-heads": {ATTENTION: lambda c: BlockKeep(ATTENTION, heads=[1, 2], groups=[0, 1])},
    "kv-group": {ATTENTION: lambda c: BlockKeep(ATTENTION, heads=[2, 3], groups=[1])},
    "mlp": {MLP: lambda c: BlockKeep(MLP, mlp=pick(96, 40, 3))},
    "experts": {MOE: lambda c: BlockKeep(MOE, experts=[0, 2, 3], mlp=[list(range(48))] * 3, shared=list(range(32)))},
    "experts-at-top-k": {MOE: lambda c: BlockKeep(MOE, experts=[1, 3], mlp=[list(range(48))] * 2, shared=list(range(32)))},
    "expert-channels": {MOE: lambda c: BlockKeep(MOE, experts=[0, 1, 2, 3], mlp=[pick(48, 16, e) for e in range(4)],
                                                 shared=pick(32, 8, 9))},  # fmt: skip
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_cutting_each_unit_kind_equals_masking(case):
    teacher = tiny_nemotron()
    c = teacher.config
    keeps = [CASES[case].get(t, lambda c, t=t: all_units(c, t))(c) for t in c.layers_block_type]
    layers, hidden = list(range(4)), list(range(c.hidden_size))
    diff = logits(student_of(teacher, layers, keeps, hidden)) - logits(masked(teacher, layers, keeps))
    assert diff.abs().max() < 1e-5


@pytest.mark.parametrize("drop", [0, 1, 2, 3])
def test_dropping_a_layer_of_each_type_equals_masking_it(drop):
    teacher = tiny_nemotron(num_layers=8)  # twice Mamba2, MoE, attention, MLP (a student keeps one attention
    c = teacher.config  # layer: transformers' forward asks the cache for the length, which only attention holds)
    layers = [i for i in range(8) if i != drop]
    keeps = [all_units(c, c.layers_block_type[i]) for i in layers]
    diff = logits(student_of(teacher, layers, keeps, list(range(c.hidden_size)))) - logits(masked(teacher, layers, keeps))
    assert diff.abs().max() < 1e-5


def test_a_pruned_student_saves_loads_and_generates(tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = tiny_nemotron()
    c = teacher.config
    keeps = [all_units(c, t) for t in c.layers_block_type]
    keeps[0] = BlockKeep(MAMBA, mamba_heads=[0, 3, 5, 6], mamba_channels=[1, 2, 5, 6])
    student = student_of(teacher, list(range(4)), keeps, pick(64, 48, 4))
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(loaded), logits(student))
    assert loaded.generate(TOKENS[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=1).shape == (1, 9)


G = torch.Generator().manual_seed(5)
CALIB = torch.randint(0, 96, (8, 16), generator=G)
VAL = torch.randint(0, 96, (4, 16), generator=G)


def test_importance_scores_each_unit_kind_in_its_own_layers_and_round_trips(tmp_path):
    from nas.prune.importance import Importance, compute_importance

    teacher = tiny_nemotron()  # Mamba2, MoE, attention, MLP
    with torch.no_grad():
        norm = teacher.model.layers[0].mixer.norm.weight  # [heads * head_dim], head-major
        norm[5 * 8 : 6 * 8] = 0  # Mamba head 5 outputs nothing
        norm[3::8] = 0  # nor does head channel 3 of any head
        teacher.model.layers[1].mixer.experts.down_proj[2].zero_()  # expert 2 outputs zeros
        teacher.model.layers[1].mixer.shared_experts.down_proj.weight[:, 7] = 0
    scores = compute_importance(teacher, CALIB, VAL)
    assert scores.mamba_heads.shape == (4, 8) and scores.mamba_channels.shape == (4, 8)
    assert scores.mamba_heads[0].argmin() == 5 and scores.mamba_heads[0, 5] == 0
    assert scores.mamba_channels[0].argmin() == 3 and scores.mamba_channels[0, 3] == 0
    assert scores.experts[1].argmin() == 2 and scores.experts[1, 2] == 0 < scores.expert_mass[1, 2]
    assert torch.allclose(scores.expert_mass[1].sum(), torch.tensor(1.0))  # norm_topk_prob: weights sum to 1
    assert scores.expert_mlp.shape == (4, 4, 48) and scores.shared_mlp.shape == (4, 32)
    # each unit kind is scored in the layers of its type only
    assert scores.heads[[0, 1, 3]].abs().sum() == 0 < scores.heads[2].min()
    assert scores.mlp[[0, 1, 2]].abs().sum() == 0 < scores.mlp[3].min()
    assert scores.mamba_heads[1:].abs().sum() == 0 and scores.experts[[0, 2, 3]].abs().sum() == 0
    loaded = Importance.load(scores.save(tmp_path / "imp.safetensors"))
    for name in ("mamba_heads", "mamba_channels", "experts", "expert_mlp", "shared_mlp"):
        assert torch.equal(getattr(loaded, name), getattr(scores, name))
