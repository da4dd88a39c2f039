"""The demo's sizes and step counts (`DemoPlan`, scaled by `demo_plan(minutes)`) and its study
settings (`run_config`)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from nas.demo.teacher import TeacherSpec
from nas.errors import ConfigError
from nas.settings import run_config_from_dict

# tokens/s of each kind of training on 2 CPU cores (fp32), for the time estimates, evaluations and
# checkpoints included: plain LM training of the teacher, dense KD of a half-size student (student
# train + teacher forward: the winner's final run), the same from the teacher cache (no teacher forward:
# the trials), plain LM training of a student. Measured in one demo run on a shared 2-core host whose
# speed drifted by up to 1.7x within an hour (teacher 1,250-2,110 tok/s); these are from a slow phase.
RATES = {"teacher": 1730.0, "kd": 1800.0, "kd_cached": 3300.0, "scratch": 3500.0}


@dataclass(frozen=True)
class DemoPlan:
    """Every size and step count of one demo run; `demo_plan(minutes)` scales the step counts."""

    minutes: float = 10.0
    seq_len: int = 256
    max_documents: int | None = None  # of the corpus (None: every chapter)
    eval_sequences: int = 32  # validation sequences of every evaluation (the first n of data.val)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    budgets: tuple[str, ...] = ("35%", "50%")  # each gets its funnel; the report's fronts span them
    final_budget: str = "50%"  # the budget whose winner is fully distilled and compared with scratch
    space: dict[str, Any] = field(
        default_factory=lambda: {
            "tolerance": 0.1,
            "steps": {"hidden_size": 64, "ffn_hidden_size": 256, "num_query_groups": 2},
        }
    )
    importance: dict[str, Any] = field(
        default_factory=lambda: {"num_samples": 128, "val_sequences": 16, "batch_size": 16}
    )
    n_trials: int = 0  # 0: every shortlisted candidate
    screen_top: int = 4  # candidates per budget distilled after the screen
    finalists: int = 3  # of them, per budget, carried to the horizon
    teacher_cache: bool = True  # trials train from the teacher's top-k outputs, written once (1.5x faster)
    horizon_tokens: int = 30 * 8 * 256  # short KD of every trial: 30 steps of batch_size x seq_len
    rung_tokens: int = 10 * 8 * 256  # successive halving's rung size: 10 steps
    batch_size: int = 8  # of every KD / scratch step
    kd_lr: float = 1e-3
    final_steps: int = 70  # full KD of the winner, after its short run (the funnel costs more search)
    scratch_lr: float = 3e-3  # from-scratch training gets the teacher's recipe, not the KD one

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def estimates(self) -> dict[str, float]:
        """Seconds per stage on 2 CPU cores (RATES); search: per budget, the shortlist to the first rung
        and the finalists on to the horizon (at the cost of a half-size student: the smaller budgets
        are cheaper, the larger dearer)."""
        t = self.tokens_per_step
        teacher = self.teacher.steps * self.teacher.batch_size * self.seq_len / RATES["teacher"]
        per_budget = self.screen_top * self.rung_tokens + self.finalists * (self.horizon_tokens - self.rung_tokens)
        search_tokens = len(self.budgets) * per_budget
        trial_rate = RATES["kd_cached"] if self.teacher_cache else RATES["kd"]
        winner_tokens = self.horizon_tokens + self.final_steps * t
        return {
            "corpus": 2.0,
            "tokenizer": 3.0,
            "data": 5.0,
            "teacher": teacher,
            "search": 45.0 + search_tokens / trial_rate,  # + importance, screen, teacher cache
            "final": self.final_steps * t / RATES["kd"],
            "report": 5.0,
            "scratch": winner_tokens / RATES["scratch"],
            "compare": 5.0,
        }


def demo_plan(minutes: float = 10.0) -> DemoPlan:
    """The default plan with every step count scaled by `minutes / 10` (at least 2 steps each)."""
    if not minutes > 0:
        raise ConfigError(f"--minutes must be positive, got {minutes}")
    base = DemoPlan()
    scale = minutes / base.minutes

    def steps(n: int) -> int:
        return max(2, round(n * scale))

    per_step = base.tokens_per_step  # the token counts scale in whole steps
    rung = steps(base.rung_tokens // per_step) * per_step
    return replace(
        base,
        minutes=minutes,
        teacher=replace(base.teacher, steps=steps(base.teacher.steps)),
        horizon_tokens=max(steps(base.horizon_tokens // per_step) * per_step, 2 * rung),
        rung_tokens=rung,
        final_steps=steps(base.final_steps),
    )


def run_config(out: Path, corpus: Path, plan: DemoPlan, device: str):
    """The demo's `nas.settings.RunConfig`: the teacher under `out/teacher`, every output under `out`."""
    distill_cfg = {
        "batch_size": plan.batch_size,
        "lr": plan.kd_lr,
        "min_lr": plan.kd_lr / 10,
        "eval_sequences": plan.eval_sequences,
        "checkpoint_every": max(1, plan.rung_tokens // plan.tokens_per_step),  # at every rung
        "keep_checkpoints": 1,
        "device": device,
    }
    return run_config_from_dict(
        {
            "name": "demo",
            "teacher": str(out / "teacher"),
            "out_dir": str(out),
            "budget": list(plan.budgets),
            "final_budgets": [plan.final_budget],
            "device": device,
            "data": {
                "seq_len": plan.seq_len,
                "cache_dir": str(out / "cache"),
                "sources": [{"path": str(corpus)}],
            },
            "space": plan.space,
            "importance": plan.importance,
            "search": {
                "horizon_tokens": plan.horizon_tokens,
                "rung_tokens": plan.rung_tokens,
                "n_trials": plan.n_trials,
                "top_k": 3,
                "screen_top": plan.screen_top,
                "finalists": plan.finalists,
                "reduction_factor": 2,  # keep half at each rung (never fewer than the finalists)
                "teacher_cache": plan.teacher_cache,
                # the demo's time (DemoPlan.estimates) covers the funnel's top screen_top and the horizon
                # alone: the adaptive horizon's rungs and the per-class shortlist are off here
                "adaptive": False,
                "per_class": 0,
            },
            "distill": distill_cfg,
            "final": {"steps": plan.final_steps, "checkpoint_every": max(plan.final_steps // 2, 1)},
        }
    )
