"""What a search loads once per process (creator or worker) and every trial reads: `SearchContext`.

Its own module so that the trial loop (`nas.search.trial`) and the adaptive horizon (`nas.search.horizon`)
both read it without importing each other or the strategies that built it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from nas.model.arch import Arch
from nas.prune.importance import Importance
from nas.search.horizon_plan import Horizon, resolve
from nas.search.strategy import Strategy
from nas.search.study import arch_key
from nas.settings import RunConfig
from nas.train.teacher_cache import TeacherCache
from nas.train.trackers import NO_TRACKERS, Trackers


@dataclass
class SearchContext:
    """Everything a trial needs, loaded once per process (creator or worker)."""

    cfg: RunConfig
    strategy: Strategy  # which candidates, in what order, with which sampler and pruner
    teacher: torch.nn.Module
    tokenizer: Any
    data: Any  # nas.data.tokens.TokenData
    importance: Importance
    candidates: list[Arch]  # in priority order (the funnel: each budget's shortlist, best screen first)
    teacher_cache: TeacherCache | None = None  # the horizon's teacher outputs (teacher then off the GPU)
    screen: dict[tuple[int, ...], dict] = field(default_factory=dict)  # key -> its screen (nas.search.funnel)
    kd_teacher: torch.nn.Module | None = None  # `distill_teacher`: the students' KD teacher (None: `teacher`)
    trackers: Trackers = NO_TRACKERS  # `report_to`: where each trial's metrics stream
    horizon: Horizon | None = None  # the search's horizon, resolved once (None: from `cfg`, fixed in tokens)

    def __post_init__(self) -> None:
        if self.horizon is None:
            self.horizon = resolve(self.cfg)

    @property
    def distill_from(self) -> torch.nn.Module:
        """The model the students are distilled from: `distill_teacher`, else the teacher they are cut from."""
        return self.kd_teacher if self.kd_teacher is not None else self.teacher

    @property
    def teacher_arch(self) -> Arch:
        return Arch.from_hf_config(self.teacher.config)

    @property
    def queued(self) -> bool:
        """Each candidate of the list in order from Optuna's queue (else the strategy's sampler proposes)."""
        return self.strategy.queued

    exhaustive = queued  # the older name

    def budget_sizes(self) -> dict[str | None, int]:
        """Budget label -> how many of its candidates the search distills (None: a search without a
        screen, e.g. TPE over one budget)."""
        sizes: dict[str | None, int] = {}
        for arch in self.candidates:
            budget = self.screen.get(arch_key(arch), {}).get("budget")
            sizes[budget] = sizes.get(budget, 0) + 1
        return sizes
