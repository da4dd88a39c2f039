"""Family-specific golden facts beyond the shared ones (tests/model/test_arch.py and tests/prune/test_prune.py run those
over every family of `FAMILY_CASES`): mixture-of-experts importance, budgets on active parameters, Gemma's
embedding scale, Phi-3's longrope coupling, and a short distillation of a pruned student of each family."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from nas.cli import main
from nas.errors import InfeasibleError, ModelError
from nas.model.arch import Arch, check_prunable
from nas.model.families import expert_ffn, family_of
from nas.model.size import count_params
from nas.prune.cut import plan_cut, prune
from nas.prune.importance import Importance, compute_importance
from nas.prune.space import enumerate_candidates, parse_budget
from nas.settings import SpaceConfig
from nas.testing import kjv_verses, tiny_config, tiny_model, tiny_tokenizer

G = torch.Generator().manual_seed(5)
CALIB = torch.randint(0, 96, (8, 16), generator=G)
VAL = torch.randint(0, 96, (4, 16), generator=G)
VOCAB = 320
NEW_FAMILIES = ("gemma3_text", "phi3", "olmo2", "olmo3", "smollm3", "qwen3_moe", "mixtral", "ministral3", "gpt_oss",
                "gemma4_text", "qwen3_5_text", "qwen3_5_moe_text", "nemotron_h")  # fmt: skip


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss", "qwen3_5_moe_text"])
def test_an_expert_with_zero_output_scores_lowest_and_routing_mass_is_the_router_weights(model_type):
    model = tiny_model(model_type, num_layers=2)
    with torch.no_grad():
        experts = model.model.layers[1].mlp.experts
        experts.down_proj[2].zero_()  # expert 2 of layer 1 outputs zeros
        if hasattr(experts, "down_proj_bias"):  # gpt-oss: and its output bias
            experts.down_proj_bias[2].zero_()
    scores = compute_importance(model, CALIB, VAL)
    assert scores.experts.shape == scores.expert_mass.shape == (2, 4)
    assert scores.mlp.shape == (2, 4, 96)  # per expert, its FFN channels
    assert scores.experts[1].argmin() == 2 and scores.experts[1, 2] == 0
    assert scores.expert_mass[1, 2] > 0  # still routed to: the mass alone would keep it
    if getattr(model.config, "norm_topk_prob", True):  # the top-k weights of a token sum to 1
        assert torch.allclose(scores.expert_mass.sum(-1), torch.ones(2))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral", "gpt_oss", "qwen3_5_moe_text"])
def test_expert_outputs_as_importance_recomputes_them_are_the_experts_outputs(model_type):
    """The per-expert FFN that importance scores (`expert_ffn`: gpt-oss's transposed, interleaved, biased
    experts and clamped SwiGLU included), weighted by the routing, sums to what the experts module returns."""
    model = tiny_model(model_type, num_layers=1)
    spec, experts, seen = family_of(model.config).experts, model.model.layers[0].mlp.experts, {}
    experts.register_forward_hook(lambda m, args, out: seen.update(args=args, out=out))
    with torch.no_grad():
        model(input_ids=CALIB[:2], use_cache=False)  # one Qwen3.5-MoE layer: no attention layer to cache
        x, index, weights = seen["args"]
        total = torch.zeros_like(seen["out"])
        for e in range(4):
            token, slot = torch.where(index == e)
            total.index_add_(0, token, expert_ffn(experts, spec, e, x[token])[1] * weights[token, slot, None])
    assert (total - seen["out"]).abs().max() < 1e-5


def test_moe_importance_round_trips_and_prunes_the_dead_expert(tmp_path):
    model = tiny_model("qwen3_moe", num_layers=2)
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[1].zero_()
    scores = compute_importance(model, CALIB, VAL)
    loaded = Importance.load(scores.save(tmp_path / "imp.safetensors"))
    assert torch.equal(loaded.experts, scores.experts) and torch.equal(loaded.mlp, scores.mlp)
    teacher = Arch.from_hf_config(model.config)
    cut = plan_cut(teacher, teacher.replace(num_experts=3), loaded)
    assert 1 not in cut.experts[0] and len(cut.mlp[0]) == 3


def test_fewer_experts_than_the_router_top_k_lower_the_top_k():
    teacher = Arch.from_hf_config(tiny_config("mixtral"))
    one = teacher.replace(num_experts=1)
    assert one.num_experts_per_tok == 1 and one.describe().endswith("E1/k1")
    check_prunable(teacher, one)
    with pytest.raises(InfeasibleError, match="num_experts_per_tok must be"):
        check_prunable(teacher, teacher.replace(num_experts=3, num_experts_per_tok=1))


@pytest.mark.parametrize("kind", ["total", "active"])
def test_moe_space_respects_a_budget_on_total_or_active_params(kind):
    config = tiny_config("qwen3_moe", tie_word_embeddings=True)
    teacher = Arch.from_hf_config(config)
    space = SpaceConfig(tolerance=0.1, budget_kind=kind)
    budget = parse_budget("70%", teacher, kind)
    candidates = enumerate_candidates(teacher, "70%", space)
    assert {a.num_experts for a in candidates} > {teacher.num_experts}  # experts are a knob
    for arch in candidates:
        assert 0.9 * budget <= count_params(arch, active=kind == "active") <= budget
        check_prunable(teacher, arch)
        assert arch.num_experts_per_tok == min(teacher.num_experts_per_tok, arch.num_experts)
    for arch in candidates[:3]:  # the largest: built from their config, they have the counted size
        assert numel(AutoModelForCausalLM.from_config(arch.to_hf_config(config))) == count_params(arch)


def test_active_budget_admits_more_total_params_than_a_total_budget():
    teacher = Arch.from_hf_config(tiny_config("mixtral"))
    assert count_params(teacher, active=True) < count_params(teacher)
    active = enumerate_candidates(teacher, "60%", SpaceConfig(tolerance=0.1, budget_kind="active"))
    total = enumerate_candidates(teacher, "60%", SpaceConfig(tolerance=0.1))
    assert max(count_params(a) for a in active) > max(count_params(a) for a in total)


def test_cli_space_of_a_moe_teacher_with_an_active_budget(tmp_path, capsys):
    tiny_model("mixtral").save_pretrained(tmp_path / "moe")
    args = [
        "space",
        str(tmp_path / "moe"),
        "--budget",
        "60%",
        "--tolerance",
        "0.1",
        "--budget-kind",
        "active",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "active per token" in out and "num_experts" in out and "active_params" in out


@pytest.mark.parametrize("tied", [False, True])
def test_gemma_students_start_from_the_teachers_scaled_embeddings(tied):
    teacher = tiny_model("gemma3_text", tie_word_embeddings=tied)
    importance = compute_importance(teacher, CALIB, VAL)
    arch = Arch.from_hf_config(teacher.config).replace(
        hidden_size=32, num_attention_heads=2, num_query_groups=1
    )
    student = prune(teacher, arch, importance)
    kept = student.nas_cut.hidden
    with torch.no_grad():
        assert torch.allclose(student.model.embed_tokens(CALIB), teacher.model.embed_tokens(CALIB)[..., kept])
        if tied:  # the scaled (shared) embedding scales the logits; the final norm's weight takes it back
            scale = (64 / 32) ** 0.5
            assert torch.allclose(
                (1 + student.model.norm.weight) * scale, 1 + teacher.model.norm.weight[kept]
            )


def test_phi3_with_longrope_keeps_hidden_size_at_heads_times_head_dim():
    rope = {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [1.0] * 8}
    config = tiny_config("phi3", original_max_position_embeddings=256, rope_scaling=rope)
    teacher = Arch.from_hf_config(config)
    assert teacher.head_dim_tied and not Arch.from_hf_config(tiny_config("phi3")).head_dim_tied
    with pytest.raises(InfeasibleError, match="longrope"):
        teacher.replace(hidden_size=48)
    candidates = enumerate_candidates(teacher, "80%", SpaceConfig(tolerance=0.2))
    assert all(a.hidden_size == a.num_attention_heads * a.head_dim for a in candidates)
    AutoModelForCausalLM.from_config(candidates[-1].to_hf_config(config))  # transformers validates the rope


def test_qwen3_moe_with_dense_layers_is_one_clear_error():
    config = tiny_config("qwen3_moe", mlp_only_layers=[1])
    with pytest.raises(ModelError, match="every layer is sparse"):
        Arch.from_hf_config(config)


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    """Real text (King James Bible verses) through the real data pipeline, with a 320-token BPE."""
    from nas.data.tokens import prepare
    from nas.settings import DataConfig

    root = tmp_path_factory.mktemp("data")
    text = root / "kjv.txt"
    text.write_text("\n\n".join(kjv_verses(1500)), encoding="utf-8")
    return prepare(
        DataConfig.single(str(text), seq_len=32, cache_dir=str(root / "cache")), tiny_tokenizer(VOCAB)
    )


@pytest.mark.parametrize("model_type", NEW_FAMILIES)
def test_a_short_distillation_of_a_pruned_student_lowers_its_kl(model_type, token_data, tmp_path):
    from nas.settings import DistillConfig
    from nas.train.kd import kl_to_teacher
    from nas.train.loop import distill

    teacher = tiny_model(model_type, num_layers=3, vocab_size=VOCAB)
    with torch.no_grad():  # a sharp teacher: a random init gives near-uniform next-token distributions
        # (Gemma's are sharp already: its embeddings are scaled by sqrt(hidden_size); soft-capping saturates)
        teacher.lm_head.weight.mul_(2.0 if model_type.startswith("gemma") else 8.0)
    importance = compute_importance(teacher, token_data.calib(8), token_data.val(4))
    big = Arch.from_hf_config(teacher.config)
    # a hybrid keeps a layer of each type (Nemotron-H's 3 layers: Mamba2, attention, MLP): cut width instead
    depth = {"hidden_size": 48} if big.layer_types else {"num_layers": 2}
    arch = big.replace(**depth, ffn_hidden_size=48)
    student = prune(teacher, arch, importance)
    before = kl_to_teacher(student, teacher, token_data.val(8))
    settings = DistillConfig(
        steps=16, batch_size=4, lr=1e-3, min_lr=1e-4, warmup_steps=1, eval_every=0, checkpoint_every=0,
        eval_sequences=8,
    )  # fmt: skip
    result = distill(teacher, student, token_data, settings, tmp_path)
    assert result.val_kl < 0.9 * before


@pytest.mark.slow
@pytest.mark.parametrize(
    "model_type", ["gemma3_text", "phi3", "olmo2", "qwen3_moe", "gpt_oss", "gemma4_text", "qwen3_5_text", "qwen3_5_moe_text",
                   "nemotron_h"]
)
def test_a_study_searches_and_reports_a_teacher_of_each_kind(model_type, tmp_path):
    """The whole search (importance, space, queue, short KD trials) and the HTML report on a tiny teacher
    of a family with its own extras: soft-capping and 4 norms, fused projections, post-norms, experts, a
    Mamba2 / attention / MLP hybrid stack."""
    from nas.pipeline import search
    from nas.report.html import write_report
    from nas.search.study import TrialRecord
    from nas.settings import run_config_from_dict
    from nas.testing import tiny_study_config, write_tiny_teacher

    write_tiny_teacher(tmp_path / "teacher", model_type)
    cfg = run_config_from_dict(tiny_study_config(tmp_path, search={"n_trials": 2, "pruner": "none"}))
    ctx, study = search(cfg)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    done = [t for t in complete if not TrialRecord.read(t).infeasible]  # TPE samples outside the space
    assert len(done) == 2 and all(math.isfinite(t.value) for t in done)
    for trial in done:
        record = TrialRecord.read(trial)
        arch = Arch.from_dict(record.arch)
        assert arch.model_type == model_type and record.params == count_params(arch)
        student = AutoModelForCausalLM.from_pretrained(record.checkpoint)  # plain transformers loads it
        assert numel(student) == count_params(arch)
    html = write_report(cfg.storage_url, cfg.name, tmp_path / "report.html").read_text()
    assert model_type in html or Arch.from_dict(TrialRecord.read(done[0]).arch).describe() in html


def test_a_hybrid_space_budgets_layers_per_type_and_counts_the_recurrent_state(tmp_path, capsys):
    """Every candidate of a Qwen3.5 teacher keeps both layer types, its count is exact, its memory adds the
    Gated DeltaNet state once per sequence (not per token), and the CLI lists the per-type knobs."""
    from nas.model.size import kv_cache_bytes, recurrent_state_bytes
    from nas.prune.space import memory_bytes
    from nas.settings import ConstraintsConfig

    teacher = Arch.from_hf_config(tiny_config("qwen3_5_text"))
    space = enumerate_candidates(teacher, "70%", SpaceConfig(tolerance=0.2))
    assert {a.num_linear_attention_layers for a in space} > {teacher.num_linear_attention_layers}
    for arch in space:
        check_prunable(teacher, arch)
        assert arch.num_attention_layers >= 1 and arch.num_linear_attention_layers >= 1
        assert arch.num_linear_value_heads % arch.num_linear_key_heads == 0
    short, long = ConstraintsConfig(seq_len=16), ConstraintsConfig(seq_len=1024)
    arch = space[0]
    grown = memory_bytes(arch, long) - memory_bytes(arch, short)
    assert grown == kv_cache_bytes(arch, seq_len=1024 - 16)  # only the KV cache grows with the sequence
    assert memory_bytes(arch, short) == count_params(arch) * 2 + kv_cache_bytes(arch, 16) + recurrent_state_bytes(arch)
    tiny_model("qwen3_5_text").save_pretrained(tmp_path / "hybrid")
    assert main(["space", str(tmp_path / "hybrid"), "--budget", "70%", "--tolerance", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "num_linear_attention_layers" in out and "state_bytes_per_sequence" in out
@pytest.mark.parametrize(
    "features,named",
    [
        ({"hidden_size_per_layer_input": 8}, ["per-layer embeddings"]),
        ({"num_kv_shared_layers": 2}, ["KV-sharing layers"]),
        ({"enable_moe_block": True, "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 32,
          "hidden_size_per_layer_input": 8}, ["expert block", "per-layer embeddings"]),
    ],
)  # fmt: skip
def test_gemma4_features_nas_cannot_prune_are_one_error_naming_each(features, named, tmp_path):
    config = tiny_config("gemma4_text", **features)
    with pytest.raises(ModelError, match="gemma4_text with") as error:
        Arch.from_hf_config(config)
    assert all(what in str(error.value) for what in named)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "g4")  # the CLI: one line, exit 2
    assert main(["space", str(tmp_path / "g4"), "--budget", "50%"]) == 2


def test_gemma4_layers_of_one_type_with_different_attention_shapes_are_one_error():
    """nas counts one (head_dim, KV heads) per layer type; transformers' rotary embedding needs it too."""
    config = tiny_config("gemma4_text", per_layer_config={3: {"head_dim": 64, "num_key_value_heads": 1}})
    with pytest.raises(ModelError, match="full_attention layers of different head_dim"):
        Arch.from_hf_config(config)


