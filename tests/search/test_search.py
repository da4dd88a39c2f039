"""The search end to end on a tiny teacher and real text (real Optuna, real SQLite)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from optuna.trial import TrialState

from nas.model.arch import KNOBS, Arch
from nas.pipeline import finalize, search, worker
from nas.search.horizon_plan import tokens_per_step
from nas.search.study import StudyRecord, TrialRecord, kendall_tau
from nas.search.trial import trial_dir
from nas.settings import run_config_from_dict
from nas.testing import tiny_study_config


def finished(study):
    return study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))


def candidate_keys(trials):
    return [tuple(t.params[k] for k in KNOBS) for t in trials]


def duplicates(study):
    """Sampled trials that drew a candidate another trial already had (failed, not evaluated)."""
    return [
        t for t in study.get_trials(states=(TrialState.FAIL,)) if TrialRecord.read(t).duplicate_of is not None
    ]


@pytest.mark.slow
def test_study_with_two_trials_is_continued_to_four_without_repeats(tmp_path):
    no_pruning = {"pruner": "none"}  # every trial completes, so the top-k model clean-up has work to do
    _, study = search(run_config_from_dict(tiny_study_config(tmp_path, search={"n_trials": 2, **no_pruning})))
    assert len(finished(study)) == 2
    ctx, study = search(
        run_config_from_dict(tiny_study_config(tmp_path, search={"n_trials": 4, **no_pruning}))
    )
    keys = candidate_keys(finished(study))
    assert len(keys) == 4 and len(set(keys)) == 4
    assert keys[:2] == [tuple(getattr(a, k) for k in KNOBS) for a in ctx.candidates[:2]]  # priority order
    for trial in study.get_trials(states=(TrialState.COMPLETE,)):
        record = TrialRecord.read(trial)
        assert record.params > 0 and record.latency_tokens_per_s > 0
        assert record.kd_tokens_per_s == record.kd_speed["tokens_per_s"] > 0 and record.kd_mfu is None  # CPU
        assert record.kd_speed["write_seconds"] > 0 and record.kernel_paths == {"attention": "sdpa"}
        assert [p["step"] for p in record.curve] == [2, 4]
        assert sorted(trial.intermediate_values) == [2, 4]
    complete = sorted(study.get_trials(states=(TrialState.COMPLETE,)), key=lambda t: t.value)
    kept = [os.path.isdir(TrialRecord.read(t).checkpoint) for t in complete]
    assert len(complete) == 4 and kept == [
        True,
        True,
        True,
        False,
    ]  # only the top_k short-run models stay on disk


@pytest.mark.slow
def test_winner_directory_loads_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    ctx, study = search(run_config_from_dict(tiny_study_config(tmp_path, search={"n_trials": 2})))
    winner = finalize(ctx, study)
    model = AutoModelForCausalLM.from_pretrained(winner["dir"])
    assert sum(p.numel() for p in model.parameters()) == winner["params"]
    assert StudyRecord.read(study).winner["final_val_loss"] == winner["final_val_loss"]
    assert (tmp_path / "studies" / "tiny" / "winner" / "nas_pruning.json").is_file()


def set_search(study, **values):
    """Change the search settings stored in the study (what every worker reads)."""
    config = StudyRecord.read(study).config
    StudyRecord(config={**config, "search": {**config["search"], **values}}).write(study)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def training(study) -> list:
    """Running trials past their setup (latency measured): their worker is distilling the candidate."""
    running = study.get_trials(states=(TrialState.RUNNING,))
    return [t for t in running if TrialRecord.read(t).latency_tokens_per_s is not None]


@pytest.mark.slow
def test_a_trial_killed_mid_run_is_retried_from_its_checkpoint(tmp_path):
    ctx, study = search(run_config_from_dict(tiny_study_config(tmp_path, search={"n_trials": 1})))
    storage = ctx.cfg.storage_url
    step = tokens_per_step(ctx.cfg)
    set_search(study, n_trials=0, horizon_tokens=100000 * step, rung_tokens=50000 * step)  # the next trial runs "forever"
    code = f"from nas.pipeline import worker; worker({storage!r}, 'tiny', max_trials=1)"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        wait_for(lambda: training(study), 120, "the worker to start a trial")
        (killed,) = training(study)
        checkpoints = trial_dir(ctx, Arch.from_dict(TrialRecord.read(killed).arch)) / "checkpoints"
        wait_for(lambda: any(checkpoints.glob("*/*")), 120, "the trial's first checkpoint")
    finally:
        proc.send_signal(signal.SIGKILL)  # killed mid-trial: no chance to mark the trial failed
        proc.wait()
    assert study.get_trials()[killed.number].state == TrialState.RUNNING
    set_search(study, horizon_tokens=4 * step, rung_tokens=2 * step)
    # nothing waits here: this worker evaluates the rest of the queue, then (nothing left to start, one trial
    # RUNNING) its own stale-trial check fails the killed trial once its heartbeat is stale, and retries it
    study = worker(storage, "tiny")
    assert study.get_trials()[killed.number].state == TrialState.FAIL
    retried = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retried) == 1 and retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retried[0].params == killed.params
    keys = candidate_keys(finished(study))
    assert sorted(keys) == sorted(tuple(getattr(a, k) for k in KNOBS) for a in ctx.candidates)  # each once


def test_kendall_tau():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)


@pytest.mark.slow
def test_a_candidate_that_keeps_failing_is_given_up_after_max_retry(tmp_path):
    # logits divided by a temperature this small overflow: every candidate's KD loss is NaN at step 1
    config = tiny_study_config(
        tmp_path, search={"n_trials": 2, "max_retry": 1}, distill={"temperature": 1e-30}
    )
    ctx, study = search(run_config_from_dict(config))  # returns instead of retrying forever
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert not finished(study) and failed
    per_candidate = {}
    for trial in failed:
        key = tuple(TrialRecord.read(trial).arch[k] for k in KNOBS)
        per_candidate[key] = per_candidate.get(key, 0) + 1
    assert per_candidate == {tuple(getattr(a, k) for k in KNOBS): 2 for a in ctx.candidates}


@pytest.mark.slow
def test_sampled_search_counts_only_candidates_and_never_repeats_one(tmp_path):
    config = tiny_study_config(tmp_path, search={"strategy": "tpe", "n_trials": 4, "pruner": "none"})
    ctx, study = search(run_config_from_dict(config))
    assert not ctx.exhaustive
    feasible = [t for t in finished(study) if not TrialRecord.read(t).infeasible]
    assert len(feasible) == 4
    keys = [tuple(TrialRecord.read(t).arch[k] for k in KNOBS) for t in feasible]
    assert len(set(keys)) == 4 and set(keys) <= {tuple(getattr(a, k) for k in KNOBS) for a in ctx.candidates}
    # sampled shapes outside the budget window: a violated constraint, no training, not counted
    infeasible = [t for t in study.get_trials() if TrialRecord.read(t).infeasible]
    assert all(TrialRecord.read(t).curve is None for t in infeasible)
    assert all(t.constraints["budget"] > 0 for t in infeasible)
    assert len(study.get_trials()) == len(feasible) + len(infeasible) + len(duplicates(study))


@pytest.mark.slow
def test_teacher_correction_runs_once_per_study_and_is_reused(tmp_path):
    config = tiny_study_config(tmp_path, correct_steps=2, search={"n_trials": 1})
    search(run_config_from_dict(config))
    corrected = tmp_path / "studies" / "tiny" / "corrected" / "model" / "model.safetensors"
    assert corrected.is_file()
    stamp = corrected.stat().st_mtime_ns
    ctx, _ = search(run_config_from_dict({**config, "search": {**config["search"], "n_trials": 2}}))
    assert corrected.stat().st_mtime_ns == stamp  # the continued study did not correct again
    from safetensors.torch import load_file

    weights = load_file(corrected)
    shared = [n for n in ctx.teacher.state_dict() if n in weights]
    assert len(shared) > 10  # the search's teacher is the corrected model
    assert all(torch.equal(ctx.teacher.state_dict()[n], weights[n]) for n in shared)
