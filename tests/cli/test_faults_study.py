"""Faults of the study commands (`nas space`, `search`, `run`, `worker`): each case one line on stderr,
exit code 2, nothing changed (the runner and the faulty inputs: `tests/cli/faults.py`)."""

from __future__ import annotations

import optuna
import pytest

from nas.cli.main import main
from nas.testing import write_tiny_teacher
from tests.cli.faults import check_fault, fault_table, one_line_error, tree_digest

# (case id, sub-command, argv builder, what the one line must say)
CASES = [
    # -- space
    ("space-budget-nan", "space", lambda w: ["space", w.teacher, "--budget", "nan"], "finite"),
    ("space-budget-inf", "space", lambda w: ["space", w.teacher, "--budget", "inf"], "finite"),
    ("space-budget-nan-share", "space", lambda w: ["space", w.teacher, "--budget", "nan%"], "budget share"),
    ("space-corrupt-config", "space", lambda w: ["space", w.model("config"), "--budget", "50%"], "config"),
    ("space-missing-teacher", "space", lambda w: ["space", str(w.root / "nope"), "--budget", "50%"], "does not exist"),
    # -- search
    ("search-unknown-scheme", "search", lambda w: ["search", w.study(), "--storage", "redis://localhost/0"], "unknown study storage"),
    ("search-unreachable-postgres", "search", lambda w: ["search", w.study(), "--storage", w.closed_postgres()], "Connection refused"),
    ("search-corrupt-sqlite", "search", lambda w: ["search", w.study(), "--storage", w.sqlite("garbage")], "not a readable SQLite database"),
    ("search-truncated-sqlite", "search", lambda w: ["search", w.study(), "--storage", w.sqlite("truncated")], "not a readable SQLite database"),
    ("search-out-dir-is-file", "search", lambda w: ["search", w.study(out_dir=w.file())], "existing file"),
    ("search-out-dir-is-teacher", "search", lambda w: ["search", w.study(out_dir=w.teacher)], "is the input"),
    ("search-truncated-teacher", "search", lambda w: ["search", w.study(teacher=w.model("truncated"))], "truncated"),
    ("search-binary-data", "search", lambda w: ["search", w.study(data={"sources": [{"path": w.binary()}]})], "not UTF-8 text"),
    ("search-seq-len", "search", lambda w: ["search", w.study(data={"seq_len": 2048})], "max_position_embeddings"),
    ("search-bad-device", "search", lambda w: ["search", w.study(device="cuda:3")], "--device cuda:3"),
    ("search-busy", "search", lambda w: ["search", w.study(out_dir=w.busy_dir())], "in use by another nas command (pid"),
    ("search-budget-nan", "search", lambda w: ["search", w.study(budget="nan")], "budget"),
    ("search-budget-inf", "search", lambda w: ["search", w.study(budget="inf")], "budget"),
    ("search-readonly", "search", lambda w: ["search", w.study(out_dir=str(w.readonly() / "s"))], "read-only"),
    # -- run
    ("run-corrupt-sqlite", "run", lambda w: ["run", w.study(), "--storage", w.sqlite("garbage")], "not a readable SQLite database"),
    ("run-unknown-scheme", "run", lambda w: ["run", w.study(), "--storage", "file:///tmp/x"], "unknown study storage"),
    ("run-unreachable-postgres", "run", lambda w: ["run", w.study(), "--storage", w.closed_postgres()], "Connection refused"),
    ("run-busy", "run", lambda w: ["run", w.study(out_dir=w.busy_dir())], "in use by another nas command (pid"),
    ("run-out-dir-inside-teacher", "run", lambda w: ["run", w.study(out_dir=w.teacher + "/study")], "inside the input"),
    ("run-missing-tensor", "run", lambda w: ["run", w.study(teacher=w.model("missing"))], "lacks 1 tensor"),
    # -- worker
    ("worker-unreachable-postgres", "worker", lambda w: ["worker", "--storage", w.closed_postgres(), "--study", "fault"], "Connection refused"),
    ("worker-unknown-scheme", "worker", lambda w: ["worker", "--storage", "mongodb://x/y", "--study", "fault"], "unknown study storage"),
    ("worker-corrupt-sqlite", "worker", lambda w: ["worker", "--storage", w.sqlite("garbage"), "--study", "s"], "not a readable SQLite database"),
    ("worker-truncated-sqlite", "worker", lambda w: ["worker", "--storage", w.sqlite("truncated"), "--study", "s"], "not a readable SQLite database"),
    ("worker-missing-study", "worker", lambda w: ["worker", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "nope"], "no study 'nope'"),
    ("worker-not-a-nas-study", "worker", lambda w: ["worker", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s"], "not created by nas"),
    ("worker-importance-missing", "worker", lambda w: ["worker", "--storage", w.nas_study(importance=False), "--study", "fault"], "importance file"),
    # -- issue 25: a numerically broken teacher (non-finite or non-floating weights)
    ("search-nan-embedding", "search", lambda w: ["search", w.study(teacher=w.broken("nan", "model.embed_tokens.weight"))], "tensor model.embed_tokens.weight holds 1 NaN/inf"),
    # -- files and databases that are not nas's: refused, read-only
    ("worker-foreign-sqlite", "worker", lambda w: ["worker", "--storage", w.foreign_db(), "--study", "s"], "database of other tables (notes)"),
    ("search-foreign-sqlite", "search", lambda w: ["search", w.study(), "--storage", w.foreign_db()], "nas never writes into it"),
    # -- records without usable text: counted, refused past max_skipped_share
    ("search-records-all-numbers", "search", lambda w: ["search", w.study(data={"sources": [{"path": w.lossy_jsonl(lambda r: {"text": 3.5}, every=1)}]})], "125 records skipped"),
    # -- library errors turned into one line where nas calls the library
    ("run-final-batch-not-multiple", "run", lambda w: ["run", w.study(final={"batch_size": 5}), "--nproc-per-node", "2"], "final distillation's batch_size 5"),
    ("worker-old-optuna-schema", "worker", lambda w: ["worker", "--storage", w.old_optuna_db(), "--study", "s"], "schema of another Optuna version"),
    # -- every study setting checked before anything is computed, naming the TOML field
    ("search-max-memory-unreadable", "search", lambda w: ["search", w.study(constraints={"max_memory": "12 parsecs"})], "constraints.max_memory"),
    ("run-max-memory-too-small", "run", lambda w: ["run", w.study(constraints={"max_memory": "2KB"})], "constraints.max_memory = '2KB'"),
    ("search-budget-above-teacher", "search", lambda w: ["search", w.study(budget="3B")], "budget = '3B'"),
    ("run-budget-too-small", "run", lambda w: ["run", w.study(budget=["75%", "40"])], "budget = ['75%', '40']"),
    ("search-tpe-two-budgets", "search", lambda w: ["search", w.study(budget=["50%", "75%"], search={"strategy": "tpe"})], "search.strategy = tpe"),
    # -- messages that name the real cause
    ("space-config-no-vocab", "space", lambda w: ["space", w.broken("no-field", "vocab_size"), "--budget", "50%"], "lacks vocab_size"),
    ("search-study-is-dir", "search", lambda w: ["search", str(w.root)], "is a directory"),
    ("run-study-is-dir", "run", lambda w: ["run", str(w.base)], "is a directory; give the study's TOML file"),
    # -- noticed in passing
    ("worker-max-trials-negative", "worker", lambda w: ["worker", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--max-trials", "-2"], "--max-trials must be at least 1"),
    ("worker-max-trials-zero", "worker", lambda w: ["worker", "--storage", f"sqlite:///{w.base / 'study.db'}", "--study", "s", "--max-trials", "0"], "--max-trials must be at least 1"),
    # -- issue 33: special files (a device, a FIFO) as outputs and inputs, one line before any read
    ("search-study-fifo", "search", lambda w: ["search", w.fifo("s.toml")], "study file"),
]  # fmt: skip


@fault_table(CASES)
def test_fault_is_one_line_exit_2_and_changes_nothing(case, workspace, capsys, monkeypatch):
    check_fault(case, workspace, capsys, monkeypatch)


@pytest.mark.slow
def test_a_study_with_another_budget_or_teacher_never_reuses_its_trials(workspace, capsys):
    w = workspace
    assert main(["search", w.study(search={"n_trials": 1})]) == 0
    before = tree_digest(w.root / "studies")
    line = one_line_error(capsys, ["search", w.study(budget="60%", search={"n_trials": 1})])
    assert 'budget: "75%" -> "60%"' in line and "new name" in line and "--restart" in line
    teacher = w.root / "other-teacher"
    write_tiny_teacher(teacher, seed=1, num_layers=3)
    line = one_line_error(capsys, ["search", w.study(teacher=str(teacher), search={"n_trials": 1})])
    assert "teacher_arch.num_layers: 4 -> 3" in line
    assert tree_digest(w.root / "studies") == before
    # raising n_trials continues the same study
    assert main(["search", w.study(search={"n_trials": 2})]) == 0
    study = optuna.load_study(study_name="fault", storage=f"sqlite:///{w.root / 'studies/fault/study.db'}")
    assert len([t for t in study.trials if t.state.is_finished()]) >= 2
    assert main(["search", w.study(budget="60%", search={"n_trials": 1}), "--restart"]) == 0
