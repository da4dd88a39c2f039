"""The checks every sub-command makes before it reads or writes anything heavy: its output can be written
and is no input, the device exists, the sequence length fits the model; and the ownership lock of the
output while the command runs (`nas.lock.own_output`)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from nas.cli.flags import split_weight
from nas.errors import ConfigError
from nas.io import check_not_input, check_ours, check_output
from nas.lock import own_output


def data_paths(args: Any) -> list[str]:
    """The local paths (or hub ids) of the `--data` sources of a command."""
    return [split_weight(spec)[0] for spec in getattr(args, "data", None) or []]


def output(
    out: str | os.PathLike,
    inputs: Sequence[str | os.PathLike | None],
    is_dir: bool = True,
    allow=(),
    overwrite: bool = False,
) -> Path:
    """OUT checked: writable (not an existing file for a directory, nor read-only), not an input, and, for
    a file, new or one nas wrote unless `overwrite` (`--overwrite`; the rule of every command)."""
    path = check_output(out, is_dir=is_dir)
    check_not_input(path, inputs, allow)
    if not is_dir:
        check_ours(path, overwrite)
    return path


@contextmanager
def owning(out: str | os.PathLike, is_dir: bool = True) -> Iterator[Path]:
    """Hold OUT for the command (see `nas.lock.own_output`); under torchrun only rank 0 takes the lock, the
    other ranks work for it."""
    rank_zero = os.environ.get("RANK", "0") == "0"
    with own_output(out, is_dir) if rank_zero else nullcontext(Path(out)) as path:
        yield path


def device(name: str) -> None:
    """ConfigError now, before any loading, when `--device` names a device this machine lacks."""
    from nas.device import resolve_device

    resolve_device(name)


def seq_len_fits(seq_len: int, *models: str) -> None:
    """DataError when `--seq-len` exceeds a model's `max_position_embeddings` (only configs are read)."""
    from nas.data.tokens import check_seq_len
    from nas.model.load import load_config

    for model in models:
        check_seq_len(seq_len, load_config(model), model)


def batch_splits(batch_size: int, nproc: int, name: str = "--batch-size") -> None:
    """ConfigError before any torchrun child starts when the global micro-batch `batch_size` cannot be
    split evenly over `nproc` processes (`nas.train.dist.local_rows` needs equal shares)."""
    if nproc > 1 and batch_size % nproc:
        raise ConfigError(
            f"{name} {batch_size} must be a multiple of --nproc-per-node {nproc} (each process takes an "
            f"equal share of the batch); use {batch_size - batch_size % nproc or nproc} or "
            f"{batch_size + nproc - batch_size % nproc}"
        )


def default_seq_len_fits(args: Any, model: str) -> str | None:
    """When `--seq-len` is not given and the model has fewer positions than its default, set it to the
    model's `max_position_embeddings`; returns the note saying so (None when nothing changed)."""
    from nas.model.load import load_config
    from nas.settings import DataConfig

    if hasattr(args, "seq_len"):
        return None
    default = DataConfig.model_fields["seq_len"].default
    limit = getattr(load_config(model), "max_position_embeddings", None)
    if limit is None or limit >= default:
        return None
    args.seq_len = limit
    return (
        f"{model} has {limit} positions, fewer than the default --seq-len {default}: using --seq-len {limit}"
    )


def finite(name: str, value: float | None, positive: bool = True) -> None:
    """ConfigError for a flag that is nan, inf, or (with `positive`) not above 0."""
    if value is None:
        return
    if not math.isfinite(value) or (positive and value <= 0):
        raise ConfigError(f"{name} must be a finite number{' above 0' if positive else ''}, got {value}")


def replaceable_model_dir(out: Path) -> None:
    """OutputError unless OUT, which a saved model replaces as a whole, is new, empty, or a model nas wrote
    before (a directory of other files would be deleted)."""
    from nas.errors import OutputError
    from nas.lock import LOCK_NAME

    if not out.is_dir():
        return
    names = {p.name for p in out.iterdir()} - {LOCK_NAME}
    if names and not {"config.json", "nas_pruning.json"} <= names:
        raise OutputError(
            f"output {out} is a directory of other files ({len(names)} entries) that the model would "
            "replace; give a new or an empty directory"
        )


def run_dir_is_ours(out: Path, overwrite: bool = False) -> None:
    """OutputError when the run directory OUT holds an entry a run writes (metrics.jsonl, checkpoints/,
    model/) but no run record (`run.json`, written before a run's first step): those are someone else's
    and the run would replace them; `--overwrite` allows it. Other files in OUT are never touched."""
    from nas.errors import OutputError
    from nas.io import NOT_OURS_HINT
    from nas.train.run_files import IDENTITY_FILE, RUN_FILES

    if overwrite or not out.is_dir() or (out / IDENTITY_FILE).is_file():
        return
    theirs = [name for name in RUN_FILES if (out / name).exists()]
    if theirs:
        hint = NOT_OURS_HINT.replace("--out", "output directory")
        raise OutputError(
            f"output {out} holds {', '.join(theirs)} that nas did not write (no {IDENTITY_FILE}); {hint}"
        )
