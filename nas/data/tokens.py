"""Text corpora -> tokenized, packed, cached calibration / validation / train sequences.

Splits are by document: each document goes to calibration, validation or train by a hash of its text
(`nas.data.corpus.document_hash`), so the same text always lands in the same split, from whatever source.
Each split of each source is tokenized (no special tokens, EOS after every document), packed into rows
of `seq_len` tokens (the incomplete last row dropped) and cached as a memory-mapped array under
`cache_dir/<key>/`, where the key hashes the source's files (path, size, mtime) or hub id, the tokenizer,
`seq_len` and the split fractions; a second `prepare` reads the cache and tokenizes nothing.

A chat source (`messages_field`) is rendered with the tokenizer's chat template (or the named or Jinja
`chat_template`) and then tokenized like text, EOS after each conversation, every token trained on (with
`mask_prompt`, only the assistant turns: a 0/1 mask per token is cached beside the tokens and
`TokenData.train_mask` gives it per batch); the template's name and hash go into its cache key and
`TokenData.chat_templates`.

Train batches follow blends with phases: the phase is the one with the greatest `start` <= step /
total_steps, each sequence's source is drawn with the phase's weights, and its row uniformly (with
replacement), all from `np.random.default_rng([seed, step])`, so resuming at a step replays its batch.
Validation and calibration rows are fixed: the sources of every phase, interleaved row by row.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from nas.data.chat import chat_renderer, chat_template, template_label, token_mask
from nas.data.corpus import document_hash, load_documents, source_fingerprint
from nas.errors import ConfigError, DataError
from nas.io import publish, read_json, write_atomic
from nas.settings import DataConfig, Phase, Source

__all__ = ["DataConfig", "Phase", "Source", "TokenData", "load_documents", "prepare"]

log = logging.getLogger(__name__)

SPLITS = ("calib", "val", "train")
CACHE_VERSION = 1  # bump when the cached layout or the split rule changes
TOKENIZE_BATCH = 256  # documents per tokenizer call (fast tokenizers parallelise within a batch)


def check_seq_len(seq_len: int, model_config: Any, model: str) -> None:
    """DataError when sequences of `seq_len` tokens are longer than the model's positions (it would
    run, past its trained range, and report meaningless losses)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise DataError(
            f"--seq-len {seq_len} is longer than {model}'s max_position_embeddings ({limit}); "
            f"use --seq-len {limit} or less"
        )


