"""The search horizon, in one place: `Horizon`, the run length of every candidate's short KD, resolved once
when a search starts (`resolve`) and held by the search context; everything that needs its steps or tokens
reads it.

The order, stated once (as nanochat's `base_train.py` decides its run length): `search.horizon_tokens`
as given; else (0) horizon_tokens_per_param x the largest budget's parameters, fixed into the config once
the teacher is known (`fix_horizon`, so the study records the tokens it ran); older studies' steps are
tokens by then (`nas.settings.legacy`, with this module's tokens a step). Steps are the tokens over the
tokens of one optimizer step, rounded up; the rungs (the halving's validations) are `rung_tokens`, else
horizon / 8.

No training code: `nas space` and `nas plan` read it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nas.errors import ConfigError
from nas.model.arch import Arch
from nas.prune.space import parse_budget
from nas.settings import DistillConfig, RunConfig
from nas.settings.search import MIN_HORIZON_FACTOR

# the [search] settings that set the horizon (a study's identity holds each: `nas.pipeline.identity`)
HORIZON_SETTINGS = ("horizon_tokens", "horizon_tokens_per_param", "rung_tokens")


@dataclass(frozen=True)
class Horizon:
    """One candidate's short KD: its tokens (steps x tokens_per_step), steps, steps between validations,
    and the adaptive horizon's token cap and floor (`search.max_horizon_factor`, `min_horizon_factor`)."""

    tokens: int
    steps: int
    rung_steps: int
    tokens_per_step: int
    cap: int
    floor: int

    def short_distill(self, cfg: RunConfig) -> DistillConfig:
        """The KD settings of one trial: `cfg.distill` with this horizon (and the study's seed)."""
        return cfg.distill.replace(steps=self.steps, eval_every=self.rung_steps, seed=cfg.seed)

    def record_fields(self) -> dict[str, int]:
        """The `StudyRecord` fields that keep this horizon (the study format's names)."""
        return {"horizon_steps": self.steps, "horizon_tokens": self.tokens, "tokens_per_step": self.tokens_per_step}


def tokens_per_step(cfg: RunConfig) -> int:
    """Training tokens of one optimizer step of the short runs (batch x accumulation x seq_len)."""
    return cfg.distill.batch_size * cfg.distill.grad_accum * cfg.data.seq_len


def fix_horizon(cfg: RunConfig, teacher: Arch) -> RunConfig:
    """`cfg` with its horizon fixed in tokens: `search.horizon_tokens = 0` becomes horizon_tokens_per_param
    x the largest budget's parameters (at least one step); a horizon already set is kept."""
    s = cfg.search
    if s.horizon_tokens:
        return cfg
    per_param = per_param_tokens(teacher, cfg.budgets, cfg.space.budget_kind, s.horizon_tokens_per_param)
    return cfg.replace(search=s.replace(horizon_tokens=max(per_param, tokens_per_step(cfg))))


def per_param_tokens(teacher: Arch, budgets: list[str], budget_kind: str, per_param: float) -> int:
    """`search.horizon_tokens = 0`: `per_param` tokens a parameter of the largest of `budgets`."""
    return round(per_param * max(parse_budget(b, teacher, budget_kind) for b in budgets))


def resolve(cfg: RunConfig, teacher: Arch | None = None) -> Horizon:
    """The horizon of `cfg` (`teacher`: needed only when `search.horizon_tokens = 0`, per parameter)."""
    if teacher is not None:
        cfg = fix_horizon(cfg, teacher)
    s, per_step = cfg.search, tokens_per_step(cfg)
    if not s.horizon_tokens:
        raise ConfigError(
            "search.horizon_tokens = 0 (per parameter) is fixed once the teacher is known "
            "(nas.search.horizon_plan.resolve with the teacher); set search.horizon_tokens to use it here"
        )
    steps = max(1, math.ceil(s.horizon_tokens / per_step))
    # Minitron §4: 400 steps, rankings compared every 50
    rung = max(1, math.ceil(s.rung_tokens / per_step)) if s.rung_tokens else max(1, steps // 8)
    tokens = steps * per_step
    floor = s.min_horizon_factor or min(MIN_HORIZON_FACTOR, s.max_horizon_factor)
    return Horizon(tokens, steps, rung, per_step, s.max_horizon_factor * tokens, floor * tokens)
