"""The funnel's parts: the zero-shot screen, the constraints, several budgets, and the halving pruner."""

import math
import os

import optuna
import pytest
import torch

from nas.errors import ConfigError
from nas.evaluate.loss import lm_loss
from nas.model.arch import KNOBS, Arch
from nas.model.size import count_params
from nas.prune.cut import prune
from nas.prune.importance import compute_importance
from nas.prune.space import enumerate_budgets, memory_bytes, parse_budget, parse_bytes
from nas.search.funnel import FunnelPruner, prune_class, rungs, screen, shortlist
from nas.search.record import StudyRecord
from nas.settings import ConstraintsConfig, SpaceConfig, run_config_from_dict
from nas.testing import tiny_model

SPACE = SpaceConfig(tolerance=0.15, steps={"hidden_size": 16, "ffn_hidden_size": 16})


@pytest.fixture(scope="module")
def setup():
    teacher = tiny_model("llama", num_layers=4, hidden_size=64, ffn_hidden_size=96)
    g = torch.Generator().manual_seed(0)
    importance = compute_importance(
        teacher, torch.randint(0, 96, (8, 16), generator=g), torch.randint(0, 96, (4, 16), generator=g)
    )
    val = torch.randint(0, 96, (4, 24), generator=g)
    return teacher, importance, val, Arch.from_hf_config(teacher.config)


def test_budgets_have_disjoint_spaces_each_within_its_budget(setup):
    *_, arch = setup
    spaces = enumerate_budgets(arch, ["40%", "70%"], SPACE)
    assert list(spaces) == ["40%", "70%"] and all(spaces.values())
    for budget, candidates in spaces.items():
        high = parse_budget(budget, arch)
        assert all(high * 0.85 <= count_params(a) <= high for a in candidates)
    keys = [tuple(getattr(a, k) for k in KNOBS) for c in spaces.values() for a in c]
    assert len(keys) == len(set(keys))


def test_screen_loss_is_the_pruned_models_loss_best_first(setup):
    teacher, importance, val, arch = setup
    spaces = enumerate_budgets(arch, ["40%", "70%"], SPACE)
    screened = screen(teacher, importance, spaces, val)
    assert len(screened) == sum(map(len, spaces.values()))
    for budget in spaces:
        rows = [s for s in screened if s.budget == budget]
        assert [s.rank for s in rows] == list(range(len(rows)))
        assert [s.loss for s in rows] == sorted(s.loss for s in rows)
    first = screened[0]
    student = prune(teacher, Arch.from_dict(first.arch), importance)
    assert first.loss == pytest.approx(lm_loss(student, val), abs=1e-5)  # one batch == the protocol's batches
    top = shortlist(screened, 2)
    assert [len(v) for v in top.values()] == [2, 2] and top["40%"][0].rank == 0


def test_memory_is_weights_plus_the_measured_kv_cache(setup):
    teacher, importance, _, arch = setup
    small = arch.replace(num_layers=3, ffn_hidden_size=64, num_query_groups=1, num_attention_heads=2)
    model = prune(teacher, small, importance).to(torch.bfloat16)
    tokens = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        cache = model(input_ids=tokens, use_cache=True).past_key_values
    kv = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    weights = sum(p.nbytes for p in model.parameters())
    c = ConstraintsConfig(seq_len=20, batch=2, dtype="bfloat16")
    assert memory_bytes(small, c) == weights + kv


