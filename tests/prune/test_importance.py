import torch

from nas.model.arch import Arch
from nas.prune.activations import skip_layer
from nas.prune.importance import Importance, compute_importance
from nas.testing import tiny_model

G = torch.Generator().manual_seed(3)
CALIB = torch.randint(0, 96, (8, 16), generator=G)
VAL = torch.randint(0, 96, (4, 16), generator=G)


def test_a_head_with_zero_output_scores_lowest():
    model = tiny_model("llama", num_attention_heads=4, num_query_groups=4)
    d = model.config.head_dim
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[2 * d : 3 * d] = 0  # head 2 of layer 1 outputs zeros
    scores = compute_importance(model, CALIB, VAL)
    assert scores.heads[1].argmin() == 2 and scores.heads[1, 2] == 0
    assert scores.groups[1].argmin() == 2


def test_a_zeroed_kv_group_is_the_lowest_group():
    model = tiny_model("qwen2", num_attention_heads=4, num_query_groups=2)
    d = model.config.head_dim
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[0:d] = 0
        model.model.layers[0].self_attn.v_proj.bias[0:d] = 0
    scores = compute_importance(model, CALIB, VAL)
    assert scores.groups[0].argmin() == 0
    assert set(scores.heads[0].argsort()[:2].tolist()) == {0, 1}


def test_a_dead_mlp_channel_scores_lowest():
    model = tiny_model("qwen3")
    with torch.no_grad():
        model.model.layers[2].mlp.gate_proj.weight[7] = 0  # silu(0) * up = 0
    assert compute_importance(model, CALIB, VAL).mlp[2].argmin() == 7


def test_scores_are_deterministic_and_shaped():
    model = tiny_model("llama")
    a, b = compute_importance(model, CALIB, VAL), compute_importance(model, CALIB, VAL)
    for name in ("heads", "mlp", "hidden", "block_bi", "layer_loss"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    arch = Arch.from_hf_config(model.config)
    assert a.heads.shape == (arch.num_layers, arch.num_attention_heads)
    assert a.mlp.shape == (arch.num_layers, arch.ffn_hidden_size)
    assert a.hidden.shape == (arch.hidden_size,)
    assert a.block_bi.shape == (arch.num_layers + 1, arch.num_layers + 1)
    assert a.layer_bi.shape == (arch.num_layers,)


def test_layer_bi_is_one_minus_cosine_of_layer_input_and_output():
    model = tiny_model("llama", num_layers=2)
    captured = {}
    layer = model.model.layers[1]
    h1 = layer.register_forward_pre_hook(
        lambda m, a, kw: captured.update(x=kw.get("hidden_states", a[0] if a else None)), with_kwargs=True
    )
    h2 = layer.register_forward_hook(lambda m, a, y: captured.update(y=y))
    with torch.no_grad():
        model.model(input_ids=CALIB[:1])
    h1.remove(), h2.remove()
    expected = 1 - torch.nn.functional.cosine_similarity(captured["x"], captured["y"], dim=-1).mean()
    scores = compute_importance(model, CALIB[:1], VAL)
    assert abs(scores.layer_bi[1] - expected) < 1e-5


def test_layer_loss_is_the_loss_with_that_layer_skipped():
    from nas.evaluate.loss import lm_loss

    model = tiny_model("mistral")
    scores = compute_importance(model, CALIB, VAL)
    with skip_layer(model, 1):
        assert abs(lm_loss(model, VAL) - scores.layer_loss[1].item()) < 1e-6
    assert abs(lm_loss(model, VAL) - scores.base_loss) < 1e-9


def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen2", tie_word_embeddings=True)
    scores = compute_importance(model, CALIB, VAL)
    loaded = Importance.load(scores.save(tmp_path / "imp.safetensors"))
    assert torch.equal(loaded.heads, scores.heads) and loaded.base_loss == scores.base_loss
    assert loaded.teacher_arch == Arch.from_hf_config(model.config).to_dict()


def test_corrupt_importance_file_is_a_clear_error(tmp_path):
    import pytest

    from nas.errors import ModelError

    bad = tmp_path / "imp.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="corrupt"):
        Importance.load(bad)
    with pytest.raises(ModelError, match="does not exist"):
        Importance.load(tmp_path / "missing.safetensors")
