"""Gemma 4 golden facts beyond the shared ones (tests/model/test_arch.py and tests/prune/test_prune.py run keep-all,
numel == count, pruning == masking and save -> from_pretrained -> generate on its tiny model of `FAMILY_CASES`,
whose full-attention layers have twice the head_dim over one KV head with keys as values, as the 31B's): full
layers over several KV groups and with a v_proj, the KV cache they hold, and the shipped 31B config."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from nas.errors import InfeasibleError
from nas.model.arch import Arch
from nas.model.load import load_config
from nas.model.size import count_params, kv_cache_bytes
from nas.prune.cut import plan_cut, prune
from nas.prune.space import enumerate_candidates
from nas.settings import SpaceConfig
from nas.testing import tiny_config, tiny_model
from tests.prune.test_prune import logits, masked_teacher, scores_of

CONFIG = Path(__file__).parents[3] / "benchmarks" / "configs" / "gemma-4-31B"
# full-attention layers (1 and 3 of 4) of their own head_dim over 2 KV groups of their own, with a v_proj (no
# keys as values; transformers reads num_global_key_value_heads only with them, so the overrides are explicit)
TWO_GLOBAL_GROUPS = {"num_query_groups": 4, "attention_k_eq_v": False,
                     "per_layer_config": {i: {"head_dim": 8, "num_key_value_heads": 2} for i in (1, 3)}}  # fmt: skip


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("knobs", [
    {"num_attention_heads": 2, "num_query_groups": 2},  # one query head in each global KV group
    {"num_layers": 3, "ffn_hidden_size": 40, "num_attention_heads": 2, "num_query_groups": 2},
])  # fmt: skip
def test_full_attention_heads_are_cut_inside_their_own_kv_groups_exactly(knobs):
    teacher = tiny_model("gemma4_text", **TWO_GLOBAL_GROUPS)
    full = teacher.model.layers[1].self_attn
    assert full.v_proj is not None and full.k_proj.out_features == 2 * 8  # the layout under test
    big = Arch.from_hf_config(teacher.config)
    assert count_params(big) == numel(teacher)
    importance = scores_of(teacher)
    arch = big.replace(**knobs)
    student = prune(teacher, arch, importance)
    assert numel(student) == count_params(arch)
    narrow = arch.replace(hidden_size=48)  # hidden channels are no masking (RMSNorm over fewer): counted only
    assert numel(prune(teacher, narrow, importance)) == count_params(narrow)
    cut = plan_cut(big, arch, importance)
    for new, old in enumerate(cut.layers):
        if big.layer_types[old] == "global_attention":  # both groups kept, one head in each (heads 0-1, 2-3)
            assert cut.groups[new] == [0, 1] and [h // 2 for h in cut.heads[new]] == [0, 1]
    assert (logits(student) - logits(masked_teacher(teacher, cut, arch))).abs().max() < 1e-5


def test_query_heads_must_fill_the_full_attention_kv_groups():
    arch = Arch.from_hf_config(tiny_model("gemma4_text", **TWO_GLOBAL_GROUPS).config)
    with pytest.raises(InfeasibleError, match="multiple of num_global_query_groups"):
        arch.replace(num_attention_heads=1, num_query_groups=1)


@pytest.mark.parametrize("features", [{}, TWO_GLOBAL_GROUPS])
def test_kv_cache_bytes_are_what_the_model_caches(features):
    """Sliding layers cache their KV groups of head_dim, full layers theirs of global_head_dim (keys as values
    too: transformers caches the values beside the keys); 6 tokens fit the sliding window of 8."""
    model = tiny_model("gemma4_text", **features)
    with torch.no_grad():
        cache = model(input_ids=torch.arange(6)[None], use_cache=True).past_key_values
    cached = sum(layer.keys.numel() + layer.values.numel() for layer in cache.layers)
    assert kv_cache_bytes(Arch.from_hf_config(model.config), seq_len=6, dtype=torch.float32) == 4 * cached


def test_the_31b_config_counts_what_transformers_builds_and_plans_a_space():
    """The shipped 31B text config (benchmarks/configs/gemma-4-31B/SOURCE.md): its count is the numel of the
    model transformers builds from it (on the meta device: no weights), 30.7B as published, and a budget of it
    gives candidates that keep its full-attention shapes."""
    config = load_config(CONFIG)
    teacher = Arch.from_hf_config(config)
    assert (teacher.global_head_dim, teacher.num_global_query_groups) == (512, 4) and teacher.attention_k_eq_v
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert numel(model) == count_params(teacher) == 30_697_345_280
    steps = {"hidden_size": 512, "ffn_hidden_size": 2048}
    space = SpaceConfig(steps=steps, max_width_prune=0.3, max_depth_prune=0.2)
    candidates = enumerate_candidates(teacher, "70%", space)
    assert candidates and all(a.num_attention_heads % 4 == 0 and a.global_head_dim == 512 for a in candidates)
    largest = candidates[0].to_hf_config(config)
    with torch.device("meta"):
        assert numel(AutoModelForCausalLM.from_config(largest)) == count_params(candidates[0])


def test_the_memory_plan_grows_each_layer_type_by_its_own_attention_shapes():
    """The dry run's depth extrapolation (one and two layers of each type) matches the dry run at full depth,
    and its weights are the model's: the full-attention layers keep their own head_dim and KV heads at every
    depth it measures."""
    from nas.plan import dryrun

    config = tiny_config("gemma4_text", num_layers=5, vocab_size=256, ffn_hidden_size=128)
    axes = dryrun.depth_axes(config)
    assert axes == [("full_attention", 3), ("sliding_attention", 2)]
    two = dryrun.at_axes(config, axes, (2, 1))
    assert [two.per_layer_config[i].head_dim for i in range(3)] == [32, 32, 16]

    def measure(depths):
        return dryrun.measure_eval(dryrun.at_axes(config, axes, depths), torch.bfloat16, 2, 32, "bf16-mixed")

    planned, full = dryrun.peak_of(dryrun.extrapolate(measure, (3, 2))), dryrun.peak_of(measure((3, 2)))
    weights = numel(AutoModelForCausalLM.from_config(config)) * 2
    assert planned["teacher"] == full["teacher"] == weights
    assert planned["peak_bytes"] == pytest.approx(full["peak_bytes"], rel=0.01)
