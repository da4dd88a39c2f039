"""The Optuna study: one trial = one candidate, pruned from the teacher and distilled for a short horizon.

Small spaces are searched exhaustively in a fixed priority order (each candidate once); large ones
are sampled with TPE under a budget constraint. Intermediate validation losses go to `trial.report`,
so successive halving (default) or Hyperband stops losing candidates early. Heartbeats plus
`RetryFailedTrialCallback` re-run trials whose worker died, resuming from their last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from nas.device import model_device
from nas.errors import InfeasibleError
from nas.model.arch import KNOBS, Arch, count_params, kv_cache_bytes
from nas.prune.cut import prune
from nas.prune.importance import Importance
from nas.search.study import CLAIMED, arch_key, done_trials, make_storage
from nas.settings import DistillConfig, RunConfig
from nas.train import dist
from nas.train.loop import NonFiniteLossError, distill

log = logging.getLogger(__name__)
INFEASIBLE_VALUE = 1e3  # objective of sampled archs outside the budget (they also violate the constraint)
MAX_TRIALS_PER_TARGET = 20  # a sampled search gives up after this many trials per wanted evaluation


@dataclass
class SearchContext:
    """Everything a trial needs, loaded once per process (creator or worker)."""

    cfg: RunConfig
    teacher: torch.nn.Module
    tokenizer: Any
    data: Any  # nas.data.tokens.TokenData
    importance: Importance
    candidates: list[Arch]  # in priority order

    @property
    def teacher_arch(self) -> Arch:
        return Arch.from_hf_config(self.teacher.config)

    @property
    def exhaustive(self) -> bool:
        mode = self.cfg.search.sampler
        return mode == "exhaustive" or (
            mode == "auto" and len(self.candidates) <= self.cfg.search.max_exhaustive
        )


class CandidateSampler(optuna.samplers.BaseSampler):
    """Hands each new trial the first candidate (in priority order) that no trial has claimed yet and
    that has not failed `max_failures` times already."""

    def __init__(self, candidates: list[Arch], max_failures: int) -> None:
        self.candidates = candidates
        self.max_failures = max_failures

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        chosen = next_unclaimed(
            study, self.candidates, self.max_failures, exclude=trial.number, prefix=trial.params
        )
        arch = chosen or self.candidates[0]  # exhausted: a duplicate the objective will refuse
        return getattr(arch, param_name)


def next_unclaimed(
    study, candidates, max_failures: int, exclude: int | None = None, prefix: dict | None = None
) -> Arch | None:
    """The first candidate with no live or finished trial that has failed fewer than `max_failures`
    times (a candidate that keeps failing, e.g. with a NaN loss, is given up instead of retried forever)."""
    claimed, failures = set(), Counter()
    for t in study.get_trials(deepcopy=False):
        params = t.params or t.system_attrs.get("fixed_params", {})
        if t.number == exclude:
            continue
        if t.state in CLAIMED and all(k in params for k in KNOBS):
            claimed.add(arch_key(params))
        elif t.state == TrialState.FAIL and "arch" in t.user_attrs and "duplicate_of" not in t.user_attrs:
            failures[arch_key(t.user_attrs["arch"])] += 1
    claimed |= {key for key, n in failures.items() if n >= max_failures}
    for arch in candidates:
        if arch_key(arch) not in claimed and all(getattr(arch, k) == v for k, v in (prefix or {}).items()):
            return arch
    return None


def suggest_arch(trial: optuna.Trial, ctx: SearchContext) -> Arch:
    """The trial's candidate: the knobs as integer params over the teacher's ranges."""
    teacher = ctx.teacher_arch
    if ctx.exhaustive:
        knobs = {k: trial.suggest_int(k, 1, getattr(teacher, k)) for k in KNOBS}
    else:
        values = {
            k: sorted({getattr(a, k) for a in ctx.candidates}) for k in KNOBS if k != "num_attention_heads"
        }
        knobs = {k: trial.suggest_categorical(k, v) for k, v in values.items()}
        per_group = trial.suggest_int("heads_per_group", 1, teacher.heads_per_group)
        knobs["num_attention_heads"] = knobs["num_query_groups"] * per_group
    return teacher.replace(**knobs)


def trial_dir(ctx: SearchContext, arch: Arch) -> Path:
    """Keyed by the candidate, not the trial, so a retried trial resumes the dead one's checkpoint."""
    return ctx.cfg.root / "trials" / arch.describe().replace(" ", "-").replace("/", "-")


