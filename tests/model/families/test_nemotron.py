"""Nemotron-H golden facts beyond the shared ones (tests/model/test_arch.py and tests/prune/test_prune.py run those on the
Nemotron Nano 2-like tiny model of `FAMILY_CASES`): on a stack of all four layer types (Mamba2, MoE, attention,
MLP), pruning every unit kind (Mamba2 heads evenly per group and head_dim, attention heads and KV groups, FFN
channels of the MLPs and of each expert, experts, layers of each type) equals masking the same units; keep-all
reproduces the teacher; importance scores each unit kind in the layers of its type; the recurrent state is what
transformers' cache holds; the published 12B -> 9B prune is a valid cut."""

import copy
import json
from pathlib import Path

import pytest
import torch

from nas.errors import InfeasibleError, ModelError
from nas.model.arch import Arch, check_prunable
from nas.model.card import CardFacts, model_card
from nas.model.mamba import channels
from nas.model.size import count_params, recurrent_state_bytes
from nas.prune.cut import nemotron_keeps, plan_cut, prune, save_pruned
from nas.prune.importance import Importance, compute_importance
from nas.prune.nemotron import ATTENTION, MAMBA, MLP, MOE
from nas.testing import tiny_config, tiny_model
from tests.model.families.test_mamba import MaskedGatedNorm

TOKENS = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(1))
G = torch.Generator().manual_seed(5)
CALIB = torch.randint(0, 96, (8, 16), generator=G)
VAL = torch.randint(0, 96, (4, 16), generator=G)
ALL_TYPES = [MAMBA, MOE, ATTENTION, MLP] * 2  # every type twice, so that a layer of each can be dropped
CONFIGS = Path(__file__).parents[3] / "benchmarks" / "configs"


def all_types(**sizes):
    return tiny_model("nemotron_h", layers_block_type=ALL_TYPES, **sizes)


_SCORES: dict[int, Importance] = {}


def scores_of(model) -> Importance:
    """Importance of one tiny teacher on random tokens (computed once per model, handed out as copies)."""
    if id(model) not in _SCORES:
        _SCORES[id(model)] = compute_importance(model, CALIB, VAL)
    return copy.deepcopy(_SCORES[id(model)])


@pytest.fixture(scope="module")
def teacher():
    return all_types()


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(input_ids=tokens).logits


def masked(teacher, layers: list[int], keeps) -> torch.nn.Module:
    """The teacher with every dropped unit masked: a dropped layer's mixer outputs zero; dropped attention heads,
    MLP and expert channels have zero output columns; a dropped expert is never routed to (its router bias is
    -inf: Nemotron-H's router scores each expert by its own sigmoid, so the kept ones score as before); dropped
    Mamba2 heads and head channels are zero and left out of their group's gated norm."""
    model = copy.deepcopy(teacher)
    c = teacher.config
    outputs = {MAMBA: ["out_proj.weight"], ATTENTION: ["o_proj.weight"], MLP: ["down_proj.weight"],
               MOE: ["experts.down_proj", "shared_experts.down_proj.weight"]}  # fmt: skip
    with torch.no_grad():
        for index, layer in enumerate(model.model.layers):
            mixer, kind = layer.mixer, layer.block_type
            if index not in layers:
                for name in outputs[kind]:
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
                mixer.gate.e_score_correction_bias[sorted(set(range(c.n_routed_experts)) - set(keep.experts))] = (
                    float("-inf")
                )
                mixer.gate.top_k = min(c.num_experts_per_tok, len(keep.experts))
    return model


def test_analytic_params_and_keep_all_on_a_stack_of_every_layer_type(teacher):
    arch = Arch.from_hf_config(teacher.config)
    assert arch.blocks == ("mamba", "moe", "attention", "mlp") and arch.describe().startswith("L8=2M+2E+2A+2F")
    assert count_params(arch) == sum(p.numel() for p in teacher.parameters())
    assert torch.equal(logits(prune(teacher, arch, scores_of(teacher))), logits(teacher))


