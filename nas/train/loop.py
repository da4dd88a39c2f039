"""The knowledge-distillation loop: a student learns the teacher's next-token distribution (Minitron).

One optimizer step = `grad_accum` micro-batches of `batch_size` packed sequences. The loss is the
chunked forward KL(teacher || student) of `nas.train.kd` (with no teacher: plain LM loss, used for teacher
correction). Every `eval_every` steps and at the end the student is scored with `nas.evaluate.loss.lm_loss`
on the same fixed validation sequences (and its KL to the teacher on them). Checkpoints are atomic
directories `out_dir/checkpoints/step-XXXXXXX/`; calling `distill` again with the same `out_dir`
resumes from the latest one and reproduces the uninterrupted run (data batches are a pure function
of the step).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from nas.device import peak_bf16_tflops, precision_for, use_precision
from nas.errors import ConfigError, ModelError, NasError
from nas.evaluate.loss import lm_loss
from nas.io import append_log, check_identity, read_log, record_identity, save_model_atomic, write_text_atomic
from nas.model.families import decoder_layers, layer_units
from nas.model.head import head_weight
from nas.model.kernels import hub_kernels, kernel_paths_of, notice_slow_paths
from nas.settings import DistillConfig
from nas.train import dist
from nas.train.checkpoint import (
    cast_floating,
    gather_full_state,
    gather_model_state,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    tied_names,
)
from nas.train.kd import kl_to_teacher
from nas.train.optim import build_optimizer, lr_at, set_lr
from nas.train.run_files import (  # noqa: F401 (NOT_IDENTITY, RUN_FILES, clear_run: their old home)
    IDENTITY_FILE,
    NOT_IDENTITY,
    RUN_FILES,
    clear_run,
    restart_hint,
    run_identity,
)
from nas.train.speed import Speed, model_flops_per_token, use_speed_settings
from nas.train.teacher_cache import TeacherCache

log = logging.getLogger(__name__)


@dataclass
class Result:
    """What a run produced; `curve` has one {"step", "val_loss", "val_kl"} entry per evaluation."""

    out_dir: str
    steps: int
    tokens: int
    val_loss: float
    val_kl: float | None
    curve: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # the whole call: warm-up, steps, evaluations, checkpoints and the final write
    tokens_per_s: float = 0.0  # steady state: the train steps after the warm-up alone (`nas.train.speed`)
    speed: dict = field(default_factory=dict)  # `Speed.record()`: tokens/s, MFU, train and write seconds
    kernel_paths: dict = field(default_factory=dict)  # block type -> the kernels it ran (`nas.model.kernels`)


class NonFiniteLossError(NasError):
    """The training loss (or gradient norm) became NaN or infinite."""


def train_step(model, data, cfg: DistillConfig, optimizer, step: int, out: Path | None = None):
    """One optimizer step `step` (0-based) of the loop: learning rate, `grad_accum` micro-batches,
    clipping, the NaN check and the update. Returns (loss, kl, grad_norm, tokens); `out=None` (the
    memory plan's dry run on fake tensors, which hold no values) returns tensors and checks nothing."""
    set_lr(optimizer, lr_at(step, cfg))
    means, norm, tokens = _accumulate_grads(model, data, cfg, optimizer, step)
    if out is None:
        optimizer.step()
        return means[0], means[1], norm, tokens
    loss, kl = means.tolist()
    norm = norm.item()
    _check_finite(loss, norm, step + 1, out)
    optimizer.step()
    return loss, kl, norm, tokens


@dataclass
class _Run:
    """Mutable state of a run that checkpoints carry."""

    step: int = 0
    tokens: int = 0
    curve: list[dict] = field(default_factory=list)


def distill(
    teacher: nn.Module | TeacherCache | None,
    student: nn.Module,
    data: Any,
    cfg: DistillConfig,
    out_dir: str | os.PathLike,
    on_eval: Callable[[int, float], None] | None = None,
    fresh_on_change: bool = False,
    write_dtype: torch.dtype | None = None,
    speed: Speed | None = None,
    write: bool = True,
    start: Path | None = None,
) -> Result:
    """Train `student` in place to match `teacher` (forward KL on logits) on `data.train_batch`.

    `teacher=None` trains on the plain LM loss (teacher correction); a `TeacherCache` of exactly this
    run's batches trains on its cached targets (no teacher forward; no validation KL). `data` is a
    `nas.data.tokens.TokenData`.
    `on_eval(step, val_loss)` is called after every evaluation and its checkpoint; exceptions from it
    propagate (the search raises optuna.TrialPruned). Re-running with the same `out_dir` resumes from
    the latest checkpoint, if it was made with the same settings (`run_identity`, recorded in `run.json`);
    with others it raises ConfigError, or, with `fresh_on_change` (a search trial's directory, whose
    study checks the settings itself), starts afresh. Writes `metrics.jsonl`, `checkpoints/`, `model/`.
    Dtypes follow `cfg.precision` (`nas.device`): the student is cast to its master dtype here;
    load the teacher with `nas.model.load.load_teacher_and_student` (or in the policy's teacher dtype).
    `write_dtype`: the dtype `model/` is written in (default the master weights'; a trial writes its
    compute dtype, `trial_write_dtype`; `write=False`: no `model/` at all, for a run nothing reads after,
    e.g. a benchmark). `speed`: a `nas.train.speed.Speed` this call fills as it runs
    (steady tokens/s and MFU of the train steps alone), so a caller whose `on_eval` stops the run reads it.
    `start`: a checkpoint directory (of a run of the same student) whose weights and optimizer state this
    run starts from, at its own step 0 (a continued schedule, `nas.search.wsd`); `out_dir`'s own
    checkpoints come first when it has any.
    """
    with use_precision(cfg.precision):
        return _distill(teacher, student, data, cfg, Path(out_dir), on_eval, fresh_on_change,
                        write_dtype if write else False, speed, start)  # fmt: skip


def trial_write_dtype(cfg: DistillConfig) -> torch.dtype:
    """The dtype a search trial writes its student in: the run's compute dtype (bf16 on every bf16 policy,
    i.e. CUDA by default: half the bytes and time of fp32; fp32 under fp32, so a continued CPU run is exact)."""
    return precision_for(cfg.precision, dist.local_device(cfg.device)).teacher_dtype


def _distill(teacher, student, data, cfg: DistillConfig, out: Path, on_eval, fresh_on_change: bool,
             write_dtype: torch.dtype | None | bool = None, speed: Speed | None = None,
             start: Path | None = None) -> Result:  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    device = dist.local_device(cfg.device)
    dist.setup(device)
    identity = run_identity(teacher, student, data, cfg)
    try:
        check_identity(out / IDENTITY_FILE, identity, f"the run in {out}", restart_hint(out))
    except ConfigError as e:
        if not fresh_on_change:
            raise
        log.warning("%s: starting it afresh", e)
        if dist.world().main:
            clear_run(out)
        dist.barrier()
    torch.manual_seed(cfg.seed)
    student.to(device, dtype=precision_for(cfg.precision, device).student_dtype)  # the master weights
    cache = teacher if isinstance(teacher, TeacherCache) else None
    if cache is not None:
        cache.check_covers(cfg, data)
        teacher = None
    elif teacher is not None:
        teacher.to(device).eval()
    _check_vocab(teacher, student, cache)
    use_speed_settings(student, teacher, cfg)
    paths = kernel_paths_of(student, teacher, device, hub_kernels(student, teacher))
    notice_slow_paths(paths, device)
    speed = speed if speed is not None else Speed()
    speed.flops_per_token = model_flops_per_token(student, teacher)
    peak = peak_bf16_tflops(device)
    speed.peak_flops = peak * 1e12 * dist.world().size if peak else None
    model = dist.wrap(student, teacher, cfg, device, cache)  # before the optimizer: FSDP swaps parameters
    optimizer = build_optimizer(student, cfg, device)
    run = _resume(out, student, optimizer, cfg, dist.is_sharded(model), start)
    if dist.world().main and not (out / IDENTITY_FILE).is_file():
        record_identity(out / IDENTITY_FILE, identity)
    val = torch.as_tensor(data.val(cfg.eval_sequences), dtype=torch.long)
    start_time = time.perf_counter()
    _set_checkpointing(student, cfg.gradient_checkpointing)
    try:
        _train(model, data, cfg, out, optimizer, run, val, on_eval, speed)
    finally:
        _set_checkpointing(student, False)
        student.eval()
    if not run.curve or run.curve[-1]["step"] != run.step:  # a resumed run that had already finished
        _evaluate(model, val, cfg, out, run, on_eval)
    if write_dtype is not False:  # False: not written (`write=False`)
        write_start = time.perf_counter()
        _save_model(model, student, out / "model", write_dtype)
        speed.write_seconds = time.perf_counter() - write_start
    seconds = time.perf_counter() - start_time
    last = run.curve[-1]
    log.info("distilled %d steps (%d tokens): val loss %.4f; %s", run.step, run.tokens, last["val_loss"],
             speed.describe())  # fmt: skip
    return Result(
        out_dir=str(out),
        steps=run.step,
        tokens=run.tokens,
        val_loss=last["val_loss"],
        val_kl=last["val_kl"],
        curve=list(run.curve),
        seconds=seconds,
        tokens_per_s=speed.tokens_per_s,
        speed=speed.record(),
        kernel_paths=paths,
    )


def _save_model(model: nn.Module, student: nn.Module, dst: Path, dtype: torch.dtype | None = None) -> None:
    """The final `save_pretrained` export, by rank 0 (from the gathered full weights under FSDP), in
    `dtype` (None: the weights' own)."""
    state = gather_model_state(student) if dist.is_sharded(model) else None
    if dtype is not None and state is None and any(p.dtype != dtype for p in student.parameters()):
        state = dict(student.state_dict())
    for group in tied_names(student) if state else ():  # one shared tensor, as save_pretrained expects
        state.update({name: state[group[0]] for name in group})
    if state is not None and dtype is not None:
        state = cast_floating(state, dtype)
    if dist.world().main:
        save_model_atomic(student, dst, state)
    dist.barrier()


def _set_checkpointing(student: nn.Module, on: bool | tuple[str, ...]) -> None:
    """Activation (gradient) checkpointing of every decoder layer (True), of none (False), or of the layers whose
    own block type (`nas.model.families.layer_units`) is one of `on` (a hybrid's "mamba" / "linear_attention":
    their reference PyTorch paths save the most per layer, `nas.plan` checkpoints them first)."""
    prefix = "activation" if hasattr(student, "activation_checkpointing_enable") else "gradient"
    getattr(student, f"{prefix}_checkpointing_{'enable' if on else 'disable'}")()
    if not isinstance(on, tuple):
        return
    types = [units[0] for units in layer_units(student.config)]
    unknown = sorted(set(on) - set(types))
    if unknown:
        raise ConfigError(
            f"gradient_checkpointing names block types {unknown} that no layer of this model has "
            f"(its layers: {sorted(set(types))}); name some of those, or set true or false"
        )
    for layer, kind in zip(decoder_layers(student), types, strict=True):
        layer.gradient_checkpointing = kind in on  # transformers' GradientCheckpointingLayer flag


def _check_vocab(teacher: nn.Module | None, student: nn.Module, cache: TeacherCache | None) -> None:
    if teacher is None and cache is None:
        return
    t = cache.vocab_size if cache is not None else head_weight(teacher).shape[0]
    s = head_weight(student).shape[0]
    if t != s:
        raise ModelError(
            f"teacher and student vocabularies differ ({t} vs {s}); prune the student from this teacher"
        )


def _resume(out: Path, student: nn.Module, optimizer, cfg: DistillConfig, sharded: bool, start: Path | None) -> _Run:
    """Load the latest checkpoint (if any) into student and optimizer (on every rank); rank 0 cuts
    metrics.jsonl back to it. With none, `start`'s weights and optimizer state (if given), at step 0."""
    main = dist.world().main
    if main:
        for stale in (out / "checkpoints").glob(".tmp-*"):  # from a run killed while writing one
            shutil.rmtree(stale, ignore_errors=True)
    dist.barrier()
    path = latest_checkpoint(out)
    if path is None:
        if main:
            (out / "metrics.jsonl").unlink(missing_ok=True)
        if start is not None:
            load_checkpoint(start, student, optimizer, sharded)
            log.info("continuing the weights and optimizer state of %s", start)
        return _Run()
    state = load_checkpoint(path, student, optimizer, sharded)
    if state.get("config", {}).get("batch_size") != cfg.batch_size:
        log.warning("resuming %s with a different batch_size; the data order changes", path)
    if main:
        _truncate_metrics(out / "metrics.jsonl", state["step"])
    log.info("resumed from %s (step %d)", path, state["step"])
    return _Run(step=state["step"], tokens=state["tokens"], curve=state["curve"])


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of steps after `step` (they are about to be redone), atomically."""
    if not path.exists():
        return
    keep = [record for record in read_log(path) if record.get("step", step + 1) <= step]
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in keep))


def _train(
    model, data, cfg: DistillConfig, out: Path, optimizer, run: _Run, val, on_eval, speed: Speed
) -> None:
    """The step loop from `run.step` to `cfg.steps`; `model` is the wrapped `dist.StudentLoss`. Each
    optimizer step alone is timed into `speed` (evaluations, checkpoints and callbacks are not)."""
    window = {"loss": 0.0, "kl": 0.0, "n": 0, "tokens": 0, "t0": time.perf_counter()}
    loss_module = dist.unwrapped(model)
    desc = "train" if loss_module.teacher is None and loss_module.cache is None else "distill"
    bar = tqdm(total=cfg.steps, initial=run.step, disable=None if dist.world().main else True, desc=desc)
    device = next(loss_module.student.parameters()).device
    model.train()
    with bar:
        while run.step < cfg.steps:
            lr = lr_at(run.step, cfg)
            step_start = time.perf_counter()
            loss, kl, _, tokens = train_step(model, data, cfg, optimizer, run.step, out)
            _sync(device)  # the update's kernels are part of this step's time
            speed.add_step(tokens, time.perf_counter() - step_start)
            run.step += 1
            run.tokens += tokens
            _accumulate(window, loss, kl, tokens)
            bar.update(1)
            if run.step % max(cfg.log_every, 1) == 0 or run.step == cfg.steps:
                rate = _log_train(out, run, lr, window)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}")
            evaluate_now = run.step == cfg.steps or (cfg.eval_every and run.step % cfg.eval_every == 0)
            if evaluate_now:
                _evaluate(model, val, cfg, out, run, None)
            if cfg.checkpoint_every and (run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps):
                _checkpoint(model, optimizer, cfg, out, run)
            if evaluate_now and on_eval is not None:
                on_eval(run.step, run.curve[-1]["val_loss"])
                model.train()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _accumulate_grads(model, data, cfg: DistillConfig, optimizer, step: int):
    """Gradients of one optimizer step over `grad_accum` global micro-batches (each rank computes its
    rows; gradients are averaged on the last one), clipped. Returns the global [loss, kl] means and
    the gradient norm as tensors (no host sync), and the tokens; kl is NaN when there is no teacher."""
    student, cache = dist.unwrapped(model).student, dist.unwrapped(model).cache
    device = next(student.parameters()).device
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=device)
    kl_sum = torch.zeros((), device=device)
    tokens = 0
    for micro in range(cfg.grad_accum):
        index = step * cfg.grad_accum + micro
        offset = cfg.data_offset * cfg.grad_accum  # a continued run draws the batches after its first part's
        total = (cfg.data_offset + cfg.steps) * cfg.grad_accum
        batch = torch.as_tensor(data.train_batch(offset + index, cfg.batch_size, total), dtype=torch.long)
        mask = data.train_mask(offset + index, cfg.batch_size, total) if hasattr(data, "train_mask") else None
        mask = dist.local_rows(mask).to(device, non_blocking=True) if mask is not None else None
        tokens += batch.numel()
        targets = None
        if cache is not None:  # the teacher's outputs on this very batch, from disk
            targets = [dist.local_rows(t).to(device, non_blocking=True) for t in cache.targets(index, batch)]
        batch = dist.local_rows(batch).to(device, non_blocking=True)
        with dist.sync_context(model, micro == cfg.grad_accum - 1):
            loss, kl = model(batch, targets, loss_mask=mask)
            (loss / cfg.grad_accum).backward()
        loss_sum += loss.detach().float()
        kl_sum += kl.float() if kl is not None else math.nan
    params = [p for p in student.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    means = dist.global_mean(torch.stack([loss_sum, kl_sum]) / cfg.grad_accum)
    return means, dist.full_tensor(norm).float(), tokens


def _checkpoint(model, optimizer, cfg: DistillConfig, out: Path, run: _Run) -> None:
    """Rank 0 writes the checkpoint (FSDP: from the full state gathered by all ranks); all wait for it."""
    student = dist.unwrapped(model).student
    full = gather_full_state(student, optimizer) if dist.is_sharded(model) else None
    if dist.world().main:
        state = asdict(run) | {"config": cfg.to_dict()}
        save_checkpoint(out, run.step, student, optimizer, state, cfg.keep_checkpoints, full)
    dist.barrier()


def _check_finite(loss: float, norm: float, step: int, out: Path) -> None:
    """Stop before a NaN/inf update reaches the weights; the checkpoints on disk stay as they are."""
    if math.isfinite(loss) and math.isfinite(norm):
        return
    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
    last = latest_checkpoint(out)
    raise NonFiniteLossError(
        f"the training {what} is {value} at step {step}; stopped before updating the weights. "
        f"The last good checkpoint is kept ({last or 'none written yet'}); lower the learning rate "
        "or add warmup, then rerun to resume from it"
    )


def _accumulate(window: dict, loss: float, kl: float, tokens: int) -> None:
    window["loss"] += loss
    window["kl"] += kl
    window["n"] += 1
    window["tokens"] += tokens


def _log_train(out: Path, run: _Run, lr: float, window: dict) -> float:
    """Append a train line (means over the window since the last one); returns tokens/s."""
    now = time.perf_counter()
    rate = window["tokens"] / max(now - window["t0"], 1e-9)
    n = max(window["n"], 1)
    kl = window["kl"] / n
    record = {"step": run.step, "loss": window["loss"] / n, "kl": kl if math.isfinite(kl) else None}
    record |= {"val_loss": None, "val_kl": None, "lr": lr, "tokens": run.tokens, "tokens_per_s": rate}
    _append_metrics(out, record)
    window.update(loss=0.0, kl=0.0, n=0, tokens=0, t0=now)
    return rate


def _evaluate(model, val, cfg: DistillConfig, out: Path, run: _Run, on_eval) -> None:
    """Validation LM loss (the shared protocol) and KL to the teacher; logged, recorded, reported.
    Every rank scores the whole set (FSDP needs all of them in each forward); rank 0's numbers count."""

    def score(student, teacher):
        loss = lm_loss(student, val, cfg.eval_batch_size)
        kl = kl_to_teacher(student, teacher, val, cfg.eval_batch_size, cfg.chunk_tokens) if teacher else None
        return loss, kl

    with torch.no_grad():
        val_loss, kl = dist.from_rank_zero(dist.unwrapped(model)(fn=score))
    run.curve.append({"step": run.step, "val_loss": val_loss, "val_kl": kl})
    record = {"step": run.step, "loss": None, "kl": None, "val_loss": val_loss, "val_kl": kl}
    _append_metrics(out, record | {"lr": None, "tokens": run.tokens, "tokens_per_s": None})
    log.info("step %d: val loss %.4f%s", run.step, val_loss, f", val KL {kl:.4f}" if kl is not None else "")
    if on_eval is not None:
        on_eval(run.step, val_loss)


def _append_metrics(out: Path, record: dict) -> None:
    if dist.world().main:
        append_log(out / "metrics.jsonl", record)