@dataclass(eq=False)
class TokenData:
    """Packed token sequences of every source, split into calibration / validation / train."""

    seq_len: int
    fingerprint: str  # hash of the data config (blends, seq_len, seed), the files' stamps and the tokenizer
    sources: tuple[Source, ...]  # distinct corpora; a source id indexes this
    phases: tuple[Phase, ...]
    seed: int
    splits: dict[str, list[np.ndarray]]  # split -> one [rows, seq_len] memmap per source
    from_cache: bool = False  # True when nothing was tokenized
    chat_templates: dict[str, str] = field(default_factory=dict)  # chat source path -> `template_label`
    # split -> per source, which tokens are trained on (None: all; `mask_prompt` chat sources have one)
    masks: dict[str, list[np.ndarray | None]] = field(default_factory=dict)
    _phase_ids: list[np.ndarray] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        index = {s: i for i, s in enumerate(self.sources)}
        self._phase_ids = [np.array([index[s.replace(weight=1.0)] for s in p.sources]) for p in self.phases]

    def sizes(self, split: str) -> list[int]:
        """Rows (sequences) of `split` in each source."""
        return [len(a) for a in self.splits[split]]

    def calib(self, n: int | None = None) -> torch.Tensor:
        """The first `n` (default all) calibration sequences, [n, seq_len] int64; the same on every call."""
        return self._fixed("calib", n)

    def val(self, n: int | None = None) -> torch.Tensor:
        """The first `n` (default all) validation sequences, [n, seq_len] int64; the same on every call."""
        return self._fixed("val", n)

    def phase_at(self, step: int, total_steps: int) -> int:
        """Index of the phase used at `step`: the one with the greatest start <= step / total_steps."""
        if total_steps < 1:
            raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
        fraction = step / total_steps
        return max(i for i, p in enumerate(self.phases) if p.start <= fraction)

    def train_batch_sources(self, step: int, batch_size: int, total_steps: int) -> np.ndarray:
        """The source id of each sequence of `train_batch(step, ...)` (ids index `self.sources`)."""
        return self._draw(step, batch_size, total_steps)[0]

    def train_batch(self, step: int, batch_size: int, total_steps: int) -> torch.Tensor:
        """Train sequences [batch_size, seq_len] int64, a pure function of (seed, step)."""
        source_ids, rows = self._draw(step, batch_size, total_steps)
        train = self.splits["train"]
        batch = np.stack([train[s][r] for s, r in zip(source_ids, rows, strict=True)])
        return torch.from_numpy(batch.astype(np.int64))

    def train_mask(self, step: int, batch_size: int, total_steps: int) -> torch.Tensor | None:
        """Which tokens of `train_batch(step, ...)` are trained on ([batch_size, seq_len] bool; a
        `mask_prompt` chat source's prompt turns are 0); None when every token is."""
        masks = self.masks.get("train", [])
        if not any(m is not None for m in masks):
            return None
        source_ids, rows = self._draw(step, batch_size, total_steps)
        ones = np.ones(self.seq_len, dtype=np.uint8)
        batch = [ones if masks[s] is None else masks[s][r] for s, r in zip(source_ids, rows, strict=True)]
        return torch.from_numpy(np.stack(batch).astype(bool))

    def _draw(self, step: int, batch_size: int, total_steps: int) -> tuple[np.ndarray, np.ndarray]:
        phase = self.phase_at(step, total_steps)
        ids = self._phase_ids[phase]
        sizes = np.array(self.sizes("train"))[ids]
        if sizes.sum() < batch_size:
            raise DataError(
                f"phase {phase} has {sizes.sum()} train sequences ({sizes.sum() * self.seq_len} tokens), "
                f"fewer than one batch of {batch_size}: add data, or lower --batch-size or --seq-len"
            )
        weights = np.array([s.weight for s in self.phases[phase].sources], dtype=np.float64)
        rng = np.random.default_rng([self.seed, step])
        choice = rng.choice(len(ids), size=batch_size, p=weights / weights.sum())
        rows = (rng.random(batch_size) * sizes[choice]).astype(np.int64)
        return ids[choice], rows

    def _fixed(self, split: str, n: int | None) -> torch.Tensor:
        arrays = self.splits[split]
        sizes = [len(a) for a in arrays]
        n = sum(sizes) if n is None else n
        if n > sum(sizes):
            raise DataError(
                f"asked for {n} {split} sequences but the data has {sum(sizes)} ({sum(sizes) * self.seq_len} "
                f"tokens; {n * self.seq_len} needed): ask for fewer, add data, or raise {split}_fraction"
            )
        # interleave the sources row by row, so the first n cover every source
        row = np.concatenate([np.arange(size) for size in sizes])
        source = np.repeat(np.arange(len(sizes)), sizes)
        order = np.lexsort((source, row))[:n]
        rows = [arrays[s][r] for s, r in zip(source[order], row[order], strict=True)]
        batch = np.stack(rows) if rows else np.zeros((0, self.seq_len))
        return torch.from_numpy(batch.astype(np.int64))


def prepare(cfg: DataConfig, tokenizer: Any) -> TokenData:
    """Tokenize (EOS between documents), pack and cache every source of `cfg`; check that the splits are
    disjoint and none is empty. A source already in the cache is read, not tokenized again."""
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token (eos_token); set one so documents can be separated")
    tok_hash = tokenizer_fingerprint(tokenizer)
    splits: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    masks: dict[str, list[np.ndarray | None]] = {s: [] for s in SPLITS}
    hashes: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    metas, templates = [], {}
    for source in cfg.sources:
        if source.messages_field is not None:
            templates[source.path] = template_label(source, chat_template(tokenizer, source))
        directory, hit = cached_source(source, cfg, tokenizer, tok_hash)
        metas.append(read_json(directory / "meta.json", error=DataError) | {"directory": directory, "hit": hit})
    check_sizes(cfg, metas)
    for meta in metas:
        for split in SPLITS:
            splits[split].append(open_rows(meta["directory"] / f"{split}.bin", meta, split, cfg.seq_len))
            mask = meta["directory"] / f"{split}.mask.bin"
            mask = open_rows(mask, meta, split, cfg.seq_len, "uint8") if meta.get("mask") else None
            masks[split].append(mask)
            hashes[split].append(np.load(meta["directory"] / f"{split}.hashes.npy"))
    from_cache = all(meta["hit"] for meta in metas)
    check_disjoint({s: np.concatenate(h) for s, h in hashes.items()})
    # the source keys cover file sizes and mtimes, so edited data gives another fingerprint
    fingerprint = _hash([config_dict(cfg), tok_hash, [meta["key"] for meta in metas]])
    data = TokenData(
        cfg.seq_len, fingerprint, cfg.sources, cfg.phases, cfg.seed, splits, from_cache, templates, masks
    )
    log.info(
        "data %s: %s sequences of %d tokens (train/val/calib)%s",
        fingerprint[:12],
        "/".join(str(sum(data.sizes(s))) for s in ("train", "val", "calib")),
        cfg.seq_len,
        " from the cache" if from_cache else "",
    )
    return data


