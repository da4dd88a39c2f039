"""The search space: every valid homogeneous architecture under one or several parameter budgets (total
parameters, or for a mixture of experts optionally the parameters active per token), and the deployment
constraints (memory of weights + KV cache) a candidate must also meet."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pandas as pd

from nas.errors import ConfigError, InfeasibleError
from nas.model.arch import (
    MOE_ALIGN,
    Arch,
    count_budget_params,
    count_params,
    kv_cache_bytes,
    parse_count,
)
from nas.settings import DTYPE_BYTES, SIZE_KNOBS, ConstraintsConfig, RunConfig, SpaceConfig


def default_steps(teacher: Arch) -> dict[str, int]:
    """Hardware-friendly steps: 64 (hidden) / 256 (ffn) on real models, finer on tiny ones (never below the
    alignment that expert kernels need, for a mixture of experts)."""
    floor = MOE_ALIGN if teacher.num_experts else 1

    def step(size: int, real: int) -> int:
        return real if size >= 16 * real else max(floor, 2 ** int(math.log2(max(size // 16, 1))))

    steps = {
        "num_layers": 2 if teacher.num_layers >= 24 else 1,
        "hidden_size": step(teacher.hidden_size, 64),
        "ffn_hidden_size": step(teacher.ffn_hidden_size, 256),
        "num_query_groups": 1,
    }
    return steps | ({"num_experts": 1} if teacher.num_experts else {})


def knob_values(teacher: Arch, config: SpaceConfig) -> dict[str, list[int]]:
    """The allowed values of each size knob: multiples of its step, down to the max pruning ratio."""
    steps = {**default_steps(teacher), **config.steps}
    values = {}
    for knob in (k for k in SIZE_KNOBS if k in teacher.knobs):
        top = getattr(teacher, knob)
        ratio = config.max_depth_prune if knob == "num_layers" else config.max_width_prune
        low = math.ceil(top * (1 - ratio))
        options = [v for v in range(steps[knob], top + 1, steps[knob]) if v >= low]
        values[knob] = sorted(set(options) | {top}, reverse=True)
    return values


def all_valid(teacher: Arch, config: SpaceConfig) -> Iterator[Arch]:
    """Every valid arch of the space (by `Arch`'s own validity rules, which are family-aware), ignoring
    the budget."""
    values = knob_values(teacher, config)
    min_heads = math.ceil(teacher.num_attention_heads * (1 - config.max_width_prune))
    for combo in itertools.product(*values.values()):
        sizes = dict(zip(values, combo, strict=True))
        for per_group in range(teacher.heads_per_group, 0, -1):
            if sizes["num_query_groups"] * per_group < min_heads:
                break
            try:
                yield teacher.replace(**sizes, num_attention_heads=sizes["num_query_groups"] * per_group)
            except (
                InfeasibleError
            ):  # e.g. hidden_size not divisible by the heads: transformers cannot load it
                continue


def parse_budget(budget: str | int | float, teacher: Arch, budget_kind: str = "total") -> int:
    """A budget from `4B`, `350M`, `1.5e9` or `50%` (of the teacher's parameters of `budget_kind`)."""
    text = str(budget).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            raise InfeasibleError(f"cannot read budget {budget!r}; write e.g. 50% or 4B") from None
        if not 0 < share <= 1:  # also refuses nan%
            raise InfeasibleError(f"a budget share must be in (0%, 100%], got {budget!r}")
        return int(count_budget_params(teacher, budget_kind) * share)
    return parse_count(text)


def enumerate_candidates(
    teacher: Arch, budget: str | int | float, config: SpaceConfig | None = None
) -> list[Arch]:
    """Every valid arch with budget*(1-tolerance) <= params <= budget, largest first; params are those of
    `config.budget_kind` (all, or those active per token).

    An empty space raises `InfeasibleError` naming the nearest feasible budgets."""
    config = config or SpaceConfig()
    high = parse_budget(budget, teacher, config.budget_kind)
    low = high * (1 - config.tolerance)
    every = list(all_valid(teacher, config))

    def size(a: Arch) -> int:
        return count_budget_params(a, config.budget_kind)

    inside = [a for a in every if low <= size(a) <= high]
    if not inside:
        raise InfeasibleError(_empty_space_message([size(a) for a in every], low, high))
    return sorted(
        inside, key=lambda a: (-size(a), -count_params(a), *(-getattr(a, k) for k in teacher.knobs))
    )


def _empty_space_message(counts: list[int], low: float, high: int) -> str:
    sizes = sorted(set(counts))
    below = [s for s in sizes if s < low]
    above = [s for s in sizes if s > high]
    hints = []
    if below:
        hints.append(f"{below[-1]:,} (the largest candidate below; use budget {below[-1]:,})")
    if above:
        hints.append(f"{above[0]:,} (the smallest above; use budget {above[0]:,})")
    return (
        f"no valid architecture has between {int(low):,} and {high:,} parameters; nearest feasible: "
        + ("; ".join(hints) or "none")
        + ". Raise the tolerance, the max pruning ratios, or change the budget."
    )


def candidates_frame(
    candidates: list[Arch], teacher: Arch | None = None, constraints: ConstraintsConfig | None = None
) -> pd.DataFrame:
    """One row a candidate: params (MoE: also those active per token), KV-cache bytes per token (bf16), serving
    memory under `constraints` (weights + KV cache), depth and widths."""
    rows = []
    for index, arch in enumerate(candidates):
        row = {"candidate": index, "label": arch.describe(), "params": count_params(arch)}
        if arch.num_experts:
            row["active_params"] = count_params(arch, active=True)
        row["kv_cache_bytes_per_token"] = kv_cache_bytes(arch)
        row["memory_bytes"] = memory_bytes(arch, constraints)
        row.update({k: getattr(arch, k) for k in arch.knobs})
        if arch.num_experts:
            row["num_experts_per_tok"] = arch.num_experts_per_tok
        if teacher is not None:
            row["share_of_teacher"] = row["params"] / count_params(teacher)
        rows.append(row)
    return pd.DataFrame(rows)


def enumerate_budgets(
    teacher: Arch, budgets: list[str], config: SpaceConfig | None = None
) -> dict[str, list[Arch]]:
    """The space of every budget (label as written -> candidates, largest first). A candidate inside the
    windows of two budgets belongs to the first only, so every candidate has one funnel."""
    spaces: dict[str, list[Arch]] = {}
    seen: set[tuple[int, ...]] = set()
    for budget in budgets:
        inside = enumerate_candidates(teacher, budget, config)
        spaces[str(budget)] = [a for a in inside if _key(a) not in seen]
        seen |= {_key(a) for a in inside}
        if not spaces[str(budget)]:
            raise InfeasibleError(f"budget {budget} has no candidate that an earlier budget does not hold")
    return spaces


def _key(arch: Arch) -> tuple[int, ...]:
    return tuple(getattr(arch, k) for k in arch.knobs)


def parse_bytes(text: str | int | float, teacher_bytes: int | None = None) -> int:
    """A memory size from `2GB`, `512MB`, `3.5e9`, `2GiB` or a share of the teacher's (`60%`)."""
    s = str(text).strip().replace("_", "").upper()
    if s.endswith("%"):
        if teacher_bytes is None:
            raise ConfigError(f"memory {text!r} is a share, but no teacher size is known here")
        try:
            return int(teacher_bytes * float(s[:-1]) / 100)
        except ValueError:
            raise ConfigError(f"cannot read memory {text!r}; write e.g. 2GB, 512MB or 60%") from None
    binary = s.endswith("IB")
    s = s.removesuffix("IB").removesuffix("B") if binary else s.removesuffix("B")
    scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}.get(s[-1:], None)
    if binary and scale:
        scale = 1024 ** (1 + "KMGT".index(s[-1]))
    try:
        value = float(s[:-1]) * scale if scale else float(s)
    except ValueError:
        raise ConfigError(f"cannot read memory {text!r}; write e.g. 2GB, 512MB, 2GiB or 3.5e9") from None
    if value <= 0:
        raise ConfigError(f"a memory limit must be positive, got {text!r}")
    return int(value)


def memory_bytes(arch: Arch, constraints: ConstraintsConfig | None = None) -> int:
    """Serving memory of `arch`: its weights plus the KV cache of `batch` x `seq_len` tokens, in `dtype`."""
    c = constraints or ConstraintsConfig()
    itemsize = DTYPE_BYTES[c.dtype]
    kv_per_token = kv_cache_bytes(arch) // 2  # kv_cache_bytes counts 2-byte elements
    return count_params(arch) * itemsize + kv_per_token * itemsize * c.seq_len * c.batch


def memory_violation(arch: Arch, constraints: ConstraintsConfig, teacher: Arch) -> float:
    """How far `arch` exceeds the memory limit, as a share of it (0: within, or no limit)."""
    if not constraints.max_memory:
        return 0.0
    limit = parse_bytes(constraints.max_memory, memory_bytes(teacher, constraints))
    return max(0.0, memory_bytes(arch, constraints) / limit - 1)


def within_memory(
    candidates: list[Arch], constraints: ConstraintsConfig, teacher: Arch
) -> tuple[list[Arch], list[Arch]]:
    """(kept, rejected): the candidates within the memory limit and those over it, in order."""
    kept = [a for a in candidates if memory_violation(a, constraints, teacher) == 0]
    rejected = [a for a in candidates if memory_violation(a, constraints, teacher) > 0]
    return kept, rejected


def with_horizon(cfg: RunConfig, teacher: Arch) -> RunConfig:
    """`cfg` with its search horizon fixed in tokens: `search.horizon_tokens = 0` becomes
    horizon_tokens_per_param x the largest budget's parameters (`RunConfig.with_horizon`)."""
    largest = max(parse_budget(b, teacher, cfg.space.budget_kind) for b in cfg.budgets)
    return cfg.with_horizon(largest)
