"""Rungs read from one continuing schedule (`search.rung_schedule = "wsd"`): warmup-stable-decay as MiniCPM
uses it to read a run at any length (arXiv 2404.06395 §4: the loss of a constant-LR run, decayed for ~10%
of its tokens, is what a run that ended there reaches; the stable checkpoint goes on).

A trial (and each rung of the adaptive horizon after it) trains its stable phase at constant LR in
`<out>/stable/`, which ends with a checkpoint of the weights AND the optimizer state; the trial is read
by a decay branch from that checkpoint: `decay_fraction` x the tokens so far more steps on the batches
after them, the LR falling linearly from `lr` to `min_lr`, with the stable phase's AdamW moments. The
branch's model (`<out>/model`) and its validation loss are the read; the branch is never continued. The
next rung resumes the stable checkpoint (weights and optimizer state, no new warmup), and the winner's
final distillation continues it too and ends with the decay (`final_run`), so that the trials, the rungs
and the final distillation are pieces of one schedule. "restart" (the older rungs): each rung and the final
distillation start a fresh schedule from the last rung's weights, with new optimizer moments.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from nas.model.load import load_model
from nas.settings import DistillConfig
from nas.train.checkpoint import latest_checkpoint
from nas.train.loop import Result, distill, trial_write_dtype
from nas.train.speed import Speed
from nas.train.teacher_cache import teacher_source

if TYPE_CHECKING:
    from nas.search.search_context import SearchContext

STABLE_DIR = "stable"  # under a trial's (or a rung's) directory: the stable phase and its checkpoint


def stable_run(run: DistillConfig) -> DistillConfig:
    """The stable phase of `run`: its warmup, then constant LR, with a checkpoint at its last step (what
    the decay branch and the next rung start from)."""
    return run.replace(schedule="constant", checkpoint_every=run.checkpoint_every or run.steps)


def decay_run(run: DistillConfig, done_steps: int) -> DistillConfig:
    """The decay branch after `done_steps` stable steps: `decay_fraction` x them, on the batches after,
    the LR from lr to min_lr."""
    steps = max(1, round(run.decay_fraction * done_steps))
    return run.replace(steps=steps, data_offset=done_steps, warmup_steps=0, schedule="wsd", decay_fraction=1.0,
                       eval_every=0, checkpoint_every=0)  # fmt: skip


def stable_state(model_dir: str | Path) -> Path | None:
    """The stable checkpoint next to a read model `<out>/model` (None: a restart trial's, or deleted)."""
    return latest_checkpoint(Path(model_dir).parent / STABLE_DIR)


def distill_and_read(ctx: SearchContext, student, run: DistillConfig, out: Path, on_eval=None,
                     start: Path | None = None, speed: Speed | None = None) -> tuple[Result, Result]:  # fmt: skip
    """The stable phase of `run` in `out/stable` (from `start`'s weights and optimizer state when given),
    then its decay branch in `out` on a copy of the student (the stable phase's saved model: FSDP shards the
    student in place). Returns (stable, read) results; `student` ends at the stable weights."""
    first = stable_run(run)
    teacher = teacher_source(ctx.distill_from, ctx.teacher_cache, first, ctx.data)
    stable = distill(teacher, student, ctx.data, first, out / STABLE_DIR, on_eval=on_eval, fresh_on_change=True,
                     start=start, speed=speed)  # fmt: skip
    branch = decay_run(run, run.data_offset + run.steps)
    teacher = teacher_source(ctx.distill_from, ctx.teacher_cache, branch, ctx.data)
    student_copy = load_model(out / STABLE_DIR / "model", kernels=ctx.cfg.kernels)
    read = distill(teacher, student_copy, ctx.data, branch, out, fresh_on_change=True,
                   start=latest_checkpoint(out / STABLE_DIR), write_dtype=trial_write_dtype(branch))  # fmt: skip
    return stable, read


def final_run(final: DistillConfig) -> DistillConfig:
    """The winner's final distillation as the rest of its schedule: no new warmup, stable, then the decay."""
    return final.replace(schedule="wsd", warmup_steps=0)
