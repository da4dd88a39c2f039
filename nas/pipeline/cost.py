"""How long a study takes and what it costs, before it runs (`nas plan`'s time table): the KD tokens of
each stage, their FLOPs, and hours on the user's GPUs at a measured throughput or a stated MFU.

Stages, as `nas run` runs them: the importance pass (teacher forwards), the screen (every candidate of
every budget cut and scored on `screen_sequences`), the trials (each distilled for the horizon), the
adaptive horizon (each budget's best `stable_top` distilled on in doubling rungs up to
`max_horizon_factor` horizons: its worst case) and the final distillation of each final budget.

Tokens are exact where nas decides them (the horizon, the rungs, the final distillation) and an upper
bound where the study does: every trial runs its whole horizon (the halving stops some early; with
`pruner = "none"` none is stopped) and the funnel's shortlist is at most `screen_top` plus `per_class`
of every depth and class of the space. FLOPs per KD token are 2 N_teacher (forward) + 6 N_student
(forward and backward) + 2 N_student with gradient checkpointing (Kaplan et al. 2020, arXiv 2001.08361
§2.1: 6N per trained token), with N the parameters one token uses and N_student the largest candidate
of the budget; validation passes are not counted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from nas.device import PEAK_BF16_TFLOPS
from nas.errors import ConfigError
from nas.model.arch import Arch
from nas.model.size import count_params
from nas.prune.space import enumerate_budgets, memory_violation
from nas.search.funnel import prune_class
from nas.search.horizon_plan import fix_horizon, resolve
from nas.search.strategy import ScreenFirst, strategy_for
from nas.settings import RunConfig

# the GPUs' memory, NVIDIA's datasheets (their dense bf16 peaks: `nas.device.PEAK_BF16_TFLOPS`)
GPU_MEMORY = {"H100": "80GB", "H200": "141GB", "A100": "80GB", "L40S": "48GB", "A10": "24GB"}
# measured here (DESIGN.md, one H200, December 2026): a Qwen3-8B -> 2.74B trial (bf16-mixed, 4 x 2048 tokens)
# ran ~10,100 tokens/s steady = 33.5% MFU by the count above; ModelOpt's published H100 tutorials imply ~18%
DEFAULT_MFU = 0.335
MFU_SOURCE = "measured by nas on one H200: a Qwen3-8B -> 2.74B trial at 10,100 tokens/s, DESIGN.md"
# measured here (DESIGN.md, one H200): the screen of Qwen3-8B's 2,242-candidate 50% space took 10-26 min; it is
# bound by cutting each candidate (copying its weights), so its time goes with the candidates' parameters:
# 2,242 x ~3.95B parameters in 26 min (the slow end)
SCREEN_PARAMS_PER_S = 5.7e9


@dataclass(frozen=True)
class Throughput:
    """The FLOP/s one GPU sustains on KD, and where that figure comes from."""

    gpu: str
    flops_per_s: float
    source: str


@dataclass(frozen=True)
class StageCost:
    """One stage: how many runs, their KD (or forward) tokens, FLOPs, and on how many GPUs at once."""

    stage: str
    runs: int
    tokens: int
    flops: float
    parallel: bool  # spread over every GPU (trials in workers, the final distillation with FSDP)
    note: str = ""
    seconds_on_one: float | None = None  # set when the time is not FLOPs-bound (the screen)

    def gpu_hours(self, t: Throughput) -> float:
        return (self.seconds_on_one if self.seconds_on_one is not None else self.flops / t.flops_per_s) / 3600

    def hours(self, t: Throughput, gpus: int) -> float:
        return self.gpu_hours(t) / (gpus if self.parallel else 1)


def kd_flops_per_token(
    teacher: int, student: int, checkpointing: bool, cached_teacher: bool = False
) -> float:
    """FLOPs of one KD token (see the module docstring); a cached teacher costs nothing per trial."""
    return (0 if cached_teacher else 2 * teacher) + (8 if checkpointing else 6) * student


def throughput(gpu: str, cfg: RunConfig, mfu: float | None, tokens_per_s: float | None) -> Throughput:
    """`tokens_per_s` measured on a trial of this study (its metrics.jsonl) makes the FLOP/s; else the GPU's
    dense bf16 peak (`PEAK_BF16_TFLOPS`) at `mfu` (default `DEFAULT_MFU`, measured here)."""
    if tokens_per_s is not None:
        teacher, largest = study_sizes(cfg)
        per_token = kd_flops_per_token(teacher, max(largest.values()), cfg.distill.gradient_checkpointing)
        return Throughput(gpu, tokens_per_s * per_token, f"measured: {tokens_per_s:,.0f} KD tokens/s per GPU")
    peak = gpu_peak(gpu)
    mfu = DEFAULT_MFU if mfu is None else mfu
    source = MFU_SOURCE if mfu == DEFAULT_MFU else "as given with --mfu"
    return Throughput(
        gpu, peak * 1e12 * mfu, f"{mfu:.1%} MFU of {peak:,.0f} TFLOP/s dense bf16; MFU {source}"
    )


def gpu_peak(gpu: str) -> float:
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k.lower() in gpu.lower()), None)
    if peak is None:
        raise ConfigError(
            f"no known bf16 peak for GPU {gpu!r} (known: {', '.join(PEAK_BF16_TFLOPS)}); give its measured KD "
            "throughput with --tokens-per-s (a trial's tokens_per_s in metrics.jsonl)"
        )
    return peak


def study_sizes(cfg: RunConfig) -> tuple[int, dict[str, int]]:
    """The teacher's parameters per token and each budget's largest candidate's."""
    from nas.model.load import load_config

    teacher = Arch.from_hf_config(load_config(cfg.teacher))
    spaces = enumerate_budgets(teacher, cfg.budgets, cfg.space)
    largest = {b: max(count_params(a, active=True) for a in c) for b, c in spaces.items()}
    return count_params(teacher, active=True), largest


