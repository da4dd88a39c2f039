"""The search space: every valid homogeneous architecture under one or several parameter budgets (total
parameters, or for a mixture of experts optionally the parameters active per token), and the deployment
constraints (memory of weights + KV cache) a candidate must also meet."""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator

import pandas as pd

from nas.errors import ConfigError, InfeasibleError
from nas.model.arch import MOE_ALIGN, Arch
from nas.model.blocks import LAYER_KNOBS
from nas.model.size import (
    count_budget_params,
    count_params,
    kv_cache_bytes,
    parse_count,
    recurrent_state_bytes,
)
from nas.settings import DTYPE_BYTES, SIZE_KNOBS, ConstraintsConfig, SpaceConfig


def default_steps(teacher: Arch) -> dict[str, int]:
    """Hardware-friendly steps: 64 (hidden) / 256 (ffn) on real models, finer on tiny ones (never below the
    alignment that expert kernels need, for a mixture of experts). Hybrids: layers of each type in steps of 2
    when there are 24 or more of them (as `num_layers`), whole Gated DeltaNet key heads, Mamba2 heads one per
    group at a time (kept evenly in each group), Mamba head_dim in 16s on real models (bf16 tensor-core tiles
    are 16 elements wide). Experts in 8s from 128 of them. A hybrid whose attention is a small minority also
    keeps its attention widths (`kept_knobs`)."""
    floor = MOE_ALIGN if teacher.num_experts else 1

    def step(size: int, real: int) -> int:
        return real if size >= 16 * real else max(floor, 2 ** int(math.log2(max(size // 16, 1))))

    steps = {
        "num_layers": 2 if teacher.num_layers >= 24 else 1,  # NVIDIA's pruning tool on 8B models (DESIGN.md)
        "hidden_size": step(teacher.hidden_size, 64),
        "ffn_hidden_size": step(teacher.ffn_hidden_size, 256),
        "num_query_groups": 1,
    }
    for layer_type, knob in LAYER_KNOBS.items():
        steps[knob] = 2 if teacher.layer_count(layer_type) >= 24 else 1
    # Mamba2 heads one per group, head_dim in 16s: ModelOpt's Minitron search of Nemotron-Nano-9B-v2 -> 7B
    # steps the heads by 8 (its 8 groups: 80..128) and head_dim by 8 (56..80) (NVIDIA/Model-Optimizer,
    # examples/megatron_bridge/results/minitron/NVIDIA-Nemotron-Nano-9B-v2/README.md, "Search space for"); the
    # published Nemotron-H 8B -> 4B cut (Minitron-SSM, arXiv 2504.11409) has 112 of 128 heads, head_dim kept
    steps |= {"num_linear_key_heads": 1, "num_mamba_heads": max(teacher.mamba_groups, 1)}
    steps["mamba_head_dim"] = 16 if teacher.mamba_head_dim >= 64 else max(1, teacher.mamba_head_dim // 4)
    # experts by 8 from 128 up (16 steps, as the widths take their real step), one by one below (gpt-oss's 32):
    # ModelOpt's Minitron search steps them by 8 (num_moe_experts_divisor=8, NVIDIA/Model-Optimizer
    # examples/megatron_bridge/prune_minitron.py); by one, Qwen3.5-35B-A3B's 256 gave 3.3M shapes (measured here)
    experts = 8 if teacher.num_experts >= 128 else 1
    return steps | ({"num_experts": experts} if teacher.num_experts else {})


# A hybrid with attention in at most 1 layer in 10 keeps its attention heads and groups unless steps name
# num_query_groups: NVIDIA's published hybrid prunes cut attention layers but never attention widths
# (Nemotron Nano 2, arXiv 2508.14444: 12B -> 9B keeps 40 heads / 8 groups; Minitron-SSM, arXiv 2504.11409:
# Nemotron-H 8B -> 4B cuts hidden, FFN and Mamba heads), and ModelOpt's Nano-9B-v2 -> 7B search skips
# num_attention_heads ("harder to recover", the README above). Their 4 of 56 layers hold 2.5% of the 9B's
# parameters, yet searching them multiplied its space 11-fold (1.6M shapes at the defaults, measured here).
MINOR_ATTENTION_SHARE = 0.1


def kept_knobs(teacher: Arch, config: SpaceConfig) -> frozenset[str]:
    """The width knobs the space keeps at the teacher's size: the attention heads and groups of a hybrid whose
    attention layers are at most `MINOR_ATTENTION_SHARE` of its layers (Nemotron-H: 4 of 52 to 6 of 62), unless
    `config.steps` gives num_query_groups (then both are searched)."""
    if not _minor_attention(teacher) or "num_query_groups" in config.steps:
        return frozenset()
    return frozenset({"num_query_groups", "num_attention_heads"})


def _minor_attention(teacher: Arch) -> bool:
    attention = teacher.layer_count("attention")
    return bool(teacher.layer_types) and 0 < attention <= MINOR_ATTENTION_SHARE * teacher.num_layers


# (knob, the knob it is a multiple of, the ratio): searched as the ratio times the other knob, never above
# the teacher's ratio (query heads within KV groups, Gated DeltaNet value heads within key heads)
RATIO_KNOBS = (
    ("num_attention_heads", "num_query_groups", "heads_per_group"),
    ("num_linear_value_heads", "num_linear_key_heads", "linear_values_per_key"),
)


def knob_values(teacher: Arch, config: SpaceConfig) -> dict[str, list[int]]:
    """The allowed values of each size knob: multiples of its step, down to the max pruning ratio (a layer
    count of a hybrid never below 1; a `kept_knobs` knob only the teacher's)."""
    steps = {**default_steps(teacher), **config.steps}
    depth = {"num_layers", *LAYER_KNOBS.values()}
    kept = kept_knobs(teacher, config)
    values = {}
    for knob in (k for k in SIZE_KNOBS if k in teacher.knobs):
        top = getattr(teacher, knob)
        ratio = 0 if knob in kept else config.max_depth_prune if knob in depth else config.max_width_prune
        low = max(1, math.ceil(top * (1 - ratio)))
        options = [v for v in range(steps[knob], top + 1, steps[knob]) if v >= low]
        values[knob] = sorted(set(options) | {top}, reverse=True)
    return values


def _ratio_choices(teacher: Arch, sizes: dict[str, int], config: SpaceConfig) -> Iterator[dict[str, int]]:
    """Every choice of the knobs that are multiples of others (`RATIO_KNOBS`) for the given `sizes`."""
    options = []
    for knob, base, _ in (r for r in RATIO_KNOBS if r[0] in teacher.knobs):
        options.append([(knob, sizes[base] * p) for p in _multiples(teacher, config, knob, sizes[base])])
    for combo in itertools.product(*options):
        yield dict(combo)


def _multiples(teacher: Arch, config: SpaceConfig, knob: str, base: int) -> list[int]:
    """The ratios a `RATIO_KNOBS` knob may have over its base knob's value `base`: at most the teacher's, and
    within the width cut (none for a `kept_knobs` knob)."""
    ratio = next(r for k, _, r in RATIO_KNOBS if k == knob)
    cut = 0 if knob in kept_knobs(teacher, config) else config.max_width_prune
    low = math.ceil(getattr(teacher, knob) * (1 - cut))
    return [p for p in range(getattr(teacher, ratio), 0, -1) if base * p >= low]


def all_valid(teacher: Arch, config: SpaceConfig) -> Iterator[Arch]:
    """Every valid arch of the space (by `Arch`'s own validity rules, which are family-aware), ignoring
    the budget."""
    values = knob_values(teacher, config)
    for combo in itertools.product(*values.values()):
        sizes = dict(zip(values, combo, strict=True))
        for derived in _ratio_choices(teacher, sizes, config):
            try:
                yield teacher.replace(**sizes, **derived)
            except InfeasibleError:  # e.g. hidden_size not divisible by the heads: no loadable model
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

    def size(a: Arch) -> int:
        return count_budget_params(a, config.budget_kind)

    check_grid(teacher, config)
    inside = list(_in_window(teacher, config, low, high))
    if not inside:
        raise InfeasibleError(_empty_space_message([size(a) for a in all_valid(teacher, config)], low, high))
    return sorted(
        inside, key=lambda a: (-size(a), -count_params(a), *(-getattr(a, k) for k in teacher.knobs))
    )


# shapes (knob choices but hidden_size) a space may hold, measured here on 2 busy cores: Qwen3.5-9B's 52,500
# take 9-20 s, Nemotron-Nano-9B-v2's 145,152 23-38 s, Qwen3.5-35B-A3B's 440,640 52-71 s (up to ~0.4 ms a
# shape), so 1M is a few minutes
MAX_SHAPES = 1_000_000


def shape_count(teacher: Arch, config: SpaceConfig) -> int:
    """How many shapes (knob choices but hidden_size) the space tries: the loops of `_in_window`, each base
    knob's value with its own choices of the knobs that are multiples of it."""
    values = knob_values(teacher, config)
    values.pop("hidden_size")
    ratios = [(knob, base) for knob, base, _ in RATIO_KNOBS if knob in teacher.knobs]
    shapes = math.prod(len(v) for k, v in values.items() if k not in {base for _, base in ratios})
    for knob, base in ratios:  # a base knob has one ratio knob
        shapes *= sum(len(_multiples(teacher, config, knob, b)) for b in values[base])
    return shapes


def check_grid(teacher: Arch, config: SpaceConfig) -> None:
    """ConfigError, before any work, when the space has more than `MAX_SHAPES` shapes to try (`shape_count`):
    enumerating it would take many minutes; the message gives the settings that coarsen it."""
    shapes = shape_count(teacher, config)
    searched = _minor_attention(teacher) and "num_query_groups" in config.steps
    keep = (
        "; or leave num_query_groups out of the steps: this hybrid then keeps its attention widths" * searched
    )
    if shapes > MAX_SHAPES:
        raise ConfigError(
            f"the space has {shapes:,} shapes to try (more than {MAX_SHAPES:,}: many minutes to enumerate); "
            "coarsen it, e.g. --steps hidden_size=256,ffn_hidden_size=512 --max-width-prune 0.4 --max-depth-prune "
            f"0.2 (NVIDIA's pruning tool's steps and limits; in a study: [space] steps, max_width_prune, "
            f"max_depth_prune){keep}"
        )


def _in_window(teacher: Arch, config: SpaceConfig, low: float, high: int) -> Iterator[Arch]:
    """The archs of `all_valid` with low <= params <= high, without building the others: the count grows with
    hidden_size, so for each choice of the other knobs a bisection over the hidden sizes (on unchecked shapes,
    `Arch.sized`) finds the window, and only the sizes inside it are built and validated. (A 9B hybrid's space
    has ~2M shapes; building each took minutes.)"""
    values = knob_values(teacher, config)
    hidden = sorted(values.pop("hidden_size"))

    def size(fixed: dict[str, int], h: int) -> int:
        return count_budget_params(teacher.sized(**fixed, hidden_size=h), config.budget_kind)

    for combo in itertools.product(*values.values()):
        sizes = dict(zip(values, combo, strict=True))
        for derived in _ratio_choices(teacher, sizes, config):
            fixed = sizes | derived
            start = bisect.bisect_left(hidden, low, key=lambda h, f=fixed: size(f, h))
            stop = bisect.bisect_right(hidden, high, key=lambda h, f=fixed: size(f, h))
            for h in reversed(hidden[start:stop]):
                try:
                    yield teacher.replace(**fixed, hidden_size=h)
                except InfeasibleError:  # e.g. hidden_size not divisible by the heads
                    continue


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
        if arch.layer_types:
            row["state_bytes_per_sequence"] = recurrent_state_bytes(arch)  # bf16, whatever the length
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
    """Serving memory of `arch`: its weights plus the KV cache of `batch` x `seq_len` tokens, plus (hybrid stacks)
    the recurrent state of `batch` sequences, constant in `seq_len`, all in `dtype`."""
    c = constraints or ConstraintsConfig()
    itemsize = DTYPE_BYTES[c.dtype]
    kv_per_token = kv_cache_bytes(arch) // 2  # kv_cache_bytes counts 2-byte elements
    state = recurrent_state_bytes(arch) // 2  # so does recurrent_state_bytes
    return count_params(arch) * itemsize + (kv_per_token * c.seq_len + state) * itemsize * c.batch


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
