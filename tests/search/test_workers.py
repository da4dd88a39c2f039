"""Search workers on SQLite and PostgreSQL: two `nas worker` processes share one study; one is SIGKILLed
mid-trial, its trial goes stale (heartbeat), is failed and retried, and the study still evaluates every
candidate exactly once. Real PostgreSQL (a private cluster from tests/search/pg.py), real SQLite, real
subprocesses, real Optuna."""

import contextlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from nas.errors import ConfigError
from nas.model.arch import KNOBS
from nas.pipeline import search, worker
from nas.search.horizon_plan import tokens_per_step
from nas.search.study import StudyRecord, TrialRecord, make_storage
from nas.settings import run_config_from_dict
from nas.testing import tiny_study_config
from tests.search.pg import PostgresUnavailable, postgres_server

TIMEOUT = 90  # seconds for the workers to finish the study; a healthy run needs a fraction of it


@pytest.fixture(scope="module")
def postgres_server_url():
    """A throwaway PostgreSQL database for this module (skipped where PostgreSQL cannot start)."""
    pytest.importorskip("psycopg", reason="psycopg 3 is not installed (pip install -e '.[postgres]')")
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(postgres_server())
        except PostgresUnavailable as e:
            pytest.skip(f"no local PostgreSQL server: {e}")
        yield url


def start_worker(storage: str, study: str, log: Path) -> subprocess.Popen:
    # One thread each: two workers share this machine's cores, as two workers would share nothing on GPUs.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "nas.cli", "worker", "--storage", storage, "--study", study]
    return subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def set_search(study: optuna.Study, **values) -> None:
    """Change the search settings stored in the study (what a worker reads when it starts)."""
    config = StudyRecord.read(study).config
    StudyRecord(config={**config, "search": {**config["search"], **values}}).write(study)


def claimed(study: optuna.Study, states=(TrialState.RUNNING,)) -> list[int]:
    """Trials in one of `states` past their setup (latency measured: the heartbeat runs, training starts)."""
    trials = study.get_trials(states=states)
    return [t.number for t in trials if TrialRecord.read(t).latency_tokens_per_s is not None]


def files_with_mtimes(*paths: Path) -> dict[str, int]:
    found = {}
    for path in paths:
        for f in [path] if path.is_file() else sorted(path.rglob("*")):
            found[str(f)] = f.stat().st_mtime_ns
    return found


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shared/study.db"
    return request.getfixturevalue("postgres_server_url")


