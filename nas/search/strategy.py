"""Search strategies: which candidates a study distills and in what order, the Optuna sampler and pruner
that run them, and what the study records about them.

A strategy is one class behind `Strategy` (as an Optuna sampler or pruner is one class behind its base),
chosen by `search.strategy` (older studies: `search.sampler`). The built-ins:

- `Funnel` ("auto", "funnel"): screen every candidate of every budget, distill each budget's best
  `screen_top` by screen, best first, with successive halving within each budget (`FunnelPruner`).
- `Exhaustive` ("exhaustive"): every eligible candidate, best screen first (or largest first).
- `TPE` ("tpe"): Optuna's TPE samples one budget's space; nothing is screened or queued.

How to add a strategy (optuna's samplers are the model: an abstract base, explicit names, nothing
registered by being imported):

1. Subclass `Strategy`, or `ScreenFirst` when the strategy starts from the zero-shot screen of every
   candidate (then only `order(screened, teacher)` is needed: the candidates to distill, in order).
2. Override what differs: `candidates(inputs)` (which candidates, in what order, and the screen the study
   records), `sampler()` and `pruner(sizes)` (the Optuna objects), `description()` (the study's
   "sampler" attribute, in words), `record()` (more it wants the study to keep, under "strategy"),
   `target_trials(n)` (the finished trials the search wants), `extends_horizon()` (whether each budget's
   finalists distill on after the trials), and `queued` (True: every candidate is put in Optuna's trial
   queue once, in order, and each worker pulls the next; False: the sampler proposes candidates and a
   trial drawing a taken one yields).
3. Use it: `nas.pipeline.search(cfg, strategy=MyStrategy(cfg))`, e.g. a later stage of a cascade built
   with stage 1's winner (`Stage2(cfg, winner)`, whose `candidates` narrows `inputs.spaces` around it).
   A strategy that `search.strategy` names in a study TOML, so that workers joining through the storage
   rebuild it, is a built-in: one line in `STRATEGIES` below and one name in `nas.settings.base.STRATEGIES`
   (`tests/search/test_strategy.py` checks the two agree and runs its contract over every class).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import optuna

from nas.errors import ConfigError, InfeasibleError
from nas.model.arch import Arch
from nas.prune.space import within_memory
from nas.search.funnel import FunnelPruner, screen, shortlist
from nas.search.horizon_plan import Horizon, resolve
from nas.settings import RunConfig

if TYPE_CHECKING:
    from nas.prune.importance import Importance
    from nas.search.funnel import Screened as ScreenRow

DEFAULT_TRIALS = 20  # finished trials a sampled search wants by default: twice TPE's 10 random startup trials


@dataclass
class SearchInputs:
    """What a strategy may use to choose its candidates: the teacher, its importance, the data and every
    budget's space (`nas.prune.space.enumerate_budgets`: budget label -> candidates)."""

    cfg: RunConfig
    teacher: Any  # the teacher model
    importance: Importance
    data: Any  # nas.data.tokens.TokenData
    spaces: dict[str, list[Arch]]

    @property
    def teacher_arch(self) -> Arch:
        return Arch.from_hf_config(self.teacher.config)


@dataclass
class Candidates:
    """A strategy's choice: the candidates to distill in priority order, and the screen it measured
    (`nas.search.funnel.Screened.to_dict` rows; empty when it screened nothing)."""

    archs: list[Arch]
    screen: list[dict] = field(default_factory=list)


class Strategy(ABC):
    """One way to search. `cfg` is the study's RunConfig; the defaults suit a queued strategy (every
    candidate once, in the order `candidates` gives) pruned as `search.pruner` says."""

    name: ClassVar[str] = ""
    queued: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def candidates(self, inputs: SearchInputs) -> Candidates:
        """Which candidates the study distills, in priority order."""

    @cached_property
    def horizon(self) -> Horizon:
        """The study's horizon (`nas.search.horizon_plan`: `cfg` has it in tokens by the time a search runs)."""
        return resolve(self.cfg)

    def sampler(self) -> optuna.samplers.BaseSampler:
        """Queued trials carry their parameters, so the sampler is never asked (seeded all the same)."""
        return optuna.samplers.RandomSampler(seed=self.cfg.seed)

    def pruner(self, sizes: dict[str | None, int]) -> optuna.pruners.BasePruner:
        """`search.pruner`; `sizes`: budget label -> how many of its candidates the search distills."""
        s, h = self.cfg.search, self.horizon
        if s.pruner == "successive-halving":
            return self.halving(sizes)
        if s.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(
                min_resource=h.rung_steps, max_resource=h.steps, reduction_factor=s.reduction_factor
            )
        return optuna.pruners.NopPruner()

    def halving(self, sizes: dict[str | None, int]) -> optuna.pruners.BasePruner:
        """Successive halving within each budget, its first `finalists` and the first of each class (with
        `search.per_class`) never stopped."""
        s, h = self.cfg.search, self.horizon
        return FunnelPruner(h.rung_steps, h.steps, s.reduction_factor, s.finalists, sizes,
                            per_class=s.per_class > 0, screen_top=s.screen_top * s.small_space)  # fmt: skip

    def description(self) -> str:
        """The study's "sampler" attribute: the strategy in words."""
        return self.name

    def record(self) -> dict[str, Any]:
        """What the study records about its strategy (the "strategy" attribute; JSON values)."""
        return {"name": self.name, "queued": self.queued, "description": self.description()}

    def target_trials(self, n_candidates: int) -> int:
        """Finished trials the search wants: `n_trials`, at most every candidate."""
        return min(self.cfg.search.n_trials or n_candidates, n_candidates)

    def extends_horizon(self) -> bool:
        """Whether each budget's finalists distill on after the trials until their order holds (the
        adaptive horizon, `nas.search.horizon`); False: the trials' horizon is the last word."""
        return False


