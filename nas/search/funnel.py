"""The search funnel: screen every candidate cheaply, short-KD the best few with successive halving, and
carry at least `finalists` per budget to the full horizon.

The screen is the LM loss of each pruned candidate with no training, on a few validation sequences, all
in one batch: its cut comes from the importance order shared by every candidate (one sort per tensor),
its weights are index-selected straight from the teacher's tensors (the teacher is never copied), and
only one candidate lives at a time. The screen also applies the constraints: a candidate over the
memory limit is never built, one below the throughput floor is measured and dropped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import optuna
import torch
from torch import nn

from nas.device import model_device
from nas.evaluate.loss import lm_loss
from nas.model.arch import Arch
from nas.model.blocks import LAYER_KNOBS
from nas.model.size import count_params, kv_cache_bytes
from nas.prune.cut import prune
from nas.prune.importance import Importance
from nas.prune.space import memory_bytes, memory_violation
from nas.search.record import StudyRecord
from nas.search.study import arch_key
from nas.settings import ConstraintsConfig

log = logging.getLogger(__name__)


@dataclass
class Screened:
    """One candidate's screen: its zero-shot loss (None when a constraint rejected it first)."""

    budget: str
    arch: dict
    label: str
    params: int
    kv_cache_bytes_per_token: int
    memory_bytes: int
    loss: float | None = None
    tokens_per_s: float | None = None
    rejected: str = ""  # why a constraint rejected it ("" = eligible)
    rank: int | None = None  # 0 = best screen loss of its budget (eligible ones only)

    @property
    def key(self) -> tuple[int, ...]:
        return arch_key(self.arch)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def measure_throughput(model: nn.Module, tokens: int = 128, repeats: int = 3) -> float:
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


def screen(
    teacher: nn.Module,
    importance: Importance,
    spaces: dict[str, list[Arch]],
    sequences: torch.Tensor,
    constraints: ConstraintsConfig | None = None,
    depth_strategy: str = "drop-lowest",
) -> list[Screened]:
    """Screen every candidate of every budget (`spaces`: budget label -> candidates); the result lists
    them per budget, best screen loss first, rejected ones last. Pure: nothing is stored."""
    constraints = constraints or ConstraintsConfig()
    teacher_arch = Arch.from_hf_config(teacher.config)
    sequences = torch.as_tensor(sequences, dtype=torch.long)
    start, out = time.perf_counter(), []
    for budget, candidates in spaces.items():
        scored = [
            screen_one(
                teacher, importance, arch, budget, sequences, constraints, teacher_arch, depth_strategy
            )
            for arch in candidates
        ]
        out += rank_budget(scored)
    log.info(
        "screened %d candidates on %d sequences in %.1f s (%d rejected by a constraint)",
        len(out),
        len(sequences),
        time.perf_counter() - start,
        sum(bool(s.rejected) for s in out),
    )
    return out


def screen_one(
    teacher: nn.Module,
    importance: Importance,
    arch: Arch,
    budget: str,
    sequences: torch.Tensor,
    constraints: ConstraintsConfig,
    teacher_arch: Arch,
    depth_strategy: str,
) -> Screened:
    """The screen of one candidate: constraints first (memory is analytic: no weights are cut for a
    candidate over it), then the zero-shot loss of the pruned model on `sequences` in one batch."""
    row = Screened(budget, arch.to_dict(), arch.describe(), count_params(arch), kv_cache_bytes(arch),
                   memory_bytes(arch, constraints))  # fmt: skip
    over = memory_violation(arch, constraints, teacher_arch)
    if over > 0:
        row.rejected = f"memory {row.memory_bytes:,} B is {over:.1%} over constraints.max_memory"
        return row
    student = prune(teacher, arch, importance, depth_strategy)
    if constraints.min_throughput:
        row.tokens_per_s = measure_throughput(student, constraints.throughput_tokens)
        if row.tokens_per_s < constraints.min_throughput:
            row.rejected = f"throughput {row.tokens_per_s:,.0f} tokens/s < constraints.min_throughput"
            return row
    row.loss = lm_loss(student, sequences, batch_size=len(sequences))
    del student  # one candidate in memory at a time
    return row


def rank_budget(scored: list[Screened]) -> list[Screened]:
    """Eligible candidates by screen loss (ties: the earlier, i.e. larger, first), then the rejected."""
    eligible = sorted((s for s in scored if not s.rejected), key=lambda s: s.loss)
    for rank, s in enumerate(eligible):
        s.rank = rank
    return eligible + [s for s in scored if s.rejected]


# the unit kinds a candidate can cut, each from its knobs: a class is the set it cuts (`prune_class`)
CUT_AXES = {
    "depth": ("num_layers", *LAYER_KNOBS.values()),
    "hidden": ("hidden_size",),
    "mlp": ("ffn_hidden_size",),
    "attention": ("num_attention_heads", "num_query_groups"),
    "experts": ("num_experts",),
    "recurrent": ("num_linear_key_heads", "num_linear_value_heads", "num_mamba_heads", "mamba_head_dim"),
}  # fmt: skip


def prune_class(arch: dict, teacher: dict) -> str:
    """A candidate's class against the teacher: the unit kinds it cuts (`CUT_AXES`: depth, hidden, mlp,
    attention, experts, recurrent) joined by "+", e.g. "depth+hidden+mlp"; "none" when it cuts nothing.
    Finer than depth vs width because rankings flip along more axes than depth: Minitron §4.2 (depth vs
    width "flip around 200 steps"); ModelOpt's Nemotron-Nano-9B-v2 search keeps the attention heads as
    "harder to recover"; and here (benchmarks/search_quality.py, 25%-45%), candidates that keep every
    attention head rank low after a short KD and first or second after 10x the horizon."""
    cut = [axis for axis, knobs in CUT_AXES.items()
           if any(isinstance(arch.get(k), int) and arch[k] < teacher.get(k, 0) for k in knobs)]  # fmt: skip
    return "+".join(cut) or "none"


