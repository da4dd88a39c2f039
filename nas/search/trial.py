"""The Optuna study: one trial = one candidate, pruned from the teacher and distilled for a short horizon.

The study's strategy (`nas.search.strategy`) chooses the candidates, their order, the sampler and the
pruner. A queued strategy's candidates (the funnel's shortlist of every budget, best screen first, or
every candidate): `enqueue_candidates` puts each in Optuna's
own trial queue once, in that priority order, with its budget (`Study.enqueue_trial(..., skip_if_exists=True)`: a continued study adds nothing
twice), and the storage hands each WAITING trial to exactly one worker (PostgreSQL: `SELECT ... FOR
UPDATE`; SQLite: see `nas.search.study`). A sampled strategy (TPE) proposes candidates of one budget's
space under a budget constraint. Intermediate validation losses go to `trial.report`, so successive halving (within each
budget, its first `finalists` never stopped) or Hyperband stops losing candidates early. A trial whose worker died goes stale (heartbeats) and is failed and re-enqueued
by `RetryHeartbeatStaleTrialCallback`; a trial that fails (a non-finite loss) is re-enqueued by
`retry_failed` through the same callback; both stop after `max_retry` retries (counted in the trial's
retry history). Trial directories are keyed by candidate, so a retry resumes the dead trial's checkpoint.

Hand-written parts kept, and why: (1) TPE proposes its own parameters, may propose a candidate twice, and
two workers may draw the same one at once; Optuna has no queue for that, so a sampled trial writes its
candidate first and then yields to any other live or finished trial of it (`_twin`). (2) Only
`study.optimize` checks for stale trials, so a worker with nothing to start but others running checks
them itself while it waits (else a dead worker's trial would stay RUNNING). (3) A worker that finds the
queue empty when its trial starts (another worker took the last one) must not evaluate a fresh trial:
`objective` refuses trials that did not come from the queue (`QueueEmpty`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from nas.device import resolve_device
from nas.errors import InfeasibleError
from nas.model.arch import Arch
from nas.model.size import count_budget_params, count_params, kv_cache_bytes
from nas.prune.cut import prune
from nas.prune.space import RATIO_KNOBS
from nas.search.funnel import measure_throughput
from nas.search.search_context import SearchContext
from nas.search.study import TrialRecord, arch_key, done_trials, make_storage
from nas.search.wsd import STABLE_DIR, distill_and_read
from nas.settings import DistillConfig
from nas.train import dist
from nas.train.loop import NonFiniteLossError, Result, distill, trial_write_dtype
from nas.train.speed import Speed
from nas.train.teacher_cache import teacher_source

log = logging.getLogger(__name__)
INFEASIBLE_VALUE = 1e3  # objective of sampled archs outside the budget (they also violate the constraint)
MAX_TRIALS_PER_TARGET = 20  # a sampled search gives up after this many trials per wanted evaluation


def enqueue_candidates(study: optuna.Study, ctx: SearchContext) -> None:
    """Queue every candidate of a queued search once, in priority order (a continued study skips the
    candidates that already have a trial, in any state)."""
    for index, arch in enumerate(ctx.candidates):
        screened = ctx.screen.get(arch_key(arch), {})  # its budget groups it for the halving pruner
        record = TrialRecord(arch=arch.to_dict(), label=arch.describe(), candidate=index, budget=screened.get("budget"),
                             screen_rank=screened.get("rank"), screen_loss=screened.get("loss"))  # fmt: skip
        params = {k: getattr(arch, k) for k in arch.knobs}  # every knob fixed, num_experts too
        study.enqueue_trial(params, user_attrs=record.attrs(), skip_if_exists=True)


def suggest_arch(trial: optuna.Trial, ctx: SearchContext) -> Arch:
    """The trial's candidate: the knobs as integer params over the teacher's ranges."""
    teacher = ctx.teacher_arch
    if ctx.queued:
        knobs = {k: trial.suggest_int(k, 1, getattr(teacher, k)) for k in teacher.knobs}
    else:
        ratios = [r for r in RATIO_KNOBS if r[0] in teacher.knobs]  # heads per group, values per key head
        derived = {knob for knob, _, _ in ratios}
        values = {k: sorted({getattr(a, k) for a in ctx.candidates}) for k in teacher.knobs if k not in derived}
        knobs = {k: trial.suggest_categorical(k, v) for k, v in values.items()}
        for knob, base, ratio in ratios:
            knobs[knob] = knobs[base] * trial.suggest_int(ratio, 1, getattr(teacher, ratio))
    return teacher.replace(**knobs)


def trial_dir(ctx: SearchContext, arch: Arch) -> Path:
    """Keyed by the candidate, not the trial, so a retried trial resumes the dead one's checkpoint."""
    return ctx.cfg.root / "trials" / arch.describe().replace(" ", "-").replace("/", "-")


