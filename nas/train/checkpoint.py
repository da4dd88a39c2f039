"""Atomic files (`atomic_path`, `write_text_atomic`: temp file + rename) and resumable checkpoints:
`out_dir/checkpoints/step-XXXXXXX/` holding `model.safetensors`,
`optimizer.pt`, `rng.pt` and `state.json`, and the final `save_pretrained` export.

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
from nas.io import replace_dir, temp_dir

log = logging.getLogger(__name__)


CHECKPOINT_NAME = re.compile(r"^step-\d{7}$")


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
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    else:
        tensors = {name: t.contiguous() for name, t in full_state[0].items()}
        for group in tied_names(student):  # keep one name per tied group, as save_model does
            for name in sorted(group)[1:]:
                tensors.pop(name, None)
        safetensors.torch.save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(full_state[1], tmp / "optimizer.pt")
    torch.save(_rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))


def load_checkpoint(path: Path, student: nn.Module, optimizer, sharded: bool = False) -> dict:
    """Restore student weights, optimizer and RNG states from `path`; returns its state.json.
    `sharded`: the student is FSDP-sharded (every rank reads the files and keeps its own shard)."""
    device = next(student.parameters()).device
    try:
        state = json.loads((path / "state.json").read_text())
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
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
        _set_rng_state(torch.load(path / "rng.pt", weights_only=False))  # our own file: numpy state inside
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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