def objective(trial: optuna.Trial, ctx: SearchContext) -> float:
    try:
        arch = suggest_arch(trial, ctx)
    except InfeasibleError:  # a sampled shape no model can have (e.g. hidden_size not divisible by heads)
        arch = None
    keys = {arch_key(a): i for i, a in enumerate(ctx.candidates)}
    if arch is None or arch_key(arch) not in keys:
        trial.set_constraint("budget", budget_violation(arch, ctx) if arch else 1.0)
        trial.set_user_attr("infeasible", True)
        return INFEASIBLE_VALUE
    if not ctx.exhaustive:
        trial.set_constraint("budget", 0.0)
    trial.set_user_attr("arch", arch.to_dict())  # the claim, written before looking for rivals
    duplicate = _finished_twin(trial, arch)
    if duplicate is not None:
        trial.set_user_attr("duplicate_of", duplicate)  # a lost race, not a failure of the candidate
        raise DuplicateCandidate(f"candidate {arch.describe()} already has trial {duplicate}")
    student = prune(ctx.teacher, arch, ctx.importance, ctx.cfg.depth_strategy)
    _describe_trial(trial, arch, keys[arch_key(arch)], student, ctx)
    out = trial_dir(ctx, arch)
    curve: list[dict] = []

    def on_eval(step: int, val_loss: float) -> None:
        curve.append({"step": step, "val_loss": val_loss})
        trial.set_user_attr("curve", curve)
        trial.report(val_loss, step)
        if dist.from_rank_zero(trial.should_prune()):  # the group's other processes stop with it
            trial.set_user_attr(
                "tokens", step * ctx.cfg.distill.batch_size * ctx.cfg.distill.grad_accum * ctx.data.seq_len
            )
            raise optuna.TrialPruned(f"pruned at step {step} (val loss {val_loss:.4f})")

    dist.from_rank_zero(arch.to_dict())  # a trial group: the other processes run this candidate too
    try:
        result = distill(ctx.teacher, student, ctx.data, trial_config(ctx), out, on_eval=on_eval)
    finally:  # a finished or stopped trial needs no resume state; a killed one keeps it for its retry
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    trial.set_user_attr("curve", result.curve)
    trial.set_user_attr("tokens", result.tokens)
    trial.set_user_attr("checkpoint", str(out / "model"))
    return result.val_loss


def trial_config(ctx: SearchContext) -> DistillConfig:
    """The KD settings of one trial; under torchrun every trial is one FSDP2 job over all processes."""
    cfg = ctx.cfg.short_distill()
    return dataclasses.replace(cfg, fsdp=True) if dist.world().size > 1 else cfg


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
            distill(ctx.teacher, student, ctx.data, trial_config(ctx), trial_dir(ctx, arch), on_eval=on_eval)


def budget_violation(arch: Arch, ctx: SearchContext) -> float:
    """How far (as a share of the budget) a sampled arch lies outside the budget window; > 0 is infeasible."""
    sizes = [count_params(a) for a in ctx.candidates]
    low, high, params = min(sizes), max(sizes), count_params(arch)
    return max(params - high, low - params, 1) / high


class DuplicateCandidate(Exception):
    """A trial drew a candidate another trial already evaluates (a race between workers)."""


def _finished_twin(trial: optuna.Trial, arch: Arch) -> int | None:
    """The number of another live or finished trial of the same candidate, if any. Each trial writes its
    claim before this check, so of two workers racing for one candidate the later to check always sees
    the other (both may yield; the candidate is then handed out again), and none is run twice."""
    for other in trial.study.get_trials(deepcopy=False, states=CLAIMED):
        twin = other.user_attrs.get("arch")
        if other.number != trial.number and twin and arch_key(twin) == arch_key(arch):
            return other.number
    return None