class QueueEmpty(Exception):
    """A queued search's worker started a trial after another worker took the last queued one."""


def objective(trial: optuna.Trial, ctx: SearchContext) -> float:
    if ctx.queued and TrialRecord.read(trial).candidate is None:
        raise QueueEmpty(f"trial {trial.number}: no queued candidate left")
    try:
        arch = suggest_arch(trial, ctx)
    except InfeasibleError:  # a sampled shape no model can have (e.g. hidden_size not divisible by heads)
        arch = None
    keys = {arch_key(a): i for i, a in enumerate(ctx.candidates)}
    if arch is None or arch_key(arch) not in keys:
        trial.set_constraint("budget", budget_violation(arch, ctx) if arch else 1.0)
        TrialRecord(infeasible=True).write(trial)
        return INFEASIBLE_VALUE
    if not ctx.queued:
        trial.set_constraint("budget", 0.0)
        TrialRecord(arch=arch.to_dict()).write(trial)  # the claim, written before looking for rivals
        duplicate = _twin(trial, arch)
        if duplicate is not None:
            TrialRecord(duplicate_of=duplicate).write(trial)  # a repeat or a lost race, not a failure
            raise DuplicateCandidate(f"candidate {arch.describe()} already has trial {duplicate}")
    student = prune(ctx.teacher, arch, ctx.importance, ctx.cfg.depth_strategy)
    student.to(resolve_device(ctx.cfg.device))  # where it trains, also when the teacher waits on the CPU
    _describe_trial(trial, arch, keys[arch_key(arch)], student, ctx)
    out = trial_dir(ctx, arch)
    curve: list[dict] = []
    speed = Speed()  # filled as the trial runs, so a stopped trial records its speed too

    def on_eval(step: int, val_loss: float) -> None:
        ctx.trackers.stream(f"trial_{trial.number}", out / "metrics.jsonl")
        curve.append({"step": step, "val_loss": val_loss})
        TrialRecord(curve=curve).write(trial)
        trial.report(val_loss, step)
        if dist.from_rank_zero(trial.should_prune()):  # the group's other processes stop with it
            tokens = step * ctx.cfg.distill.batch_size * ctx.cfg.distill.grad_accum * ctx.data.seq_len
            TrialRecord(tokens=tokens, **speed_attrs(speed.record())).write(trial)
            raise optuna.TrialPruned(f"pruned at step {step} (val loss {val_loss:.4f})")

    dist.from_rank_zero(arch.to_dict())  # a trial group: the other processes run this candidate too
    try:
        result = train_trial(ctx, student, out, on_eval, speed)
    except optuna.TrialPruned:  # a stopped trial is never continued: no stable state kept
        shutil.rmtree(out / STABLE_DIR, ignore_errors=True)
        raise
    finally:  # a finished or stopped trial needs no resume state; a killed one keeps it for its retry
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        ctx.trackers.stream(f"trial_{trial.number}", out / "metrics.jsonl")
    TrialRecord(curve=result.curve, tokens=result.tokens, checkpoint=str(out / "model"),
                kernel_paths=result.kernel_paths, **speed_attrs(result.speed)).write(trial)  # fmt: skip
    return result.val_loss


