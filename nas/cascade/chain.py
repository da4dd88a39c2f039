"""The stages of a cascade (`cascade = true`, `iterative_step`): which sizes are cut, in what order,
and from which model (pure: sizes only, no weights).

- **Cascade** (Minitron, arXiv 2407.14679: its 4B is pruned from the distilled 8B, not from the 15B): the
  budgets are taken largest first, and each stage after the first starts from the previous stage's
  distilled winner. Every budget is still parsed against the ORIGINAL teacher, so "25%" means 25% of the
  teacher's parameters in a cascade and in a one-shot study alike.
- **Iterative pruning** (NVIDIA's guidance beyond ~50% reduction: cut ~30%, distill, cut again): with
  `iterative_step = s`, no stage cuts more than the share `s` of the size it starts from. A gap from size
  `a` to a smaller target `b` (the teacher to the first budget, or between consecutive budgets of a
  cascade) that is deeper than that is crossed in `n = ceil(log(b / a) / log(1 - s))` cuts of equal ratio
  `(b / a) ** (1 / n)`: the `n - 1` sizes between are *intermediate* stages (unnamed budgets, each
  distilled for `intermediate_share` of the final steps). E.g. 25% with s = 30%: 4 cuts of 29.3% each,
  through 70.7%, 50% and 35.4%; with s = 50%: through 50%. Equal ratios make every cut as shallow as the
  step allows, and the sizes depend only on the budgets (not on the winners found), so the whole chain is
  known before the first stage runs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from nas.errors import ConfigError
from nas.model.arch import Arch
from nas.model.size import count_budget_params
from nas.prune.space import parse_budget
from nas.settings import RunConfig
from nas.settings.run_config import step_fraction


@dataclass(frozen=True)
class CascadeStage:
    """One stage of a cascade: a search and a full distillation at `params` (a share of the original teacher),
    starting from stage `source` (0: the teacher)."""

    index: int  # 1, 2, ... in the order they run
    params: int  # the stage's budget, in parameters of the original teacher's budget_kind
    share: float  # params / the original teacher's
    label: str  # the budget as written (a named member) or its share, e.g. "50%" (intermediate)
    named: bool  # one of the study's budgets (a member of the cascade), not an intermediate cut
    source: int  # the stage whose winner it is cut from (0: the teacher)
    token_share: float  # its full distillation's steps, as a share of final.steps

    @property
    def slug(self) -> str:
        """Its directory and study-name part, e.g. "2-50pct" (intermediate: "2-50pct-step")."""
        text = self.label.replace("%", "pct").replace("/", "-").replace(" ", "").replace(".", "p")
        return f"{self.index}-{text}" + ("" if self.named else "-step")

    def to_dict(self) -> dict:
        return {**asdict(self), "slug": self.slug}


def cuts_between(start: int, target: int, step: float | None) -> list[int]:
    """The sizes from `start` down to `target` (excluded start, included target) with no cut deeper than
    `step` (None: one cut)."""
    if step is None or target >= start * (1 - step):
        return [target]
    ratio = target / start
    n = math.ceil(math.log(ratio) / math.log(1 - step) - 1e-9)
    return [round(start * ratio ** (k / n)) for k in range(1, n)] + [target]


def cascade_stages(cfg: RunConfig, teacher: Arch) -> list[CascadeStage]:
    """The stages `nas run` runs for a chained study (`cfg.chained`), in order; one stage per budget when
    neither `cascade` nor `iterative_step` is set (every stage then starts from the teacher)."""
    kind = cfg.space.budget_kind
    total = count_budget_params(teacher, kind)
    sizes = {b: parse_budget(b, teacher, kind) for b in cfg.budgets}
    if len(set(sizes.values())) != len(sizes):
        raise ConfigError(f"budgets {cfg.budgets} name the same size twice; give distinct budgets")
    order = sorted(sizes, key=lambda b: -sizes[b]) if cfg.chained else list(sizes)
    step = step_fraction(cfg.iterative_step) if cfg.iterative_step else None
    stages: list[CascadeStage] = []
    current = total
    for budget in order:
        if not cfg.chained:
            current = total
        cuts = cuts_between(current, sizes[budget], step)
        for k, params in enumerate(cuts):
            named = k == len(cuts) - 1
            stages.append(
                CascadeStage(
                    index=len(stages) + 1,
                    params=params,
                    share=params / total,
                    label=budget if named else f"{100 * params / total:.3g}%",
                    named=named,
                    source=len(stages) if cfg.chained else 0,
                    token_share=1.0 if named else cfg.intermediate_share,
                )
            )
        current = sizes[budget]
    return stages
