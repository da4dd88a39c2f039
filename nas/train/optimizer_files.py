"""An optimizer's state dict as two files and back, exactly (no pickle): `optimizer.safetensors` holds every
tensor, named by its place (`state.0.exp_avg`, `state.0.step`, `param_groups.0.lr` for torchao's tensor
learning rate), and `optimizer.json` the structure around them (dicts with their int or str keys, lists,
python numbers such as a float `step`, the param groups), each tensor as `{"tensor": NAME}`. Reading builds
the same dict: the same keys, dtypes, and tensor vs python values, so a resumed run is bitwise the same.

torchao's quantized states (`OptimState8bit`, `OptimState4bit`, `OptimStateFp8`: tensor subclasses that
safetensors cannot hold) are stored as their plain component tensors (`state.0.exp_avg.codes`, `.scale`,
`.qmap`) plus the attributes of their `__tensor_flatten__` (signed, shape, dtype) in the JSON, and rebuilt
by `__tensor_unflatten__`; only those classes, named in `QUANTIZED`, are rebuilt: nothing in the files
names code to run. Written here rather than with torch.distributed.checkpoint, whose `.metadata` file is
a pickle; safetensors itself holds a flat name -> tensor map only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from nas.io import read_json, write_text_atomic

TENSORS, STRUCTURE = "optimizer.safetensors", "optimizer.json"
QUANTIZED = ("OptimState8bit", "OptimState4bit", "OptimStateFp8")  # torchao.optim's state subclasses


def save_optimizer_state(state: dict, directory: Path) -> None:
    """`state` (an optimizer's `state_dict()`) as `optimizer.safetensors` + `optimizer.json` in `directory`."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, "", tensors)
    safetensors.torch.save_file(_unshared(tensors), str(directory / TENSORS))
    write_text_atomic(directory / STRUCTURE, json.dumps(structure))  # floats round-trip exactly (repr)


def load_optimizer_state(directory: Path) -> dict:
    """The state dict `save_optimizer_state` wrote, its tensors on the CPU."""
    tensors = safetensors.torch.load_file(str(directory / TENSORS))
    return _decode(read_json(directory / STRUCTURE), tensors)


def _encode(value: Any, name: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, its tensors moved into `tensors` under the names of their places."""
    if isinstance(value, torch.Tensor):
        return _encode_tensor(value, name, tensors)
    if isinstance(value, dict):
        if not all(type(k) in (int, str) for k in value):
            raise TypeError(f"optimizer state {name or 'root'}: keys must be int or str, not {list(value)}")
        return {"dict": [[k, _encode(v, f"{name}.{k}".lstrip("."), tensors)] for k, v in value.items()]}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, (list, tuple)):
        items = [_encode(v, f"{name}.{i}".lstrip("."), tensors) for i, v in enumerate(value)]
        return {"list" if isinstance(value, list) else "tuple": items}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if value is None or type(value) in (bool, int, float, str):
        return value
    raise TypeError(f"optimizer state {name}: cannot store a {type(value).__name__}")


def _encode_tensor(value: torch.Tensor, name: str, tensors: dict[str, torch.Tensor]) -> dict:
    if name in tensors:  # a key with a dot in it met another place's name: keep both
        name = f"{name}#{len(tensors)}"
    kind = type(value).__name__
    if type(value) is torch.Tensor or isinstance(value, torch.nn.Parameter):
        tensors[name] = value.detach().cpu().contiguous()
        return {"tensor": name}
    if kind not in QUANTIZED:
        raise TypeError(
            f"optimizer state {name}: cannot store a {kind} (a tensor subclass nas does not know)"
        )
    parts, attributes = value.__tensor_flatten__()
    for part in parts:
        tensors[f"{name}.{part}"] = getattr(value, part).detach().cpu().contiguous()
    return {
        "quantized": kind,
        "tensors": {part: f"{name}.{part}" for part in parts},
        "attributes": [_encode(a, f"{name}.attribute{i}", tensors) for i, a in enumerate(attributes)],
    }


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of any tensor whose storage another one already uses (safetensors refuses shared memory)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if pointer and pointer in seen else tensor
        seen.add(pointer)
    return out


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value `_encode` wrote as `value`, its tensors taken from `tensors`."""
    if not isinstance(value, dict):
        return value
    if "quantized" in value:
        return _decode_quantized(value, tensors)
    (kind, body), *rest = value.items()
    if rest or kind not in _DECODERS:
        raise ValueError(f"not an optimizer state node: {str(value)[:80]}")
    return _DECODERS[kind](body, tensors)


def _decode_quantized(value: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    classes = _quantized_classes()
    cls = classes[value["quantized"]]  # a KeyError for any other name: nothing else is rebuilt
    parts = {part: tensors[name] for part, name in value["tensors"].items()}
    return cls.__tensor_unflatten__(parts, [_decode(a, tensors) for a in value["attributes"]])


def _quantized_classes() -> dict[str, type]:
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    return {cls.__name__: cls for cls in (OptimState8bit, OptimState4bit, OptimStateFp8)}


_DECODERS = {
    "tensor": lambda name, tensors: tensors[name],
    "dict": lambda pairs, tensors: {k: _decode(v, tensors) for k, v in pairs},
    "list": lambda items, tensors: [_decode(v, tensors) for v in items],
    "tuple": lambda items, tensors: tuple(_decode(v, tensors) for v in items),
    "size": lambda items, _: torch.Size(items),
    "dtype": lambda name, _: _dtype(name),
}


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype
