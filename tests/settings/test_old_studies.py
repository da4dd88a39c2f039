"""What older nas wrote still loads: a study TOML and a study database from before `search.sampler` was
named `search.strategy` (both from nas at commit 78b18e6)."""

import shutil
from pathlib import Path

import optuna

from nas.cli.main import main
from nas.pipeline.identity import search_identity
from nas.search.record import StudyRecord
from nas.settings import load_run_config, run_config_from_dict

DATA = Path(__file__).parents[1] / "fixtures"
# studies/example.toml as it was at 78b18e6 (`sampler = "auto"` in [search])
OLD_TOML = DATA / "example_before_strategy.toml"
# `nas.pipeline.run` at 78b18e6 on `nas.testing.tiny_study_config` (budget 75%, search: sampler =
# "exhaustive", n_trials = 2, pruner = "none"; final steps = 2), then VACUUM: the SQLite file as it was left
OLD_DB = DATA / "study_before_strategy.db"


def test_an_old_study_toml_still_loads():
    assert 'sampler = "auto"' in OLD_TOML.read_text()
    cfg = load_run_config(OLD_TOML)
    assert cfg.search.strategy == "auto" and "sampler" not in cfg.to_dict()["search"]
    assert cfg.budgets == ["25%", "50%", "75%"]


def test_an_old_study_database_still_loads(tmp_path, capsys):
    db = tmp_path / "study.db"
    shutil.copy(OLD_DB, db)
    storage = f"sqlite:///{db}"
    study = optuna.load_study(study_name="old", storage=storage)
    record = StudyRecord.read(study)
    assert record.config["search"]["sampler"] == "exhaustive"  # stored under the older name
    cfg = run_config_from_dict(record.config)  # what a worker of the old study loads
    assert cfg.search.strategy == "exhaustive"
    # the stored identity is what this nas computes from the stored settings: a resume is not refused
    assert search_identity(cfg.search) == record.identity["search"]
    assert record.winners["75%"]["final_val_loss"] > 0
    out = tmp_path / "old.html"
    assert main(["report", "--study", "old", "--storage", storage, "--out", str(out)]) == 0
    assert "exhaustive" in out.read_text() or "every candidate" in out.read_text()
