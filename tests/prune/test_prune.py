import copy

import pytest
import torch

from nas.errors import InfeasibleError
from nas.model.arch import Arch
from nas.model.families import block_module, layer_units
from nas.model.size import count_params
from nas.prune.cut import plan_cut, prune, save_pruned
from nas.prune.importance import Importance, compute_importance
from nas.testing import tiny_model

TOKENS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))


_SCORES: dict[tuple, Importance] = {}


def scores_of(model, seed: int = 0) -> Importance:
    """Importance on random tokens: real hooks, arbitrary but fixed rankings. Computed once per model
    (its config and a fingerprint of its weights) and handed out as copies, so the many parametrized
    cases of one tiny model share the computation."""
    fingerprint = float(sum(p.detach().double().sum() for p in model.parameters()))
    key = (model.config.to_json_string(), seed, fingerprint)
    if key not in _SCORES:
        g = torch.Generator().manual_seed(seed)
        _SCORES[key] = compute_importance(
            model, torch.randint(0, 96, (8, 16), generator=g), torch.randint(0, 96, (4, 16), generator=g)
        )
    return copy.deepcopy(_SCORES[key])


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
    # 3 of the 4 layers: a hybrid student keeps a layer of every type (Nemotron-H: Mamba2, attention, MLP)
    arch = Arch.from_hf_config(family_model.config).replace(num_layers=3, hidden_size=32)
    prune(family_model, arch, scores_of(family_model))
    after = family_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def mask_router(gate, dropped: list[int], top_k: int, normalize: bool, softmax_of_top_k: bool = False) -> None:
    """The router never picks a dropped expert: its logits are -inf before the softmax and top-k (gpt-oss:
    before the top-k, then a softmax over the top-k logits)."""

    def hook(module, args, out):
        logits = out[0].clone()
        logits[:, dropped] = float("-inf")
        if softmax_of_top_k:
            values, index = torch.topk(logits, top_k, dim=-1)
            return out[0], torch.softmax(values, dim=-1).to(out[1].dtype), index
        weights, index = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1)
        if normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return out[0], weights.to(out[1].dtype), index

    gate.register_forward_hook(hook)


def _zero_units(weight, units: set[int], size: int) -> None:
    """Zero the input columns of whole units (heads) of `size` channels of an output projection."""
    for u in units:
        weight[:, u * size : (u + 1) * size] = 0


ATTENTION = ("attention", "global_attention")


def masked_teacher(teacher, cut, arch):
    """The teacher with every unit the cut drops masked out: zeroed `o_proj` columns of heads (`out_proj` columns
    of Gated DeltaNet value heads), zeroed `down_proj` columns of MLP channels (of each expert), zeroed outputs
    of dropped layers, and dropped experts never routed to. Hidden channels are not masked: RMSNorm over fewer
    channels is not a masking of the full norm (nor is OLMo2's q/k norm over all heads a masking of heads)."""
    masked = copy.deepcopy(teacher)
    big = Arch.from_hf_config(teacher.config)
    fam = big.family
    normalize = getattr(teacher.config, "norm_topk_prob", True)  # Mixtral always renormalises the top-k
    with torch.no_grad():
        for index, (layer, units) in enumerate(zip(masked.model.layers, layer_units(teacher.config), strict=True)):
            mlp = block_module(layer, fam, units[-1])
            outs = {"attention": lambda m: m.o_proj.weight, "global_attention": lambda m: m.o_proj.weight,
                    "linear_attention": lambda m: m.out_proj.weight}  # fmt: skip
            down = mlp.experts.down_proj if big.num_experts else mlp.down_proj.weight  # [E,] H, F
            spec = big.family.experts
            if index not in cut.layers:  # no attention and no MLP output: the block is the identity
                outs[units[0]](block_module(layer, fam, units[0])).zero_()
                mixer = block_module(layer, fam, units[0])
                for p in (
                    down,
                    *_shared_expert_output(mlp),
                    *(_output_biases(mixer, mlp) if units[0] in ATTENTION else ()),
                ):
                    p.zero_()
                continue
            kept = cut.layers.index(index)
            # a zeroed head's output is zero whatever its attention sink (gpt-oss): the sink is the head's own
            if units[0] in ATTENTION:  # Gemma 4's full-attention heads are global_head_dim wide
                heads = set(range(big.num_attention_heads)) - set(cut.heads[kept])
                head_dim = big.global_head_dim if units[0] == "global_attention" else big.head_dim
                _zero_units(layer.self_attn.o_proj.weight, heads, head_dim)
            else:
                values = set(range(big.num_linear_value_heads)) - set(cut.linear_values[kept])
                _zero_units(layer.linear_attn.out_proj.weight, values, big.linear_value_head_dim)
            if not big.num_experts:
                down[:, sorted(set(range(big.ffn_hidden_size)) - set(cut.mlp[kept]))] = 0
                continue
            for e, channels in zip(cut.experts[kept], cut.mlp[kept], strict=True):
                dropped_channels = sorted(set(range(big.ffn_hidden_size)) - set(channels))
                if spec.transposed:  # [E, F, H] (gpt-oss)
                    down[e][dropped_channels, :] = 0
                else:
                    down[e][:, dropped_channels] = 0
            dropped = sorted(set(range(big.num_experts)) - set(cut.experts[kept]))
            mask_router(getattr(mlp, spec.router), dropped, arch.num_experts_per_tok, normalize,
                        softmax_of_top_k=spec.router == "router")  # fmt: skip
    return masked


