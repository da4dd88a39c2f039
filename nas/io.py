"""Leaf helpers for files: atomic writes (temp file + rename) and directory replacement."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path beside `path` to write to; renamed onto `path` only if the block succeeds, so
    readers never see a partial file. The result gets ordinary permissions (mkstemp's are 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give a finished temp file ordinary permissions (mkstemp's are 0600) and rename it onto `path`."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_model_atomic(model: Any, dst: Path, state_dict: dict | None = None) -> Path:
    """`save_pretrained` (safetensors) into a temp directory next to `dst`, then rename it to `dst`.
    `state_dict`: the weights to write instead of the model's own (the gathered ones of a sharded model)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".tmp-{dst.name}-"))
    model.save_pretrained(tmp, state_dict=state_dict)
    replace_dir(tmp, dst)
    return dst


def replace_dir(tmp: Path, dst: Path) -> None:
    """Rename the finished temp directory `tmp` to `dst`, replacing an existing `dst` (renamed aside first:
    os.replace needs an empty target). `tmp` gets ordinary permissions first (mkdtemp's are 0700), so
    workers of another user on shared storage can read it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if dst.exists():
        trash = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".old-{dst.name}-"))
        os.replace(dst, trash / dst.name)
        os.replace(tmp, dst)
        shutil.rmtree(trash)
    else:
        os.replace(tmp, dst)


def write_atomic(path: Path, payload: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
