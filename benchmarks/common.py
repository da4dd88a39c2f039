"""What several benchmarks share: the demo's teacher and data (the recipe itself is
`nas.demo.teacher.demo_teacher`), seeded random token batches and random-weight models (speed and memory
do not depend on the values), and the context every row of the GPU acceptance run gets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from nas.demo.teacher import TeacherInfo, TeacherSpec, demo_teacher, write_corpus
from nas.settings import DataConfig


def demo_teacher_and_data(
    out: Path, spec: TeacherSpec, seq_len: int, eval_sequences: int, max_documents: int | None = None,
    device: str = "auto",
) -> tuple[Any, Any, TeacherInfo, DataConfig]:
    """The demo's corpus under `out` (its first `max_documents` chapters), then the demo's teacher recipe on
    it: (tokenizer, token data, teacher info, the data settings); reused from `out` when already there."""
    corpus = write_corpus(out / "corpus", max_documents)
    data_cfg = DataConfig.single(str(corpus), seq_len=seq_len, cache_dir=str(out / "cache"))
    tokenizer, data, info = demo_teacher(out, spec, corpus, data_cfg, eval_sequences, device)
    return tokenizer, data, info, data_cfg


def random_model(config, dtype: torch.dtype, device: torch.device):
    """The causal LM of `config` with random weights, initialised on `device` (fast on a GPU)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


class RandomTokens:
    """`TokenData`'s batch interface over seeded random token ids (memory and speed do not see values)."""

    fingerprint = "random"

    def __init__(self, seq_len: int, vocab_size: int) -> None:
        self.seq_len, self.vocab_size = seq_len, vocab_size

    def train_batch(self, index: int, batch_size: int, total: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(index)
        return torch.randint(0, self.vocab_size, (batch_size, self.seq_len), generator=g)

    def val(self, n: int) -> torch.Tensor:
        return self.train_batch(10**6, n, 0)

    calib = val


@dataclasses.dataclass
class Context:
    device: torch.device
    smoke: bool
    work: Path
    demo_minutes: float
    result: Path | None = None  # where the row's result goes (`record_partial` writes there first)
    partial: dict = dataclasses.field(default_factory=dict)  # what `record_partial` recorded last

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def record_partial(self, row: dict) -> None:
        """What the row knows so far, in its result file: a row the time guard stops (or an exception
        ends) still shows it."""
        self.partial = dict(row)
        if self.result is not None:
            from nas.io import write_text_atomic

            write_text_atomic(self.result, json.dumps(row, default=float))

    def verdict(self, ok: bool, needs_cuda: bool = False) -> str:
        """ok/FAIL only at full size on CUDA (see gpu_acceptance.py's docstring)."""
        if needs_cuda and not self.cuda:
            return "no GPU"
        return "smoke" if self.smoke else ("ok" if ok else "FAIL")
