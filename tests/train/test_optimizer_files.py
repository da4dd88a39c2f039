"""The optimizer state without pickle: every optimizer nas builds (torch's AdamW, torchao's 8-bit, 4-bit
and bf16 AdamW) round-trips through optimizer.safetensors + optimizer.json to the same state dict, and a
previous-format optimizer.pt (torchao's 8-bit states inside) converts to the same state."""

import pytest
import torch

from nas.train.checkpoint import convert_legacy
from nas.train.optimizer_files import load_optimizer_state, save_optimizer_state


@pytest.fixture(autouse=True)
def eager_torchao():
    """torchao compiles its update per parameter shape (a minute of inductor on this CPU); eager runs the
    same arithmetic."""
    with torch.compiler.set_stance("force_eager"):
        yield


def stepped(make) -> torch.optim.Optimizer:
    """An optimizer `make(params)` after two steps of a layer (256 wide: torchao quantizes in 256-blocks)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 64)
    groups = [{"params": [layer.weight], "weight_decay": 0.1}, {"params": [layer.bias], "weight_decay": 0.0}]
    optimizer = make(groups)
    for _ in range(2):
        layer(torch.randn(3, 256)).square().sum().backward()
        optimizer.step()
    return optimizer


def assert_same(a, b, where="state_dict") -> None:
    """The same structure, key types, python vs tensor values, dtypes and bits (torchao's quantized states:
    the same class, component tensors and attributes)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}.{i}")
    elif type(a) is torch.Tensor:
        assert a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, torch.Tensor):
        parts, attributes = a.__tensor_flatten__()
        assert b.__tensor_flatten__() == (parts, attributes), where
        for part in parts:
            assert torch.equal(getattr(a, part), getattr(b, part)), f"{where}.{part}"
    else:
        assert a == b, where


def optimizers():
    from torchao.optim import AdamW4bit, AdamW8bit, _AdamW

    return {
        "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-3, foreach=True),
        "adamw-8bit": lambda groups: AdamW8bit(groups, lr=1e-3),
        "adamw-4bit": lambda groups: AdamW4bit(groups, lr=1e-3),
        "bf16-stochastic": lambda groups: _AdamW(groups, lr=1e-3, bf16_stochastic_round=True),
    }


@pytest.mark.parametrize("name", ["adamw", "adamw-8bit", "adamw-4bit", "bf16-stochastic"])
def test_every_optimizer_state_round_trips_exactly_without_pickle(tmp_path, name):
    optimizer = stepped(optimizers()[name])
    state = optimizer.state_dict()
    save_optimizer_state(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]
    loaded = load_optimizer_state(tmp_path)
    assert_same(state, loaded)
    assert set(loaded["state"]) == {0, 1}  # int keys, as torch numbers the parameters
    optimizer.load_state_dict(loaded)  # torch accepts it as its own


def test_a_previous_format_8bit_optimizer_pt_converts_to_the_same_state(tmp_path):
    state = stepped(optimizers()["adamw-8bit"]).state_dict()
    torch.save(state, tmp_path / "optimizer.pt")
    assert convert_legacy(tmp_path) == ["optimizer.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]
    assert_same(state, load_optimizer_state(tmp_path))


def test_a_tensor_subclass_nas_does_not_know_is_refused_by_name(tmp_path):
    class Odd(torch.Tensor):
        pass

    state = {"state": {0: {"exp_avg": torch.zeros(2).as_subclass(Odd)}}, "param_groups": []}
    with pytest.raises(TypeError, match=r"state\.0\.exp_avg.*Odd"):
        save_optimizer_state(state, tmp_path)
