import itertools
import math

import pytest
from transformers import AutoModelForCausalLM

from nas.errors import InfeasibleError
from nas.model.arch import KNOBS, Arch, check_prunable, count_params
from nas.prune.space import candidates_frame, default_steps, enumerate_candidates, parse_budget
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
    per-type layer counts, widths, heads and linear-attention heads that satisfies the space's definition."""
    teacher = Arch.from_hf_config(tiny_config("qwen3_5_text"))
    config = SpaceConfig(tolerance=0.1, max_width_prune=0.6, steps={"hidden_size": 8, "ffn_hidden_size": 8})
    budget = parse_budget("60%", teacher)
    knobs = ("num_linear_attention_layers", "num_attention_layers", "hidden_size", "ffn_hidden_size",
             "num_query_groups", "num_attention_heads", "num_linear_key_heads", "num_linear_value_heads")  # fmt: skip
    steps = {"hidden_size": 8, "ffn_hidden_size": 8}
    ratio = {"num_attention_heads": "num_query_groups", "num_linear_value_heads": "num_linear_key_heads"}
    found = set()
    ranges = [sorted({*range(steps.get(k, 1), getattr(teacher, k) + 1, steps.get(k, 1)), getattr(teacher, k)})
              for k in knobs]  # fmt: skip
    for combo in itertools.product(*ranges):
        sizes = dict(zip(knobs, combo, strict=True))
        prune = {k: config.max_depth_prune if k.endswith("_layers") else config.max_width_prune for k in knobs}
        if any(v < max(1, math.ceil(getattr(teacher, k) * (1 - prune[k]))) for k, v in sizes.items()):
            continue
        if any(sizes[k] % sizes[b] or sizes[k] // sizes[b] > getattr(teacher, k) // getattr(teacher, b)
               for k, b in ratio.items()):  # fmt: skip
            continue
        try:
            arch = teacher.replace(**sizes)
        except InfeasibleError:
            continue
        if budget * 0.9 <= count_params(arch) <= budget:
            found.add(combo)
    enumerated = {tuple(getattr(a, k) for k in knobs) for a in enumerate_candidates(teacher, "60%", config)}
    assert found and enumerated == found


def test_a_space_too_large_to_enumerate_is_refused_before_any_work_and_names_the_settings():
    """Nemotron-Nano-9B-v2 at the default steps and ratios has 3.6M shapes (a quarter hour of CPU): one
    ConfigError naming the settings that coarsen it; with NVIDIA's steps and limits it enumerates."""
    from pathlib import Path

    from nas.errors import ConfigError
    from nas.model.families import load_config
    from nas.prune.space import check_grid

    teacher = Arch.from_hf_config(load_config(Path(__file__).parents[1] / "benchmarks/configs/NVIDIA-Nemotron-Nano-9B-v2"))
    with pytest.raises(ConfigError, match=r"3,628,800 shapes.*--steps hidden_size=256"):
        enumerate_candidates(teacher, "50%")
    coarse = SpaceConfig(steps={"hidden_size": 256, "ffn_hidden_size": 512}, max_width_prune=0.4, max_depth_prune=0.2)
    check_grid(teacher, coarse)  # 4,615 candidates at 50% (README), enumerated in about 30 s
