"""Search strategies (`nas.search.strategy`): one contract over every registered strategy, and a new
strategy that needs nothing outside its class and its registration."""

import optuna
import pytest
from optuna.trial import TrialState

from nas.errors import ConfigError
from nas.model.arch import Arch
from nas.model.size import count_budget_params, count_params
from nas.pipeline import finalize, search
from nas.prune.space import enumerate_budgets, parse_budget
from nas.search.record import RECORD_VERSION, StudyRecord, TrialRecord, arch_key
from nas.search.strategy import STRATEGIES, ScreenFirst, register, strategy_for
from nas.settings import SAMPLERS, run_config_from_dict
from nas.testing import tiny_study_config


class LargestFirst(ScreenFirst):
    """A strategy written outside nas: every eligible candidate, largest first, none stopped early."""

    def order(self, screened):
        return sorted((s for s in screened if not s.rejected), key=lambda s: -s.params)

    def pruner(self, sizes):
        return optuna.pruners.NopPruner()

    def description(self):
        return "largest first, no pruner"


@pytest.fixture
def largest_first():
    register("largest-first")(LargestFirst)  # its registration: the only line besides the class
    yield LargestFirst
    del STRATEGIES["largest-first"]
    SAMPLERS.remove("largest-first")


BUILT_IN = sorted({cls.name for cls in STRATEGIES.values()})  # one case per class ("auto" is "funnel")


def test_settings_offer_exactly_the_registered_strategies(largest_first):
    assert set(SAMPLERS) == set(STRATEGIES) and {"auto", "funnel", "exhaustive", "tpe"} <= set(STRATEGIES)
    assert STRATEGIES["auto"] is STRATEGIES["funnel"]
    cfg = run_config_from_dict({**tiny_config_stub(), "search": {"sampler": "largest-first"}})
    assert isinstance(strategy_for(cfg), LargestFirst)
    with pytest.raises(
        ConfigError, match=r"search.sampler: must be one of 'auto', .*'largest-first', got 'x'"
    ):
        run_config_from_dict({**tiny_config_stub(), "search": {"sampler": "x"}})


def tiny_config_stub() -> dict:
    return {"name": "s", "teacher": "t", "data": {"sources": [{"path": "corpus.jsonl"}]}}


def check_contract(cfg, ctx, study) -> None:
    """Every evaluated trial is a candidate of its budget's space and within the budget, no candidate is
    evaluated twice, and the winner of the budget is recorded."""
    teacher = ctx.teacher_arch
    spaces = enumerate_budgets(teacher, cfg.budgets, cfg.space)
    evaluated = [
        t
        for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
        if not TrialRecord.read(t).infeasible
    ]
    assert evaluated
    keys = []
    for t in evaluated:
        record = TrialRecord.read(t)
        budget = record.budget or cfg.budgets[0]  # a sampled strategy labels no budget: it has one
        arch = Arch.from_dict(record.arch)
        assert arch_key(arch) in {arch_key(a) for a in spaces[budget]}
        assert count_budget_params(arch, cfg.space.budget_kind) <= parse_budget(budget, teacher)
        keys.append(arch_key(arch))
    assert len(keys) == len(set(keys))
    winner = finalize(ctx, study)
    record = StudyRecord.read(study)
    assert record.record_version == RECORD_VERSION and record.sampler == ctx.strategy.description()
    assert record.strategy == {"name": ctx.strategy.name, "queued": ctx.strategy.queued,
                               "description": ctx.strategy.description()}  # fmt: skip
    assert list(record.winners) == cfg.budgets and record.winners[cfg.budgets[0]]["dir"] == winner["dir"]
    assert winner["trial"] in {t.number for t in evaluated if t.state == TrialState.COMPLETE}
    assert set(record.stability) == set(cfg.budgets)


@pytest.mark.slow
@pytest.mark.parametrize("name", [*BUILT_IN, "largest-first"])
def test_every_strategy_keeps_the_contract(name, request, tmp_path):
    if name == "largest-first":
        request.getfixturevalue("largest_first")
    config = tiny_study_config(tmp_path, search={"sampler": name, "n_trials": 3, "screen_top": 3})
    cfg = run_config_from_dict(config)
    ctx, study = search(cfg)
    assert type(ctx.strategy) is STRATEGIES[name]
    check_contract(cfg, ctx, study)
    if name == "largest-first":  # its own choices took effect: largest first, nothing stopped
        sizes = [count_params(a) for a in ctx.candidates]
        assert sizes == sorted(sizes, reverse=True) and len(sizes) > 3
        ran = sorted((t for t in study.trials if t.state != TrialState.WAITING), key=lambda t: t.number)
        assert [arch_key(TrialRecord.read(t).arch) for t in ran] == [arch_key(a) for a in ctx.candidates[:3]]
        assert all(t.state == TrialState.COMPLETE for t in ran)
        assert all(max(t.intermediate_values) == cfg.search.horizon_steps for t in ran)
