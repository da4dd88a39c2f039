"""The teacher cache: the teacher's outputs on every training batch of the search horizon, written
once per study, so that trials train from disk with the teacher off the GPU.

Every trial of a study distills on the same batches (`TokenData.train_batch` is a pure function of
the step), so the teacher's forward is the same in every trial: per token a KD step costs about
2 N_teacher + 6 N_student FLOPs, ~40% of it the teacher's for a half-size student.

What is stored, per token (the estimator): the ids and log-probs (at the KD temperature) of the
teacher's `k` most likely next tokens, plus the log of the mass of all the others (the "rest"
bucket); `nas.train.kd.cached_kd_loss` trains on the KL between teacher and student over those
k + 1 buckets. Why this one:
- it is exact where it can be: with k = vocab it *is* dense KD (tested), and for any k its gradient
  is exact on the top-k tokens, which hold nearly all of a trained teacher's mass;
- it keeps the teacher's total mass: plain top-k renormalised over k tokens is biased (it tells the
  student the tail is empty; Anshumann et al. 2025, "Sparse Logit Sampling", arXiv:2503.16870, sec. 3),
  while the rest bucket pulls the student's tail mass to the teacher's, spread like the student's own
  tail (a lower bound of the full KL by the data-processing inequality);
- it is what the tools that ship logit caches use: DistillKit's compressed top-k logit captures
  (arcee-ai/DistillKit) and Megatron-LM's top-k logits saver;
- it is deterministic: every candidate sees the same targets, so the ranking is not blurred by
  sampling noise, which is what the search needs (`benchmarks/teacher_cache.py` measures the ranking
  against dense KD). Random sampling KD (Anshumann et al.) is unbiased in expectation but its
  per-token targets are noisy at the same bytes per token; it is not implemented here.

Files of `<study>/teacher_cache/` (flat rows in the loop's order: micro-batch, sequence, position):
`ids.bin` [N, k] uint16/uint32, `logp.bin` [N, k] float16 (float32 when k = vocab, so that the cache
is exact), `rest.bin` [N] float32 (log of the rest mass, -inf when k = vocab), memory-mapped, and `meta.json`: the key (a hash of the teacher's weights,
the tokenizer, the data fingerprint, the settings), a hash of every micro-batch's token ids, and
each file's size and BLAKE2b digest. The directory is written under `.tmp-...` and renamed into place
with `meta.json` written last, all under an exclusive OS lock (`fcntl.flock`) on
`<study>/.teacher_cache.lock`: of several workers starting at once one writes, the others wait and
then read it. The OS drops the lock of a killed writer; the next process removes its temp directory
and writes the cache again. A cache with a damaged file (size or digest) is rewritten; a cache for
another teacher, tokenizer, data or settings is a `TeacherCacheError`, never used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from nas.data.tokens import tokenizer_fingerprint
from nas.device import autocast_for, model_device
from nas.errors import TeacherCacheError
from nas.io import read_json, replace_dir, temp_dir, write_text_atomic
from nas.model.head import head_weight, logit_softcap, softcap_
from nas.settings import DistillConfig
from nas.settings.paths import TEACHER_CACHE as DIRNAME  # its name under a study's out_dir

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # bump when the files or the estimator change (2: final-logit soft-capping)
FILES = ("ids.bin", "logp.bin", "rest.bin")
DIGEST_BLOCK = 1 << 24  # bytes read at a time when hashing


@dataclass(frozen=True)
class CacheSettings:
    """What the cached batches and targets depend on besides the teacher, tokenizer and data."""

    topk: int  # top-k tokens per position (= vocab: the full distribution)
    steps: int  # optimizer steps of the horizon
    grad_accum: int
    batch_size: int
    seq_len: int
    temperature: float
    data_seed: int
    value_dtype: str = "float16"  # of the stored log-probs

    @classmethod
    def of(cls, cfg: DistillConfig, data: Any, topk: int, vocab_size: int, value_dtype: str = "auto"):
        """The settings of a cache for training runs `cfg` on `data`: k clamped to the vocabulary, and
        log-probs in float16, or float32 (`auto` with k = vocab) so that the full distribution is exact."""
        if topk < 1:
            raise TeacherCacheError(f"search.teacher_cache_topk must be >= 1, got {topk}")
        k = min(topk, vocab_size)
        if value_dtype == "auto":
            value_dtype = "float32" if k == vocab_size else "float16"
        return cls(k, cfg.steps, cfg.grad_accum, cfg.batch_size, data.seq_len, float(cfg.temperature),
                   int(data.seed), value_dtype)  # fmt: skip

    @property
    def micro_batches(self) -> int:
        return self.steps * self.grad_accum

    @property
    def tokens(self) -> int:
        return self.micro_batches * self.batch_size * self.seq_len


class TeacherCache:
    """A verified, memory-mapped teacher cache; `targets(index)` gives micro-batch `index`'s targets."""

    def __init__(self, directory: Path, meta: dict[str, Any]) -> None:
        self.directory, self.meta = directory, meta
        self.settings = CacheSettings(**meta["key"]["settings"])
        n, k = self.settings.tokens, self.settings.topk
        self.ids = np.memmap(directory / "ids.bin", dtype=meta["id_dtype"], mode="r", shape=(n, k))
        self.logp = np.memmap(directory / "logp.bin", dtype=self.settings.value_dtype, mode="r", shape=(n, k))
        self.rest = np.memmap(directory / "rest.bin", dtype=np.float32, mode="r", shape=(n,))
        self.vocab_size = int(meta["vocab_size"])

    @property
    def key(self) -> dict[str, Any]:
        return self.meta["key"]

    def mismatch(self, cfg: DistillConfig, data: Any) -> str | None:
        """Why this cache does not hold the batches of training run `cfg` on `data` (None: it does)."""
        s = self.settings
        wanted = {"steps": cfg.steps, "grad_accum": cfg.grad_accum, "batch_size": cfg.batch_size,
                  "seq_len": data.seq_len, "temperature": float(cfg.temperature), "data_seed": data.seed}  # fmt: skip
        wrong = [f"{k} {getattr(s, k)} (run: {v})" for k, v in wanted.items() if getattr(s, k) != v]
        if self.key["data"] != data.fingerprint:
            wrong.append(f"data fingerprint {self.key['data'][:12]} (run: {data.fingerprint[:12]})")
        if cfg.data_offset:  # a continued run (the adaptive horizon's rungs) trains on later batches
            wrong.append(f"data_offset 0 (run: {cfg.data_offset})")
        return ", ".join(wrong) or None

    def check_covers(self, cfg: DistillConfig, data: Any) -> None:
        """TeacherCacheError unless this cache holds exactly the batches of training run `cfg` on `data`."""
        why = self.mismatch(cfg, data)
        if why:
            raise TeacherCacheError(
                f"the teacher cache {self.directory} was written for other batches: {why}; train with the "
                "teacher itself, or delete the cache to rebuild it for these settings"
            )

    def targets(self, index: int, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top_ids [B, T, k] int64, top_logp [B, T, k] fp32, log_rest [B, T] fp32) of micro-batch
        `index`, after checking that `batch` holds the token ids the cache was written from."""
        if batch_hash(batch) != self.meta["batch_hashes"][index]:
            raise TeacherCacheError(
                f"micro-batch {index} differs from the one the teacher cache {self.directory} was written "
                "from (another data set or sampling); delete the cache to rebuild it"
            )
        s = self.settings
        rows = slice(index * s.batch_size * s.seq_len, (index + 1) * s.batch_size * s.seq_len)
        shape = (s.batch_size, s.seq_len)
        ids = torch.from_numpy(self.ids[rows].astype(np.int64)).view(*shape, s.topk)
        logp = torch.from_numpy(self.logp[rows].astype(np.float32)).view(*shape, s.topk)
        rest = torch.from_numpy(np.array(self.rest[rows])).view(shape)
        return ids, logp, rest


def teacher_source(teacher: nn.Module, cache: TeacherCache | None, cfg: DistillConfig, data: Any):
    """What a training run `cfg` learns from: the cache when there is one holding its batches (the
    search horizon's), else the teacher itself (online dense KD, e.g. the winner's final run)."""
    why = cache.mismatch(cfg, data) if cache is not None else "no cache"
    if why is None:
        return cache
    if cache is not None:
        log.info("online dense KD for this run: the teacher cache holds other batches (%s)", why)
    return teacher


def ensure_teacher_cache(
    root: str | Path,
    teacher: nn.Module,
    tokenizer: Any,
    data: Any,
    cfg: DistillConfig,
    topk: int,
    value_dtype: str = "auto",
) -> tuple[TeacherCache, bool]:
    """The study's teacher cache under `root` for training runs `cfg` on `data`, written now if it is
    missing or damaged (by this process; concurrent callers wait for it). Returns (cache, written here)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    settings = CacheSettings.of(cfg, data, topk, head_weight(teacher).shape[0], value_dtype)
    key = cache_key(teacher, tokenizer, data, settings)
    directory = root / DIRNAME
    with exclusive_lock(root / f".{DIRNAME}.lock"):
        # left by a writer killed midway (we hold the lock, so no one is writing them now)
        for stale in [*root.glob(f".tmp-{DIRNAME}-*"), *root.glob(f".old-{DIRNAME}-*")]:
            log.warning("removing %s, left by a teacher-cache writer that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)
        if (directory / "meta.json").is_file():
            try:
                return open_teacher_cache(directory, key), False
            except _Damaged as e:
                log.warning("the teacher cache %s is damaged (%s); writing it again", directory, e)
        write_teacher_cache(directory, key, teacher, data, cfg.chunk_tokens)
        return open_teacher_cache(directory, key), True


def open_teacher_cache(directory: str | Path, key: dict[str, Any] | None = None) -> TeacherCache:
    """Open and verify a complete cache (every file's size and digest, and `key` when given)."""
    directory = Path(directory)
    try:
        meta = read_json(directory / "meta.json", error=TeacherCacheError)
    except (OSError, ValueError, TeacherCacheError) as e:
        raise _Damaged(f"the teacher cache {directory} is damaged: meta.json unreadable ({e})") from e
    if meta.get("key", {}).get("version") != CACHE_VERSION:
        raise _Damaged(f"the teacher cache {directory} was written by another cache version")
    if key is not None and meta["key"] != key:
        raise TeacherCacheError(
            f"the teacher cache {directory} was written for {_differences(meta['key'], key)}; it cannot "
            "serve this study: delete it to rebuild it, or go back to the settings it was written for"
        )
    for name in FILES:
        want, path = meta["files"][name], directory / name
        size = path.stat().st_size if path.is_file() else -1
        if size != want["bytes"]:
            raise _Damaged(f"{path} has {size} bytes, {want['bytes']} expected (truncated?)")
        if file_digest(path) != want["blake2b"]:
            raise _Damaged(f"{path} does not match its digest (changed after it was written)")
    return TeacherCache(directory, meta)


def write_teacher_cache(
    directory: Path, key: dict[str, Any], teacher: nn.Module, data: Any, chunk: int
) -> None:
    """Run the teacher over every micro-batch of the horizon and store its top-k (see the module
    docstring); the directory appears complete or not at all (a failure removes the temp directory)."""
    s = CacheSettings(**key["settings"])
    vocab = head_weight(teacher).shape[0]
    id_dtype = np.uint16 if vocab <= 2**16 else np.uint32
    start = time.perf_counter()
    with temp_dir(directory) as tmp:
        hashes = _fill(tmp, s, id_dtype, teacher, data, chunk)
        files = {n: {"bytes": (tmp / n).stat().st_size, "blake2b": file_digest(tmp / n)} for n in FILES}
        meta = {"key": key, "vocab_size": vocab, "id_dtype": np.dtype(id_dtype).name, "files": files,
                "batch_hashes": hashes, "seconds": time.perf_counter() - start}  # fmt: skip
        write_text_atomic(tmp / "meta.json", json.dumps(meta))  # last: its presence marks a complete cache
        replace_dir(tmp, directory)
    log.info("teacher cache: %d tokens, top-%d, %.1f MB in %.1f s -> %s", s.tokens, s.topk,
             sum(f["bytes"] for f in files.values()) / 1e6, meta["seconds"], directory)  # fmt: skip


def _fill(tmp: Path, s: CacheSettings, id_dtype: Any, teacher: nn.Module, data: Any, chunk: int) -> list[str]:
    """Write the teacher's targets of every micro-batch into memory-mapped files in `tmp`; returns the
    batches' hashes."""
    per_batch = s.batch_size * s.seq_len
    ids = np.memmap(tmp / "ids.bin", dtype=id_dtype, mode="w+", shape=(s.tokens, s.topk))
    logp = np.memmap(tmp / "logp.bin", dtype=s.value_dtype, mode="w+", shape=(s.tokens, s.topk))
    rest = np.memmap(tmp / "rest.bin", dtype=np.float32, mode="w+", shape=(s.tokens,))
    hashes, device, was_training = [], model_device(teacher), teacher.training
    teacher.eval()
    for index in tqdm(range(s.micro_batches), desc="teacher cache", disable=None):
        batch = data.train_batch(index, s.batch_size, s.micro_batches)
        hashes.append(batch_hash(batch))
        top_ids, top_logp, log_rest = teacher_topk(teacher, batch.to(device), s.topk, s.temperature, chunk)
        rows = slice(index * per_batch, (index + 1) * per_batch)
        ids[rows] = top_ids.reshape(per_batch, s.topk).cpu().numpy()
        logp[rows] = top_logp.reshape(per_batch, s.topk).cpu().numpy()
        rest[rows] = log_rest.reshape(per_batch).cpu().numpy()
    teacher.train(was_training)
    for array in (ids, logp, rest):
        array.flush()
    return hashes


@torch.no_grad()
def teacher_topk(teacher: nn.Module, input_ids: torch.Tensor, k: int, temperature: float, chunk: int):
    """The teacher's (top-k ids, their log-probs at `temperature`, log of the rest mass) for every
    position of `input_ids` [B, T], the head applied `chunk` rows at a time."""
    with autocast_for(input_ids.device):
        hidden = teacher.model(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.shape[-1])
    weight, cap = head_weight(teacher).to(hidden.dtype), logit_softcap(teacher)
    ids, values, rests = [], [], []
    for start in range(0, hidden.shape[0], chunk):
        logits = softcap_(torch.mm(hidden[start : start + chunk], weight.t()).float(), cap)
        log_p = torch.log_softmax(logits / temperature, dim=-1)
        top, top_ids = log_p.topk(k, dim=-1, sorted=False)
        rests.append(torch.logsumexp(log_p.scatter_(1, top_ids, -math.inf), dim=-1))
        ids.append(top_ids)
        values.append(top)
    shape = input_ids.shape
    return torch.cat(ids).view(*shape, k), torch.cat(values).view(*shape, k), torch.cat(rests).view(shape)


def cache_key(teacher: nn.Module, tokenizer: Any, data: Any, settings: CacheSettings) -> dict[str, Any]:
    """What a cache must match to be used: the teacher's weights, the tokenizer, the data, the settings."""
    return {
        "version": CACHE_VERSION,
        "teacher": weights_hash(teacher),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": data.fingerprint,
        "settings": dataclasses.asdict(settings),
    }


def weights_hash(model: nn.Module) -> str:
    """BLAKE2b of every tensor of the state dict (name, dtype, shape, bytes), in name order."""
    h = hashlib.blake2b(digest_size=20)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def batch_hash(batch: torch.Tensor) -> str:
    """A short hash of a batch's token ids (as int64)."""
    array = np.ascontiguousarray(batch.detach().cpu().numpy().astype(np.int64))
    return hashlib.blake2b(array.tobytes(), digest_size=8).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while block := f.read(DIGEST_BLOCK):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """An exclusive `flock` on `path` (waiting for it, logged); the OS drops it if the process dies."""
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process that holds %s (writing the teacher cache)", path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Damaged(TeacherCacheError):
    """A complete-looking cache whose files do not match their sizes or digests (`ensure_teacher_cache`
    writes it again)."""


def _differences(have: dict[str, Any], want: dict[str, Any]) -> str:
    """The parts of two keys that differ, in words."""
    names = {"teacher": "another teacher (weights hash)", "tokenizer": "another tokenizer",
             "data": "other data (fingerprint)"}  # fmt: skip
    parts = [
        f"{label} {have[k][:12]} (now {want[k][:12]})" for k, label in names.items() if have[k] != want[k]
    ]
    hs, ws = have["settings"], want["settings"]
    parts += [f"{k} = {hs.get(k)} (now {ws[k]})" for k in ws if hs.get(k) != ws[k]]
    return ", ".join(parts) or "another key"