def plan_cost(cfg: RunConfig) -> list[StageCost]:
    """The stages of `cfg` (a study), in the order `nas run` runs them (see the module docstring)."""
    from nas.model.load import load_config

    teacher = Arch.from_hf_config(load_config(cfg.teacher))
    cfg = fix_horizon(cfg, teacher)  # the horizon in tokens, as `nas run` fixes it
    spaces = enumerate_budgets(teacher, cfg.budgets, cfg.space)
    n_teacher = count_params(teacher, active=True)
    seq = cfg.data.seq_len
    imp = cfg.importance
    imp_tokens = (imp.num_samples + (teacher.num_layers + 1) * imp.val_sequences) * seq
    stages = [StageCost("importance", 1, imp_tokens, 2.0 * n_teacher * imp_tokens, False,
                        "teacher forwards: calibration, then the held-out loss without each layer")]  # fmt: skip
    stages.append(screen_cost(cfg, teacher, spaces))
    stages += kd_costs(cfg, teacher, spaces, n_teacher)
    return stages


def screen_cost(cfg: RunConfig, teacher: Arch, spaces: dict[str, list[Arch]]) -> StageCost:
    kept = [a for c in spaces.values() for a in c if memory_violation(a, cfg.constraints, teacher) <= 0]
    if not isinstance(strategy_for(cfg), ScreenFirst):
        return StageCost("screen", 0, 0, 0.0, False, f"none: search.strategy = {cfg.search.strategy}")
    tokens = cfg.search.screen_sequences * cfg.data.seq_len
    params = sum(count_params(a, active=True) for a in kept)
    flops = 2.0 * params * tokens
    return StageCost("screen", len(kept), tokens * len(kept), flops, False,
                     "bound by cutting each candidate (rate measured on an H200)",
                     seconds_on_one=params / SCREEN_PARAMS_PER_S)  # fmt: skip


def trials_per_budget(cfg: RunConfig, teacher: Arch, spaces: dict[str, list[Arch]]) -> dict[str, int]:
    """Short-KD runs per budget, at most: the funnel's shortlist bound, or the strategy's trial count."""
    t = teacher.to_dict()
    lists = {}
    for budget, space in spaces.items():
        if cfg.search.strategy in ("auto", "funnel"):
            groups = {a.num_layers for a in space}, {prune_class(a.to_dict(), t) for a in space}
            bound = cfg.search.screen_top + cfg.search.per_class * sum(len(g) for g in groups)
            lists[budget] = min(len(space), bound)
        else:
            lists[budget] = len(space)
    total = sum(lists.values())
    target = strategy_for(cfg).target_trials(total)
    if target < total:  # n_trials: shared out over the budgets as the queue does, in their order
        left = target
        for budget in lists:
            lists[budget] = min(lists[budget], left)
            left -= lists[budget]
    return lists


