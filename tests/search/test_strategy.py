"""Search strategies (`nas.search.strategy`): one contract over every built-in strategy and a strategy
written outside nas (passed as an instance), and the setting that names one (`search.strategy`, older
`search.sampler`)."""

import optuna
import pytest
from optuna.trial import TrialState

from nas.errors import ConfigError
from nas.model.arch import Arch
from nas.model.size import count_budget_params, count_params
from nas.pipeline import finalize, search
from nas.prune.space import enumerate_budgets, parse_budget
from nas.search.record import RECORD_VERSION, StudyRecord, TrialRecord, arch_key
from nas.search.strategy import STRATEGIES, ScreenFirst, Strategy, strategy_for
from nas.settings import STRATEGIES as STRATEGY_NAMES
from nas.settings import run_config_from_dict
from nas.testing import tiny_study_config


class LargestFirst(ScreenFirst):
    """A strategy written outside nas: every eligible candidate, largest first, none stopped early."""

    name = "largest-first"

    def order(self, screened, teacher):
        return sorted((s for s in screened if not s.rejected), key=lambda s: -s.params)

    def pruner(self, sizes):
        return optuna.pruners.NopPruner()

    def description(self):
        return "largest first, no pruner"


BUILT_IN = sorted({cls.name for cls in STRATEGIES.values()})  # one case per class ("auto" is "funnel")


def test_settings_offer_exactly_the_built_in_strategies():
    assert set(STRATEGY_NAMES) == set(STRATEGIES) == {"auto", "funnel", "exhaustive", "tpe"}
    assert STRATEGIES["auto"] is STRATEGIES["funnel"]
    assert all(issubclass(cls, Strategy) and cls.name in STRATEGIES for cls in STRATEGIES.values())
    cfg = run_config_from_dict({**tiny_config_stub(), "search": {"strategy": "exhaustive"}})
    assert type(strategy_for(cfg)).__name__ == "Exhaustive"
    with pytest.raises(ConfigError, match=r"search.strategy must be one of 'auto', 'funnel', 'exhaustive' or 'tpe', got 'x'"):
        run_config_from_dict({**tiny_config_stub(), "search": {"strategy": "x"}})


def test_the_older_name_search_sampler_still_loads():
    cfg = run_config_from_dict({**tiny_config_stub(), "search": {"sampler": "tpe"}})
    assert cfg.search.strategy == "tpe" and "sampler" not in cfg.search.to_dict()
    with pytest.raises(ConfigError, match="search.strategy or .*search.sampler, not both"):
        run_config_from_dict({**tiny_config_stub(), "search": {"sampler": "tpe", "strategy": "auto"}})


def test_a_strategy_is_an_abstract_base():
    with pytest.raises(TypeError):
        Strategy(run_config_from_dict(tiny_config_stub()))  # `candidates` is abstract
    with pytest.raises(TypeError):
        ScreenFirst(run_config_from_dict(tiny_config_stub()))  # `order` is abstract


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
def test_every_strategy_keeps_the_contract(name, tmp_path):
    strategy = "auto" if name == "largest-first" else name  # what workers would rebuild; unused here
    config = tiny_study_config(tmp_path, search={"strategy": strategy, "n_trials": 3, "screen_top": 3})
    cfg = run_config_from_dict(config)
    ctx, study = search(cfg, strategy=LargestFirst(cfg) if name == "largest-first" else None)
    assert type(ctx.strategy) is (LargestFirst if name == "largest-first" else STRATEGIES[name])
    check_contract(cfg, ctx, study)
    if name == "largest-first":  # its own choices took effect: largest first, nothing stopped
        sizes = [count_params(a) for a in ctx.candidates]
        assert sizes == sorted(sizes, reverse=True) and len(sizes) > 3
        ran = sorted((t for t in study.trials if t.state != TrialState.WAITING), key=lambda t: t.number)
        assert [arch_key(TrialRecord.read(t).arch) for t in ran] == [arch_key(a) for a in ctx.candidates[:3]]
        assert all(t.state == TrialState.COMPLETE for t in ran)
        assert all(max(t.intermediate_values) == ctx.horizon.steps for t in ran)
