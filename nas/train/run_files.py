"""What a run directory holds besides checkpoints: the settings that decide its result (`run.json`),
and what `--restart` deletes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from nas.model.families import global_value
from nas.settings import DistillConfig
from nas.train.teacher_cache import TeacherCache

IDENTITY_FILE = "run.json"  # the settings that decide the run's result (see `run_identity`)
# settings that change how a run is executed or logged, never its weights
NOT_IDENTITY = (
    "device", "log_every", "eval_every", "eval_batch_size", "checkpoint_every", "keep_checkpoints",
    "gradient_checkpointing", "fsdp", "chunk_tokens", "offload_optimizer", "attention", "fused_optimizer",
    "compile",
)  # fmt: skip
RUN_FILES = (IDENTITY_FILE, "metrics.jsonl", "checkpoints", "model")  # what --restart deletes


def run_identity(
    teacher: nn.Module | TeacherCache | None, student: nn.Module, data: Any, cfg: DistillConfig
) -> dict:
    """The settings that decide a run's result: the training settings, the data (its fingerprint covers
    the sources, their files, the tokenizer and the split settings), and the teacher (or the key of the
    teacher cache) and student models. A re-run with the same ones resumes; with others it is refused
    (`nas.io.check_identity`)."""
    cached = isinstance(teacher, TeacherCache)
    return {
        "training": {k: v for k, v in cfg.to_dict().items() if k not in NOT_IDENTITY},
        "data": getattr(data, "fingerprint", None),
        "teacher": {"teacher_cache": teacher.key} if cached else _model_identity(teacher),
        "student": _model_identity(student),
    }


def _model_identity(model: nn.Module | None) -> dict | None:
    if model is None:
        return None
    config = model.config
    source = str(getattr(config, "_name_or_path", "") or "")
    if source and Path(source).exists():
        source = str(Path(source).resolve())
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings")  # fmt: skip
    identity = {"from": source, **{k: global_value(config, k) for k in keys}}
    if getattr(config, "is_heterogeneous", False):  # Gemma 4's full-attention layers: their own shapes too
        identity["per_layer_config"] = config.to_dict().get("per_layer_config")
    return identity


def restart_hint(out: Path) -> str:
    """The two ways out of a settings mismatch."""
    return (
        f"rerun with the settings it was made with, write to a new output directory, or pass --restart to "
        f"delete {out}'s run ({', '.join(RUN_FILES)}) and start over"
    )


def clear_run(out: str | os.PathLike) -> None:
    """Delete a run's files (`--restart`): the recorded settings, metrics, checkpoints and model; nothing
    else in `out`."""
    for name in RUN_FILES:
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
