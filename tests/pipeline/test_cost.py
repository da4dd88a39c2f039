"""`nas plan`'s time and cost table: the tokens it plans are the tokens a tiny study then spends (the adaptive
horizon within its stated worst case), and the arithmetic of hours and GPU-hours."""

from __future__ import annotations

import importlib.util

import pytest
import tomli_w

from nas.cli.main import main
from nas.errors import ConfigError
from nas.io import read_log
from nas.pipeline.cost import StageCost, Throughput, format_cost, kd_flops_per_token, plan_cost, throughput
from nas.settings import load_run_config, run_config_from_dict
from nas.testing import tiny_study_config


def test_hours_and_gpu_hours_follow_the_flops_and_the_gpus():
    speed = Throughput("H100", 989e12 * 0.5, "test")
    trials = StageCost("trials", 4, 10**9, 3600 * 989e12 * 0.5 * 8, parallel=True)
    horizon = StageCost("adaptive horizon", 3, 10**9, 3600 * 989e12 * 0.5 * 2, parallel=False)
    assert trials.gpu_hours(speed) == pytest.approx(8) and trials.hours(speed, 4) == pytest.approx(2)
    assert horizon.hours(speed, 4) == pytest.approx(2)  # runs in the study's own process, on one GPU
    assert kd_flops_per_token(8, 4, checkpointing=False) == 2 * 8 + 6 * 4
    assert kd_flops_per_token(8, 4, checkpointing=True, cached_teacher=True) == 8 * 4
    table = format_cost([trials, horizon], speed, 4, "s")
    assert "total" in table.splitlines()[-1] and " 10.0 " in table.splitlines()[-1]  # 8 + 2 GPU-hours


def test_an_unknown_gpu_needs_a_measured_throughput(tmp_path):
    cfg = run_config_from_dict(tiny_study_config(tmp_path))
    with pytest.raises(ConfigError, match="--tokens-per-s"):
        throughput("RTX 9090", cfg, None, None)
    assert throughput("NVIDIA H200", cfg, 0.4, None).flops_per_s == pytest.approx(989e12 * 0.4)
    measured = throughput("RTX 9090", cfg, None, 1000.0)
    assert "measured" in measured.source and measured.flops_per_s > 0


@pytest.mark.slow
def test_planned_tokens_are_the_tokens_a_tiny_study_spends(tmp_path, monkeypatch, capsys):
    import optuna

    from nas.search.record import StudyRecord, TrialRecord

    monkeypatch.chdir(tmp_path)
    search = {"n_trials": 3, "pruner": "none", "adaptive": True, "stable_top": 2, "finalists": 2}
    config = tiny_study_config(tmp_path, search=search, report_to=["tensorboard"])
    (tmp_path / "tiny.toml").write_text(tomli_w.dumps(config))
    assert main(["plan", str(tmp_path / "tiny.toml"), "--no-memory", "--gpu", "H100", "--gpus", "2"]) == 0
    assert "time and cost of study tiny on 2 x H100" in capsys.readouterr().out
    planned = {s.stage: s for s in plan_cost(run_config_from_dict(config))}
    assert main(["run", str(tmp_path / "tiny.toml")]) == 0
    root = tmp_path / "studies" / "tiny"
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{root}/study.db")
    record = StudyRecord.read(study)
    assert planned["screen"].runs == len(record.screen)
    trials = [TrialRecord.read(t).tokens for t in study.trials if TrialRecord.read(t).tokens]
    assert (
        (len(trials), sum(trials))
        == (planned["trials"].runs, planned["trials"].tokens)
        == (3, 3 * 4 * 2 * 32)
    )
    spent = sum(h.get("tokens", 0) for h in (record.horizon or {}).values())
    # the default floor (4 horizons): both finalists go through the rungs at 2x and 4x; at worst on to 8x
    assert 2 * 4 * 2 * 32 * 3 <= spent <= planned["adaptive horizon"].tokens == 2 * 4 * 2 * 32 * 7
    final = read_log(root / "final" / "metrics.jsonl")[-1]["tokens"]
    assert final == planned["final distillation"].tokens == 4 * 2 * 32
    if importlib.util.find_spec("tensorboard"):  # the trackers see where the horizon stopped
        from tests.train.test_trackers import scalars

        last = record.horizon["75%"]["rungs"][-1]
        assert scalars(root / "tensorboard")["study/horizon_tokens/75%"] == {3: last["tokens"]}


@pytest.mark.slow  # ~10 s: the enumeration of Qwen3-8B's 2,242-candidate space at 50%
def test_nas_plan_prints_the_time_table_of_qwen3_8b_at_half(capsys, monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).parents[2])  # the study names its teacher from the repository root
    study = "benchmarks/configs/Qwen3-8B/study-50pct.toml"
    assert main(["plan", study, "--gpu", "H200", "--gpus", "8", "--no-memory"]) == 0
    rows = {line.split("  ")[0].strip(): line for line in capsys.readouterr().out.splitlines()}
    stages = {s.stage: s for s in plan_cost(load_run_config(study))}
    assert stages["screen"].runs == 2242  # the space README and DESIGN.md cite
    horizon = stages["trials"].tokens // stages["trials"].runs
    assert horizon == pytest.approx(0.225 * 4.1e9, rel=0.01)  # 0.225 tokens a parameter of the largest budget
    assert f"{horizon:,} tokens each" in rows["trials"]
    for name in ("importance", "screen", "trials", "adaptive horizon", "final distillation", "total"):
        assert name in rows
