"""report_to: a tiny study streams its metrics.jsonl files and its progress to TensorBoard (read back
from the event files), and a tracker whose package is missing is one line naming the pip command."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import tomli_w

from nas.cli.main import main
from nas.io import read_log
from nas.testing import tiny_study_config
from nas.train.trackers import FIELDS


def scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the event files under `log_dir`: tag -> {step: value} (tensorboard's own reader)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in log_dir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def expected(run: str, metrics: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for record in read_log(metrics):
        for key in FIELDS:
            if record.get(key) is not None:
                out.setdefault(f"{run}/{key}", {})[record["step"]] = record[key]
    return out


@pytest.mark.slow
def test_a_study_with_tensorboard_writes_the_scalars_of_its_metrics_files(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import optuna

    monkeypatch.chdir(tmp_path)
    config = tiny_study_config(tmp_path, report_to=["tensorboard"], search={"n_trials": 2})
    (tmp_path / "tiny.toml").write_text(tomli_w.dumps(config))
    assert main(["run", str(tmp_path / "tiny.toml")]) == 0
    root = tmp_path / "studies" / "tiny"
    got = scalars(root / "tensorboard")
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{root}/study.db")
    want: dict[str, dict[int, float]] = {}
    for trial in study.trials:
        if trial.user_attrs.get("checkpoint"):
            want |= expected(
                f"trial_{trial.number}", Path(trial.user_attrs["checkpoint"]).parent / "metrics.jsonl"
            )
    want |= expected("final_75%", root / "final" / "metrics.jsonl")
    assert len([t for t in want if t.startswith("trial_")]) >= 2 * 4  # two trials' train and val fields
    for tag, values in want.items():  # float32 in the event file
        assert got[tag] == pytest.approx(values, rel=1e-6), tag
    done = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert max(got["study/trials_done"]) == done and got["study/trials_done"][done] == done
    best = min(t.value for t in study.trials if t.value is not None)
    assert got["study/best_val_loss"][done] == pytest.approx(best, rel=1e-6)
    assert set(got["study/horizon_tokens"].values()) == {4 * 2 * 32}  # 4 steps x batch x seq_len


def test_a_missing_tracker_is_one_line_with_the_pip_command(tmp_path, capsys):
    missing = next((t for t in ("wandb", "mlflow") if importlib.util.find_spec(t) is None), None)
    if missing is None:
        pytest.skip("wandb and mlflow are both installed")
    config = tiny_study_config(tmp_path, report_to=[missing])
    (tmp_path / "tiny.toml").write_text(tomli_w.dumps(config))
    capsys.readouterr()  # what writing the tiny teacher printed (transformers' progress bars) is not the CLI's
    assert main(["run", str(tmp_path / "tiny.toml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"nas: error: report_to = '{missing}' needs the {missing} package: pip install 'nas[{missing}]'"
    ]
    assert not (tmp_path / "studies" / "tiny" / "study.db").exists()  # refused before any work
