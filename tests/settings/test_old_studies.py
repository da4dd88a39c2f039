"""What older nas wrote still loads: a study TOML and a study database from before `search.sampler` was
named `search.strategy` (both from nas at commit 78b18e6), whose horizon is in steps (`search.horizon_steps`,
`eval_every`: `nas.settings.legacy` reads them as tokens)."""

import json
import shutil
from pathlib import Path

import optuna
import pytest
import tomli_w

from nas.cli.main import main
from nas.errors import ConfigError
from nas.pipeline.identity import check_study, search_identity, study_identity
from nas.search.horizon_plan import resolve
from nas.search.record import StudyRecord
from nas.settings import load_run_config, run_config_from_dict
from nas.settings.legacy import identity_in_tokens
from nas.testing import tiny_study_config

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
    assert search_identity(cfg.search) == identity_in_tokens(record.identity)["search"]
    assert record.winners["75%"]["final_val_loss"] > 0
    out = tmp_path / "old.html"
    assert main(["report", "--study", "old", "--storage", storage, "--out", str(out)]) == 0
    assert "exhaustive" in out.read_text() or "every candidate" in out.read_text()


def test_an_old_study_toml_with_its_horizon_in_steps_loads_as_the_same_horizon_in_tokens(tmp_path):
    config = tiny_study_config(tmp_path, distill={"batch_size": 3, "grad_accum": 2})
    search = {k: v for k, v in config["search"].items() if k not in ("horizon_tokens", "rung_tokens")}
    old = tmp_path / "old.toml"
    old.write_text(tomli_w.dumps({**config, "search": {**search, "horizon_steps": 5, "eval_every": 2}}))
    cfg = load_run_config(old)
    per_step = 3 * 2 * 32  # batch_size x grad_accum x seq_len
    assert (cfg.search.horizon_tokens, cfg.search.rung_tokens) == (5 * per_step, 2 * per_step)
    horizon = resolve(cfg)
    assert (horizon.steps, horizon.rung_steps) == (5, 2)  # the steps the old study ran
    assert "horizon_steps" not in cfg.to_dict()["search"] and run_config_from_dict(cfg.to_dict()) == cfg
    both = {**config, "search": {**config["search"], "horizon_steps": 5}}
    with pytest.raises(ConfigError, match="horizon_tokens or .*horizon_steps, not both"):
        run_config_from_dict(both)
    with pytest.raises(ConfigError, match="horizon_steps .*>= 1, got 0"):
        run_config_from_dict({**config, "search": {**search, "horizon_steps": 0}})


def test_an_old_study_database_with_its_horizon_in_steps_resumes(tmp_path):
    """The old study moved to this machine (its teacher and corpus here): its stored identity, with the
    horizon in steps, is the identity this nas computes from its stored config, so a resume goes on; a
    changed horizon is still refused."""
    here = tiny_study_config(tmp_path)
    db = tmp_path / "study.db"
    shutil.copy(OLD_DB, db)
    study = optuna.load_study(study_name="old", storage=f"sqlite:///{db}")
    moved = json.loads(json.dumps(study.user_attrs).replace("/tmp/olddb/root/teacher", here["teacher"]))
    record = StudyRecord.from_attrs(moved)
    assert record.identity["search"]["horizon_steps"] == 4 and record.config["search"]["horizon_steps"] == 4
    sources = {"sources": here["data"]["sources"], "cache_dir": here["data"]["cache_dir"]}
    stored = {**record.config, "out_dir": str(tmp_path), "data": {**record.config["data"], **sources}}
    stored["search"] = {**stored["search"], "storage": f"sqlite:///{db}"}
    stored["data"].pop("phases")
    cfg = run_config_from_dict(stored)
    identity = study_identity(cfg)  # what this nas computes for the stored config
    study.set_user_attr("identity", {**moved["identity"], "data": identity["data"]})  # the files here
    assert check_study(cfg) == identity  # the stored one, in steps, is read in tokens: a resume goes on
    assert identity["search"]["horizon_tokens"] == 4 * 2 * 32 and identity["distill"]["steps"] == 4
    longer = cfg.replace(search=cfg.search.replace(horizon_tokens=5 * 2 * 32))
    with pytest.raises(ConfigError, match=r"search.horizon_tokens: 256 -> 320"):
        check_study(longer)
