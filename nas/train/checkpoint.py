"""Atomic files (`atomic_path`, `write_text_atomic`: temp file + rename) and resumable checkpoints:
`out_dir/checkpoints/step-XXXXXXX/` holding `model.safetensors`, the optimizer state
(`optimizer.safetensors` + `optimizer.json`: `nas.train.optimizer_files`), the RNG states
(`rng.safetensors`: torch's and CUDA's generator bytes; `rng.json`: numpy's and Python's), and
`state.json`, and the final `save_pretrained` export. Nothing here is unpickled on resume. A checkpoint of
nas before these files (a pickled `rng.pt` and/or `optimizer.pt`) is refused with the command that
converts it once (`python -m nas.train.checkpoint DIR`: `convert_legacy`, which reads those pickles with
torch's `weights_only` loader: tensors and plain containers only).

A checkpoint is written into a temp directory and renamed into place, so a run killed mid-write leaves
the previous one intact. Single-process and DDP runs write the same files (the optimizer state keyed by
parameter index). FSDP runs gather the full state dicts on rank 0 first (`gather_full_state`)
and store the optimizer state keyed by parameter name; either kind resumes in either mode.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from torch import nn

from nas.errors import ModelError
from nas.io import check_kind, read_json, replace_dir, temp_dir, write_text_atomic
from nas.train.optimizer_files import STRUCTURE, load_optimizer_state, save_optimizer_state

log = logging.getLogger(__name__)


CHECKPOINT_NAME = re.compile(r"^step-\d{7}$")
RNG_TENSORS, RNG_JSON = "rng.safetensors", "rng.json"
LEGACY_RNG = "rng.pt"  # nas before issue 33: the RNG states pickled (numpy's and Python's inside)
LEGACY_OPTIMIZER = "optimizer.pt"  # nas before issue 33: the optimizer state dict by torch.save (a pickle)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory with the highest step under `out_dir/checkpoints`, or None."""
    root = Path(out_dir) / "checkpoints"
    found = sorted(p for p in root.iterdir() if CHECKPOINT_NAME.match(p.name)) if root.is_dir() else []
    return found[-1] if found else None


