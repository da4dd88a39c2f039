"""Qwen3.5-MoE golden facts beyond the shared ones (tests/model/test_arch.py and tests/prune/test_prune.py run keep-all,
numel, pruning == masking of experts, expert channels, heads, linear-attention heads and layers, and save ->
from_pretrained -> generate on its tiny model of `FAMILY_CASES`): cutting hidden channels equals masking them in
every block of a layer (the sparse block's router, experts, shared expert and its sigmoid gate included); the
active count is what one token touches; the published Qwen3.5-35B-A3B config counts exactly and gives a space; a
checkpoint with its multi-token-prediction head loads without it."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from nas.cli import main
from nas.model.arch import Arch, check_prunable
from nas.model.load import load_config, load_model
from nas.model.size import count_params
from nas.prune.cut import prune
from nas.prune.importance import compute_importance
from nas.prune.space import enumerate_candidates
from nas.settings import SpaceConfig
from nas.testing import tiny_config, tiny_model, write_tiny_wrapper

G = torch.Generator().manual_seed(7)
CALIB = torch.randint(0, 96, (8, 16), generator=G)
VAL = torch.randint(0, 96, (4, 16), generator=G)
CONFIG = Path(__file__).parents[3] / "benchmarks" / "configs" / "Qwen3.5-35B-A3B"


@pytest.fixture(scope="module")
def teacher():
    return tiny_model("qwen3_5_moe_text")


def _run_block(model, layer: int, block: str, x: torch.Tensor) -> torch.Tensor:
    """One block of a decoder layer on `x` (attention with the model's rotary positions and no mask)."""
    module = getattr(model.model.layers[layer], block)
    if block == "self_attn":
        positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
        return module(x, position_embeddings=model.model.rotary_emb(x, positions), attention_mask=None)[0]
    return module(x)


@pytest.mark.parametrize("hidden", [56, 40])
def test_cutting_hidden_channels_equals_masking_them_in_every_block(teacher, hidden):
    """Each block reads the residual stream and writes back to it without a norm over the hidden channels: the
    student's block on the kept channels equals the teacher's block fed zeros on the dropped ones, read at the
    kept ones (the MoE block's router, routed experts, shared expert and `shared_expert_gate`, all cut along
    hidden_size)."""
    student = prune(teacher, Arch.from_hf_config(teacher.config).replace(hidden_size=hidden),
                    compute_importance(teacher, CALIB, VAL))  # fmt: skip
    kept = torch.tensor(student.nas_cut.hidden)
    assert student.model.layers[0].mlp.shared_expert_gate.weight.shape == (1, hidden)
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(3))
    masked = torch.zeros_like(x)
    masked[..., kept] = x[..., kept]
    blocks = 0
    with torch.no_grad():
        for new, old in enumerate(student.nas_cut.layers):
            mixer = "self_attn" if teacher.config.layer_types[old] == "full_attention" else "linear_attn"
            for block in (mixer, "mlp"):
                want = _run_block(teacher, old, block, masked)[..., kept]
                got = _run_block(student, new, block, x[..., kept])
                assert (got - want).abs().max() < 1e-5, (old, block)
                blocks += 1
    assert blocks == 8


def _touched_by_one_token(model) -> int:
    """Parameters one token's forward and backward reach: every tensor whole, but of the fused expert tensors only
    the experts the router sent the token to (those with a gradient)."""
    model.zero_grad()
    model(input_ids=torch.tensor([[5]])).logits.sum().backward()
    touched = 0
    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            used = int((p.grad.flatten(1).abs().sum(1) > 0).sum())
            touched += used * p[0].numel()
        else:
            touched += p.numel()
    return touched


def test_the_active_count_is_what_one_token_touches(teacher):
    """`count_params(active=True)`: the router whole, the top-k experts, the shared expert and its gate, measured
    on the teacher and on a student with fewer and narrower experts."""
    student = prune(teacher, Arch.from_hf_config(teacher.config).replace(num_experts=3, ffn_hidden_size=48),
                    compute_importance(teacher, CALIB, VAL))  # fmt: skip
    for model in (teacher, student):
        arch = Arch.from_hf_config(model.config)
        assert _touched_by_one_token(model) == count_params(arch, active=True) < count_params(arch)


@pytest.mark.parametrize("kind", ["total", "active"])
def test_the_space_cuts_experts_and_their_width_and_keeps_the_shared_expert(kind):
    config = tiny_config("qwen3_5_moe_text")
    teacher = Arch.from_hf_config(config)
    space = enumerate_candidates(teacher, "70%", SpaceConfig(tolerance=0.1, budget_kind=kind))
    assert {a.num_experts for a in space} > {teacher.num_experts}
    assert {a.ffn_hidden_size for a in space} > {teacher.ffn_hidden_size}
    for arch in space:
        check_prunable(teacher, arch)
        assert arch.shared_expert_ffn_hidden_size == 32
        assert arch.num_attention_layers >= 1 and arch.num_linear_attention_layers >= 1
    for arch in space[:3]:  # built from their config, they have the counted size
        model = AutoModelForCausalLM.from_config(arch.to_hf_config(config))
        assert sum(p.numel() for p in model.parameters()) == count_params(arch)


def test_the_published_35b_a3b_config_counts_exactly_and_gives_a_space(capsys):
    """Qwen/Qwen3.5-35B-A3B (sources in its SOURCE.md): the text model of the wrapper config, counted exactly
    against the model built on the meta device; 35B with the vision tower, 3B active."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = load_config(CONFIG)
    arch = Arch.from_hf_config(config)
    assert arch.describe() == "L40=30D+10A H2048 F512 A16/G2 D16/32 E256/k8"
    with torch.device("meta"):
        text = AutoModelForCausalLM.from_config(config)
        whole = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(CONFIG))
    assert count_params(arch) == sum(p.numel() for p in text.parameters()) == 34_660_610_688
    assert count_params(arch, active=True) == 3_454_988_928
    assert round(sum(p.numel() for p in whole.parameters()) / 1e9) == 35
    args = ["space", str(CONFIG), "--budget", "50%", "--steps", "hidden_size=256,ffn_hidden_size=128,num_experts=32",
            "--max-width-prune", "0.4", "--max-depth-prune", "0.2"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "34,660,610,688 params (3,454,988,928 active per token)" in out and "E256/k8" in out


def test_a_checkpoint_with_its_multi_token_prediction_head_loads_without_it(tmp_path):
    """Released Qwen3.5-MoE checkpoints carry an MTP module (`mtp.*`, `mtp_num_hidden_layers: 1`) that the causal
    LM does not have: transformers skips it, and nas's strict load accepts the checkpoint."""
    from safetensors.torch import load_file, save_file

    path = write_tiny_wrapper(tmp_path / "w", "qwen3_5_moe")
    weights = load_file(str(path / "model.safetensors"))
    plain = load_model(path)
    weights["mtp.fc.weight"] = torch.randn(64, 128)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((path / "config.json").read_text())
    raw["text_config"]["mtp_num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(raw))
    with_mtp = load_model(path)
    assert not any(name.startswith("mtp") for name, _ in with_mtp.named_parameters())
    tokens = CALIB[:1]
    with torch.no_grad():
        assert torch.equal(with_mtp(input_ids=tokens).logits, plain(input_ids=tokens).logits)