def cached_source(source: Source, cfg: DataConfig, tokenizer: Any, tok_hash: str) -> tuple[Path, bool]:
    """The cache directory of `source` (tokenized now unless already there), and whether it was there."""
    settings = [cfg.seq_len, cfg.val_fraction, cfg.calib_fraction]
    parts = [CACHE_VERSION, source_fingerprint(source), tok_hash, settings]
    if source.messages_field is not None:  # the template's text decides the tokens as much as the vocabulary
        parts.append(chat_template(tokenizer, source))
    key = _hash(parts)
    directory = Path(cfg.cache_dir) / key[:24]
    if (directory / "meta.json").is_file():
        check_cached(directory, key, cfg.seq_len)
        log.info("data %s: cached in %s", source.path, directory)
        return directory, True
    directory.mkdir(parents=True, exist_ok=True)
    meta = tokenize_source(source, cfg, tokenizer, directory)
    write_atomic(directory / "meta.json", json.dumps(meta | {"key": key}, indent=1).encode())
    return directory, False


def check_cached(directory: Path, key: str, seq_len: int) -> None:
    """DataError when a cache directory was not written for these settings (its recorded key differs) or
    its files are not whole (truncated, missing, corrupt)."""
    fix = f"delete {directory} and run again (it is rebuilt from the data)"
    try:
        meta = read_json(directory / "meta.json", error=DataError)
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in SPLITS:
            want = meta["splits"][split]["sequences"] * seq_len * itemsize
            files = {f"{split}.bin": want}
            if meta.get("mask"):  # one byte a token
                files[f"{split}.mask.bin"] = want // itemsize
            for name, size in files.items():
                got = (directory / name).stat().st_size
                if got != size:
                    raise DataError(
                        f"data cache {directory / name} has {got} bytes, not {size}: truncated; {fix}"
                    )
            np.load(directory / f"{split}.hashes.npy")
    except DataError:
        raise
    except Exception as e:  # unreadable JSON, missing files or fields, a corrupt .npy
        raise DataError(f"data cache {directory} is corrupt ({type(e).__name__}: {e}); {fix}") from e
    if meta.get("key") != key or meta.get("seq_len") != seq_len:
        raise DataError(f"data cache {directory} was written for other settings; {fix}")


def tokenize_source(source: Source, cfg: DataConfig, tokenizer: Any, directory: Path) -> dict[str, Any]:
    """Tokenize and pack every document of `source` into `directory/<split>.bin` (+ `.hashes.npy`)."""
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    writers = {s: SplitWriter(directory / f"{s}.bin", dtype, cfg.seq_len, source.mask_prompt) for s in SPLITS}
    try:
        batch: list[str] = []
        render = chat_renderer(tokenizer, source) if source.messages_field is not None else None
        documents = load_documents(source, render)
        documents = tqdm(documents, desc=f"tokenizing {source.path}", unit="doc", disable=None)
        for text in documents:
            batch.append(text)
            if len(batch) == TOKENIZE_BATCH:
                write_documents(batch, tokenizer, writers, cfg)
                batch = []
        write_documents(batch, tokenizer, writers, cfg)
        splits = {s: w.close() for s, w in writers.items()}
    finally:
        for w in writers.values():
            w.discard()
    log.info(
        "data %s: %s",
        source.path,
        ", ".join(f"{s} {m['documents']} docs {m['tokens']} tokens" for s, m in splits.items()),
    )
    return {"version": CACHE_VERSION, "source": source.model_dump(), "seq_len": cfg.seq_len,
            "dtype": np.dtype(dtype).name, "tokenizer": type(tokenizer).__name__, "splits": splits,
            "mask": source.mask_prompt}  # fmt: skip


def write_documents(
    texts: list[str], tokenizer: Any, writers: dict[str, SplitWriter], cfg: DataConfig
) -> None:
    if not texts:
        return
    masked = any(w.mask_path for w in writers.values())
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False, return_offsets_mapping=masked)
    for i, (text, tokens) in enumerate(zip(texts, encoded["input_ids"], strict=True)):
        doc = document_hash(text)
        mask = token_mask(encoded["offset_mapping"][i], text.spans) + [1] if masked else None  # EOS: trained
        writers[split_of(doc, cfg)].write(tokens + [tokenizer.eos_token_id], doc, mask)


def split_of(doc_hash: int, cfg: DataConfig) -> str:
    """The split of a document: its content hash as a fraction of 2**64 against the split fractions,
    so identical documents always land together."""
    u = doc_hash / 2**64
    if u < cfg.calib_fraction:
        return "calib"
    return "val" if u < cfg.calib_fraction + cfg.val_fraction else "train"