CASES = {
    "mamba-heads": {"num_mamba_heads": 4},  # two of the four heads of each of the 2 groups
    "mamba-head-dim": {"mamba_head_dim": 4},
    "attention-heads": {"num_attention_heads": 2, "num_query_groups": 2},
    "kv-group": {"num_attention_heads": 2, "num_query_groups": 1},
    "ffn": {"ffn_hidden_size": 40},  # the MLPs' channels and each expert's own
    "experts": {"num_experts": 3},
    "experts-at-top-k": {"num_experts": 2},
    "mamba-layers": {"num_mamba_layers": 1},
    "moe-layers": {"num_moe_layers": 1},
    "attention-layers": {"num_attention_layers": 1},
    "mlp-layers": {"num_mlp_layers": 1},
    "mixed": {"num_mamba_layers": 1, "num_mlp_layers": 1, "num_mamba_heads": 2, "mamba_head_dim": 6,
              "ffn_hidden_size": 48, "num_experts": 2, "num_attention_heads": 2, "num_query_groups": 1},
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_pruning_each_unit_kind_equals_masking(teacher, case):
    importance = scores_of(teacher)
    big = Arch.from_hf_config(teacher.config)
    arch = big.replace(**CASES[case])
    student = prune(teacher, arch, importance)
    assert sum(p.numel() for p in student.parameters()) == count_params(arch)
    cut = plan_cut(big, arch, importance)
    if "mamba" in case:  # heads stay evenly inside each group, in group order
        for heads in filter(None, cut.mamba_heads):
            assert [sum(h // 4 == g for h in heads) for g in range(2)] == [arch.num_mamba_heads // 2] * 2
    reference = masked(teacher, cut.layers, nemotron_keeps(teacher.config, cut))
    assert (logits(student) - logits(reference)).abs().max() < 1e-5


def test_layers_are_dropped_within_their_type_by_importance(teacher):
    importance = scores_of(teacher)
    importance.layer_loss = torch.tensor([5.0, 1.0, 1.0, 1.0, 9.0, 2.0, 3.0, 0.5])  # per layer: M E A F M E A F
    big = Arch.from_hf_config(teacher.config)
    cut = plan_cut(big, big.replace(num_mamba_layers=1, num_moe_layers=1, num_attention_layers=1,
                                    num_mlp_layers=1), importance)  # fmt: skip
    assert cut.layers == [3, 4, 5, 6]  # of each type the layer whose removal hurts less goes: 0, 1, 2 and 7


def test_a_pruned_moe_stack_saves_loads_and_generates(teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    arch = Arch.from_hf_config(teacher.config).replace(hidden_size=48, num_mamba_heads=4, num_experts=3)
    student = prune(teacher, arch, scores_of(teacher))
    save_pruned(student, tmp_path / "student", teacher="tiny")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert torch.equal(logits(loaded), logits(student))
    assert loaded.generate(TOKENS[:1, :5], max_new_tokens=4, do_sample=False, pad_token_id=1).shape == (1, 9)
    record = json.loads((tmp_path / "student" / "nas_pruning.json").read_text())
    assert record["arch"]["num_mamba_heads"] == 4 and len(record["cut"]["mamba_heads"][0]) == 4


def test_importance_scores_each_unit_kind_in_the_layers_of_its_type(tmp_path):
    model = tiny_model("nemotron_h", layers_block_type=[MAMBA, MOE, ATTENTION, MLP])
    with torch.no_grad():
        norm = model.model.layers[0].mixer.norm.weight  # [heads * head_dim], head-major
        norm[5 * 8 : 6 * 8] = 0  # Mamba2 head 5 outputs nothing
        norm[3::8] = 0  # nor does head channel 3 of any head
        model.model.layers[1].mixer.experts.down_proj[2].zero_()  # expert 2 outputs zeros
    scores = compute_importance(model, CALIB, VAL)
    assert scores.mamba_heads.shape == (4, 8) and scores.mamba_head_dims.shape == (4, 8)
    assert scores.mamba_heads[0].argmin() == 5 and scores.mamba_heads[0, 5] == 0
    assert scores.mamba_head_dims[0].argmin() == 3 and scores.mamba_head_dims[0, 3] == 0
    assert scores.experts[1].argmin() == 2 and scores.experts[1, 2] == 0 < scores.expert_mass[1, 2]
    assert torch.allclose(scores.expert_mass[1].sum(), torch.tensor(1.0))  # norm_topk_prob: weights sum to 1
    assert scores.heads[[0, 1, 3]].abs().sum() == 0 < scores.heads[2].min()  # each kind in its layers only
    assert scores.mlp[[0, 2]].abs().sum() == 0 < scores.mlp[3, 0].min()
    assert scores.mamba_heads[1:].abs().sum() == 0 and scores.experts[[0, 2, 3]].abs().sum() == 0
    loaded = Importance.load(scores.save(tmp_path / "imp.safetensors"))
    assert torch.equal(loaded.mamba_heads, scores.mamba_heads) and torch.equal(loaded.experts, scores.experts)


def test_recurrent_state_is_what_the_cache_holds_whatever_the_length():
    model = tiny_model("nemotron_h")  # 4 layers: Mamba2, attention, MLP, Mamba2
    arch = Arch.from_hf_config(model.config)
    for length in (5, 19):
        with torch.no_grad():  # the cache the model makes itself (the keyword to pass one differs by release)
            cache = model(input_ids=TOKENS[:1, :length], use_cache=True).past_key_values
        mamba = [cache.layers[i] for i in (0, 3)]  # each layer's own states (5.20-5.25 alike; 5.25 adds getters)
        states = [layer.conv_states[0] for layer in mamba] + [layer.recurrent_states[0] for layer in mamba]
        assert sum(s.numel() * s.element_size() for s in states) == recurrent_state_bytes(arch, torch.float32)


def test_invalid_nemotron_shapes_are_clear_errors():
    arch = Arch.from_hf_config(tiny_config("nemotron_h", layers_block_type=[MAMBA, MOE, ATTENTION]))
    with pytest.raises(InfeasibleError, match="at least 2"):
        arch.replace(num_experts=1)  # the router takes the best two scores of each expert group
    with pytest.raises(InfeasibleError, match="multiple of mamba_groups"):
        arch.replace(num_mamba_heads=3)
    with pytest.raises(ModelError, match="one FFN width"):
        Arch.from_hf_config(tiny_config("nemotron_h", layers_block_type=[MAMBA, MOE, MLP], moe_intermediate_size=48))
    with pytest.raises(ModelError, match="moe_latent_size"):
        Arch.from_hf_config(tiny_config("nemotron_h", layers_block_type=[MAMBA, MOE], moe_latent_size=32))
    tied = Arch.from_hf_config(tiny_config("nemotron_h", tie_word_embeddings=True))
    assert not tied.tie_word_embeddings  # NemotronHForCausalLM never ties its head


def test_the_published_12b_to_9b_prune_is_a_valid_cut():
    """Nemotron Nano 2 (arXiv 2508.14444): 12B -> 9B, 62 -> 56 layers, hidden 5120 -> 4480, FFN 20480 -> 15680
    (the 12B's shape: Megatron-Bridge's NemotronNanoModelProvider12Bv2)."""
    from nas.model.load import load_config

    nine = load_config(CONFIGS / "NVIDIA-Nemotron-Nano-9B-v2")
    twelve = copy.deepcopy(nine)
    twelve.layers_block_type = NemotronPattern.parse("M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-")
    twelve.hidden_size, twelve.intermediate_size = 5120, 20480
    big, small = Arch.from_hf_config(twelve), Arch.from_hf_config(nine)
    assert (big.num_layers, small.num_layers) == (62, 56)
    check_prunable(big, small)
    assert 8.8e9 < count_params(small) < 9.0e9 and 12.2e9 < count_params(big) < 12.4e9


class NemotronPattern:
    """transformers' `hybrid_override_pattern` letters: M Mamba2, * attention, - MLP, E MoE."""

    @staticmethod
    def parse(pattern: str) -> list[str]:
        return [{"M": MAMBA, "*": ATTENTION, "-": MLP, "E": MOE}[c] for c in pattern]


def test_cli_prunes_a_nemotron_teacher_by_its_hybrid_knobs(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from nas.cli import main
    from nas.testing import write_tiny_teacher

    teacher = write_tiny_teacher(tmp_path / "teacher", "nemotron_h")  # Mamba2, attention, MLP, Mamba2
    compute_importance(AutoModelForCausalLM.from_pretrained(teacher), CALIB, VAL).save(tmp_path / "imp.safetensors")
    args = ["prune", str(tmp_path / "teacher"), str(tmp_path / "out"), "--importance", str(tmp_path / "imp.safetensors"),
            "--num-mamba-layers", "1", "--num-mamba-heads", "4", "--mamba-head-dim", "4"]  # fmt: skip
    assert main(args) == 0
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    arch = Arch.from_hf_config(student.config)
    assert (arch.num_mamba_layers, arch.num_mamba_heads, arch.mamba_head_dim) == (1, 4, 4)
    assert "M4x4" in capsys.readouterr().out
    assert main([*args[:5], "--num-linear-key-heads", "1"]) == 2  # not a knob of Nemotron-H: one line, exit 2
    assert "not a knob" in capsys.readouterr().err


@pytest.mark.slow  # ~30 s on 2 busy cores
def test_cli_space_of_a_nemotron_teacher_with_steps(tmp_path, capsys):
    from nas.cli import main

    tiny_model("nemotron_h").save_pretrained(tmp_path / "teacher")  # Mamba2, attention, MLP, Mamba2
    args = ["space", str(tmp_path / "teacher"), "--budget", "70%", "--tolerance", "0.1",
            "--steps", "hidden_size=32,ffn_hidden_size=48,num_mamba_heads=4,mamba_head_dim=4"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "num_mamba_heads" in out and "state_bytes_per_sequence" in out and "candidates:" in out
    assert main([*args[:-1], "hidden_size=x"]) == 2


def test_a_saved_nemotron_config_is_valid_without_num_hidden_layers_and_names_a_missing_layer_list(tmp_path):
    from nas.model.load import load_config

    tiny_model("nemotron_h").save_pretrained(tmp_path / "m")  # transformers writes no num_hidden_layers
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw.get("num_hidden_layers") is None and Arch.from_hf_config(load_config(tmp_path / "m")).num_layers == 4
    del raw["layers_block_type"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="lacks layers_block_type"):
        load_config(tmp_path / "m")


def test_a_pruned_stack_whose_first_layer_is_an_mlp_generates_as_without_a_cache(teacher, tmp_path):
    """Depth pruning can drop the first Mamba layer; transformers 5.25's cache then has nothing at layer 0 to
    ask the sequence length of (nas.model.compat mends it). Greedy decoding with the cache must match
    decoding that recomputes the whole sequence at every step, which no cache can get wrong."""
    from transformers import AutoModelForCausalLM

    importance = scores_of(teacher)
    importance.layer_loss = torch.tensor([0.1, 0.2, 0.3, 9.0, 9.0, 9.0, 9.0, 9.0])  # M E A go first
    arch = Arch.from_hf_config(teacher.config).replace(num_mamba_layers=1, num_moe_layers=1, num_attention_layers=1)
    save_pruned(prune(teacher, arch, importance), tmp_path / "student", teacher="tiny")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    assert loaded.config.layers_block_type[0] == MLP
    prompt = TOKENS[:1, :5]
    cached = loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=1)
    uncached = loaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=1, use_cache=False)
    assert cached.shape == (1, 11) and torch.equal(cached, uncached)
    teacher_arch = Arch.from_hf_config(teacher.config)
    cards = [model_card(CardFacts(teacher="tiny", teacher_arch=teacher_arch, arch=a, study="s", budget="50%", tokens=0))
             for a in (Arch.from_hf_config(loaded.config), teacher_arch)]  # fmt: skip
    assert "use_cache=False" in cards[0] and "use_cache=False" not in cards[1]  # only where layer 0 keeps nothing