def _output_biases(attn, mlp) -> list:
    """The biases added after `o_proj` and after the experts (gpt-oss), zeroed with a dropped block."""
    biases = [getattr(attn.o_proj, "bias", None), getattr(getattr(mlp, "experts", None), "down_proj_bias", None)]
    return [b for b in biases if b is not None]


def _shared_expert_output(mlp) -> list:
    """The output projection of a shared expert beside the routed ones (Qwen3.5-MoE), zeroed with a dropped block."""
    shared = getattr(mlp, "shared_expert", None)
    return [shared.down_proj.weight] if shared is not None else []


UNIT_KNOBS = {
    "heads": {"num_attention_heads": 2, "num_query_groups": 2},  # one head per group
    "kv-group": {"num_attention_heads": 2, "num_query_groups": 1},  # a whole KV group
    "mlp": {"ffn_hidden_size": 40},
    "layers": {"num_layers": 2},
    "mixed": {"num_layers": 3, "ffn_hidden_size": 48, "num_attention_heads": 2, "num_query_groups": 1},
}
MOE_KNOBS = {
    "experts": {"num_experts": 3},
    "experts-below-top-k": {"num_experts": 1},  # num_experts_per_tok follows down to 1
    "experts-mixed": {"num_experts": 2, "ffn_hidden_size": 40, "num_layers": 3, "num_query_groups": 1,
                      "num_attention_heads": 2},
}  # fmt: skip
HYBRID_KNOBS = {  # Gated DeltaNet: value heads within their key head, whole key heads, layers of one type
    "linear-values": {"num_linear_value_heads": 2},
    "linear-keys": {"num_linear_key_heads": 1, "num_linear_value_heads": 2},
    "linear-layers": {"num_linear_attention_layers": 1},
    "attention-layers": {"num_attention_layers": 1},
    "hybrid-mixed": {"num_linear_attention_layers": 1, "num_linear_key_heads": 1, "num_linear_value_heads": 1,
                     "ffn_hidden_size": 48, "num_attention_heads": 2, "num_query_groups": 1},
}  # fmt: skip
MOE_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "qwen3_5_moe_text")
HYBRID_FAMILIES = ("qwen3_5_text", "qwen3_5_moe_text")
PROJ_NORM = {"olmo2", "olmo3"}  # q/k norm over all heads: head pruning is not a masking
MASK_CASES = [
    pytest.param(model_type, knobs, id=f"{model_type}-{name}")
    for model_type in ("llama", "qwen2", "qwen3", "gemma3_text", "phi3", "olmo2", "olmo3", "smollm3",
                       "qwen3_moe", "mixtral", "ministral3", "gpt_oss", "gemma4_text", "qwen3_5_text",
                       "qwen3_5_moe_text")
    for name, knobs in {**UNIT_KNOBS, **(MOE_KNOBS if model_type in MOE_FAMILIES else {}),
                        **(HYBRID_KNOBS if model_type in HYBRID_FAMILIES else {})}.items()
    if not (model_type in PROJ_NORM and "num_attention_heads" in knobs)
]  # fmt: skip


@pytest.mark.parametrize("model_type,knobs", MASK_CASES)
def test_pruning_equals_masking(model_type, knobs):
    teacher = tiny_model(model_type, num_query_groups=2)
    importance = scores_of(teacher)
    arch = Arch.from_hf_config(teacher.config).replace(**knobs)
    student = prune(teacher, arch, importance)
    masked = masked_teacher(teacher, plan_cut(Arch.from_hf_config(teacher.config), arch, importance), arch)
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
