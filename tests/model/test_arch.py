import pytest
import torch

from nas.errors import InfeasibleError, ModelError
from nas.model.arch import Arch, check_prunable
from nas.model.size import count_params, kv_cache_bytes, parse_count
from nas.testing import tiny_config, tiny_model


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_analytic_params_equal_numel(family_model):
    assert count_params(Arch.from_hf_config(family_model.config)) == numel(family_model)


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_analytic_params_with_attention_and_mlp_bias(model_type):
    model = tiny_model(model_type, attention_bias=True, mlp_bias=True)
    arch = Arch.from_hf_config(model.config)
    assert (
        arch.qkv_bias and arch.o_bias and arch.mlp_bias == (model_type == "llama")
    )  # Qwen3's MLP has no bias
    assert count_params(arch) == numel(model)


def test_to_hf_config_round_trips_and_builds_the_counted_model(family_model):
    from transformers import AutoModelForCausalLM

    teacher = Arch.from_hf_config(family_model.config)
    small = teacher.replace(
        num_layers=2, hidden_size=32, ffn_hidden_size=40, num_attention_heads=2, num_query_groups=1
    )
    config = small.to_hf_config(family_model.config)
    assert Arch.from_hf_config(config) == small
    assert config.per_layer_config[0].head_dim == teacher.head_dim  # layer 0's (Gemma 4's full: their own)
    assert numel(AutoModelForCausalLM.from_config(config)) == count_params(small)
    assert family_model.config.num_hidden_layers == teacher.num_layers  # base config untouched


def test_kv_cache_bytes_counts_k_and_v_of_every_layer():
    arch = Arch.from_hf_config(tiny_config("llama", num_layers=4, num_query_groups=2, head_dim=16))
    assert kv_cache_bytes(arch, seq_len=10, dtype=torch.bfloat16) == 2 * 4 * 2 * 16 * 10 * 2
    assert kv_cache_bytes(arch, seq_len=1, dtype=torch.float32) == 2 * 4 * 2 * 16 * 4


def test_heads_must_be_a_multiple_of_groups():
    arch = Arch.from_hf_config(tiny_config("llama"))
    with pytest.raises(InfeasibleError, match="multiple of num_query_groups"):
        arch.replace(num_attention_heads=3, num_query_groups=2)


def test_hidden_size_must_split_across_heads_for_transformers_to_load_it():
    arch = Arch.from_hf_config(tiny_config("llama"))
    with pytest.raises(InfeasibleError, match="cannot load"):
        arch.replace(hidden_size=40, num_attention_heads=3, num_query_groups=1)


def test_larger_than_teacher_is_infeasible():
    teacher = Arch.from_hf_config(tiny_config("llama"))
    with pytest.raises(InfeasibleError, match="larger than the teacher"):
        check_prunable(teacher, teacher.replace(ffn_hidden_size=teacher.ffn_hidden_size + 8))
    with pytest.raises(InfeasibleError, match="heads per group"):
        check_prunable(teacher, teacher.replace(num_attention_heads=4, num_query_groups=1))


def test_unknown_model_type_names_the_supported_ones():
    config = tiny_config("llama")
    config.model_type = "gpt2"
    with pytest.raises(
        ModelError,
        match="gemma3_text, gemma4_text, gpt_oss, llama, ministral3, mistral, mixtral, nemotron_h, olmo2, olmo3, phi3, qwen2, qwen3, qwen3_5_moe_text, qwen3_5_text, qwen3_moe, "
        "smollm3$",
    ):
        Arch.from_hf_config(config)


@pytest.mark.parametrize(
    "text,expected",
    [("4B", 4_000_000_000), ("350M", 350_000_000), ("1.5e9", 1_500_000_000), ("12k", 12_000), (7, 7)],
)
def test_parse_count(text, expected):
    assert parse_count(text) == expected


def test_parse_count_rejects_garbage():
    with pytest.raises(InfeasibleError, match="4B, 350M"):
        parse_count("lots")
