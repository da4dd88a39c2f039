import itertools
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from nas.errors import ConfigError, InfeasibleError
from nas.model.arch import KNOBS, Arch, check_prunable
from nas.model.load import load_config
from nas.model.size import count_params
from nas.prune.space import (
    candidates_frame,
    check_grid,
    default_steps,
    enumerate_candidates,
    kept_knobs,
    parse_budget,
    shape_count,
)
from nas.settings import SpaceConfig
from nas.testing import tiny_config

TEACHER = Arch.from_hf_config(
    tiny_config(
        "qwen2",
        num_layers=4,
        hidden_size=64,
        ffn_hidden_size=96,
        num_attention_heads=4,
        num_query_groups=2,
        tie_word_embeddings=True,
    )
)


def test_every_candidate_is_within_budget_valid_and_builds_to_its_count(tmp_path):

    budget = parse_budget("60%", TEACHER)
    candidates = enumerate_candidates(TEACHER, "60%", SpaceConfig(tolerance=0.1))
    assert candidates
    for arch in candidates:
        assert budget * 0.9 <= count_params(arch) <= budget
        check_prunable(TEACHER, arch)
        model = AutoModelForCausalLM.from_config(
            arch.to_hf_config(tiny_config("qwen2", tie_word_embeddings=True))
        )
        assert sum(p.numel() for p in model.parameters()) == count_params(arch)
    assert len({tuple(getattr(a, k) for k in KNOBS) for a in candidates}) == len(candidates)


def brute_force(teacher: Arch, budget: int, config: SpaceConfig) -> set[tuple]:
    """Every integer combination of the knobs, kept when it satisfies the space's definition."""
    steps = {**default_steps(teacher), **config.steps}
    found = set()
    ranges = [range(1, getattr(teacher, k) + 1) for k in KNOBS]
    for layers, hidden, ffn, heads, groups in itertools.product(*ranges):
        sizes = {
            "num_layers": layers,
            "hidden_size": hidden,
            "ffn_hidden_size": ffn,
            "num_query_groups": groups,
        }
        if any(v % steps[k] and v != getattr(teacher, k) for k, v in sizes.items()):
            continue
        if any(
            v
            < math.ceil(
                getattr(teacher, k)
                * (1 - (config.max_depth_prune if k == "num_layers" else config.max_width_prune))
            )
            for k, v in sizes.items()
        ):
            continue
        if heads % groups or heads // groups > teacher.heads_per_group or hidden % heads:
            continue
        if heads < math.ceil(teacher.num_attention_heads * (1 - config.max_width_prune)):
            continue
        arch = teacher.replace(
            num_layers=layers,
            hidden_size=hidden,
            ffn_hidden_size=ffn,
            num_attention_heads=heads,
            num_query_groups=groups,
        )
        if budget * (1 - config.tolerance) <= count_params(arch) <= budget:
            found.add((layers, hidden, ffn, heads, groups))
    return found


@pytest.mark.parametrize("share", ["50%", "70%"])
def test_no_valid_arch_inside_the_budget_is_missed(share):
    config = SpaceConfig(
        tolerance=0.08,
        max_width_prune=0.6,
        max_depth_prune=0.5,
        steps={"hidden_size": 8, "ffn_hidden_size": 8},
    )
    budget = parse_budget(share, TEACHER)
    enumerated = {tuple(getattr(a, k) for k in KNOBS) for a in enumerate_candidates(TEACHER, share, config)}
    assert enumerated == brute_force(TEACHER, budget, config)


def test_budget_forms():
    assert parse_budget("4B", TEACHER) == 4_000_000_000
    assert parse_budget("350M", TEACHER) == 350_000_000
    assert parse_budget("1.5e9", TEACHER) == 1_500_000_000
    assert parse_budget("50%", TEACHER) == count_params(TEACHER) // 2


def test_empty_space_names_the_nearest_feasible_budgets():
    with pytest.raises(InfeasibleError, match="nearest feasible: .*smallest above; use budget"):
        enumerate_candidates(TEACHER, "5%")


def test_candidate_table_has_params_and_kv_cache():
    table = candidates_frame(enumerate_candidates(TEACHER, "60%", SpaceConfig(tolerance=0.1)), TEACHER)
    assert {"params", "kv_cache_bytes_per_token", "num_layers", "share_of_teacher"} <= set(table.columns)
    assert (table["share_of_teacher"] <= 0.6).all()