def save_checkpoint(
    out: Path,
    step: int,
    student: nn.Module,
    optimizer,
    state: dict,
    keep: int,
    full_state: tuple[dict, dict] | None = None,
) -> Path:
    """Write a checkpoint into a temp directory, rename it into place, drop all but the `keep` latest.
    `full_state` = (model, optimizer) state dicts gathered from a sharded student replaces reading
    `student` and `optimizer` directly."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    with temp_dir(final) as tmp:  # a failed write (a full disk) leaves no partial checkpoint behind
        _write_checkpoint(tmp, student, optimizer, state, full_state)
        replace_dir(tmp, final)
    for old in sorted(p for p in root.iterdir() if CHECKPOINT_NAME.match(p.name))[:-keep]:
        shutil.rmtree(old)
    log.debug("checkpoint %s", final)
    return final


def _write_checkpoint(tmp: Path, student: nn.Module, optimizer, state: dict, full_state) -> None:
    """The files of one checkpoint into the (temp) directory `tmp`."""
    if full_state is None:
        safetensors.torch.save_model(student, str(tmp / "model.safetensors"))  # handles tied weights
        save_optimizer_state(optimizer.state_dict(), tmp)
    else:
        tensors = {name: t.contiguous() for name, t in full_state[0].items()}
        for group in tied_names(student):  # keep one name per tied group, as save_model does
            for name in sorted(group)[1:]:
                tensors.pop(name, None)
        safetensors.torch.save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        save_optimizer_state(full_state[1], tmp)
    save_rng(tmp)
    (tmp / "state.json").write_text(json.dumps(state, indent=1))


def load_checkpoint(path: Path, student: nn.Module, optimizer, sharded: bool = False) -> dict:
    """Restore student weights, optimizer and RNG states from `path`; returns its state.json.
    `sharded`: the student is FSDP-sharded (every rank reads the files and keeps its own shard)."""
    device = next(student.parameters()).device
    check_not_legacy(path)
    for file in path.iterdir():  # a device or FIFO put in a file's place would be read without end
        check_kind(file, "checkpoint file", ModelError)
    try:
        state = read_json(path / "state.json")
        optimizer_state = load_optimizer_state(path)
        if sharded:
            tensors = safetensors.torch.load_file(str(path / "model.safetensors"))
            for group in tied_names(student):
                present = [name for name in group if name in tensors]
                tensors.update({name: tensors[present[0]] for name in group if present})
            load_full_state(student, optimizer, tensors, optimizer_state)
        else:
            safetensors.torch.load_model(
                student, str(path / "model.safetensors"), strict=True, device=str(device)
            )
            optimizer.load_state_dict(_indexed_optimizer_state(optimizer_state, student, optimizer))
        load_rng(path)
        state["step"], state["tokens"], state["curve"]  # noqa: B018 (a KeyError here means corrupt)
    except Exception as e:
        raise ModelError(
            f"checkpoint {path} is corrupt or incomplete ({type(e).__name__}: {str(e).strip()[:200]}); "
            "delete that directory to resume from the previous checkpoint (or from scratch)"
        ) from e
    return state


def tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (e.g. a tied embedding and LM head)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


def _indexed_optimizer_state(saved: dict, student: nn.Module, optimizer) -> dict:
    """An optimizer state keyed by parameter name (written by an FSDP run) -> keyed by index."""
    if not any(isinstance(k, str) for k in saved.get("state", {})):
        return saved
    index = {name: i for i, name in enumerate(_param_order(student, optimizer))}
    groups = [g | {"params": [index[n] for n in g["params"]]} for g in saved["param_groups"]]
    return {"state": {index[n]: s for n, s in saved["state"].items()}, "param_groups": groups}


def named_optimizer_state(saved: dict, student: nn.Module, optimizer) -> dict:
    """An optimizer state keyed by parameter index (single-process / DDP runs) -> keyed by name."""
    if not any(isinstance(k, int) for k in saved.get("state", {})):
        return saved
    order = _param_order(student, optimizer)
    groups = [g | {"params": [order[i] for i in g["params"]]} for g in saved["param_groups"]]
    return {"state": {order[i]: s for i, s in saved["state"].items()}, "param_groups": groups}


def _param_order(student: nn.Module, optimizer) -> list[str]:
    """Parameter names in the optimizer's index order (torch numbers them group after group)."""
    names = {id(p): name for name, p in student.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def save_rng(directory: Path) -> None:
    """The RNG states of torch, CUDA (every device), numpy and Python: generator bytes as tensors in
    `rng.safetensors`, numpy's and Python's integer states in `rng.json` (JSON floats round-trip exactly)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    safetensors.torch.save_file(tensors, str(directory / RNG_TENSORS))
    (directory / RNG_JSON).write_text(json.dumps(rng_record(np.random.get_state(), random.getstate())))


def rng_record(numpy_state: tuple, python_state: tuple) -> dict:
    """numpy's legacy state (name, 624 uint32 keys, pos, has_gauss, cached_gaussian) and Python's
    (version, 625 ints, gauss_next) as JSON values."""
    name, keys, pos, has_gauss, cached = numpy_state
    version, internal, gauss_next = python_state
    return {
        "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }


def load_rng(directory: Path) -> None:
    """Restore the states `save_rng` wrote (CUDA's when this machine has CUDA and they were saved)."""
    tensors = safetensors.torch.load_file(str(directory / RNG_TENSORS))
    record = read_json(directory / RNG_JSON)
    name, keys, pos, has_gauss, cached = record["numpy"]
    version, internal, gauss_next = record["python"]
    torch.set_rng_state(tensors["torch"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate((version, tuple(internal), gauss_next))
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def legacy_files(path: Path) -> list[str]:
    """The pickled files of a previous-format checkpoint at `path` that their replacements do not yet stand
    for (each replacement's JSON is written last, so its presence means the conversion finished)."""
    pairs = ((LEGACY_RNG, RNG_JSON), (LEGACY_OPTIMIZER, STRUCTURE))
    return [old for old, new in pairs if (path / old).is_file() and not (path / new).is_file()]


def check_not_legacy(path: Path) -> None:
    """ModelError naming the conversion when `path` is a checkpoint of the previous format (pickled RNG
    states in rng.pt, a pickled optimizer state in optimizer.pt: nas no longer reads them, a pickle runs
    code)."""
    if legacy := legacy_files(path):
        each = "each " if len(legacy) > 1 else ""
        raise ModelError(
            f"checkpoint {path} holds {' and '.join(legacy)}, {each}a pickle nas no longer reads; convert it once "
            f"with `python -m nas.train.checkpoint {path}` (a checked load: tensors and plain values only), or "
            "delete that directory to resume from scratch"
        )


def convert_legacy(path: Path) -> list[str]:
    """Rewrite a previous-format checkpoint's pickled files as safetensors + JSON; returns the files
    converted."""
    legacy = legacy_files(path)
    if LEGACY_RNG in legacy:
        convert_legacy_rng(path)
    if LEGACY_OPTIMIZER in legacy:
        convert_legacy_optimizer(path)
    return legacy


def convert_legacy_rng(path: Path) -> None:
    """Rewrite a previous-format checkpoint's `rng.pt` as `rng.safetensors` + `rng.json` (then remove it).
    Read with torch's `weights_only` loader, which builds tensors and plain containers only; numpy's
    state needs its array type allowed (no function of the file runs)."""
    keys = np.random.get_state()[1]  # an ndarray as pickled: its rebuild function, type and dtype class
    allowed = [keys.__reduce__()[0], np.ndarray, np.dtype, type(keys.dtype)]
    with torch.serialization.safe_globals(allowed):
        state = torch.load(path / LEGACY_RNG, map_location="cpu", weights_only=True)
    tensors = {"torch": state["torch"]} | {f"cuda.{i}": s for i, s in enumerate(state.get("cuda", []))}
    safetensors.torch.save_file(tensors, str(path / RNG_TENSORS))
    write_text_atomic(path / RNG_JSON, json.dumps(rng_record(state["numpy"], state["python"])))  # last
    (path / LEGACY_RNG).unlink()


def convert_legacy_optimizer(path: Path) -> None:
    """Rewrite a previous-format checkpoint's `optimizer.pt` as `optimizer.safetensors` + `optimizer.json`
    (then remove it). Read with torch's `weights_only` loader; torchao's quantized state classes (8-bit,
    4-bit, fp8 AdamW) are allowed, as build_optimizer allowed them before (their constructor runs on
    plain tensors; no function the file names runs)."""
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit
    from torchao.optim.subclass_fp8 import OptimStateFp8

    with torch.serialization.safe_globals([OptimState8bit, OptimState4bit, OptimStateFp8]):
        state = torch.load(path / LEGACY_OPTIMIZER, map_location="cpu", weights_only=True)
    save_optimizer_state(state, path)
    (path / LEGACY_OPTIMIZER).unlink()


def gather_full_state(student: nn.Module, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts on CPU; complete on rank 0 only. Collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(student, options=options), get_optimizer_state_dict(
        student, optimizer, options=options
    )


def gather_model_state(student: nn.Module) -> dict:
    """The full model state dict on CPU, complete on rank 0 only. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(student: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load full state dicts (every rank holds them) into a sharded student and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(student, model_state, options=options)
    named = named_optimizer_state(optimizer_state, student, optimizer)
    set_optimizer_state_dict(student, optimizer, named, options=options)


def cast_floating(state: dict, dtype: torch.dtype) -> dict:
    """Floating tensors cast to `dtype`, a tensor shared by several names (tied weights) cast once and
    still shared."""
    cast: dict[int, torch.Tensor] = {}
    out = {}
    for name, tensor in state.items():
        if tensor.is_floating_point() and id(tensor) not in cast:
            cast[id(tensor)] = tensor.detach().to(dtype)
        out[name] = cast.get(id(tensor), tensor)
    return out


if __name__ == "__main__":  # python -m nas.train.checkpoint DIR: convert a previous-format checkpoint once
    import sys

    for directory in sys.argv[1:]:
        converted = convert_legacy(Path(directory))
        print(
            f"converted {directory}: {', '.join(converted) or 'nothing to convert'} (now safetensors + JSON)"
        )