def train_trial(ctx: SearchContext, student, out: Path, on_eval, speed: Speed | None = None) -> Result:
    """One trial's KD (`search.rung_schedule`): one schedule to the horizon, or (wsd) its stable phase and
    the decay branch that reads it (`nas.search.wsd`). The result's curve is the one `on_eval` saw (the
    stable phase's under wsd), its tokens all the trial's, its val loss the one the trial is ranked by;
    `speed` is the trial's steady speed (the stable phase's under wsd)."""
    run = trial_config(ctx)
    if ctx.cfg.search.rung_schedule == "wsd":
        stable, read = distill_and_read(ctx, student, run, out, on_eval, speed=speed)
        return dataclasses.replace(stable, tokens=stable.tokens + read.tokens, val_loss=read.val_loss)
    teacher = teacher_source(ctx.distill_from, ctx.teacher_cache, run, ctx.data)  # the cache when there is one
    return distill(teacher, student, ctx.data, run, out, on_eval=on_eval, fresh_on_change=True,
                   write_dtype=trial_write_dtype(run), speed=speed)  # fmt: skip


def speed_attrs(speed: dict) -> dict:
    """A trial record's speed fields from `Speed.record()`."""
    return {"kd_tokens_per_s": speed["tokens_per_s"], "kd_mfu": speed["mfu"], "kd_speed": speed}


def trial_config(ctx: SearchContext) -> DistillConfig:
    """The KD settings of one trial; under torchrun every trial is one FSDP2 job over all processes."""
    cfg = ctx.horizon.short_distill(ctx.cfg)
    return cfg.replace(fsdp=True) if dist.world().size > 1 else cfg


def follow_trials(ctx: SearchContext) -> None:
    """The processes other than rank 0 of a trial group: train every candidate rank 0 hands out (same
    student, same batches: each process its share of them), stop a trial when rank 0's pruner does,
    and return when rank 0 sends None (it alone talks to the study)."""
    while (arch_dict := dist.from_rank_zero(None)) is not None:
        arch = Arch.from_dict(arch_dict)
        student = prune(ctx.teacher, arch, ctx.importance, ctx.cfg.depth_strategy)

        def on_eval(step: int, val_loss: float) -> None:
            if dist.from_rank_zero(None):
                raise optuna.TrialPruned()

        with contextlib.suppress(optuna.TrialPruned, NonFiniteLossError):
            train_trial(ctx, student, trial_dir(ctx, arch), on_eval)


def budget_violation(arch: Arch, ctx: SearchContext) -> float:
    """How far (as a share of the budget) a sampled arch lies outside the budget window; > 0 is infeasible."""
    kind = ctx.cfg.space.budget_kind
    sizes = [count_budget_params(a, kind) for a in ctx.candidates]
    low, high, params = min(sizes), max(sizes), count_budget_params(arch, kind)
    return max(params - high, low - params, 1) / high


class DuplicateCandidate(Exception):
    """A sampled trial drew a candidate another trial already evaluates (TPE only)."""


def _twin(trial: optuna.Trial, arch: Arch) -> int | None:
    """The number of another live or finished trial of the same candidate, if any. Each sampled trial
    writes its candidate before this check, so of two workers racing for one candidate the later to check
    always sees the other (both may yield), and none is run twice."""
    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    for other in trial.study.get_trials(deepcopy=False, states=live):
        twin = TrialRecord.read(other).arch
        if other.number != trial.number and twin and arch_key(twin) == arch_key(arch):
            return other.number
    return None


def _describe_trial(trial, arch: Arch, index: int, student, ctx: SearchContext) -> None:
    """What a trial records about its candidate before training."""
    TrialRecord(
        arch=arch.to_dict(),
        label=arch.describe(),
        candidate=index,
        params=count_params(arch),
        active_params=count_params(arch, active=True) if arch.num_experts else None,
        kv_cache_bytes_per_token=kv_cache_bytes(arch),
        latency_tokens_per_s=measure_latency(student, ctx.cfg.search.latency_tokens),
    ).write(trial)