class ScreenFirst(Strategy):
    """A strategy that starts from the zero-shot screen of every candidate of every budget under the
    constraints (`nas.search.funnel.screen`) and distills the ones `order` picks, in its order."""

    def candidates(self, inputs: SearchInputs) -> Candidates:
        cfg = self.cfg
        screened = screen(
            inputs.teacher, inputs.importance, inputs.spaces, inputs.data.val(cfg.search.screen_sequences),
            cfg.constraints, cfg.depth_strategy,
        )  # fmt: skip
        for budget in inputs.spaces:
            if not any(x.budget == budget and not x.rejected for x in screened):
                reasons = {x.rejected.split(" ")[0] for x in screened if x.budget == budget}
                raise InfeasibleError(
                    f"every candidate of budget {budget} breaks a constraint ({', '.join(sorted(reasons))}); "
                    "relax [constraints] or raise the budget"
                )
        by_key = {x.key: Arch.from_dict(x.arch) for x in screened}
        order = self.order(screened, inputs.teacher_arch)
        return Candidates([by_key[x.key] for x in order], [x.to_dict() for x in screened])

    def extends_horizon(self) -> bool:
        """The adaptive horizon (`search.adaptive`): each budget's finalists distill on in rungs."""
        return self.cfg.search.adaptive

    @abstractmethod
    def order(self, screened: list[ScreenRow], teacher: Arch) -> list[ScreenRow]:
        """The screened candidates to distill, in order (`screened`: per budget, best screen first,
        rejected ones last; `teacher`: what a candidate's depth and width are compared against)."""


class Funnel(ScreenFirst):
    """Each budget's best `screen_top` by screen plus the best `per_class` of each depth and width-vs-depth
    class (`nas.search.funnel.shortlist`), best first; successive halving within each budget."""

    name = "funnel"

    def order(self, screened: list[ScreenRow], teacher: Arch) -> list[ScreenRow]:
        s = self.cfg.search
        lists = shortlist(screened, s.screen_top, s.per_class, teacher.to_dict())
        return [x for picked in lists.values() for x in picked]

    def description(self) -> str:
        s = self.cfg.search
        per_class = f" and the best {s.per_class} of each depth and class" if s.per_class else ""
        return f"funnel: the best {s.screen_top} of each budget's screen{per_class}, best first"


class Exhaustive(ScreenFirst):
    """Every eligible candidate: best screen first, or largest first (`search.order = "params"`)."""

    name = "exhaustive"

    def order(self, screened: list[ScreenRow], teacher: Arch) -> list[ScreenRow]:
        eligible = [s for s in screened if not s.rejected]
        if self.cfg.search.order == "params":
            eligible.sort(key=lambda s: -s.params)  # stable: budgets stay apart only by size, which is fine
        return eligible

    def description(self) -> str:
        return "every candidate, best screen first"


class TPE(Strategy):
    """Optuna's TPE samples one budget's space (within the memory limit) under a budget constraint;
    nothing is screened. Repeats of a candidate yield to its first trial (`nas.search.trial`)."""

    name = "tpe"
    queued = False

    def candidates(self, inputs: SearchInputs) -> Candidates:
        if len(inputs.spaces) > 1 or self.cfg.constraints.min_throughput:
            raise ConfigError(
                "search.strategy = tpe searches one budget with no throughput floor; use the funnel (auto)"
            )
        space = next(iter(inputs.spaces.values()))
        kept, _ = within_memory(space, self.cfg.constraints, inputs.teacher_arch)
        return Candidates(kept)

    def sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.TPESampler(seed=self.cfg.seed, multivariate=True)

    def halving(self, sizes: dict[str | None, int]) -> optuna.pruners.BasePruner:
        s = self.cfg.search  # sampled trials have no funnel: Optuna's own halving
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=self.horizon.rung_steps, reduction_factor=s.reduction_factor
        )

    def description(self) -> str:
        return "TPE with a budget constraint"

    def target_trials(self, n_candidates: int) -> int:
        return self.cfg.search.n_trials or DEFAULT_TRIALS


# `search.strategy` -> its class: fixed here, read where a study is built (`strategy_for`); the settings offer
# exactly these names (`nas.settings.base.STRATEGIES`)
STRATEGIES: dict[str, type[Strategy]] = {"auto": Funnel, "funnel": Funnel, "exhaustive": Exhaustive, "tpe": TPE}


def strategy_for(cfg: RunConfig) -> Strategy:
    """The built-in strategy `cfg.search.strategy` names."""
    try:
        return STRATEGIES[cfg.search.strategy](cfg)
    except KeyError:
        raise ConfigError(
            f"search.strategy {cfg.search.strategy!r} names no strategy; known: {', '.join(STRATEGIES)}"
        ) from None