def kd_costs(cfg: RunConfig, teacher: Arch, spaces: dict, n_teacher: int) -> list[StageCost]:
    """The trials, the adaptive horizon's worst case and the final distillations."""
    s, ckpt = cfg.search, cfg.distill.gradient_checkpointing
    largest = {b: max(count_params(a, active=True) for a in c) for b, c in spaces.items()}
    runs = trials_per_budget(cfg, teacher, spaces)
    horizon = resolve(cfg).tokens
    trial_flops = sum(n * horizon * kd_flops_per_token(n_teacher, largest[b], ckpt, s.teacher_cache)
                      for b, n in runs.items())  # fmt: skip
    if s.teacher_cache:  # the teacher's outputs on the horizon's batches, once
        trial_flops += 2.0 * n_teacher * horizon
    funnel = " (at most: the funnel's shortlist bound)" if s.strategy in ("auto", "funnel") else ""
    halving = ", the halving stops some sooner" if s.pruner != "none" else ""
    stages = [StageCost("trials", sum(runs.values()), sum(runs.values()) * horizon, trial_flops, True,
                        f"{horizon:,} tokens each{funnel}{halving}")]  # fmt: skip
    if strategy_for(cfg).extends_horizon():
        doublings = int(math.log2(s.max_horizon_factor))  # rung r ends at 2^r horizons, <= the cap
        # each budget's best stable_top go on (none with a single trial: one left, it stops)
        going = {b: min(s.stable_top, n) if n > 1 else 0 for b, n in runs.items()}
        extra = {b: n * horizon * (2**doublings - 1) for b, n in going.items()}
        flops = sum(t * kd_flops_per_token(n_teacher, largest[b], ckpt) for b, t in extra.items())
        stages.append(StageCost("adaptive horizon", sum(going.values()), sum(extra.values()), flops, False,
                                f"worst case: the best {s.stable_top} to {2**doublings}x the horizon"))  # fmt: skip
    final = cfg.final_distill()
    finals = [str(b) for b in cfg.final_budgets] or cfg.budgets
    tokens = cfg.final_tokens
    flops = sum(
        tokens * kd_flops_per_token(n_teacher, largest[b], final.gradient_checkpointing) for b in finals
    )
    stages.append(StageCost("final distillation", len(finals), tokens * len(finals), flops, True,
                            f"{tokens:,} tokens each"))  # fmt: skip
    return stages


def format_cost(stages: list[StageCost], t: Throughput, gpus: int, name: str) -> str:
    """The time and cost table: one row a stage, then the totals."""
    lines = [
        f"time and cost of study {name} on {gpus} x {t.gpu} at {t.flops_per_s / 1e12:,.0f} TFLOP/s per GPU "
        f"({t.source})",
        f"{'stage':<20}{'runs':>7}{'tokens':>18}{'PFLOP':>12}{'GPU-hours':>12}{f'hours on {gpus}':>12}  note",
    ]
    for s in stages:
        lines.append(f"{s.stage:<20}{s.runs:>7,}{s.tokens:>18,}{s.flops / 1e15:>12,.1f}{s.gpu_hours(t):>12,.1f}"
                     f"{s.hours(t, gpus):>12,.1f}  {s.note}")  # fmt: skip
    tokens, flops = sum(s.tokens for s in stages), sum(s.flops for s in stages)
    gpu_hours, hours = sum(s.gpu_hours(t) for s in stages), sum(s.hours(t, gpus) for s in stages)
    lines.append(f"{'total':<20}{'':>7}{tokens:>18,}{flops / 1e15:>12,.1f}{gpu_hours:>12,.1f}{hours:>12,.1f}"
                 "  (parallel stages: trials in workers, the final with FSDP, scaling assumed ideal)")  # fmt: skip
    return "\n".join(lines)


def cost_json(stages: list[StageCost], t: Throughput, gpus: int) -> dict:
    rows = [{"stage": s.stage, "runs": s.runs, "tokens": s.tokens, "flops": s.flops, "note": s.note,
             "gpu_hours": s.gpu_hours(t), "hours": s.hours(t, gpus)} for s in stages]  # fmt: skip
    return {"gpu": t.gpu, "gpus": gpus, "flops_per_s": t.flops_per_s, "source": t.source, "stages": rows}