@pytest.mark.slow
def test_two_workers_finish_a_study_when_one_is_killed_mid_trial(tmp_path, storage_url):
    # budget 70%: three candidates (one done here, then one for each worker). When the survivor finishes
    # its own, nothing is left to start, so only the stale-trial check in its wait loop retries the killed one.
    overrides = {"budget": "70%", "search": {"n_trials": 1, "storage": storage_url}}
    ctx, study = search(run_config_from_dict(tiny_study_config(tmp_path, name="workers", **overrides)))
    shared = files_with_mtimes(ctx.cfg.root / "importance.safetensors", tmp_path / "cache")
    space = StudyRecord.read(study).candidates
    assert len(space) == 3 and len(study.get_trials()) == 3  # every candidate queued, once
    step = tokens_per_step(ctx.cfg)
    set_search(study, n_trials=0, horizon_tokens=10**5 * step, rung_tokens=10**5 * step)  # the victim's trial never ends
    logs = [tmp_path / "victim.log", tmp_path / "survivor.log"]
    victim = start_worker(storage_url, "workers", logs[0])
    survivor = None
    try:
        wait_for(lambda: claimed(study), TIMEOUT, "the first worker to start a trial")
        (victim_trial,) = claimed(study)
        set_search(study, horizon_tokens=4 * step, rung_tokens=2 * step)  # short trials from here on
        survivor = start_worker(storage_url, "workers", logs[1])
        started = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
        wait_for(lambda: len(claimed(study, started)) > 2, TIMEOUT, "the second worker to start a trial")
        assert victim.poll() is None and victim_trial in claimed(study), "the victim is mid-trial"
        victim.kill()  # SIGKILL: no chance to mark its trial failed
        victim.wait()
        assert survivor.wait(TIMEOUT) == 0, logs[1].read_text()[-3000:]
    finally:
        for proc in (victim, survivor):
            if proc is not None and proc.poll() is None:
                proc.kill()

    trials = study.get_trials()
    with warnings.catch_warnings():  # Optuna marks the retry bookkeeping experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retried = [RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials]
    retries = [t for t, number in zip(trials, retried, strict=True) if number is not None]
    assert len(retries) == 1, "exactly one trial (the killed worker's) went stale and was retried"
    killed = trials[retried[retries[0].number]]
    assert killed.number == victim_trial and killed.state == TrialState.FAIL
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == killed.params
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    keys = sorted(tuple(t.params[k] for k in KNOBS) for t in finished)
    assert keys == sorted(tuple(k) for k in space)  # every candidate exactly once
    # computed once by `nas search`, then only read by the workers
    assert files_with_mtimes(ctx.cfg.root / "importance.safetensors", tmp_path / "cache") == shared
    (ctx.cfg.root / "importance.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(ConfigError, match="importance file"):  # not shared: refuse rather than recompute
        worker(storage_url, "workers")


POP_ALL = """
import sys, time, optuna
from pathlib import Path
from nas.search.study import make_storage
study = optuna.load_study(study_name="race", storage=make_storage(sys.argv[1]))
Path(sys.argv[3]).touch()  # ready: imports done, storage open
while not Path(sys.argv[4]).exists():  # start together, so that the pops can overlap
    time.sleep(0.001)
popped = []
while (trial := study.ask()).number < int(sys.argv[2]):  # past the queue: a fresh trial, so stop
    popped.append(trial.number)
print(popped)
"""


@pytest.mark.slow
def test_the_sqlite_queue_hands_each_trial_to_one_worker(tmp_path):
    # Optuna's own pop is a read then an update; without BEGIN IMMEDIATE (make_storage) two processes
    # popping 300 queued trials got 6 of them both. Exclusivity is the claim: no trial popped twice, none
    # lost. How the two interleave is the scheduler's business (one may pop them all), so it is not asserted.
    url, queued = f"sqlite:///{tmp_path}/race.db", 200
    study = optuna.create_study(study_name="race", storage=make_storage(url))
    for x in range(queued):
        study.enqueue_trial({"x": x})
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", POP_ALL, url, str(queued), str(r), str(go)],
                              stdout=subprocess.PIPE, text=True) for r in ready]  # fmt: skip
    deadline = time.monotonic() + TIMEOUT
    while not all(r.exists() for r in ready) and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()
    popped = [json.loads(p.communicate(timeout=TIMEOUT * 2)[0]) for p in procs]
    every = popped[0] + popped[1]
    assert len(every) == len(set(every)), "a trial was handed to both workers"
    assert sorted(every) == list(range(queued)), "a queued trial was lost"


@pytest.mark.slow
def test_a_trial_in_a_two_process_group_scores_what_one_process_does(tmp_path):
    """`nas worker --nproc-per-node 2` trains its trial as one FSDP2 job over 2 gloo processes; the
    candidate's validation losses equal those of the same trial in a single process."""
    from nas.pipeline import prepare_context, record_study_attrs
    from nas.search.trial import enqueue_candidates, open_study

    search_cfg = {"n_trials": 1, "pruner": "none"}
    one = run_config_from_dict(tiny_study_config(tmp_path, name="one", search=search_cfg))
    _, single = search(one)
    group_cfg = run_config_from_dict(tiny_study_config(tmp_path, name="group", search=search_cfg))
    ctx = prepare_context(group_cfg)
    study = open_study(ctx)
    enqueue_candidates(study, ctx)
    record_study_attrs(study, ctx)  # created and queued, no trial run yet
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "nas.cli", "worker", "--storage", group_cfg.storage_url, "--study", "group"]
    done = subprocess.run(
        [*cmd, "--nproc-per-node", "2", "--max-trials", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (a,) = single.get_trials(states=(TrialState.COMPLETE,))
    (b,) = optuna.load_study(study_name="group", storage=group_cfg.storage_url).get_trials(
        states=(TrialState.COMPLETE,)
    )
    assert a.user_attrs["label"] == b.user_attrs["label"]
    for x, y in zip(a.user_attrs["curve"], b.user_attrs["curve"], strict=True):
        assert x["step"] == y["step"] and abs(x["val_loss"] - y["val_loss"]) < 1e-4, (x, y)