def shortlist(
    screened: list[Screened], top: int, per_class: int = 0, teacher: dict | None = None
) -> dict[str, list[Screened]]:
    """Per budget, in screen order: the best `top` eligible candidates, plus the best `per_class` of each
    depth (num_layers) and, given the teacher's arch, of each width-vs-depth class (`prune_class`): a
    class that looks worse before retraining (Minitron §4.2: depth vs width "flip around 200 steps")
    is still trained, so the screen never drops every candidate of a depth."""
    lists: dict[str, list[Screened]] = {}
    counts: dict[tuple, int] = {}
    for s in screened:  # per budget, best screen first
        if s.rejected:
            continue
        picked = lists.setdefault(s.budget, [])
        groups = [(s.budget, "num_layers", s.arch["num_layers"])]
        if teacher is not None:
            groups.append((s.budget, "class", prune_class(s.arch, teacher)))
        if len(picked) < top or any(counts.get(g, 0) < per_class for g in groups):
            picked.append(s)
            for g in groups:
                counts[g] = counts.get(g, 0) + 1
    return lists


def whole_space(screened: list[dict], budget: str | None, top: int) -> int | None:
    """The size of `budget`'s space when it is no larger than the funnel's shortlist (`top`, search.screen_top)
    would be anyway, else None. Such a space is not funnelled: every candidate runs to the horizon with no
    halving, and the best there is the pick with no longer rungs (the issue's 5-candidate space spent 0.6x of
    brute force's tokens through the funnel). `screened`: the study's screen rows (`Screened.to_dict`)."""
    eligible = sum(1 for s in screened if s.get("budget") == budget and not s.get("rejected"))
    return eligible if 0 < eligible <= top else None


def rungs(eval_every: int, horizon: int, reduction_factor: int) -> list[int]:
    """The steps at which successive halving decides: eval_every * rf^k below the horizon."""
    steps, step = [], eval_every
    while step < horizon:
        steps.append(step)
        step *= reduction_factor
    return steps


class FunnelPruner(optuna.pruners.BasePruner):
    """Successive halving within each budget's funnel (trials grouped by their "budget" attribute), with
    a floor: at every rung a trial continues when it ranks among the best
    max(finalists, ceil(n / rf^(k+1))) of its budget's trials that reached that rung, `n` being the
    budget's shortlist size. The first `finalists` trials of a budget thus always reach the horizon (and
    trials run best screen first, so those are the screen's favourites); later ones must beat them.
    Given the teacher's arch, the first trial of each class (`prune_class`) in its budget is never stopped
    either, so that no class is decided at a rung shorter than the horizon (the adaptive horizon then
    judges it against the others at longer scales)."""

    def __init__(
        self, eval_every: int, horizon: int, reduction_factor: int, finalists: int, sizes: dict[str, int],
        per_class: bool = False, screen_top: int = 0,
    ) -> None:  # fmt: skip
        self.rungs = rungs(eval_every, horizon, reduction_factor)
        self.reduction_factor = reduction_factor
        self.finalists = finalists
        self.sizes = sizes  # budget label -> shortlist size
        self.per_class = per_class
        self.screen_top = screen_top  # a budget with no more candidates is not halved (`whole_space`)
        self._whole: dict[str, bool] = {}

    def first_of_class(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        """Whether no earlier trial of the trial's budget has its class (against the teacher the study
        records, so that workers decide as the creating process does)."""
        teacher = (StudyRecord.read(study).identity or {}).get("teacher_arch") if self.per_class else None
        if not teacher or not trial.user_attrs.get("arch"):
            return False
        budget, mine = trial.user_attrs.get("budget", ""), prune_class(trial.user_attrs["arch"], teacher)
        return not any(
            t.number < trial.number and t.user_attrs.get("budget", "") == budget and t.user_attrs.get("arch")
            and prune_class(t.user_attrs["arch"], teacher) == mine
            for t in study.get_trials(deepcopy=False)
        )  # fmt: skip

    def small(self, study: optuna.Study, budget: str) -> bool:
        """Whether `budget`'s whole space is no larger than the shortlist (the study's recorded screen)."""
        if budget not in self._whole:
            screened = StudyRecord.read(study).screen or []
            self._whole[budget] = whole_space(screened, budget, self.screen_top) is not None
        return self._whole[budget]

    def quota(self, budget: str, rung_index: int) -> int:
        n = self.sizes.get(budget, self.finalists)
        return max(self.finalists, math.ceil(n / self.reduction_factor ** (rung_index + 1)))

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step not in self.rungs:
            return False
        budget = trial.user_attrs.get("budget", "")
        if self.small(study, budget):
            return False
        value = trial.intermediate_values[step]
        rivals = [
            (t.intermediate_values[step], t.number)
            for t in study.get_trials(deepcopy=False)
            if t.number != trial.number
            and t.user_attrs.get("budget", "") == budget
            and step in t.intermediate_values
        ]
        # ties go to the earlier trial (the better screen rank)
        rank = sum(v < value or (v == value and n < trial.number) for v, n in rivals if math.isfinite(v))
        if not math.isfinite(value):
            return True
        return rank >= self.quota(budget, self.rungs.index(step)) and not self.first_of_class(study, trial)