measure_latency = measure_throughput  # the name trials and the report use


def open_study(ctx: SearchContext, create: bool = True) -> optuna.Study:
    """Create or continue the study named `cfg.name` in the configured storage."""
    storage = make_storage(ctx.cfg.storage_url, ctx.cfg)
    return (
        optuna.create_study(
            study_name=ctx.cfg.name,
            storage=storage,
            load_if_exists=True,
            direction="minimize",
            sampler=ctx.strategy.sampler(),
            pruner=ctx.strategy.pruner(ctx.budget_sizes()),
        )
        if create
        else optuna.load_study(
            study_name=ctx.cfg.name,
            storage=storage,
            sampler=ctx.strategy.sampler(),
            pruner=ctx.strategy.pruner(ctx.budget_sizes()),
        )
    )


def target_trials(ctx: SearchContext) -> int:
    return ctx.strategy.target_trials(len(ctx.candidates))


def retry_failed(ctx: SearchContext):
    """An `optimize` callback: re-enqueue a candidate whose trial failed (a non-finite loss) until it has
    been retried `max_retry` times; then it is given up."""
    with warnings.catch_warnings():  # experimental since Optuna 2.8 and still: not the user's concern
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=ctx.cfg.search.max_retry)

    def callback(study: optuna.Study, trial: FrozenTrial) -> None:
        record = TrialRecord.read(trial)
        if trial.state == TrialState.FAIL and record.arch and record.duplicate_of is None:
            retry(study, trial)

    return callback


def run_trials(ctx: SearchContext, study: optuna.Study, max_trials: int | None = None) -> None:
    """Pull trials until the study has its target count of finished trials (or this worker's max)."""
    target = target_trials(ctx)
    callbacks = [retry_failed(ctx)] if ctx.queued else []  # TPE samples anew instead
    callbacks.append(lambda study, _: report_progress(ctx, study))
    ran = 0
    while done_trials(study) < target and (max_trials is None or ran < max_trials):
        stuck = not ctx.queued and len(study.trials) >= MAX_TRIALS_PER_TARGET * target
        if stuck:  # a sampler stuck outside the space (a queue holds each candidate once: it cannot be)
            log.warning(
                "stopping after %d trials for %d evaluations; check the space", len(study.trials), target
            )
            break
        if ctx.queued and not _has(study, TrialState.WAITING):
            if not _has(study, TrialState.RUNNING):
                break  # every candidate evaluated or given up
            time.sleep(ctx.cfg.search.heartbeat_interval)  # others still running: wait for a retry or the end
            # only study.optimize fails stale trials; without this a dead worker's trial stays RUNNING forever
            with warnings.catch_warnings():  # experimental in Optuna: not the user's concern (as above)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
            continue
        study.optimize(
            # a diverging candidate fails its trial (and is retried up to max_retry), not the whole search
            lambda t: objective(t, ctx),
            n_trials=1,
            catch=(DuplicateCandidate, NonFiniteLossError, QueueEmpty),
            callbacks=callbacks,
            gc_after_trial=True,
        )
        ran += 1
    log.info("study %s: %d finished trials", study.study_name, done_trials(study))


def report_progress(ctx: SearchContext, study: optuna.Study) -> None:
    """The study's progress to its trackers: finished trials, the horizon, the best val loss so far."""
    losses = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    losses = [v for v in losses if v is not None and v < INFEASIBLE_VALUE]
    values = {"trials_done": done_trials(study), "trials_target": target_trials(ctx),
              "horizon_tokens": ctx.horizon.tokens, "best_val_loss": min(losses, default=None)}  # fmt: skip
    ctx.trackers.progress(done_trials(study), values)


def _has(study: optuna.Study, state: TrialState) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(state,)))
