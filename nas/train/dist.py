"""Distillation across processes started by torchrun: DDP by default, FSDP2 when `DistillConfig.fsdp`.

Batch semantics: `batch_size` is the *global* micro-batch. Every rank draws the same
`data.train_batch(...)` and keeps its own contiguous `batch_size / world` rows, so N processes see
exactly the sequences of a single-process run with the same settings; the per-rank KD losses are
token means over equal token counts, so DDP's gradient average is the single-process gradient.
Rank 0 alone writes metrics, checkpoints and the final model; every rank evaluates the full
validation set (identical weights give identical numbers; rank 0's value is broadcast anyway).

`nas distill --nproc-per-node N` re-executes itself as
`python -m torch.distributed.run --nproc-per-node N -m nas.cli distill ...` (`relaunch`);
`torchrun --nproc-per-node N -m nas.cli distill ...` is the same thing started by hand.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from nas.device import current_precision, resolve_device
from nas.errors import ConfigError
from nas.train.kd import model_cached_kd_loss, model_kd_loss


@dataclass(frozen=True)
class World:
    """This process's place among the torchrun workers (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """Rank, local rank and world size from torchrun's environment variables."""
    env = os.environ
    return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1)))


def local_device(name: str = "auto") -> torch.device:
    """`resolve_device(name)`, except that a CUDA device under torchrun is cuda:LOCAL_RANK."""
    device = resolve_device(name)
    if device.type == "cuda" and world().size > 1:
        return torch.device("cuda", world().local_rank)
    return device


def setup(device: torch.device) -> World:
    """Join the process group (nccl on CUDA, gloo on CPU) when torchrun started several processes."""
    w = world()
    if w.size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return w


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache), then the others (which then read it)."""
    main = world().main
    if not main:
        barrier()
    yield
    if main:
        barrier()


def global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (itself when not distributed)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def from_rank_zero(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def local_rows(batch: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of a global micro-batch (all of it when not distributed)."""
    w = world()
    if w.size == 1:
        return batch
    if len(batch) % w.size:
        raise ConfigError(
            f"batch_size {len(batch)} is the global micro-batch and must be divisible by the "
            f"{w.size} processes; use a multiple of {w.size}"
        )
    share = len(batch) // w.size
    return batch[w.rank * share : (w.rank + 1) * share]


class StudentLoss(nn.Module):
    """The student with the KD loss as its forward, so DDP / FSDP see one real forward per micro-batch
    (the fused loss calls `student.model` and the LM head directly, never `student.forward`).

    `forward(input_ids)` -> (loss, kl); `forward(input_ids, targets)` -> the same against cached
    teacher targets (`nas.train.teacher_cache`); `forward(fn=f)` -> f(student, teacher), used for
    evaluation so that FSDP gathers the student's root parameters (embeddings, norm, head) around it."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None, cfg, cache: Any = None) -> None:
        super().__init__()
        self.student = student
        object.__setattr__(self, "teacher", teacher)  # not a submodule: frozen, never synced or sharded
        self.cache = cache  # a TeacherCache the targets come from (then teacher is None)
        self.cfg = cfg

    def forward(
        self, input_ids: torch.Tensor | None = None, targets=None, fn: Callable | None = None, loss_mask=None
    ):
        if fn is not None:
            return fn(self.student, self.teacher)
        cfg = self.cfg
        if targets is not None:
            result = model_cached_kd_loss(
                self.student,
                input_ids,
                targets,
                temperature=cfg.temperature,
                ce_weight=cfg.ce_weight,
                chunk_tokens=cfg.chunk_tokens,
                loss_mask=loss_mask,
            )
            return result.loss, result.kl
        result = model_kd_loss(
            self.student,
            self.teacher,
            input_ids,
            temperature=cfg.temperature,
            ce_weight=cfg.ce_weight,
            chunk_tokens=cfg.chunk_tokens,
            loss_mask=loss_mask,
        )
        return result.loss, result.kl


def wrap(
    student: nn.Module, teacher: nn.Module | None, cfg, device: torch.device, cache: Any = None, mesh=None
) -> nn.Module:
    """`StudentLoss` as it trains here: plain (one process), in DDP, or FSDP2-sharded (`cfg.fsdp`).
    FSDP shards the student (and the teacher's decoder layers) in place; build the optimizer after.
    `mesh`: FSDP's device mesh (default: all processes; the memory plan passes its fake one)."""
    module = StudentLoss(student, teacher, cfg, cache)
    if not dist.is_initialized():
        return module
    if cfg.fsdp:
        return _fully_shard(module, student, teacher, device, mesh)
    ids = [device.index] if device.type == "cuda" else None
    # rotary buffers are identical everywhere: no buffer broadcast (a collective) on every forward
    return nn.parallel.DistributedDataParallel(
        module, device_ids=ids, forward_sync_buffers=False, static_graph=bool(cfg.gradient_checkpointing)
    )


def _fully_shard(module: StudentLoss, student: nn.Module, teacher, device: torch.device, mesh) -> nn.Module:
    from functools import partial

    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if current_precision(device).autocast_dtype == torch.bfloat16:  # bf16 all-gathers and compute,
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )  # fp32 reduction
    shard = partial(fully_shard, mp_policy=policy, mesh=mesh)
    if teacher is not None:  # the bulk of the teacher: its layers, gathered one at a time
        for layer in teacher.model.layers:
            shard(layer)
    for layer in student.model.layers:
        shard(layer)
    return shard(module)  # root: the student's embeddings, norm and head


def unwrapped(model: nn.Module) -> nn.Module:
    """The `StudentLoss` inside a DDP wrapper (FSDP2 modules are their own)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sync_context(model: nn.Module, sync: bool):
    """Gradient all-reduce on this backward only when `sync` (the last micro-batch of a step)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if sync else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def is_sharded(model: nn.Module) -> bool:
    return hasattr(model, "set_requires_gradient_sync")


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (e.g. FSDP's gradient norm); other tensors unchanged."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
