"""Minitron activation importance of a teacher: the `Importance` record (one safetensors file, saved once per
study and reused by every candidate), what decides it (`importance_identity`), and computing it: the unit scores
of one no-grad pass over calibration sequences (`nas.prune.activations`, where each score is defined) and the
held-out LM loss with each layer removed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from nas.errors import ModelError
from nas.evaluate.loss import lm_loss
from nas.io import atomic_path, check_kind, require_same
from nas.model.arch import Arch
from nas.prune.activations import activation_scores, layer_removal_losses

log = logging.getLogger(__name__)

TENSORS = ("heads", "mlp", "hidden", "block_bi", "layer_loss")
MOE_TENSORS = ("experts", "expert_mass")
HYBRID_TENSORS = ("linear_heads", "mamba_heads", "mamba_head_dims")
OPTIONAL_TENSORS = (*MOE_TENSORS, *HYBRID_TENSORS)


@dataclass
class Importance:
    """Importance scores of one teacher; computed once and reused by every candidate."""

    heads: torch.Tensor  # [num_layers, num_attention_heads]
    mlp: torch.Tensor  # [num_layers, ffn_hidden_size] (MoE: [num_layers, num_experts, ffn_hidden_size])
    hidden: torch.Tensor  # [hidden_size]
    block_bi: torch.Tensor  # [num_layers + 1, num_layers + 1]
    layer_loss: torch.Tensor  # [num_layers], LM loss with that layer removed
    base_loss: float  # LM loss of the whole teacher on the same sequences
    num_samples: int
    teacher_arch: dict = field(default_factory=dict)
    experts: torch.Tensor | None = None  # [num_layers, num_experts] (MoE only)
    expert_mass: torch.Tensor | None = None  # [num_layers, num_experts]: mean router weight per token
    linear_heads: torch.Tensor | None = None  # [num_layers, num_linear_value_heads] (Gated DeltaNet only)
    mamba_heads: torch.Tensor | None = None  # [num_layers, num_mamba_heads] (Mamba2 only)
    mamba_head_dims: torch.Tensor | None = None  # [num_layers, mamba_head_dim] (Mamba2 only)
    identity: dict = field(
        default_factory=dict
    )  # the settings that decided the scores (`importance_identity`)

    @property
    def groups(self) -> torch.Tensor:
        """[num_layers, num_query_groups]: the sum of each group's head scores."""
        num_groups = self.teacher_arch["num_query_groups"]
        return self.heads.reshape(self.heads.shape[0], num_groups, -1).sum(-1)

    @property
    def global_groups(self) -> torch.Tensor:
        """[num_layers, num_global_query_groups]: the sum of each full-attention KV group's head scores (Gemma 4)."""
        num_groups = self.teacher_arch["num_global_query_groups"]
        return self.heads.reshape(self.heads.shape[0], num_groups, -1).sum(-1)

    @property
    def linear_key_heads(self) -> torch.Tensor:
        """[num_layers, num_linear_key_heads]: the sum of the scores of the value heads each key head serves."""
        keys = self.teacher_arch["num_linear_key_heads"]
        return self.linear_heads.reshape(self.linear_heads.shape[0], keys, -1).sum(-1)

    @property
    def layer_bi(self) -> torch.Tensor:
        """[num_layers]: 1 - cos(input, output) of each layer."""
        return torch.diagonal(self.block_bi, offset=1).clone()

    def save(self, path: str | Path) -> Path:
        """Write one safetensors file (scores as tensors, the rest as metadata), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        names = [n for n in (*TENSORS, *OPTIONAL_TENSORS) if getattr(self, n) is not None]
        tensors = {name: getattr(self, name).float().contiguous() for name in names}
        meta = {
            "base_loss": json.dumps(self.base_loss),
            "num_samples": str(self.num_samples),
            "teacher_arch": json.dumps(self.teacher_arch),
            "identity": json.dumps(self.identity, sort_keys=True),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Importance:
        path = Path(path)
        check_kind(path, "importance file", ModelError)
        if not path.is_file():
            raise ModelError(f"importance file {path} does not exist; compute it with `nas importance`")
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            return cls(
                **{name: tensors[name] for name in TENSORS},
                **{name: tensors.get(name) for name in OPTIONAL_TENSORS},
                base_loss=json.loads(meta["base_loss"]),
                num_samples=int(meta["num_samples"]),
                teacher_arch=json.loads(meta["teacher_arch"]),
                identity=json.loads(meta.get("identity", "{}")),
            )
        except (SafetensorError, KeyError, ValueError, TypeError, OSError) as e:
            raise ModelError(
                f"importance file {path} is corrupt or not a nas importance file ({e}); delete it and recompute"
            ) from e

    def check_matches(self, teacher: Arch) -> None:
        """Raise unless these scores were computed on a teacher of this shape."""
        if Arch.from_dict(self.teacher_arch) != teacher:
            raise ModelError(
                "the importance file was computed for a different teacher "
                f"({Arch.from_dict(self.teacher_arch).describe()} vs {teacher.describe()}); recompute it"
            )


def importance_identity(teacher: str, teacher_arch: Arch, data_fingerprint: str, num_samples: int,
                        val_sequences: int, **extra: Any) -> dict[str, Any]:  # fmt: skip
    """The settings that decide a teacher's importance scores: the teacher (where it was loaded from, and
    its shape), the data (fingerprint), how many calibration and validation sequences; `extra`: more
    (e.g. the study's teacher-correction steps)."""
    local = Path(teacher).expanduser()
    return {
        "teacher": str(local.resolve()) if local.exists() else teacher,
        "teacher_arch": teacher_arch.to_dict(),
        "data": data_fingerprint,
        "num_samples": num_samples,
        "val_sequences": val_sequences,
        **extra,
    }


def ensure_importance(
    path: str | Path,
    teacher: nn.Module | Callable[[], nn.Module],
    data: Any,
    identity: dict[str, Any],
    batch_size: int,
    ways_out: str,
    recompute: bool = False,
) -> tuple[Importance, bool]:
    """The importance at `path` when it was computed with `identity` (`importance_identity`; other
    settings: ConfigError ending in `ways_out`), else computed on `data` (a `nas.data.tokens.TokenData`:
    identity's num_samples calibration and val_sequences validation sequences) and saved there.
    `teacher`: the model, or a function that loads it (called only to compute). Returns (importance,
    whether it was computed now). `recompute`: compute it even when the file is there (and replace it)."""
    path = Path(path)
    if path.is_file() and not recompute:
        importance = Importance.load(path)
        if importance.identity:  # files written before identities were recorded have none
            require_same(importance.identity, identity, f"importance file {path}", ways_out)
        importance.check_matches(Arch.from_dict(identity["teacher_arch"]))
        return importance, False
    model = teacher if isinstance(teacher, nn.Module) else teacher()
    calib, val = data.calib(identity["num_samples"]), data.val(identity["val_sequences"])
    importance = compute_importance(model, calib, val, batch_size)
    importance.identity = identity
    importance.save(path)
    return importance, True


def _check_finite_scores(scores: dict[str, Any], layer_loss: torch.Tensor, base: float) -> None:
    """ModelError when the teacher's outputs overflow (finite weights can still give inf activations):
    NaN scores would rank every unit arbitrarily."""
    bad = [name for name, t in scores.items() if t is not None and not bool(torch.isfinite(t).all())]
    bad += ["layer_loss"] * (not bool(torch.isfinite(layer_loss).all()))
    if bad or not torch.isfinite(torch.tensor(base)):
        raise ModelError(
            f"the teacher's outputs are not finite (base val loss {base:.4g}; non-finite scores: "
            f"{', '.join(bad) or 'none'}): its weights overflow the activations; check the model"
        )


def compute_importance(
    model: nn.Module, calib: torch.Tensor, val: torch.Tensor, batch_size: int = 8
) -> Importance:
    """All importance scores of `model` (the teacher), never modifying it."""
    if len(calib) == 0 or len(val) == 0:
        raise ModelError("importance needs at least one calibration and one validation sequence")
    was_training = model.training
    model.eval()
    scores = activation_scores(model, calib, batch_size)
    layer_loss = layer_removal_losses(model, val, batch_size)
    base = lm_loss(model, val, batch_size)
    model.train(was_training)
    _check_finite_scores(scores, layer_loss, base)
    log.info("importance: %d calibration sequences, base val loss %.4f", len(calib), base)
    return Importance(
        **scores,
        layer_loss=layer_loss,
        base_loss=base,
        num_samples=len(calib),
        teacher_arch=Arch.from_hf_config(model.config).to_dict(),
    )