@pytest.mark.parametrize("strategy", ["drop-lowest", "contiguous"])
def test_gemma4_depth_pruning_keeps_the_last_layer_whose_type_transformers_fixes(strategy):
    teacher = tiny_model("gemma4_text", num_layers=4)
    importance = compute_importance(teacher, CALIB, VAL)
    importance.layer_loss = torch.tensor([5.0, 4.0, 3.0, 0.0])  # the last layer matters least
    importance.block_bi = torch.ones(5, 5)
    importance.block_bi[2, 4] = 0.0  # and so does the block of the last two
    arch = Arch.from_hf_config(teacher.config)
    cut = plan_cut(arch, arch.replace(num_layers=2), importance, strategy)
    assert cut.layers[-1] == 3
    student = prune(teacher, arch.replace(num_layers=2), importance, strategy)
    assert student.config.layer_types == [teacher.config.layer_types[i] for i in cut.layers]


def test_a_config_field_under_its_attribute_map_name_counts_and_its_absence_is_named(tmp_path):
    """transformers 5.24 saves Qwen3-MoE's `num_experts` as `num_local_experts` (its attribute_map): the
    config check reads either name, and names the field when neither is there."""
    import json

    from nas.model.load import load_config
    from nas.testing import write_tiny_teacher

    write_tiny_teacher(tmp_path / "t", "qwen3_moe")
    raw = json.loads((tmp_path / "t" / "config.json").read_text())
    assert "num_local_experts" in raw and load_config(tmp_path / "t").num_experts == 4
    del raw["num_local_experts"]
    (tmp_path / "t" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="lacks num_experts"):
        load_config(tmp_path / "t")