def test_a_candidate_over_the_memory_limit_is_never_screened(setup):
    teacher, importance, val, arch = setup
    spaces = enumerate_budgets(arch, ["70%"], SPACE)
    sizes = sorted(memory_bytes(a) for a in spaces["70%"])
    limit = sizes[len(sizes) // 2]
    screened = screen(teacher, importance, spaces, val, ConstraintsConfig(max_memory=str(limit)))
    over = [s for s in screened if s.memory_bytes > limit]
    assert over and all(s.rejected.startswith("memory") and s.loss is None for s in over)
    assert all(s.loss is not None and s.rank is not None for s in screened if s.memory_bytes <= limit)
    assert shortlist(screened, 100)["70%"] == [s for s in screened if not s.rejected]


def test_throughput_floor_rejects_slow_candidates(setup):
    teacher, importance, val, arch = setup
    spaces = {"70%": enumerate_budgets(arch, ["70%"], SPACE)["70%"][:3]}
    fast = screen(
        teacher, importance, spaces, val, ConstraintsConfig(min_throughput=1.0, throughput_tokens=16)
    )
    assert all(s.tokens_per_s > 1.0 and not s.rejected for s in fast)
    floor = max(s.tokens_per_s for s in fast) * 1e3  # far above what any of them measures
    slow = screen(
        teacher, importance, spaces, val, ConstraintsConfig(min_throughput=floor, throughput_tokens=16)
    )
    assert all(s.rejected.startswith("throughput") and s.loss is None for s in slow)


def test_memory_sizes_and_bad_inputs():
    assert (
        parse_bytes("2GB") == 2_000_000_000
        and parse_bytes("1GiB") == 2**30
        and parse_bytes("3.5e9") == 3_500_000_000
    )
    assert parse_bytes("50%", teacher_bytes=1000) == 500
    for bad in ("lots", "-1GB"):
        with pytest.raises(ConfigError, match="memory"):
            parse_bytes(bad)
    with pytest.raises(ConfigError, match="dtype"):
        ConstraintsConfig(dtype="int3")
    base = {"name": "x", "teacher": "t", "data": {"sources": [{"path": "p"}]}}
    with pytest.raises(ConfigError, match="final_budgets"):
        run_config_from_dict({**base, "budget": ["25%", "50%"], "final_budgets": ["75%"]})
    with pytest.raises(ConfigError, match="distinct"):
        run_config_from_dict({**base, "budget": ["25%", "25%"]})
    with pytest.raises(ConfigError, match="finalists"):
        run_config_from_dict({**base, "search": {"screen_top": 2, "finalists": 3}})


def run_funnel(losses: dict[str, list[list[float]]], finalists: int, archs: list[dict] | None = None,
               teacher: dict | None = None) -> optuna.Study:  # fmt: skip
    """A real Optuna study of trials that report the given curves at steps 2, 4, 6 (horizon 8); given
    `teacher`, the trials carry `archs` and the first of each class is protected."""
    sizes = {b: len(c) for b, c in losses.items()}
    study = optuna.create_study(pruner=FunnelPruner(2, 8, 2, finalists, sizes, per_class=teacher is not None))
    if teacher is not None:
        StudyRecord(identity={"teacher_arch": teacher}).write(study)
    for budget, curves in losses.items():
        for i, curve in enumerate(curves):
            study.enqueue_trial({}, user_attrs={"budget": budget} | ({"arch": archs[i]} if archs else {}))

            def objective(trial, curve=curve):
                for step, value in zip((2, 4, 6), curve, strict=True):
                    trial.report(value, step)
                    if trial.should_prune():
                        raise optuna.TrialPruned()
                return curve[-1]

            study.optimize(objective, n_trials=1)
    return study


def test_halving_keeps_finalists_per_budget_and_stops_the_rest():
    assert rungs(2, 8, 2) == [2, 4]
    # best screen first; in "b" every later trial is worse than the first three at every rung
    good = [[3.0, 2.0, 1.0], [3.1, 2.1, 1.1], [3.2, 2.2, 1.2]]
    bad = [[9.0, 8.0, 7.0]] * 5
    study = run_funnel({"a": [[5.0, 4.0, 3.5]] + bad[:1], "b": good + bad}, finalists=3)
    by_budget = {b: [t for t in study.trials if t.user_attrs["budget"] == b] for b in ("a", "b")}
    complete = {b: [t.state.name for t in ts] for b, ts in by_budget.items()}
    assert complete["a"] == ["COMPLETE", "COMPLETE"]  # fewer than 3: both go to the horizon
    assert complete["b"] == ["COMPLETE"] * 3 + ["PRUNED"] * 5
    # 8 in the funnel: the best 4 pass the first rung, the best 3 the second
    assert [max(t.intermediate_values) for t in by_budget["b"][3:]] == [4, 2, 2, 2, 2]
    late = run_funnel({"b": good + [[0.5, 0.4, 0.3]]}, finalists=2)  # a late but better one is kept
    assert [t.state.name for t in late.trials][-1] == "COMPLETE" and math.isclose(late.best_value, 0.3)


def test_halving_never_stops_the_first_of_a_class():
    teacher = {"num_layers": 8, "hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 4,
               "num_query_groups": 2}  # fmt: skip
    heads_cut = teacher | {"num_layers": 6, "num_attention_heads": 2}
    heads_kept = teacher | {"num_layers": 6, "hidden_size": 48}
    assert prune_class(heads_cut, teacher) == "depth+attention"
    assert prune_class(heads_kept, teacher) == "depth+hidden" and prune_class(teacher, teacher) == "none"
    good = [[3.0, 2.0, 1.0], [3.1, 2.1, 1.1]]
    late = [[9.0, 8.0, 7.0]] * 3  # worse at every rung: the first of its class still reaches the horizon
    archs = [heads_cut, heads_cut, heads_kept, heads_kept, heads_cut]
    study = run_funnel({"b": good + late}, finalists=2, archs=archs, teacher=teacher)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3 + ["PRUNED"] * 2
    plain = run_funnel({"b": good + late}, finalists=2, archs=archs)  # without per_class: stopped
    assert [t.state.name for t in plain.trials] == ["COMPLETE"] * 2 + ["PRUNED"] * 3


@pytest.mark.slow
def test_multi_budget_study_end_to_end(tmp_path, monkeypatch, capsys):
    """Two budgets in one study: one screen, a funnel and a winner each, fronts and stability over both."""
    from optuna.trial import TrialState
    from transformers import AutoModelForCausalLM

    from nas.pipeline import run
    from nas.report.frames import load_study, report_frames
    from nas.testing import tiny_study_config

    monkeypatch.chdir(tmp_path)  # the report goes to ./reports
    search = {"screen_top": 3, "finalists": 2, "rung_tokens": 2 * 32, "reduction_factor": 2,  # a rung every step
              "rerank_tasks": ["kjv_lastword"], "rerank_limit": 4}  # fmt: skip
    cfg = run_config_from_dict(tiny_study_config(tmp_path, budget=["50%", "75%"], search=search))
    result = run(cfg)
    study = load_study(cfg.storage_url, cfg.name)
    screened = study.user_attrs["screen"]
    assert {s["budget"] for s in screened} == {"50%", "75%"} and all(s["loss"] for s in screened)
    for budget in ("50%", "75%"):
        trials = [t for t in study.trials if t.user_attrs.get("budget") == budget]
        ranks = [t.user_attrs["screen_rank"] for t in trials]
        # the shortlist, best screen first: the best 3, then the best of each depth and class not among them
        assert ranks[:3] == [0, 1, 2] and ranks == sorted(ranks)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) >= 2 and all(max(t.intermediate_values) == 4 for t in complete)
        assert study.user_attrs["stability"][budget]["kendall_tau"] is not None
        winner = study.user_attrs["winners"][budget]
        assert winner["trial"] in {t.number for t in complete}
        model = AutoModelForCausalLM.from_pretrained(result.winners[budget])
        assert sum(p.numel() for p in model.parameters()) == winner["params"]
    kept = {
        t.number
        for t in study.trials
        if t.state == TrialState.COMPLETE and os.path.isdir(t.user_attrs["checkpoint"])
    }
    rerank = study.user_attrs["rerank"]
    assert {int(n) for n in rerank} == kept and all(0 <= s["kjv_lastword"] <= 1 for s in rerank.values())
    data = report_frames(study)
    scored = data.trials.set_index("number")["rerank.kjv_lastword"]
    assert all(scored[n] == rerank[str(n)]["kjv_lastword"] for n in kept)
    assert set(data.trials.loc[data.trials["pareto_params"], "budget"]) == {
        "50%",
        "75%",
    }  # the front spans both
    assert len(data.screen) == len(screened) and set(data.screen_facts) == {"50%", "75%"}
    page = result.report.read_text()
    assert 'id="screen"' in page and "budget 50%" in page and "winner of 75%" in page
    from nas.cli.main import main

    assert main(["space", cfg.teacher, "--study", cfg.name, "--storage", cfg.storage_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "screen_loss" in lines[1] and "screen_rank" in lines[1]
    rows = [line.split() for line in lines[2:]]  # by budget, then screen rank (the last column here)
    firsts = [next(r for r in rows if r[0] == b) for b in ("50%", "75%")]
    assert [float(r[-1]) for r in firsts] == [0.0, 0.0]


def test_the_shortlist_keeps_every_depth_and_class(setup):
    teacher, importance, val, arch = setup
    spaces = enumerate_budgets(arch, ["40%", "70%"], SPACE)
    screened = screen(teacher, importance, spaces, val)
    for budget, candidates in spaces.items():
        depths = {a.num_layers for a in candidates}
        assert len(depths) > 1  # the fixture has a real depth choice
        picked = shortlist(screened, 1, per_class=1, teacher=arch.to_dict())[budget]
        assert {s.arch["num_layers"] for s in picked} == depths  # no depth dropped, even with top = 1
        classes = {prune_class(a.to_dict(), arch.to_dict()) for a in candidates}
        assert {prune_class(s.arch, arch.to_dict()) for s in picked} == classes
        assert picked[0].rank == 0 and [s.rank for s in picked] == sorted(s.rank for s in picked)
        only_top = shortlist(screened, 1)[budget]
        assert len(only_top) == 1  # per_class = 0: the plain funnel
