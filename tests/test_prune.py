import pytest
import torch

from nas.errors import InfeasibleError
from nas.model.arch import Arch, count_params
from nas.prune.cut import plan_cut, prune, save_pruned
from nas.prune.importance import Importance, compute_importance
from nas.testing import tiny_model

TOKENS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))


def scores_of(model, seed: int = 0) -> Importance:
    """Importance on random tokens: real hooks, arbitrary but fixed rankings."""
    g = torch.Generator().manual_seed(seed)
    return compute_importance(
        model, torch.randint(0, 96, (8, 16), generator=g), torch.randint(0, 96, (4, 16), generator=g)
    )


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def test_keep_all_reproduces_teacher_logits(family_model):
    arch = Arch.from_hf_config(family_model.config)
    student = prune(family_model, arch, scores_of(family_model))
    assert (logits(student) - logits(family_model)).abs().max() < 1e-5


@pytest.mark.parametrize("strategy", ["drop-lowest", "contiguous"])
def test_pruned_numel_equals_analytic_count(family_model, strategy):
    teacher = Arch.from_hf_config(family_model.config)
    small = teacher.replace(
        num_layers=3,
        hidden_size=48,
        ffn_hidden_size=64,
        num_query_groups=1,
        num_attention_heads=teacher.heads_per_group,
    )
    student = prune(family_model, small, scores_of(family_model), strategy)
    assert sum(p.numel() for p in student.parameters()) == count_params(small)
    assert logits(student).shape == (2, 24, teacher.vocab_size)


def test_teacher_is_not_modified(family_model):
    before = {k: v.clone() for k, v in family_model.state_dict().items()}
    arch = Arch.from_hf_config(family_model.config).replace(num_layers=2, hidden_size=32)
    prune(family_model, arch, scores_of(family_model))
    after = family_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def masked_teacher(teacher, cut):
    """The teacher with every unit the cut drops zeroed out (hidden channels are not masked:
    RMSNorm over fewer channels is not a masking of the full norm)."""
    masked = tiny_model(teacher.config.model_type, **sizes_of(teacher))
    masked.load_state_dict(teacher.state_dict())
    arch = Arch.from_hf_config(teacher.config)
    with torch.no_grad():
        for index, layer in enumerate(masked.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            if index not in cut.layers:  # no attention and no MLP output: the block is the identity
                attn.o_proj.weight.zero_()
                mlp.down_proj.weight.zero_()
                continue
            kept = cut.layers.index(index)
            for head in set(range(arch.num_attention_heads)) - set(cut.heads[kept]):
                attn.o_proj.weight[:, head * arch.head_dim : (head + 1) * arch.head_dim] = 0
            for channel in set(range(arch.ffn_hidden_size)) - set(cut.mlp[kept]):
                mlp.down_proj.weight[:, channel] = 0
    return masked


def sizes_of(model):
    c = model.config
    return dict(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_key_value_heads,
        head_dim=c.head_dim,
        tie_word_embeddings=c.tie_word_embeddings,
    )


@pytest.mark.parametrize(
    "knobs",
    [
        {"num_attention_heads": 2, "num_query_groups": 2},  # one head per group
        {"num_attention_heads": 2, "num_query_groups": 1},  # a whole KV group
        {"ffn_hidden_size": 40},
        {"num_layers": 2},
        {"num_layers": 3, "ffn_hidden_size": 50, "num_attention_heads": 2, "num_query_groups": 1},
    ],
)
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_pruning_equals_masking(model_type, knobs):
    teacher = tiny_model(model_type, num_query_groups=2)
    importance = scores_of(teacher)
    arch = Arch.from_hf_config(teacher.config).replace(**knobs)
    student = prune(teacher, arch, importance)
    masked = masked_teacher(teacher, plan_cut(Arch.from_hf_config(teacher.config), arch, importance))
    assert (logits(student) - logits(masked)).abs().max() < 1e-5


def test_drop_lowest_keeps_the_layers_whose_removal_hurts_most():
    teacher = tiny_model("llama", num_layers=4)
    importance = scores_of(teacher)
    importance.layer_loss = torch.tensor([5.0, 1.0, 3.0, 2.0])
    cut = plan_cut(
        Arch.from_hf_config(teacher.config),
        Arch.from_hf_config(teacher.config).replace(num_layers=2),
        importance,
    )
    assert cut.layers == [0, 2]


def test_contiguous_drops_the_block_with_the_lowest_block_importance():
    teacher = tiny_model("llama", num_layers=4)
    importance = scores_of(teacher)
    importance.block_bi = torch.ones(5, 5)
    importance.block_bi[1, 3] = 0.1  # layers 1..2 change the residual stream least
    arch = Arch.from_hf_config(teacher.config)
    assert plan_cut(arch, arch.replace(num_layers=2), importance, "contiguous").layers == [0, 3]


def test_save_then_from_pretrained_gives_same_logits_and_generates(tmp_path, family_model):
    from transformers import AutoModelForCausalLM

    arch = Arch.from_hf_config(family_model.config).replace(num_layers=3, ffn_hidden_size=64)
    student = prune(family_model, arch, scores_of(family_model))
    save_pruned(student, tmp_path / "student", teacher="tiny")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert (logits(loaded) - logits(student)).abs().max() < 1e-6
    out = loaded.generate(TOKENS[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert out.shape == (1, 9)
    assert (tmp_path / "student" / "nas_pruning.json").is_file()


def test_infeasible_arch_is_one_clear_error():
    teacher = tiny_model("llama", num_query_groups=2)
    arch = Arch.from_hf_config(teacher.config)
    with pytest.raises(InfeasibleError, match="larger than the teacher"):
        prune(teacher, arch.replace(num_layers=5), scores_of(teacher))
