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
