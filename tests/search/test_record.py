"""The study record: one format keyed by budget, versioned, and older studies read (and resumed) through
one upgrade."""

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from nas.errors import ConfigError
from nas.pipeline import search
from nas.report.frames import report_frames
from nas.search.record import RECORD_VERSION, V1_ONLY, StudyRecord, upgrade
from nas.settings import run_config_from_dict
from nas.testing import tiny_study_config

# the user attributes of a two-budget study (50%, 75%) that `nas run` wrote before record versions
# (nas at main a53864e, via nas.pipeline.run on nas.testing.tiny_study_config)
V1 = json.loads((Path(__file__).parents[1] / "fixtures" / "study_v1_attrs.json").read_text())


def stored(attrs: dict) -> optuna.Study:
    study = optuna.create_study(study_name="old")  # in memory: the record is all that matters here
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    return study


def test_a_study_of_the_previous_format_reads_as_the_current_one():
    study = stored(V1)
    record = StudyRecord.read(study)
    assert record.record_version == RECORD_VERSION
    assert record.budgets == V1["budgets"] and record.budget == V1["budget"]
    assert record.stability == V1["stability_by_budget"] and record.winners == V1["winners"]
    assert record.winner == V1["winner"]  # the first of final_budgets
    assert "max_exhaustive" in V1["config"]["search"] and "max_exhaustive" in V1["identity"]["search"]
    assert "max_exhaustive" not in record.config["search"] | record.identity["search"]
    cfg = run_config_from_dict(record.config)  # what a worker of the old study loads
    assert cfg.budgets == list(V1["budgets"])
    data = report_frames(study)
    assert set(data.header["winners"]) == {"50%", "75%"} and set(data.stability_facts["budgets"]) == {
        "50%",
        "75%",
    }
    assert data.header["budgets"] == V1["budgets"]

    StudyRecord(rerank={}).write(study)  # the first write stores the whole record in the current format
    assert study.user_attrs["record_version"] == RECORD_VERSION
    assert all(study.user_attrs[key] is None for key in V1_ONLY)
    assert study.user_attrs["stability"] == V1["stability_by_budget"]
    assert StudyRecord.read(study) == StudyRecord(**{**vars(record), "rerank": {}})


def test_a_one_budget_study_of_the_previous_format_gets_its_budget_label():
    winner = {"trial": 0, "final_val_loss": 3.0, "dir": "/w"}  # written before winners carried a budget
    attrs = {
        "config": {"budget": "60%"},
        "budget": 100,
        "stability": {"k": 2, "trials": [0, 1]},
        "winner": winner,
    }
    record = StudyRecord.from_attrs(attrs)
    assert record.budgets == {"60%": 100} and record.stability == {"60%": attrs["stability"]}
    assert record.winners == {"60%": winner} and record.winner == winner
    assert upgrade({}) == {} and upgrade(record.attrs()) == record.attrs()  # current: unchanged


def test_a_study_of_a_newer_format_is_refused_with_one_line():
    with pytest.raises(ConfigError, match="newer nas .*record version 99.*upgrade nas"):
        StudyRecord.from_attrs({"record_version": 99})


def as_previous_format(study: optuna.Study) -> None:
    """Rewrite a study's record as the previous format stored it (both shapes, max_exhaustive, no version)."""
    attrs = study.user_attrs
    first = next(iter(attrs["budgets"]))
    for key in ("config", "identity"):
        study.set_user_attr(key, {**attrs[key], "search": {**attrs[key]["search"], "max_exhaustive": 64}})
    study.set_user_attr("budget", attrs["budgets"][first])
    study.set_user_attr("stability_by_budget", attrs["stability"])
    study.set_user_attr("stability", attrs["stability"][first])
    study.set_user_attr("record_version", None)


@pytest.mark.slow
def test_a_study_of_the_previous_format_resumes(tmp_path):
    config = tiny_study_config(tmp_path, search={"n_trials": 1, "pruner": "none"})
    _, study = search(run_config_from_dict(config))
    as_previous_format(study)
    assert StudyRecord.read(study).identity == study.user_attrs["identity"] | {
        "search": {k: v for k, v in study.user_attrs["identity"]["search"].items() if k != "max_exhaustive"}
    }
    ctx, study = search(run_config_from_dict({**config, "search": {**config["search"], "n_trials": 2}}))
    finished = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(finished) == 2 and finished[0].params != finished[1].params  # continued, not restarted
    assert study.user_attrs["record_version"] == RECORD_VERSION and study.user_attrs["budget"] is None
    assert set(StudyRecord.read(study).stability) == {"75%"}