def test_no_valid_hybrid_arch_inside_the_budget_is_missed():
    """A Qwen3.5 teacher (Gated DeltaNet + attention layers): the enumerated space equals every combination of
    per-type layer counts, widths, heads and linear-attention heads that satisfies the space's definition, and
    `shape_count` (what `check_grid` limits) is the number of those combinations but hidden_size."""
    teacher = Arch.from_hf_config(tiny_config("qwen3_5_text"))
    config = SpaceConfig(tolerance=0.1, max_width_prune=0.6, steps={"hidden_size": 8, "ffn_hidden_size": 8})
    budget = parse_budget("60%", teacher)
    knobs = ("num_linear_attention_layers", "num_attention_layers", "hidden_size", "ffn_hidden_size",
             "num_query_groups", "num_attention_heads", "num_linear_key_heads", "num_linear_value_heads")  # fmt: skip
    steps = {"hidden_size": 8, "ffn_hidden_size": 8}
    ratio = {"num_attention_heads": "num_query_groups", "num_linear_value_heads": "num_linear_key_heads"}
    found, shapes = set(), set()
    ranges = [sorted({*range(steps.get(k, 1), getattr(teacher, k) + 1, steps.get(k, 1)), getattr(teacher, k)})
              for k in knobs]  # fmt: skip
    for combo in itertools.product(*ranges):
        sizes = dict(zip(knobs, combo, strict=True))
        prune = {
            k: config.max_depth_prune if k.endswith("_layers") else config.max_width_prune for k in knobs
        }
        if any(v < max(1, math.ceil(getattr(teacher, k) * (1 - prune[k]))) for k, v in sizes.items()):
            continue
        if any(sizes[k] % sizes[b] or sizes[k] // sizes[b] > getattr(teacher, k) // getattr(teacher, b)
               for k, b in ratio.items()):  # fmt: skip
            continue
        shapes.add(combo[:2] + combo[3:])
        try:
            arch = teacher.replace(**sizes)
        except InfeasibleError:
            continue
        if budget * 0.9 <= count_params(arch) <= budget:
            found.add(combo)
    enumerated = {tuple(getattr(a, k) for k in knobs) for a in enumerate_candidates(teacher, "60%", config)}
    assert found and enumerated == found
    assert shape_count(teacher, config) == len(shapes)


def test_a_space_too_large_to_enumerate_is_refused_before_any_work_and_names_the_settings():
    """Nemotron-Nano-9B-v2 with its attention widths searched too (an explicit num_query_groups step) has 1.6M
    shapes (many minutes of CPU): one ConfigError naming the settings that coarsen it; at the defaults (its
    attention widths kept) and with NVIDIA's steps and limits it enumerates."""
    teacher = shipped("NVIDIA-Nemotron-Nano-9B-v2")
    with pytest.raises(
        ConfigError, match=r"1,596,672 shapes.*--steps hidden_size=256.*leave num_query_groups out"
    ):
        enumerate_candidates(teacher, "50%", SpaceConfig(steps={"num_query_groups": 1}))
    check_grid(teacher, SpaceConfig())  # 145,152 shapes: 77,220 candidates at 50%, about 30 s
    coarse = {"hidden_size": 256, "ffn_hidden_size": 512, "num_query_groups": 1}
    check_grid(teacher, SpaceConfig(steps=coarse, max_width_prune=0.4, max_depth_prune=0.2))  # 4,615 (README)


CONFIGS = Path(__file__).parents[2] / "benchmarks/configs"
# 10-70 s each on 2 busy cores; the others < 3 s
SLOW_SPACES = {"NVIDIA-Nemotron-Nano-9B-v2", "Qwen3.5-9B", "Qwen3.5-35B-A3B"}


def shipped(name: str) -> Arch:
    return Arch.from_hf_config(load_config(CONFIGS / name))


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(p.name, marks=[pytest.mark.slow] * (p.name in SLOW_SPACES))
        for p in sorted(CONFIGS.iterdir())
    ],
)
def test_every_shipped_teacher_enumerates_its_default_space_at_half_its_size(name):
    """The default space of every real teacher shipped in benchmarks/configs is under `MAX_SHAPES` and holds
    candidates at 50%, each inside the budget's window."""
    teacher = shipped(name)
    budget = parse_budget("50%", teacher)
    candidates = enumerate_candidates(teacher, "50%")
    assert candidates and all(budget * 0.95 <= count_params(a) <= budget for a in candidates)


def test_a_hybrid_whose_attention_is_a_small_minority_keeps_its_attention_widths():
    """One attention layer in ten (Nemotron-H's share): the default space is the space with the attention widths
    searched (an explicit num_query_groups step), less every candidate that cuts an attention head or group;
    one in three (the tiny Nemotron-H, as Qwen3.5's one in four) searches them."""
    blocks = ["linear_attention", "mlp"] * 4 + ["full_attention", "mlp"]
    teacher = Arch.from_hf_config(tiny_config("nemotron_h", num_layers=10, layers_block_type=blocks,
                                              num_attention_heads=4, num_query_groups=2))  # fmt: skip
    steps = {"hidden_size": 8, "ffn_hidden_size": 8, "num_mamba_heads": 2, "mamba_head_dim": 2}
    searched = enumerate_candidates(
        teacher, "60%", SpaceConfig(tolerance=0.1, steps=steps | {"num_query_groups": 1})
    )
    kept = enumerate_candidates(teacher, "60%", SpaceConfig(tolerance=0.1, steps=steps))
    widths = ("num_attention_heads", "num_query_groups")
    assert {getattr(a, k) for a in searched for k in widths} > {getattr(teacher, k) for k in widths}
    assert kept == [a for a in searched if all(getattr(a, k) == getattr(teacher, k) for k in widths)]
    third = Arch.from_hf_config(tiny_config("nemotron_h", num_layers=6))
    assert kept_knobs(third, SpaceConfig()) == frozenset() < kept_knobs(teacher, SpaceConfig())