class SplitWriter:
    """Appends one split's tokens to a temp file; `close` trims it to whole rows and moves it in place."""

    def __init__(self, path: Path, dtype: Any, seq_len: int, mask: bool = False) -> None:
        self.path, self.dtype, self.seq_len = path, dtype, seq_len
        fd, self.tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        self.file = os.fdopen(fd, "wb")
        self.mask_path = path.with_suffix(".mask.bin") if mask else None  # one uint8 per token: 1 = trained on
        self.mask_file = None
        if mask:
            fd, self.mask_tmp = tempfile.mkstemp(dir=path.parent, prefix=self.mask_path.name, suffix=".tmp")
            self.mask_file = os.fdopen(fd, "wb")
        self.tokens = 0
        self.hashes: list[int] = []

    def write(self, tokens: list[int], doc_hash: int, mask: list[int] | None = None) -> None:
        np.asarray(tokens, dtype=self.dtype).tofile(self.file)
        if self.mask_file is not None:
            np.asarray(mask, dtype=np.uint8).tofile(self.mask_file)
        self.tokens += len(tokens)
        self.hashes.append(doc_hash)

    def close(self) -> dict[str, int]:
        rows = self.tokens // self.seq_len
        self.file.truncate(rows * self.seq_len * np.dtype(self.dtype).itemsize)
        self.file.close()
        if self.mask_file is not None:
            self.mask_file.truncate(rows * self.seq_len)
            self.mask_file.close()
            publish(self.mask_tmp, self.mask_path)
        publish(self.tmp, self.path)
        buffer = io.BytesIO()
        np.save(buffer, np.array(self.hashes, dtype=np.uint64))
        write_atomic(self.path.with_suffix(".hashes.npy"), buffer.getvalue())
        return {"documents": len(self.hashes), "tokens": self.tokens, "sequences": rows}

    def discard(self) -> None:
        """Remove the temp files if `close` did not move them (an error midway)."""
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)
        if self.mask_file is not None:
            self.mask_file.close()
            Path(self.mask_tmp).unlink(missing_ok=True)


def open_rows(
    path: Path, meta: dict[str, Any], split: str, seq_len: int, dtype: str | None = None
) -> np.ndarray:
    """A cached split (or its mask: `dtype` uint8) as a read-only [rows, seq_len] memmap (mmap cannot map
    an empty file)."""
    rows, dtype = meta["splits"][split]["sequences"], dtype or meta["dtype"]
    if rows == 0:
        return np.zeros((0, seq_len), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(rows, seq_len))


def check_sizes(cfg: DataConfig, metas: list[dict[str, Any]]) -> None:
    """DataError when a source has no train sequence (it could not be sampled) or when no source has a
    validation or calibration sequence."""
    for source, meta in zip(cfg.sources, metas, strict=True):
        m = meta["splits"]["train"]
        if m["sequences"] == 0:
            raise DataError(
                f"{source.path}: its train split has {m['documents']} documents and {m['tokens']} tokens, "
                f"fewer than one sequence of {cfg.seq_len} tokens: add data or lower seq_len"
            )
    for split in ("val", "calib"):
        docs, tokens, rows = (
            sum(m["splits"][split][k] for m in metas) for k in ("documents", "tokens", "sequences")
        )
        if rows == 0:
            raise DataError(
                f"the {split} split has {docs} documents and {tokens} tokens, fewer than one sequence of "
                f"{cfg.seq_len} tokens: add data, lower seq_len, or raise {split}_fraction"
            )


def check_disjoint(hashes: dict[str, np.ndarray]) -> None:
    """DataError if one document (by content hash) is in two splits."""
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            shared = np.intersect1d(hashes[a], hashes[b])
            if len(shared):
                raise DataError(
                    f"{len(shared)} documents are in both the {a} and {b} splits; the cache is inconsistent: "
                    "delete the data cache directory and run again"
                )


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the tokenizer's class, vocabulary, merges and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    content = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return _hash([type(tokenizer).__name__, len(tokenizer), tokenizer.eos_token_id, content])


# left out while unset: the fingerprints of plain-text data stay what they were before chat data
CHAT_FIELDS = ("messages_field", "chat_template", "mask_prompt")


def config_dict(cfg: DataConfig) -> dict[str, Any]:
    """The parts of `cfg` that decide the token stream (everything but where the cache lives)."""
    data = {k: v for k, v in cfg.model_dump().items() if k != "cache_dir"}
    for phase in data["phases"]:
        phase["sources"] = [{k: v for k, v in s.items() if k not in CHAT_FIELDS or v not in (None, False)}
                            for s in phase["sources"]]  # fmt: skip
    return data


def _hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
