"""The demo's corpus, tokenizer and teacher: real text, a BPE tokenizer trained on it, and a small Llama
with GQA trained from scratch on it, cached on disk.

A saved teacher is complete when `demo_teacher.json` sits next to its weights; that file is written
last (atomically), so an interrupted training never passes for a finished teacher. A second demo run
with the same teacher settings loads it instead of training again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nas.data.bpe import train_bpe
from nas.data.corpus import document_hash
from nas.data.kjv import HELD_OUT_BOOKS, kjv_path
from nas.data.tokens import prepare, split_of
from nas.device import resolve_device
from nas.evaluate.loss import lm_loss
from nas.io import replace_dir, write_text_atomic
from nas.settings import DistillConfig
from nas.train.loop import distill

log = logging.getLogger(__name__)
MARKER = "demo_teacher.json"
EOS = "<|endoftext|>"
CORPUS_FILE = "kjv.jsonl"


# ---- corpus ---------------------------------------------------------------------------------------


def corpus_documents(max_documents: int | None = None) -> Iterator[dict[str, Any]]:
    """The KJV as documents, one chapter each ({"text", "book", "chapter"}; verses one a line),
    in canonical order, without the books `nas.data.kjv.HELD_OUT_BOOKS` keeps for evaluation."""
    held_out = set(HELD_OUT_BOOKS)
    chapter: dict[str, Any] | None = None
    count = 0
    with kjv_path().open(encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            if verse["book"] in held_out:
                continue
            key = {"book": verse["book"], "chapter": verse["chapter"]}
            if chapter is not None and key != {"book": chapter["book"], "chapter": chapter["chapter"]}:
                yield document(chapter)
                count += 1
                if max_documents is not None and count >= max_documents:
                    return
                chapter = None
            chapter = chapter or {**key, "verses": []}
            chapter["verses"].append(verse["text"])
    if chapter is not None:
        yield document(chapter)


def document(chapter: dict[str, Any]) -> dict[str, Any]:
    return {"text": "\n".join(chapter["verses"]), "book": chapter["book"], "chapter": chapter["chapter"]}


def write_corpus(directory: str | os.PathLike, max_documents: int | None = None) -> Path:
    """Write `corpus_documents()` to `directory/kjv.jsonl` (atomically; kept if already complete),
    a local corpus that goes through `nas.data` like any user's .jsonl file."""
    path = Path(directory) / CORPUS_FILE
    lines = [json.dumps(d) + "\n" for d in corpus_documents(max_documents)]
    text = "".join(lines)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, text)
    log.info("corpus: %d documents (KJV chapters), %.1f MB -> %s", len(lines), len(text) / 1e6, path)
    return path