def _describe_trial(trial, arch: Arch, index: int, student, ctx: SearchContext) -> None:
    """User attrs of a claimed candidate ("arch" is already set: it is the claim)."""
    trial.set_user_attr("label", arch.describe())
    trial.set_user_attr("candidate", index)
    trial.set_user_attr("params", count_params(arch))
    trial.set_user_attr("kv_cache_bytes_per_token", kv_cache_bytes(arch))
    trial.set_user_attr("latency_tokens_per_s", measure_latency(student, ctx.cfg.search.latency_tokens))


@torch.no_grad()
def measure_latency(model: torch.nn.Module, tokens: int = 128, repeats: int = 3) -> float:
    """Forward throughput (tokens/s) of one sequence of `tokens` tokens on this machine (best of repeats)."""
    device = model_device(model)
    batch = torch.zeros(1, tokens, dtype=torch.long, device=device)
    model(input_ids=batch, use_cache=False)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(input_ids=batch, use_cache=False)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return tokens / best


def make_pruner(ctx: SearchContext) -> optuna.pruners.BasePruner:
    s = ctx.cfg.search
    if s.pruner == "successive-halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=s.eval_every, reduction_factor=s.reduction_factor
        )
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=s.eval_every, max_resource=s.horizon_steps, reduction_factor=s.reduction_factor
        )
    return optuna.pruners.NopPruner()


def make_sampler(ctx: SearchContext) -> optuna.samplers.BaseSampler:
    if ctx.exhaustive:
        return CandidateSampler(ctx.candidates, ctx.cfg.search.max_retry + 1)
    return optuna.samplers.TPESampler(seed=ctx.cfg.seed, multivariate=True)


def open_study(ctx: SearchContext, create: bool = True) -> optuna.Study:
    """Create or continue the study named `cfg.name` in the configured storage."""
    storage = make_storage(ctx.cfg.storage_url, ctx.cfg)
    return (
        optuna.create_study(
            study_name=ctx.cfg.name,
            storage=storage,
            load_if_exists=True,
            direction="minimize",
            sampler=make_sampler(ctx),
            pruner=make_pruner(ctx),
        )
        if create
        else optuna.load_study(
            study_name=ctx.cfg.name, storage=storage, sampler=make_sampler(ctx), pruner=make_pruner(ctx)
        )
    )


def target_trials(ctx: SearchContext) -> int:
    if ctx.exhaustive:
        return min(ctx.cfg.search.n_trials or len(ctx.candidates), len(ctx.candidates))
    return ctx.cfg.search.n_trials or 20


def run_trials(ctx: SearchContext, study: optuna.Study, max_trials: int | None = None) -> None:
    """Pull trials until the study has its target count of finished trials (or this worker's max)."""
    target = target_trials(ctx)
    max_failures = ctx.cfg.search.max_retry + 1
    ran = 0
    while done_trials(study) < target and (max_trials is None or ran < max_trials):
        if len(study.trials) >= MAX_TRIALS_PER_TARGET * target:  # a sampler stuck outside the space
            log.warning(
                "stopping after %d trials for %d evaluations; check the space", len(study.trials), target
            )
            break
        if not _waiting(study) and next_unclaimed(study, ctx.candidates, max_failures) is None:
            if not _running(study):
                break
            time.sleep(ctx.cfg.search.heartbeat_interval)  # others still running: wait for a retry or the end
            # only study.optimize fails stale trials; without this a dead worker's trial stays RUNNING forever
            optuna.storages.fail_stale_trials(study)
            continue
        study.optimize(
            # a diverging candidate fails its trial (and is retried up to max_retry), not the whole search
            lambda t: objective(t, ctx),
            n_trials=1,
            catch=(DuplicateCandidate, NonFiniteLossError),
            gc_after_trial=True,
        )
        ran += 1
    log.info("study %s: %d finished trials", study.study_name, done_trials(study))


def _waiting(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def _running(study: optuna.Study) -> bool:
    return bool(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