def train_texts(corpus: Path, data_cfg: Any) -> list[str]:
    """The corpus texts that `nas.data` puts in the train split, so the tokenizer never sees
    validation or calibration text."""
    with corpus.open(encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    return [t for t in texts if split_of(document_hash(t), data_cfg) == "train"]


# ---- tokenizer ------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int = 4096):
    """The demo's tokenizer: byte-level BPE with one special token, `<|endoftext|>`, used as EOS, BOS
    and padding, as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(texts, vocab_size, [EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS)


# ---- teacher ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherSpec:
    """Shape and training of the demo teacher (nas vocabulary; vocab_size is the tokenizer's). `model_type`
    and `extras` (more config fields of that model type, e.g. Nemotron-H's `layers_block_type` and Mamba
    sizes, or a MoE's expert count) make it another family's teacher; the default is the demo's Llama."""

    model_type: str = "llama"
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    hidden_size: int = 256
    num_layers: int = 8
    num_attention_heads: int = 8
    num_query_groups: int = 4
    head_dim: int = 32
    ffn_hidden_size: int = 768
    vocab_size: int = 4096
    tie_word_embeddings: bool = True
    steps: int = 210  # optimizer steps of plain LM training
    batch_size: int = 8
    lr: float = 3e-3  # a 7M-parameter model trained for < 1 epoch wants a high peak LR
    min_lr: float = 3e-4
    warmup_steps: int = 20


@dataclass
class TeacherInfo:
    """What the teacher's training measured (stored in demo_teacher.json)."""

    path: str
    params: int
    val_loss: float  # nas.evaluate.loss.lm_loss on the demo's validation sequences
    unigram_loss: float  # cross-entropy of the train-token unigram distribution on the same targets
    tokens: int
    seconds: float
    tokens_per_s: float
    key: dict[str, Any]  # teacher_key(): what the teacher was trained from
    reused: bool = False


def build_teacher(spec: TeacherSpec, seq_len: int, seed: int = 0) -> nn.Module:
    """A randomly initialised fp32 model of `spec`'s type and shape (EOS id 0 = the tokenizer's only special)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        spec.model_type,
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_query_groups,
        head_dim=spec.head_dim,
        tie_word_embeddings=spec.tie_word_embeddings,
        max_position_embeddings=max(seq_len, 256),
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=None,
        **spec.extras,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def unigram_loss(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) on `val`'s scored targets (every position but the first of each
    sequence, as in `lm_loss`) of the add-one-smoothed unigram distribution of `train`."""
    counts = torch.bincount(train.flatten().long(), minlength=vocab_size).double() + 1.0
    log_p = (counts / counts.sum()).log()
    return float(-log_p[val[:, 1:].long()].mean())


def train_tokens(data: Any) -> torch.Tensor:
    """Every token of the train split (all sources), for the unigram counts."""
    return torch.cat(
        [torch.from_numpy(np.asarray(rows, dtype=np.int64)).flatten() for rows in data.splits["train"]]
    )


def teacher_key(spec: TeacherSpec, seq_len: int, corpus: Path) -> dict[str, Any]:
    """What a saved teacher must match to be reused: its spec, the sequence length and the corpus text."""
    digest = hashlib.sha1(corpus.read_bytes()).hexdigest()
    fields = dataclasses.asdict(spec)
    if spec.model_type == "llama" and not spec.extras:  # the key teachers had before these two fields: still reused
        del fields["model_type"], fields["extras"]
    return {"spec": fields, "seq_len": seq_len, "corpus_sha1": digest}


def load_teacher_info(teacher_dir: Path, key: dict[str, Any]) -> TeacherInfo | None:
    """The stored info of a complete teacher trained from `key`, or None (absent, partial, other key)."""
    marker = teacher_dir / MARKER
    if not marker.is_file():
        return None
    try:
        info = TeacherInfo(**json.loads(marker.read_text()))
    except (ValueError, TypeError):
        return None
    if info.key != key or not (teacher_dir / "config.json").is_file():
        return None
    return dataclasses.replace(info, reused=True)


def train_teacher(
    spec: TeacherSpec,
    key: dict[str, Any],
    tokenizer: Any,
    data: Any,
    out_dir: Path,
    eval_sequences: int,
    device: str = "auto",
) -> TeacherInfo:
    """Train the teacher with plain LM loss (`distill(None, ...)`), save it with its tokenizer to
    `out_dir/teacher`, and measure it against the unigram baseline. Reuses a complete saved teacher."""
    teacher_dir = out_dir / "teacher"
    cached = load_teacher_info(teacher_dir, key)
    if cached is not None:
        log.info("reusing the trained teacher in %s (delete it to train again)", teacher_dir)
        return cached
    work = out_dir / "teacher_train"
    shutil.rmtree(work, ignore_errors=True)  # another spec's checkpoints must not be resumed
    model = build_teacher(spec, data.seq_len)
    cfg = DistillConfig(
        steps=spec.steps,
        batch_size=spec.batch_size,
        lr=spec.lr,
        min_lr=spec.min_lr,
        warmup_steps=min(spec.warmup_steps, max(spec.steps // 10, 1)),
        weight_decay=0.1,
        eval_every=max(spec.steps // 4, 1),
        eval_sequences=eval_sequences,
        checkpoint_every=max(spec.steps // 2, 1),
        keep_checkpoints=1,
        device=device,
    )
    result = distill(None, model, data, cfg, work)
    val = torch.as_tensor(data.val(eval_sequences))
    info = TeacherInfo(
        path=str(teacher_dir),
        params=sum(p.numel() for p in model.parameters()),
        val_loss=lm_loss(model.to(resolve_device(device)), val),
        unigram_loss=unigram_loss(train_tokens(data), val, spec.vocab_size),
        tokens=result.tokens,
        seconds=result.seconds,
        tokens_per_s=result.tokens_per_s,
        key=key,
    )
    save_teacher(model.cpu(), tokenizer, teacher_dir, info)
    shutil.rmtree(work, ignore_errors=True)
    check_teacher(info)
    return info


def save_teacher(model: nn.Module, tokenizer: Any, teacher_dir: Path, info: TeacherInfo) -> None:
    """Weights and tokenizer into a temp directory, the marker last, then one rename into place."""
    teacher_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=teacher_dir.parent, prefix=".tmp-teacher-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps(dataclasses.asdict(info), indent=1))
    replace_dir(tmp, teacher_dir)


def check_teacher(info: TeacherInfo) -> None:
    """A teacher no better than the unigram baseline teaches nothing; say so loudly."""
    margin = info.unigram_loss - info.val_loss
    if not math.isfinite(info.val_loss) or margin < 0.5:
        log.warning(
            "the teacher's val loss %.3f is barely below the unigram baseline %.3f; the demo's distillation "
            "will show little (give it more --minutes)",
            info.val_loss,
            info.unigram_loss,
        )


# ---- the recipe -----------------------------------------------------------------------------------


def teacher_tokenizer(out_dir: Path, corpus: Path, spec: TeacherSpec, data_cfg: Any, key: dict[str, Any]):
    """The saved teacher's tokenizer when it matches `key`, else a new one trained on the train documents."""
    from transformers import AutoTokenizer

    if load_teacher_info(out_dir / "teacher", key) is not None:
        return AutoTokenizer.from_pretrained(out_dir / "teacher")
    texts = train_texts(corpus, data_cfg)
    log.info("training a %d-token byte-level BPE tokenizer on %d train documents", spec.vocab_size, len(texts))
    return train_tokenizer(texts, spec.vocab_size)


def demo_teacher(
    out_dir: Path,
    spec: TeacherSpec,
    corpus: Path,
    data_cfg: Any,
    eval_sequences: int,
    device: str = "auto",
    stage: Callable[[str], AbstractContextManager] = lambda name: nullcontext(),
) -> tuple[Any, Any, TeacherInfo]:
    """The demo's teacher recipe, written once (the demo and the benchmarks that start where it does):
    `corpus` -> its key -> tokenizer -> token data (`data_cfg`) -> the trained teacher under `out_dir`
    (each reused when already there). Returns (tokenizer, data, teacher info); each step runs inside
    `stage(name)` ("tokenizer", "data", "teacher": the demo times them)."""
    key = teacher_key(spec, data_cfg.seq_len, corpus)
    with stage("tokenizer"):
        tokenizer = teacher_tokenizer(out_dir, corpus, spec, data_cfg, key)
    with stage("data"):
        data = prepare(data_cfg, tokenizer)
    with stage("teacher"):
        info = train_teacher(spec, key, tokenizer, data, out_dir, eval_sequences, device)
    return tokenizer, data, info
